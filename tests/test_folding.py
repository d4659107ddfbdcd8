"""BN folding for deployment keeps inference outputs and MACs: folded == BN network is an identity,
built and run under the float64 policy and compared at float64 round-off (tests/numerics.py)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from ke_tf.models import build_from_spec, model_spec
from ke_tf.surgery.flops import complexity
from ke_tf.surgery.folding import fold_batchnorm
from tests.numerics import assert_identical, float64


@pytest.mark.parametrize(
    "spec",
    [
        model_spec("resnet20", 10, (16, 16, 3), shortcut="B", widths={"s1b0": 5, "stage2": 20}),
        model_spec("resnet20", 10, (16, 16, 3)),
        model_spec("resnet50", 7, (32, 32, 3)),
    ],
    ids=["pruned-resnet20-B", "resnet20-A", "resnet50"],
)
def test_folded_network_equals_bn_network(spec):
    rng = np.random.default_rng(0)
    with float64():
        model = build_from_spec(spec)
        for v in model.weights:
            if v.name == "moving_variance":
                v.assign(rng.uniform(0.5, 2.0, v.shape))
            elif v.name in ("moving_mean", "beta", "gamma"):
                v.assign(rng.normal(0, 0.5, v.shape))
        folded = fold_batchnorm(model, spec)
        assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
        x = rng.normal(size=(2,) + tuple(spec["input_shape"]))
        assert_identical(folded(x).numpy(), model(x, training=False).numpy())
    assert complexity(folded)["macs"] == complexity(model)["macs"]


def test_models_without_bn_are_returned_unchanged():
    spec = model_spec("reduce20", 10, (16, 16, 3), variant="deploy")
    model = build_from_spec(spec)
    assert fold_batchnorm(model, spec) is model
