"""Physical slicing keeps the function of the kept channels exactly: sliced == masked is an identity,
built and run under the float64 policy and compared at float64 round-off (tests/numerics.py)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from ke_tf.models import build_model, default_widths, model_spec
from ke_tf.surgery.flops import complexity
from ke_tf.surgery.graph import ChannelGraph
from ke_tf.surgery.slicing import slice_model
from tests.numerics import assert_identical, float64


def _randomise_bn(model, rng):
    for v in model.weights:
        if v.name == "moving_variance":
            v.assign(rng.uniform(0.5, 2.0, v.shape))
        elif v.name in ("moving_mean", "beta", "gamma"):
            v.assign(rng.normal(0, 0.5, v.shape))


def _zero_dropped_channels(model, keep, widths):
    """Silence dropped channels by zeroing their BN affine parameters (then ReLU/residual keep
    them at exactly zero), which is what removing them must reproduce."""
    graph = ChannelGraph(model)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            (group,) = graph.groups_of(layer.gamma)[0]
            mask = np.zeros(widths[group])
            mask[keep[group]] = 1.0
            layer.gamma.assign(layer.gamma.numpy() * mask)
            layer.beta.assign(layer.beta.numpy() * mask)


@pytest.mark.parametrize(
    "arch,shape,options",
    [
        ("resnet20", (16, 16, 3), {"shortcut": "B"}),
        ("resnet50", (32, 32, 3), {}),
    ],
)
def test_sliced_network_equals_masked_network(arch, shape, options):
    rng = np.random.default_rng(0)
    with float64():
        model = build_model(arch, 10, shape, **options)
        _randomise_bn(model, rng)
        widths = default_widths(arch)
        keep = {g: sorted(rng.choice(c, size=max(1, c // 2), replace=False)) for g, c in widths.items()}
        _zero_dropped_channels(model, keep, widths)
        narrow, spec = slice_model(model, model_spec(arch, 10, shape, **options), keep)
        x = rng.normal(size=(3,) + shape)
        assert_identical(narrow(x, training=False).numpy(), model(x, training=False).numpy())
    assert spec["widths"] == {g: len(ix) for g, ix in keep.items()}
    assert complexity(narrow)["macs"] < 0.4 * complexity(model)["macs"]


def test_option_a_shortcuts_keep_the_residual_streams_whole():
    """Zero-pad shortcuts are boundaries: inner block widths still slice, the streams they pad are
    refused naming the shortcut."""
    model = build_model("resnet20", 10, (16, 16, 3))
    spec = model_spec("resnet20", 10, (16, 16, 3))
    narrow, _ = slice_model(model, spec, {"s1b0": [0, 1]})
    assert narrow.get_layer("s1b0_conv1").kernel.shape[-1] == 2
    with pytest.raises(ValueError, match="stage2.*s2b0_short_pad"):
        slice_model(model, spec, {"stage2": [0, 1]})


def test_empty_group_is_refused():
    model = build_model("resnet20", 10, (16, 16, 3), shortcut="B")
    with pytest.raises(ValueError, match="s1b0"):
        slice_model(model, model_spec("resnet20", 10, (16, 16, 3), shortcut="B"), {"s1b0": []})
