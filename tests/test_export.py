"""Export: SavedModel + TFLite of deployable models match Keras outputs. The exported artifacts are
float32 by design, so they are compared with the float32 Keras model within a measured bound."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import warnings

import numpy as np
import pytest
import tensorflow as tf

from ke_tf.io.params import save_params
from ke_tf.models import build_from_spec, model_spec
from tests.numerics import assert_within_measured_bound

# Largest difference measured from the float32 Keras outputs (AVX2 EPYC, oneDNN on): SavedModel
# 3.9e-7, TFLite (XNNPACK) 4.4e-7 of the logits' scale, both nets; float32 Keras itself is 2.9e-7
# from the float64 model. 10x the largest.
EXPORT_BOUND = 5e-6
EXPORT_MEASURED = "exported vs float32 Keras: max 4.4e-7 of the scale (TFLite), x10"


def _random_bn(model, rng):
    for v in model.weights:
        if v.name == "moving_variance":
            v.assign(rng.uniform(0.5, 2.0, v.shape).astype("float32"))
        elif v.name in ("moving_mean", "beta"):
            v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))


def _tflite_predict(path, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=path)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    results = []
    for row in x:
        interpreter.set_tensor(inp["index"], row[None])
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"])[0])
    return np.stack(results)


@pytest.mark.parametrize(
    "spec",
    [
        model_spec("resnet20", 10, (16, 16, 3), widths={"stage1": 8, "s1b0": 4, "s2b1": 10}, shortcut="B"),
        model_spec("reduce20", 10, (16, 16, 3), variant="deploy"),
    ],
    ids=["pruned-resnet20", "fused-reduce20"],
)
def test_test_py_export_writes_savedmodel_and_tflite_that_match(tmp_path, spec):
    from test import main as test_main

    rng = np.random.default_rng(0)
    model = build_from_spec(spec)
    _random_bn(model, rng)
    path = tmp_path / "params.pkl"
    save_params(path, model, {"model": spec, "data": {"name": "digits", "image_size": 16}})
    result = test_main(["--trained_param", str(path), "--export", str(tmp_path / "out")])
    x = rng.normal(size=(3, 16, 16, 3)).astype("float32")
    expected = model(x, training=False).numpy()
    loaded = tf.saved_model.load(result["exported"]["saved_model"])  # keep a reference: it owns the variables
    served = loaded.serve(tf.constant(x)).numpy()
    assert_within_measured_bound(served, expected, EXPORT_BOUND, EXPORT_MEASURED)
    assert_within_measured_bound(
        _tflite_predict(result["exported"]["tflite"], x), expected, EXPORT_BOUND, EXPORT_MEASURED
    )


def test_export_module_cli_reports_bad_file(tmp_path, capsys):
    from ke_tf.cli import export_main as main

    (tmp_path / "bad.pkl").write_bytes(b"not a pickle")
    with pytest.raises(SystemExit) as exc:
        main(["--trained_param", str(tmp_path / "bad.pkl"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "bad.pkl" in capsys.readouterr().err
