"""Layer factories: the one place model builders get their conv/dense/BN layers from.

A builder written against `LayerFactory` yields a plain network; `ke_tf.layers.split` and
`ke_tf.layers.gates` subclass it to yield split-mask (Knowledge Evolution) or gated (pruning)
variants of the *same* code.
"""

import keras

from ke_tf.layers.batchnorm import batch_norm

# PyTorch-compatible defaults: the published recipes (ResNet, KE, EKG) were tuned with torch BN
# (momentum/epsilon: ke_tf.layers.batchnorm), He fan-out conv init (torchvision ResNet) and torch's
# default Linear kernel init U(-1/sqrt(fan_in), 1/sqrt(fan_in)).


def conv_initializer():
    """He-normal, fan-out, as torchvision's ResNet `kaiming_normal_(mode='fan_out')`."""
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_out", distribution="untruncated_normal")


def dense_initializer():
    """torch.nn.Linear's default kernel init U(-1/sqrt(fan_in), 1/sqrt(fan_in)); biases start at 0."""
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


def tag_group(layer, group):
    """Record which channel group `layer` writes (read by `ke_tf.surgery.slicing`); returns the layer."""
    layer.channel_group = group
    return layer


class LayerFactory:
    """Makes the layers of a model. `role` tells subclasses where a layer sits:
    "stem" (first conv: sees the raw image), "classifier" (last dense), or "body"; `group` names
    the channel group a conv writes (see the model builders)."""

    def conv(
        self,
        filters,
        kernel_size,
        strides=1,
        name=None,
        role="body",
        group=None,
        use_bias=False,
        groups=1,
        padding="same",
    ):
        return tag_group(
            keras.layers.Conv2D(
                filters,
                kernel_size,
                strides=strides,
                padding=padding,
                use_bias=use_bias,
                groups=groups,
                kernel_initializer=conv_initializer(),
                name=name,
            ),
            group,
        )

    def dense(self, units, name=None, role="classifier"):
        return keras.layers.Dense(units, kernel_initializer=dense_initializer(), name=name)

    def bn(self, name=None, zero_gamma=False):
        return batch_norm(name, zero_gamma)

    def gate(self, x, group, name=None):
        """Hook after each channel group's activation; plain models pass `x` through."""
        return x


PLAIN = LayerFactory()

PADDINGS = ("same", "torch")


def padded_conv(layers, x, filters, kernel_size, strides, name, padding="same", **kwargs):
    """`layers.conv(...)(x)` with Keras "same" padding, or with PyTorch's symmetric padding
    (`padding="torch"`: explicit ZeroPadding2D + valid conv) for strided convs. Keras pads a
    stride-2 "same" conv on the bottom/right only, so a converted PyTorch network needs "torch"
    to give PyTorch's outputs; stride-1 odd kernels pad identically either way."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if padding == "torch" and strides > 1 and kernel_size > 1:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        return layers.conv(filters, kernel_size, strides, name=name, padding="valid", **kwargs)(x)
    return layers.conv(filters, kernel_size, strides, name=name, **kwargs)(x)
