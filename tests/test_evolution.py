"""Knowledge Evolution: split masks, reset-hypothesis re-init, slim extraction and the loop."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import math

import keras
import numpy as np
import pytest

from ke_tf.config import ConfigError, from_dict
from ke_tf.io.params import load_params, model_arrays
from ke_tf.layers.split import SplitConv2D, SplitDense, SplitLayerFactory, reinitialize_reset_hypothesis, split_layers
from ke_tf.methods.evolution.loop import EvolutionConfig, extract_slim, fit_keep
from ke_tf.models import build_model, model_spec
from ke_tf.surgery.flops import complexity
from ke_tf.surgery.graph import ChannelGraph
from tests.numerics import assert_identical, float64, randomise_statistics


def _strategy():
    import tensorflow as tf

    return tf.distribute.get_strategy()


@pytest.fixture(scope="module")
def resnet18_224():
    """KE's setting: Split_ResNet18, sr=0.5, 100 classes (the reference log's numbers)."""
    return build_model("resnet18", 100, (224, 224, 3), layers=SplitLayerFactory(0.5, "kels"))


def _mask(model, name):
    return model.get_layer(name).mask.numpy()


# ---- masks ---------------------------------------------------------------------------------
def test_kels_masks_match_the_reference_log(resnet18_224):
    # Fit-weight counts logged by KE's code (ahmdtaha/knowledge_evolution@a3f2eb2) for ResNet-18, sr=0.5, 100 classes.
    expected = {
        "stem_conv": 4704,
        "s1b0_conv1": 9216,
        "s2b0_conv1": 18432,
        "s2b0_short_conv": 2048,
        "s4b1_conv2": 589824,
        "classifier": 25600,
    }
    for name, count in expected.items():
        mask = _mask(resnet18_224, name)
        assert mask.shape == tuple(resnet18_224.get_layer(name).kernel.shape)
        assert int(mask.sum()) == count, name
    stem = _mask(resnet18_224, "stem_conv")  # [7, 7, 3, 64]: all RGB inputs, 32 filters
    assert stem[..., :, :32].all() and not stem[..., 32:].any()
    fc = _mask(resnet18_224, "classifier")  # [512, 100]: 256 input rows, every class
    assert fc[:256].all() and not fc[256:].any()


def test_kels_uses_ceil_and_roles():
    x = np.zeros((1, 4, 4, 7), "float32")
    body = SplitConv2D(5, 3, split_rate=0.5, role="body")
    body(x)
    m = body.mask.numpy()  # ceil(3.5) = 4 inputs, ceil(2.5) = 3 outputs
    assert m[:, :, :4, :3].all() and m.sum() == 9 * 4 * 3
    stem = SplitConv2D(5, 3, split_rate=0.3, role="stem")
    stem(x)
    assert stem.mask.numpy().sum() == 9 * 7 * 2  # all 7 inputs, ceil(1.5) = 2 outputs
    fc = SplitDense(10, split_rate=0.5, role="classifier")
    fc(np.zeros((1, 7), "float32"))
    assert fc.mask.numpy()[:4].all() and fc.mask.numpy().sum() == 4 * 10
    hidden = SplitDense(5, split_rate=0.5, role="body")
    hidden(np.zeros((1, 7), "float32"))
    assert hidden.mask.numpy().sum() == 4 * 3


def test_wels_masks_are_seeded_with_rate_sr():
    def mask(seed, rate=0.3, role="body"):
        layer = SplitConv2D(64, 3, split_rate=rate, split_mode="wels", role=role, seed=seed)
        layer(np.zeros((1, 4, 4, 64), "float32"))
        return layer.mask.numpy()

    a, b, c = mask(7), mask(7), mask(8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.3
    assert set(np.unique(a)) == {0.0, 1.0}
    assert abs(a.mean() - 0.3) < 0.01  # 36,864 Bernoulli(0.3) draws
    assert abs(mask(1, 0.5, "stem").mean() - 0.5) < 0.01  # no special case for stem/classifier
    # The factory gives same-shaped layers different (but reproducible) masks.
    m1 = build_model("resnet20", 10, (8, 8, 3), layers=SplitLayerFactory(0.5, "wels", seed=3))
    m2 = build_model("resnet20", 10, (8, 8, 3), layers=SplitLayerFactory(0.5, "wels", seed=3))
    np.testing.assert_array_equal(_mask(m1, "s1b1_conv1"), _mask(m2, "s1b1_conv1"))
    assert (_mask(m1, "s1b1_conv1") != _mask(m1, "s1b2_conv1")).any()


def test_masks_do_not_change_the_forward_pass():
    split = build_model("resnet20", 10, (8, 8, 3), layers=SplitLayerFactory(0.5), shortcut="B")
    plain = build_model("resnet20", 10, (8, 8, 3), shortcut="B")
    arrays = model_arrays(split)
    for v in plain.weights:
        v.assign(arrays[v.path])
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(split(x, training=False), plain(x, training=False))
    masks = [v for v in split.weights if v.name == "mask"]
    assert len(masks) == len(split_layers(split)) and not any(v.trainable for v in masks)
    assert complexity(split) == complexity(plain)  # masks are not parameters


def test_invalid_split_arguments():
    with pytest.raises(ValueError, match="split_mode"):
        SplitConv2D(4, 3, split_mode="random")
    with pytest.raises(ValueError, match="split_rate"):
        SplitDense(4, split_rate=0.0)
    with pytest.raises(ValueError, match="role"):
        SplitDense(4, role="head")


# ---- re-initialisation ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "rule,std", [("kaiming_uniform", lambda f: 1 / math.sqrt(3 * f)), ("kaiming_normal", lambda f: math.sqrt(2 / f))]
)
def test_reinit_changes_exactly_the_reset_weights(rule, std):
    model = build_model("resnet18", 10, (32, 32, 3), layers=SplitLayerFactory(0.5))
    rng = np.random.default_rng(1)
    for v in model.weights:  # non-trivial BN stats and classifier bias
        if v.name in ("moving_mean", "moving_variance", "gamma", "beta", "bias"):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
    before = model_arrays(model)
    reinitialize_reset_hypothesis(model, seed=5, rule=rule)
    after = model_arrays(model)
    for layer in split_layers(model):
        keep = layer.mask.numpy().astype(bool)
        k0, k1 = before[layer.kernel.path], after[layer.kernel.path]
        np.testing.assert_array_equal(k1[keep], k0[keep])
        assert (k1[~keep] != k0[~keep]).mean() > 0.999, layer.name  # float ties are possible
    for path in before:
        if not path.endswith("/kernel"):
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    # Reset-rule statistics on the largest layer: fan_in = 3*3*512.
    k = model.get_layer("s4b1_conv2")
    reset = after[k.kernel.path][~k.mask.numpy().astype(bool)]
    assert abs(reset.std() / std(9 * 512) - 1) < 0.02
    if rule == "kaiming_uniform":
        assert np.abs(reset).max() <= 1 / math.sqrt(9 * 512)
    # Deterministic per seed.
    reinitialize_reset_hypothesis(model, seed=5, rule=rule)
    np.testing.assert_array_equal(model_arrays(model)[k.kernel.path], after[k.kernel.path])


# ---- slim network --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,shape,options,rate",
    [
        ("resnet18", (32, 32, 3), {}, 0.5),
        ("resnet20", (16, 16, 3), {"shortcut": "B"}, 0.3),
    ],
)
def test_slim_equals_dense_with_reset_weights_zeroed(arch, shape, options, rate):
    """Slim == masked dense is an identity: built and run in float64, compared at its round-off."""
    rng = np.random.default_rng(0)
    spec = model_spec(arch, 10, shape, **options)
    with float64():
        dense = build_model(arch, 10, shape, layers=SplitLayerFactory(rate), **options)
        randomise_statistics(dense, seed=int(rng.integers(1 << 30)))
        slim, slim_spec = extract_slim(_strategy(), dense, spec, rate)
        groups = ChannelGraph(dense).prunable()  # ResNet-18's "stem" width is an alias of stage1
        assert {g: slim_spec["widths"][g] for g in groups} == {
            g: math.ceil(rate * c.channels) for g, c in groups.items()
        }
        x = rng.normal(size=(3,) + shape)
        unmasked = dense(x, training=False).numpy()
        for layer in split_layers(dense):
            layer.kernel.assign(layer.kernel * layer.mask)
        masked = dense(x, training=False).numpy()
        assert_identical(slim(x, training=False).numpy(), masked)
    assert np.abs(masked - unmasked).max() > 1e-2  # the slim net is not the dense net
    assert not [v for v in slim.weights if v.name == "mask"]


def test_resnet18_slim_cuts_73_percent_of_macs(resnet18_224):
    spec = model_spec("resnet18", 100, (224, 224, 3))
    slim, _ = extract_slim(_strategy(), resnet18_224, spec, 0.5)
    dense_cx, slim_cx = complexity(resnet18_224), complexity(slim)
    reduction = 1 - slim_cx["macs"] / dense_cx["macs"]
    # Paper: "relative 73% reduction in inference cost" (KE's own op count: -73.3%).
    assert reduction == pytest.approx(0.733, abs=0.005)
    assert dense_cx["params"] == 11_227_812 and slim_cx["params"] < 0.26 * dense_cx["params"]


def test_fit_keep_is_the_first_ceil_channels():
    keep = fit_keep(build_model("resnet20", 10, (8, 8, 3), widths={"s1b0": 5}, shortcut="B"), 0.5)
    assert keep["s1b0"] == [0, 1, 2] and keep["stage3"] == list(range(32))
    assert "image" not in keep and "classifier" not in keep  # the input and the classes stay whole


# ---- serialization -------------------------------------------------------------------------
def test_keras_round_trip_keeps_config_and_masks(tmp_path):
    model = build_model("resnet20", 10, (8, 8, 3), layers=SplitLayerFactory(0.4, "wels", seed=2), shortcut="B")
    layer = model.get_layer("s2b0_conv1")
    changed = 1.0 - layer.mask.numpy()  # a mask the config could not regenerate
    layer.mask.assign(changed)
    path = str(tmp_path / "split.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = loaded.get_layer("s2b0_conv1")
    assert isinstance(restored, SplitConv2D) and isinstance(loaded.get_layer("classifier"), SplitDense)
    np.testing.assert_array_equal(restored.mask.numpy(), changed)
    cfg = restored.get_config()
    assert (cfg["split_rate"], cfg["split_mode"], cfg["role"], cfg["seed"]) == (0.4, "wels", "body", layer.seed)
    assert loaded.get_layer("stem_conv").role == "stem" and loaded.get_layer("classifier").role == "classifier"
    x = np.ones((1, 8, 8, 3), "float32")
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))
    clone = SplitDense.from_config(loaded.get_layer("classifier").get_config())
    assert (clone.split_rate, clone.split_mode, clone.role) == (0.4, "wels", "classifier")


def test_config_section_validation():
    cfg = from_dict({"method": "evolution", "evolution": {"generations": 2, "split_mode": "wels"}})
    assert cfg.section("evolution") == EvolutionConfig(generations=2, split_mode="wels")
    for bad, key in [
        ({"split_rate": 0.0}, "split_rate"),
        ({"split_mode": "x"}, "split_mode"),
        ({"generations": 0}, "generations"),
        ({"reinit": "zeros"}, "reinit"),
    ]:
        with pytest.raises(ConfigError, match=f"evolution.{key}"):
            from_dict({"method": "evolution", "evolution": bad})


# ---- the loop through the CLI --------------------------------------------------------------
def _run(run_dir, *overrides, generations=2, epochs=1):
    from train_flower import main

    return main(
        [
            "--config",
            "configs/digits_resnet20_ke.yaml",
            "--set",
            f"run_dir={run_dir}",
            "--set",
            "data.image_size=16",
            "--set",
            f"train.epochs={epochs}",
            "--set",
            "train.progress=false",
            "--set",
            f"evolution.generations={generations}",
            *[a for o in overrides for a in ("--set", o)],
        ]
    )


def test_two_generation_run_writes_pickles_tables_and_plot(tmp_path):
    from test import evaluate_params_file

    summary = _run(tmp_path)
    for g in (1, 2):
        for name in ("trained_params.pkl", "slim_params.pkl"):
            assert (tmp_path / f"gen_{g}" / name).is_file()
    for name in ("evolution.md", "evolution.csv", "evolution.json", "evolution.png", "results.json"):
        assert (tmp_path / name).is_file()
    rows = json.loads((tmp_path / "evolution.json").read_text())["rows"]
    assert [r["generation"] for r in rows] == [1, 2]
    # Dense pickles carry the (unchanged) masks; generation 2 trained on from generation 1.
    a1, meta = load_params(tmp_path / "gen_1" / "trained_params.pkl")
    a2, _ = load_params(tmp_path / "gen_2" / "trained_params.pkl")
    assert meta["split"] == {"split_rate": 0.5, "split_mode": "kels", "seed": 1}
    np.testing.assert_array_equal(a1["s2b0_conv1/mask"], a2["s2b0_conv1/mask"])
    assert not np.array_equal(a1["s2b0_conv1/kernel"], a2["s2b0_conv1/kernel"])
    np.testing.assert_array_equal(a1["classifier/bias"].shape, (10,))
    # The slim pickle rebuilds through test.py with its slim widths and reports the reduction.
    slim_file = str(tmp_path / "gen_2" / "slim_params.pkl")
    _, slim_meta = load_params(slim_file)
    assert slim_meta["model"]["widths"]["stage3"] == 32 and slim_meta["model"]["options"] == {"shortcut": "B"}
    result = evaluate_params_file(slim_file)
    assert result["test_top1"] == pytest.approx(rows[1]["slim_top1"], abs=1e-6)
    assert result["macs_reduction"] == pytest.approx(summary["macs_reduction"])
    assert 0.7 < summary["macs_reduction"] < 0.8
    # The dense pickle (split masks included) rebuilds through test.py too.
    dense = evaluate_params_file(str(tmp_path / "gen_2" / "trained_params.pkl"))
    assert dense["test_top1"] == pytest.approx(rows[1]["dense_top1"], abs=1e-6)


@pytest.mark.parametrize("reinit", ["kaiming_uniform", "none"])
def test_each_generation_reinits_the_reset_weights_with_a_fresh_optimizer_and_data_order(tmp_path, monkeypatch, reinit):
    """With lr 1e-20 training changes no kernel (updates fall below float32 resolution), so generation 2's
    saved weights show exactly what happened between generations: the reset weights re-drawn (fit
    weights kept), or nothing for the `reinit: none` control. Every generation gets a new optimizer
    (iterations restart, so the warmup does) and its own data seed."""
    from ke_tf.methods.evolution import loop as evolution

    stages = []
    original = evolution.train_stage

    def recording_train_stage(*args, **kwargs):
        trainer, history, final = original(*args, **kwargs)
        stages.append((kwargs["seed"], int(trainer.optimizer.iterations.numpy()), trainer.optimizer))
        return trainer, history, final

    monkeypatch.setattr(evolution, "train_stage", recording_train_stage)
    _run(tmp_path, "train.lr=1.0e-20", "train.warmup_epochs=0", f"evolution.reinit={reinit}")
    (seed1, steps1, opt1), (seed2, steps2, opt2) = stages
    assert seed1 == 1 and seed2 == evolution.generation_data_seed(1, 2) != seed1
    assert steps1 == steps2 > 0 and opt1 is not opt2
    a1, _ = load_params(tmp_path / "gen_1" / "trained_params.pkl")
    a2, _ = load_params(tmp_path / "gen_2" / "trained_params.pkl")
    for name in ("s2b0_conv1", "s3b2_conv2", "classifier"):
        mask = a1[f"{name}/mask"].astype(bool)
        k1, k2 = a1[f"{name}/kernel"], a2[f"{name}/kernel"]
        np.testing.assert_array_equal(k1[mask], k2[mask])
        assert np.array_equal(k1[~mask], k2[~mask]) == (reinit == "none"), name


def test_option_a_network_is_refused_before_training(tmp_path):
    """A kels run whose slim net could not be sliced fails at once, naming the layer and the key."""
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, "model.options.shortcut=A")
    assert exit_info.value.code == 2
    assert not (tmp_path / "gen_1").exists()
