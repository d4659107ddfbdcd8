"""Every public layer is a good Keras citizen: registered, complete config, `.keras` round trip
with equal outputs, usable in subclassed models trained by `model.fit`. Loaded == saved is an
identity: built, saved, loaded and run under the float64 policy, compared at float64 round-off
(tests/numerics.py)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

import ke_tf
from tests.numerics import assert_identical, float64

LAYERS = {
    "SplitConv2D": lambda: ke_tf.SplitConv2D(6, 3, padding="same", split_rate=0.5, split_mode="wels", seed=3),
    "SplitDense": lambda: ke_tf.SplitDense(6, split_rate=0.3, role="body"),
    "ChannelGate": lambda: ke_tf.ChannelGate("stage1"),
    "ReduceConv": lambda: ke_tf.ReduceConv(6, strides=2, expansion=2.0, bottleneck=True, lora=True),
    "AnnealedReLU": lambda: ke_tf.AnnealedReLU(initial_lambda=0.3),
    "TransNet": lambda: ke_tf.TransNet(6, depth=3),
    "SyncBatchNormalization": lambda: ke_tf.SyncBatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=True),
}


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
