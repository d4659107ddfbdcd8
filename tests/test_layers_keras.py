"""Every public layer is a good Keras citizen: registered, complete config, `.keras` round trip
with equal outputs, usable in subclassed models trained by `model.fit`. Loaded == saved is an
identity: built, saved, loaded and run under the float64 policy, compared at float64 round-off
(tests/numerics.py)."""

import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
from keras.src.testing import TestCase

import ke_tf
from tests.numerics import assert_identical, float64

# name: (class, constructor arguments, input shape, output shape, trainable / non-trainable weights)
CASES = {
    "SplitConv2D": (
        ke_tf.SplitConv2D,
        {"filters": 6, "kernel_size": 3, "padding": "same", "split_rate": 0.5, "split_mode": "wels", "seed": 3},
        (2, 8, 8, 6),
        (2, 8, 8, 6),
        (2, 1),
    ),
    "SplitDense": (ke_tf.SplitDense, {"units": 6, "split_rate": 0.3, "role": "body"}, (2, 5), (2, 6), (2, 1)),
    "ChannelGate": (ke_tf.ChannelGate, {"group": "stage1"}, (2, 8, 8, 6), (2, 8, 8, 6), (0, 1)),
    "ReduceConv": (
        ke_tf.ReduceConv,
        {"filters": 6, "strides": 2, "expansion": 2.0, "bottleneck": True, "lora": True},
        (2, 8, 8, 6),
        (2, 4, 4, 6),
        (12, 8),
    ),
    "AnnealedReLU": (ke_tf.AnnealedReLU, {"initial_lambda": 0.3}, (2, 8, 8, 6), (2, 8, 8, 6), (0, 1)),
    "TransNet": (ke_tf.TransNet, {"channels": 6, "depth": 3}, (2, 8, 8, 6), (2, 8, 8, 6), (4, 0)),
    "SyncBatchNormalization": (
        ke_tf.SyncBatchNormalization,
        {"momentum": 0.9, "epsilon": 1e-5, "synchronized": True, "fused": True},
        (2, 8, 8, 6),
        (2, 8, 8, 6),
        (2, 2),
    ),
}
LAYERS = {name: functools.partial(case[0], **case[1]) for name, case in CASES.items()}


def _randomise(model, rng):
    for v in model.weights:
        if v.name == "moving_variance":
            v.assign(rng.uniform(0.5, 2.0, v.shape))
        elif v.name in ("gate",):
            v.assign(rng.uniform(size=v.shape) > 0.5)
        elif v.name not in ("mask",):
            v.assign(rng.normal(0, 0.3, v.shape))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_round_trips_through_keras_file(tmp_path, name):
    with float64():
        layer = LAYERS[name]()
        assert keras.saving.get_registered_name(type(layer)) == f"ke_tf>{name}"
        assert type(layer).from_config(layer.get_config()).get_config() == layer.get_config()
        dense_input = name == "SplitDense"
        inputs = keras.Input((5,) if dense_input else (8, 8, 6))
        model = keras.Model(inputs, layer(inputs))
        _randomise(model, np.random.default_rng(0))
        path = str(tmp_path / "m.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    x = np.random.default_rng(1).normal(size=(2,) + tuple(inputs.shape[1:]))
    assert_identical(loaded(x, training=False).numpy(), model(x, training=False).numpy())
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


class SubclassedNet(keras.Model):
    """A user's subclassed model mixing our layers."""

    def __init__(self):
        super().__init__()
        self.conv = ke_tf.SplitConv2D(8, 3, padding="same", role="stem")
        self.gate = ke_tf.ChannelGate("g")
        self.block = ke_tf.ReduceConv(8, lora=True, lora_act="annealed")
        self.act = ke_tf.AnnealedReLU()
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = ke_tf.SplitDense(4)

    def call(self, x, training=False):
        x = self.gate(self.conv(x))
        return self.head(self.pool(self.act(self.block(x, training=training))))


def test_subclassed_model_learns_with_fit():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    labels = np.arange(128) % 4
    images = rng.normal(size=(128, 8, 8, 3)).astype("float32") + labels[:, None, None, None].astype("float32")
    model = SubclassedNet()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(images, labels, batch_size=32, epochs=20, verbose=0)
    assert history.history["loss"][-1] < 0.6 * history.history["loss"][0]
    assert history.history["accuracy"][-1] > 0.6  # chance is 0.25


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_passes_keras_layer_test_harness(name):
    """Keras's own checks: config and serialization round trip, symbolic and eager shapes, weight
    counts, a `fit` run, and float16/mixed_float16 layer policies (output in the compute dtype)."""
    cls, kwargs, input_shape, output_shape, (trainable, non_trainable) = CASES[name]
    TestCase().run_layer_test(
        cls,
        kwargs,
        input_shape=input_shape,
        expected_output_shape=output_shape,
        expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=non_trainable,
        run_training_check=trainable > 0,
        run_mixed_precision_check=True,
    )
