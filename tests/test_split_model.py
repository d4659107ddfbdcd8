"""Knowledge Evolution on any functional model: split_model / slim_model (ke_tf.surgery.split_model)."""

import keras
import numpy as np
import pytest

from ke_tf.layers.split import SplitConv2D, SplitDense, kels_mask, reinitialize_reset_hypothesis, split_layers
from ke_tf.surgery.graph import ChannelGraph
from ke_tf.surgery.split_model import slim_model, split_model
from tests.numerics import assert_identical, float64, randomise_statistics
from tests.test_graph import grouped_model

L = keras.layers


def _own_cnn():
    """Residual add (x + y) in a nested functional block, a Concatenate and a Flatten -> Dense head."""
    i = keras.Input((6, 6, 6))
    y = L.BatchNormalization(name="inner_bn")(L.Conv2D(6, 3, padding="same", name="inner_conv")(i))
    block = keras.Model(i, L.ReLU()(i + y), name="block")
    x = keras.Input((6, 6, 3))
    h = L.ReLU()(L.BatchNormalization(name="stem_bn")(L.Conv2D(6, 3, padding="same", name="stem")(x)))
    h = block(h)
    c = L.Concatenate()([h, L.Conv2D(5, 1, name="branch")(h)])  # channels: block (6) then branch (5)
    c = L.ReLU()(L.BatchNormalization(name="mix_bn")(L.Conv2D(7, 3, strides=2, padding="same", name="mix")(c)))
    f = L.ReLU()(L.Dense(8, name="hidden")(L.Flatten()(c)))  # rows p*7 + c over 3x3 positions
    return keras.Model(x, L.Dense(4, name="classifier")(f), name="own")


def _mobilenet():
    return keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10, classifier_activation=None
    )


def _layers(model):
    """{name: layer} over `model`'s layers and its nested models' layers."""
    found = {}
    for layer in model.layers:
        found[layer.name] = layer
        if hasattr(layer, "layers"):
            found.update(_layers(layer))
    return found


def test_split_copies_every_conv_and_dense_with_its_weights():
    model = _own_cnn()
    split = split_model(model, 0.5)
    layers = _layers(split)
    assert isinstance(layers["inner_conv"], SplitConv2D) and isinstance(layers["hidden"], SplitDense)
    assert layers["stem"].role == "stem" and layers["classifier"].role == "classifier"
    assert layers["mix"].role == "body" and isinstance(split.get_layer("block"), keras.Model)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3))
    np.testing.assert_array_equal(split(x).numpy(), model(x).numpy())  # masks are not in the forward pass


def test_kels_masks_are_the_graph_fit_channels():
    layers = _layers(split_model(_own_cnn(), 0.5))
    for name in ("stem", "inner_conv", "branch", "classifier"):  # plain convs: KE's first-rows rule
        layer = layers[name]
        np.testing.assert_array_equal(layer.mask.numpy(), kels_mask(layer.kernel.shape, 0.5, layer.role), name)
    mix = layers["mix"].mask.numpy()  # reads block[:3] at rows 0-2 and branch[:3] at rows 6-8
    rows = np.isin(np.arange(11), [0, 1, 2, 6, 7, 8])
    np.testing.assert_array_equal(mix[1, 1], np.outer(rows, np.arange(7) < 4))
    hidden = layers["hidden"].mask.numpy()  # Flatten of 3x3 positions x 7 channels: rows p*7 + c, c < 4
    np.testing.assert_array_equal(hidden, np.outer(np.arange(63) % 7 < 4, np.arange(8) < 4))


@pytest.mark.parametrize(
    "build,shape,rate", [(_own_cnn, (6, 6, 3), 0.5), (_mobilenet, (32, 32, 3), 0.3), (grouped_model, (8, 8, 3), 0.5)]
)
def test_slim_equals_dense_with_reset_weights_zeroed(build, shape, rate):
    """Slim == masked dense is an identity: built and run in float64, compared at its round-off."""
    rng = np.random.default_rng(0)
    with float64():
        dense = split_model(build(), rate)
        randomise_statistics(dense, seed=int(rng.integers(1 << 30)))
        slim = slim_model(dense)
        groups, slim_groups = ChannelGraph(dense).prunable(), ChannelGraph(slim).groups
        # Channels (units x blocks) of every group; a grouped conv left with one input channel per
        # group is per-channel in the slim net (its output joins its input's group, blocks vanish),
        # so only the groups both graphs have are compared.
        assert {g: slim_groups[g].channels * slim_groups[g].blocks for g in groups if g in slim_groups} == {
            g: int(np.ceil(rate * c.channels)) * c.blocks for g, c in groups.items() if g in slim_groups
        }
        x = rng.normal(size=(2,) + shape)
        unmasked = dense(x, training=False).numpy()
        for layer in split_layers(dense):
            layer.kernel.assign(layer.kernel * keras.ops.cast(layer.mask, layer.kernel.dtype))
        masked = dense(x, training=False).numpy()
        assert_identical(slim(x, training=False).numpy(), masked)
    assert np.abs(masked - unmasked).max() > 1e-2  # the slim net is not the dense net
    assert not split_layers(slim) and not [v for v in slim.weights if v.name == "mask"]


def test_mobilenet_depthwise_convs_stay_plain():
    layers = _layers(split_model(_mobilenet(), 0.5))
    depthwise = [layer for layer in layers.values() if isinstance(layer, L.DepthwiseConv2D)]
    assert depthwise and not [layer for layer in depthwise if hasattr(layer, "mask")]
    assert isinstance(layers["Conv1"], SplitConv2D) and layers["Conv1"].role == "stem"


def test_reinit_changes_only_the_reset_weights():
    split = split_model(_own_cnn(), 0.5)
    before = {v.path: v.numpy() for v in split.weights}
    reinitialize_reset_hypothesis(split, seed=3)
    masks = {layer.kernel.path: layer.mask.numpy().astype(bool) for layer in split_layers(split)}
    for v in split.weights:
        if v.path in masks:
            keep = masks[v.path]
            np.testing.assert_array_equal(v.numpy()[keep], before[v.path][keep])
            assert (v.numpy()[~keep] != before[v.path][~keep]).all(), v.path
        else:
            np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)


def test_keras_round_trip_keeps_graph_masks(tmp_path):
    split = split_model(_own_cnn(), 0.5)
    path = str(tmp_path / "split.keras")
    split.save(path)
    loaded = keras.models.load_model(path)
    for name, layer in _layers(split).items():
        if hasattr(layer, "mask"):
            np.testing.assert_array_equal(_layers(loaded)[name].mask.numpy(), layer.mask.numpy(), name)
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype("float32")
    np.testing.assert_array_equal(slim_model(loaded)(x).numpy(), slim_model(split)(x).numpy())


def test_refusals():
    x = keras.Input((4, 4, 4))
    grouped = keras.Model(x, L.Dense(3)(L.Flatten()(L.Conv2D(4, 3, groups=2, name="grouped")(x))))
    with pytest.raises(ValueError, match="kels split layers"):
        slim_model(split_model(grouped, 0.5, split_mode="wels"))
    split = split_model(_own_cnn(), 0.5)
    with pytest.raises(ValueError, match="already has split layers"):
        split_model(split)
    _layers(split)["mix"].mask.assign(kels_mask(_layers(split)["mix"].kernel.shape, 0.5, "body"))
    with pytest.raises(ValueError, match="layer mix: its mask is not the fit hypothesis"):
        slim_model(split)
