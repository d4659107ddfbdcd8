"""A user's own model through the config (`model.keras_file`, `model.application`): KE and EKG runs,
params files that rebuild through `load_deployable`, and the config's errors."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

import ke_tf
from ke_tf.cli import evaluate_params_file
from ke_tf.config import ConfigError, from_dict
from ke_tf.export import deployable
from ke_tf.io.params import load_params, save_params
from ke_tf.layers.split import split_layers
from ke_tf.models import build_from_spec, spec_widths
from ke_tf.models.from_params import load_deployable
from ke_tf.models.user import user_model_spec
from ke_tf.surgery.graph import ChannelGraph

L = keras.layers
SIZE = 8  # digits at 8x8


def _tiny_cnn(size=SIZE, classes=10):
    """A functional CNN of our own: residual add (x + y), Flatten -> Dense head."""
    x = keras.Input((size, size, 3))
    h = L.ReLU()(L.BatchNormalization(name="stem_bn")(L.Conv2D(8, 3, padding="same", name="stem")(x)))
    y = L.BatchNormalization(name="body_bn")(L.Conv2D(8, 3, padding="same", name="body")(h))
    h = L.ReLU()(h + y)
    h = L.ReLU()(L.BatchNormalization(name="down_bn")(L.Conv2D(12, 3, strides=2, padding="same", name="down")(h)))
    f = L.ReLU()(L.Dense(16, name="hidden")(L.Flatten()(h)))
    return keras.Model(x, L.Dense(classes, name="classifier")(f), name="tiny")


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "tiny.keras"
    _tiny_cnn().save(path)
    return str(path)


def _config(run_dir, method, model, **sections):
    """A config of a tiny run on digits at 8x8 (one epoch, no progress bars)."""
    raw = {
        "method": method,
        "run_dir": str(run_dir),
        "data": {"name": "digits", "image_size": SIZE},
        "model": model,
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "progress": False, "eval_batch_size": 512},
        **sections,
    }
    return from_dict(raw)


def _outputs(model, images):
    return np.asarray(model(images, training=False))


def test_evolution_on_a_keras_file_then_its_params_files_reload(tmp_path, cnn_file, monkeypatch):
    from ke_tf.methods.evolution import loop as evolution

    slim_nets = []
    original = evolution.extract_slim

    def recording_extract_slim(*args):
        slim_nets.append(original(*args))
        return slim_nets[-1]

    monkeypatch.setattr(evolution, "extract_slim", recording_extract_slim)
    cfg = _config(tmp_path, "evolution", {"keras_file": cnn_file}, evolution={"generations": 2})
    summary = ke_tf.run(cfg)
    assert summary["arch"] == "tiny.keras" and 0.5 < summary["macs_reduction"] < 0.9
    images = np.random.default_rng(0).uniform(size=(4, SIZE, SIZE, 3)).astype("float32")
    slim, slim_spec = slim_nets[-1]
    assert slim_spec["widths"] == {"stem": 4, "down": 6, "hidden": 8}
    # ke-tf-test rebuilds the slim net from its params file: same outputs, metrics and MACs.
    result, reloaded, meta = evaluate_params_file(str(tmp_path / "gen_2" / "slim_params.pkl"), with_model=True)
    assert result["test_top1"] == summary["slim_top1"] and result["macs"] == summary["slim_macs"]
    assert meta["model"]["keras_file"] == cnn_file and not split_layers(reloaded)
    assert spec_widths(meta["model"]) == slim_spec["widths"]
    np.testing.assert_array_equal(_outputs(reloaded, images), _outputs(slim, images))
    folded = deployable(reloaded, meta)  # what ke-tf-export writes: BN folded into the convs
    assert not [layer for layer in folded.layers if isinstance(layer, L.BatchNormalization)]
    np.testing.assert_allclose(_outputs(folded, images), _outputs(slim, images), rtol=1e-4, atol=1e-4)
    # The dense params file rebuilds as the split network, masks included.
    dense, meta = load_deployable(tmp_path / "gen_2" / "trained_params.pkl")
    assert meta["layers"]["kind"] == "split" and len(split_layers(dense)) == 5
    arrays, _ = load_params(tmp_path / "gen_2" / "trained_params.pkl")
    np.testing.assert_array_equal(dense.get_layer("down").mask.numpy(), arrays["down/mask"])


def test_ekg_on_a_keras_file_then_the_pruned_net_reloads(tmp_path, cnn_file):
    ekg = {
        "pretrain_epochs": 1,
        "pretrain_lr": 0.05,
        "pretrain_decay_epochs": [],
        "holdout_per_class": 2,
        "search_target_rate": 0.7,
        "num_teacher": 2,
    }
    cfg = _config(tmp_path, "ekg", {"keras_file": cnn_file}, ekg=ekg)
    summary = ke_tf.run(cfg)
    assert summary["macs_reduction"] >= 0.3 and summary["arch"] == "tiny.keras"
    path = tmp_path / "trained_params.pkl"
    model, meta = load_deployable(path)
    widths = meta["model"]["widths"]
    assert widths and set(widths) <= {"stem", "down", "hidden"} and any(w < 8 for w in widths.values())
    assert ke_tf.complexity(model)["macs"] == summary["macs"]
    # The searched net (what a second run resumes from) rebuilds with the same widths.
    slimmed, slimmed_meta = load_deployable(tmp_path / "slimmed_params.pkl")
    assert slimmed_meta["model"] == meta["model"] and ke_tf.complexity(slimmed) == ke_tf.complexity(model)


def test_mobilenet_v2_application_spec_builds_narrows_and_reloads(tmp_path):
    """The application path: built with weights=None, the data's shape and classes, logits out;
    a spec with widths is the first channels of the full model (what a slim/pruned params file holds)."""
    spec = user_model_spec(10, (32, 32, 3), application="MobileNetV2", options={"alpha": 0.35})
    full = build_from_spec(spec)
    assert full.output.shape == (None, 10) and full.get_layer("predictions").activation is keras.activations.linear
    widths = {"block_1_expand": 8, "block_16_project": 56}
    narrow = build_from_spec({**spec, "widths": widths})
    assert narrow.get_layer("block_1_expand").filters == 8
    graph = ChannelGraph(full)
    assert ke_tf.complexity(narrow)["macs"] == graph.macs({**graph.widths(), **widths})
    path = tmp_path / "narrow.pkl"
    save_params(path, narrow, {"model": {**spec, "widths": widths}})
    reloaded, _ = load_deployable(path)
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(_outputs(reloaded, x), _outputs(narrow, x))


# ---- errors -----------------------------------------------------------------------------------
def test_config_errors_name_the_key(tmp_path, cnn_file):
    def error(model, method="evolution"):
        with pytest.raises(ConfigError) as info:
            from_dict({"method": method, "model": model})
        return str(info.value)

    assert "exclusive" in error({"keras_file": cnn_file, "application": "MobileNetV2"})
    assert "model.application" in error({"application": "MobileNetV9"}) and "MobileNetV2" in error(
        {"application": "nope"}
    )
    missing = str(tmp_path / "missing.keras")
    assert "model.keras_file" in error({"keras_file": missing}) and missing in error({"keras_file": missing})
    assert "model.options.weights" in error({"application": "MobileNetV2", "options": {"weights": "imagenet"}})
    assert "model.options" in error({"keras_file": cnn_file, "options": {"alpha": 1}})
    assert "model.keras_file" in error({"keras_file": cnn_file}, method="distillation")
    # `arch` is ignored with a user's model; supervised, evolution and ekg take one.
    cfg = from_dict({"method": "supervised", "model": {"arch": "not-an-arch", "application": "MobileNetV2"}})
    assert cfg.model.user_key == "application"


def test_a_model_that_does_not_fit_the_data_is_refused_before_training(tmp_path):
    path = tmp_path / "wide.keras"
    _tiny_cnn(size=16, classes=5).save(path)
    cfg = _config(tmp_path / "run", "evolution", {"keras_file": str(path)})
    with pytest.raises(ConfigError, match=r"model.keras_file .*wide.keras.*\(16, 16, 3\).*\(8, 8, 3\) of 10 classes"):
        ke_tf.run(cfg)
    assert not (tmp_path / "run" / "gen_1").exists()
    softmax = tmp_path / "softmax.keras"
    model = _tiny_cnn()
    keras.Model(model.input, L.Softmax()(model.output)).save(softmax)
    with pytest.raises(ConfigError, match="softmax"):
        ke_tf.run(_config(tmp_path / "run", "evolution", {"keras_file": str(softmax)}))


def test_a_params_file_whose_keras_file_changed_is_refused(tmp_path):
    path = tmp_path / "tiny.keras"
    _tiny_cnn().save(path)
    spec = user_model_spec(10, (SIZE, SIZE, 3), keras_file=str(path))
    params = tmp_path / "p.pkl"
    save_params(params, build_from_spec(spec), {"model": spec})
    _tiny_cnn(classes=10).save(path)  # another model (fresh weights) under the same name
    with pytest.raises(ValueError, match="has changed"):
        load_deployable(params)
    os.remove(path)
    with pytest.raises(ValueError, match="no such file"):
        load_deployable(params)
