"""Annealed activation for deep training (VanillaNet, Chen et al. 2023): a ReLU that is blended
into the identity over training so the layer it sits in becomes linear, hence fusable."""

import keras


@keras.saving.register_keras_serializable(package="ke_tf")
class AnnealedReLU(keras.layers.Layer):
    """`(1 - l) * ReLU(x) + l * x` (= LeakyReLU with negative slope `l`). `l` is a non-trainable
    scalar variable the training loop moves from 0 (ReLU) to 1 (identity); it is saved with the
    weights, and `initial_lambda` only sets its starting value."""

    def __init__(self, initial_lambda=0.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_lambda = float(initial_lambda)

    def build(self, input_shape):
        self.lam = self.add_weight(
            name="lam", shape=(), trainable=False, initializer=keras.initializers.Constant(self.initial_lambda)
        )

    def call(self, x):
        lam = keras.ops.cast(self.lam, x.dtype)
        return (1.0 - lam) * keras.ops.relu(x) + lam * x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "initial_lambda": self.initial_lambda}


def annealed_layers(model):
    """Every AnnealedReLU in `model`, nested layers included."""
    return [
        layer for layer in model._flatten_layers(include_self=False, recursive=True) if isinstance(layer, AnnealedReLU)
    ]


def set_annealing(model, value):
    """Set `l` of every AnnealedReLU in `model` (called by the loop once per epoch)."""
    for layer in annealed_layers(model):
        layer.lam.assign(float(value))


def linear_anneal(epoch, anneal_epochs):
    """VanillaNet's linear schedule l = epoch / anneal_epochs (0-indexed epochs), clipped at 1;
    `anneal_epochs` 0 means linear from the start."""
    if anneal_epochs <= 0:
        return 1.0
    return min(1.0, epoch / anneal_epochs)
