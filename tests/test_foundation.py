"""Models, FLOPs, params files, configs and the CLIs (train_cifar.py / test.py)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from ke_tf.config import ConfigError, apply_overrides, from_dict, load_config
from ke_tf.io.params import ParamsError, apply_params, load_params, save_params
from ke_tf.models import build_from_spec, build_model, model_spec
from ke_tf.surgery.flops import complexity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "arch,shape,classes,params,macs",
    [
        ("resnet20", (32, 32, 3), 10, 269_722, 40_551_040),
        ("resnet56", (32, 32, 3), 10, 853_018, 125_485_696),  # published 0.85M / 125.5M
        ("resnet110", (32, 32, 3), 10, 1_727_962, 252_887_680),  # published 1.7M / 253M
        ("resnet18", (224, 224, 3), 1000, 11_689_512, 1_814_073_344),  # published 11.69M / 1.82G
        ("resnet50", (224, 224, 3), 1000, 25_557_032, 4_089_184_256),
    ],
)
def test_published_parameter_and_mac_counts(arch, shape, classes, params, macs):
    model = build_model(arch, classes, shape)
    assert complexity(model) == {"params": params, "macs": macs}
    assert model.count_params() - params == sum(int(np.prod(v.shape)) for v in model.non_trainable_weights)


def test_resnet18_any_input_size_and_option_b():
    assert build_model("resnet18", 7, (96, 80, 3)).output.shape == (None, 7)
    assert complexity(build_model("resnet56", 10, (32, 32, 3), shortcut="B"))["params"] == 855_770


def test_unknown_arch_and_group_are_named():
    with pytest.raises(ValueError, match="resnet99"):
        build_model("resnet99", 10, (32, 32, 3))
    with pytest.raises(ValueError, match="stage9"):
        build_model("resnet20", 10, (32, 32, 3), widths={"stage9": 3})


def _params_file(tmp_path):
    spec = model_spec("resnet20", 10, (16, 16, 3), widths={"s1b0": 5}, shortcut="B")
    model = build_from_spec(spec)
    path = tmp_path / "p.pkl"
    save_params(path, model, {"model": spec})
    return model, spec, path


def test_params_round_trip_rebuilds_the_same_function(tmp_path):
    model, spec, path = _params_file(tmp_path)
    arrays, meta = load_params(path)
    assert meta["model"] == spec and arrays["s1b0_conv1/kernel"].shape == (3, 3, 16, 5)
    clone = apply_params(build_from_spec(meta["model"]), arrays)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_array_equal(clone(x, training=False), model(x, training=False))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"format": "ke_tf.params", "variables": {}, "metadata": _Exploit(marker)}))
    with pytest.raises(ParamsError, match="refusing to load global"):
        load_params(path)
    assert not marker.exists()


def test_bad_params_files_give_one_clear_error(tmp_path):
    model, spec, path = _params_file(tmp_path)
    data = path.read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(ParamsError, match="cut.pkl"):
        load_params(tmp_path / "cut.pkl")
    (tmp_path / "other.pkl").write_bytes(pickle.dumps({"weights": 1}))
    with pytest.raises(ParamsError, match="not a ke_tf params file"):
        load_params(tmp_path / "other.pkl")
    arrays, _ = load_params(path)
    wrong = build_model("resnet20", 10, (16, 16, 3), shortcut="B")  # s1b0 has 16 channels, file 5
    with pytest.raises(ParamsError, match="shape mismatch for 's1b0_conv1/kernel'"):
        apply_params(wrong, arrays, source="p.pkl")
    del arrays["classifier/bias"]
    with pytest.raises(ParamsError, match="missing key 'classifier/bias'"):
        apply_params(build_from_spec(spec), arrays)
    extra = {**load_params(path)[0], "head2/kernel": np.zeros((3, 3))}
    with pytest.raises(ParamsError, match="'head2/kernel' matches no variable"):
        apply_params(build_from_spec(spec), extra)


def test_atomic_write_keeps_the_previous_file_on_failure(tmp_path, monkeypatch):
    model, spec, path = _params_file(tmp_path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_params(path, {"x": np.zeros(3)}, {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.pkl"]


def test_config_validation_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key train.epoch "):
        from_dict({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        from_dict({"train": {"lr": -0.1}})
    with pytest.raises(ConfigError, match="train.batch_size must be int"):
        from_dict({"train": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match="model.arch must be one of"):
        from_dict({"model": {"arch": "vgg"}})
    with pytest.raises(ConfigError, match="not divisible"):
        from_dict({"train": {"batch_size": 10, "accum_steps": 4}})
    raw = apply_overrides({"train": {"epochs": 3}}, ["train.epochs=5", "data.classes=[1, 2]", "seed=7"])
    cfg = from_dict(raw)
    assert (cfg.train.epochs, cfg.data.classes, cfg.seed) == (5, [1, 2], 7)
    assert isinstance(from_dict({"train": {"lr": 1}}).train.lr, float)


def test_shipped_configs_are_valid():
    names = [n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".yaml")]
    assert "digits_resnet20_supervised.yaml" in names
    for name in names:
        load_config(os.path.join(ROOT, "configs", name))


def test_cli_rejects_bad_config_before_work(capsys):
    from train_cifar import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", os.path.join(ROOT, "configs", "digits_resnet20_supervised.yaml"), "--set", "train.lr=-1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: train.lr must be > 0, got -1.0"


def test_train_then_test_cli_round_trip(tmp_path, capsys):
    """A short supervised run writes trained_params.pkl; test.py rebuilds it from metadata and
    reproduces the run's own test metrics."""
    from test import main as test_main
    from train_cifar import main

    summary = main(
        [
            "--config",
            os.path.join(ROOT, "configs", "digits_resnet20_supervised.yaml"),
            "--set",
            f"run_dir={tmp_path}",
            "--set",
            "train.epochs=2",
            "--set",
            "data.image_size=16",
            "--set",
            "train.progress=false",
        ]
    )
    assert summary["test_top1"] > 0.3  # two epochs on 16x16 digits already beat chance (0.1)
    result = test_main(["--trained_param", str(tmp_path / "trained_params.pkl"), "--json", str(tmp_path / "e.json")])
    assert result["test_top1"] == pytest.approx(summary["test_top1"])
    assert result["macs"] == summary["macs"] and result["examples"] == 360
    assert json.loads((tmp_path / "e.json").read_text())["test_top1"] == pytest.approx(result["test_top1"])
    assert "Top-1" in capsys.readouterr().out
    history = json.loads((tmp_path / "train_history.json").read_text())
    assert len(history) == 2 and history[1]["train_loss"] < history[0]["train_loss"]
    assert os.listdir(tmp_path / "tensorboard" / "train")


def test_test_cli_refuses_exploit_with_one_line(tmp_path, capsys):
    from test import main as test_main

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(SystemExit) as exc:
        test_main(["--trained_param", str(path)])
    assert exc.value.code == 2 and not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to load global" in err[0]


@pytest.mark.parametrize(
    "config,override,message",
    [
        ("digits_resnet20_ke.yaml", "evolution.split_rate=1.5", "evolution.split_rate must be in (0, 1]"),
        ("digits_resnet20_ke.yaml", "evolution.split_rate=0", "evolution.split_rate must be in (0, 1]"),
        ("digits_resnet20_ekg.yaml", "ekg.search_target_rate=1.0", "ekg.search_target_rate must be in (0, 1)"),
        ("digits_resnet20_kd.yaml", "train.lr=-0.01", "train.lr must be > 0"),
        ("digits_resnet20_lwm.yaml", "incremental.bogus=1", "unknown config key incremental.bogus"),
    ],
)
def test_method_configs_reject_impossible_values(config, override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(os.path.join(ROOT, "configs", config), [override])
    assert message in str(exc.value)


def test_mac_counter_hand_values_for_conv_depthwise_grouped_and_dense():
    import keras

    inputs = keras.Input((16, 16, 8))
    x = keras.layers.Conv2D(12, 3, strides=2, padding="same")(inputs)  # 8x8x12: 64*9*8*12
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)  # 8x8x24: 64*9*24
    x = keras.layers.Conv2D(6, 1, groups=3)(x)  # 8x8x6: 64*1*8*6
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5)(x)  # 6*5
    model = keras.Model(inputs, outputs)
    assert complexity(model)["macs"] == 64 * 9 * 8 * 12 + 64 * 9 * 24 + 64 * 8 * 6 + 6 * 5
    assert complexity(model)["params"] == model.count_params()


def test_only_the_chief_process_writes_reports(tmp_path, monkeypatch):
    from ke_tf.io.report import plot_lines, write_json, write_table

    worker = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(worker))
    assert "| a |" in write_table(str(tmp_path / "t"), [{"a": 1}])
    write_json(str(tmp_path / "r.json"), {"a": 1})
    assert plot_lines(str(tmp_path / "p.png"), [1, 2], {"s": [1, 2]}, "x", "y", "t") is None
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("TF_CONFIG", json.dumps({**worker, "task": {"type": "worker", "index": 0}}))
    write_table(str(tmp_path / "t"), [{"a": 1}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.json", "t.md"]


def test_run_builds_and_trains_under_the_configured_precision(monkeypatch):
    """`ke_tf.run` (alias `run_method`) applies `train.mixed_precision` while the loop runs and restores the
    caller's policy afterwards (the CLI is not the only entry point)."""
    import keras

    import ke_tf
    import ke_tf.methods.supervised.loop as supervised
    from ke_tf.engine import make_strategy

    seen = []
    monkeypatch.setattr(
        supervised, "run", lambda cfg, strategy: seen.append(keras.mixed_precision.global_policy().name)
    )
    ke_tf.run(from_dict({"train": {"mixed_precision": "bf16"}}), make_strategy("one_device"))
    assert seen == ["mixed_bfloat16"] and ke_tf.run_method is ke_tf.run
    assert keras.mixed_precision.global_policy().name == "float32"


def test_run_is_reproducible_from_its_seed(tmp_path):
    """Two `ke_tf.run` calls of one config in one process train the same first epoch (the same
    initial weights, order and augmentation); another seed gives another first epoch."""
    import ke_tf
    from ke_tf.engine import make_strategy

    strategy = make_strategy("one_device")

    def first_epoch_loss(seed, tag):
        cfg = load_config(
            os.path.join(ROOT, "configs", "digits_resnet20_supervised.yaml"),
            [
                f"seed={seed}",
                f"run_dir={tmp_path / tag}",
                "data.image_size=8",
                "data.classes=[0,1,2]",
                "model.options={width_mult: 0.25}",
                "train.epochs=1",
                "train.batch_size=32",
                "train.progress=false",
                "train.checkpoint_every_epochs=0",
            ],
        )
        ke_tf.run(cfg, strategy)
        with open(tmp_path / tag / "results.json") as f:
            return json.load(f)["history"][0]["train_loss"]

    first, again, other = first_epoch_loss(0, "a"), first_epoch_loss(0, "b"), first_epoch_loss(1, "c")
    assert first == again
    assert abs(first - other) > 1e-4


def test_load_config_registers_the_method_sections_on_demand():
    """`ke_tf.load_config` on its own (no loop imported first) accepts every method's section."""
    code = (
        "import ke_tf.config as c\n"
        "cfg = c.load_config('configs/digits_resnet20_ke.yaml', ['evolution.generations=2'])\n"
        "print(type(cfg.section('evolution')).__name__, cfg.section('evolution').generations)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["EvolutionConfig", "2"]
