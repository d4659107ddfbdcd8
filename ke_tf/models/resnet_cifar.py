"""CIFAR ResNets (He et al. 2016, depth 6n+2: ResNet-20/32/56/110) with named channel groups.

Channel groups make widths explicit so that one builder yields the dense net, a Knowledge
Evolution slim net or an EKG-pruned net: "stage{s}" is the residual stream of stage s (the stem
writes into stage1), "s{s}b{j}" the inner width of block j of stage s.
"""

import keras

from ke_tf.layers.factory import PLAIN

STAGE_WIDTHS = (16, 32, 64)
DEPTHS = {20: 3, 32: 5, 56: 9, 110: 18}


def cifar_default_widths(depth, width_mult=1.0):
    """The channel-group widths of the unpruned network."""
    n = DEPTHS[depth]
    widths = {}
    for s, w in enumerate(STAGE_WIDTHS, start=1):
        w = int(round(w * width_mult))
        widths[f"stage{s}"] = w
        for j in range(n):
            widths[f"s{s}b{j}"] = w
    return widths


def _shortcut(x, out_channels, strides, name, layers, shortcut, group):
    """Identity when shapes match; else option A (subsample + zero-pad, He et al.'s CIFAR
    choice, gives the published 0.85M params / 125.5M MACs) or option B (1x1 conv + BN)."""
    in_channels = x.shape[-1]
    if strides == 1 and in_channels == out_channels:
        return x
    if shortcut == "B":
        x = layers.conv(out_channels, 1, strides, name=f"{name}_short_conv", group=group)(x)
        return layers.bn(name=f"{name}_short_bn")(x)
    if out_channels < in_channels:
        raise ValueError(
            f"{name}: option-A shortcut cannot shrink {in_channels} -> {out_channels} channels; "
            "use shortcut='B' for networks whose stages narrow"
        )
    return ZeroPadShortcut(out_channels - in_channels, strides, name=f"{name}_short_pad")(x)


@keras.saving.register_keras_serializable(package="ke_tf")
class ZeroPadShortcut(keras.layers.Layer):
    """Option-A shortcut: spatial subsampling by `strides` and zero channels appended."""

    channel_boundary = "option-A zero-pad shortcut: residual streams cannot be pruned (build with shortcut='B')"

    def __init__(self, pad_channels, strides, **kwargs):
        super().__init__(**kwargs)
        self.pad_channels = pad_channels
        self.strides = strides

    def call(self, x):
        x = x[:, :: self.strides, :: self.strides, :]
        return keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, self.pad_channels]])

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        s = self.strides
        return (b, None if h is None else -(-h // s), None if w is None else -(-w // s), c + self.pad_channels)

    def get_config(self):
        return {**super().get_config(), "pad_channels": self.pad_channels, "strides": self.strides}


def resnet_cifar(
    depth,
    num_classes,
    input_shape=(32, 32, 3),
    widths=None,
    layers=PLAIN,
    shortcut="A",
    zero_init_residual=False,
    width_mult=1.0,
    name=None,
):
    """Build a CIFAR ResNet-`depth` as a functional Keras model."""
    if depth not in DEPTHS:
        raise ValueError(f"CIFAR ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
    n = DEPTHS[depth]
    w = {**cifar_default_widths(depth, width_mult), **(widths or {})}
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layers.conv(w["stage1"], 3, 1, name="stem_conv", role="stem", group="stage1")(inputs)
    x = layers.bn(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = layers.gate(x, "stage1", name="stem_gate")
    for s in (1, 2, 3):
        for j in range(n):
            b = f"s{s}b{j}"
            strides = 2 if (s > 1 and j == 0) else 1
            y = layers.conv(w[b], 3, strides, name=f"{b}_conv1", group=b)(x)
            y = layers.bn(name=f"{b}_bn1")(y)
            y = keras.layers.ReLU(name=f"{b}_relu1")(y)
            y = layers.gate(y, b, name=f"{b}_gate1")
            y = layers.conv(w[f"stage{s}"], 3, 1, name=f"{b}_conv2", group=f"stage{s}")(y)
            y = layers.bn(name=f"{b}_bn2", zero_gamma=zero_init_residual)(y)
            x = _shortcut(x, w[f"stage{s}"], strides, b, layers, shortcut, f"stage{s}")
            x = keras.layers.Add(name=f"{b}_add")([x, y])
            x = keras.layers.ReLU(name=f"{b}_relu2")(x)
            x = layers.gate(x, f"stage{s}", name=f"{b}_gate2")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.dense(num_classes, name="classifier", role="classifier")(x)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}")
