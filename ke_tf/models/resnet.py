"""ImageNet-style ResNet-18/34/50 (torchvision layout, v1.5 bottleneck) for any input size.

Channel groups as in `resnet_cifar`: "stage{s}" residual streams, "s{s}b{j}" basic-block inner
width, "s{s}b{j}a"/"s{s}b{j}b" bottleneck inner widths, "stem" when the stem does not feed an
identity shortcut (ResNet-50).

`padding="torch"` pads strided convs and the max-pool symmetrically as PyTorch does (networks
converted from torchvision-layout checkpoints, `ke_tf.convert`); the default "same" is Keras'.
"""

import keras

from ke_tf.layers.factory import PLAIN, padded_conv

CONFIGS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}
BASE_WIDTHS = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}


def imagenet_default_widths(depth, width_mult=1.0):
    """The channel-group widths of the unpruned network."""
    kind, blocks = CONFIGS[depth]
    widths = {"stem": int(round(64 * width_mult))}
    for s, (n, base) in enumerate(zip(blocks, BASE_WIDTHS), start=1):
        base = int(round(base * width_mult))
        widths[f"stage{s}"] = base * EXPANSION[kind]
        for j in range(n):
            if kind == "basic":
                widths[f"s{s}b{j}"] = base
            else:
                widths[f"s{s}b{j}a"] = widths[f"s{s}b{j}b"] = base
    if kind == "basic":
        widths["stem"] = widths["stage1"]
    return widths


def _stem_group(kind):
    """ResNet-18/34's stem output is stage 1's residual stream (identity shortcuts)."""
    return "stage1" if kind == "basic" else "stem"


def _projection(x, out_channels, strides, name, layers, group):
    if strides == 1 and x.shape[-1] == out_channels:
        return x
    x = layers.conv(out_channels, 1, strides, name=f"{name}_short_conv", group=group)(x)
    return layers.bn(name=f"{name}_short_bn")(x)


def _basic_block(x, b, w, s, strides, layers, zero_init_residual, padding):
    y = padded_conv(layers, x, w[b], 3, strides, f"{b}_conv1", padding, group=b)
    y = layers.bn(name=f"{b}_bn1")(y)
    y = keras.layers.ReLU(name=f"{b}_relu1")(y)
    y = layers.gate(y, b, name=f"{b}_gate1")
    y = layers.conv(w[f"stage{s}"], 3, 1, name=f"{b}_conv2", group=f"stage{s}")(y)
    return layers.bn(name=f"{b}_bn2", zero_gamma=zero_init_residual)(y)


def _bottleneck_block(x, b, w, s, strides, layers, zero_init_residual, padding):
    y = layers.conv(w[f"{b}a"], 1, 1, name=f"{b}_conv1", group=f"{b}a")(x)
    y = layers.bn(name=f"{b}_bn1")(y)
    y = keras.layers.ReLU(name=f"{b}_relu1")(y)
    y = layers.gate(y, f"{b}a", name=f"{b}_gate1")
    y = padded_conv(layers, y, w[f"{b}b"], 3, strides, f"{b}_conv2", padding, group=f"{b}b")
    y = layers.bn(name=f"{b}_bn2")(y)
    y = keras.layers.ReLU(name=f"{b}_relu2")(y)
    y = layers.gate(y, f"{b}b", name=f"{b}_gate2")
    y = layers.conv(w[f"stage{s}"], 1, 1, name=f"{b}_conv3", group=f"stage{s}")(y)
    return layers.bn(name=f"{b}_bn3", zero_gamma=zero_init_residual)(y)


def resnet(
    depth,
    num_classes,
    input_shape=(224, 224, 3),
    widths=None,
    layers=PLAIN,
    zero_init_residual=False,
    width_mult=1.0,
    padding="same",
    name=None,
):
    """Build ResNet-`depth` (18/34/50) with the 7x7/2 stem and 3x3/2 max-pool."""
    if depth not in CONFIGS:
        raise ValueError(f"ResNet depth must be one of {sorted(CONFIGS)}, got {depth}")
    kind, blocks = CONFIGS[depth]
    w = {**imagenet_default_widths(depth, width_mult), **(widths or {})}
    block_fn = _basic_block if kind == "basic" else _bottleneck_block
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    stem_group = _stem_group(kind)
    x = padded_conv(layers, inputs, w[stem_group], 7, 2, "stem_conv", padding, role="stem", group=stem_group)
    x = layers.bn(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    if padding == "torch":  # zeros pad like -inf here: the inputs are ReLU outputs (>= 0)
        x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, 2, padding="valid" if padding == "torch" else "same", name="stem_pool")(x)
    x = layers.gate(x, stem_group, name="stem_gate")
    for s, n in enumerate(blocks, start=1):
        for j in range(n):
            b = f"s{s}b{j}"
            strides = 2 if (s > 1 and j == 0) else 1
            y = block_fn(x, b, w, s, strides, layers, zero_init_residual, padding)
            x = _projection(x, w[f"stage{s}"], strides, b, layers, f"stage{s}")
            x = keras.layers.Add(name=f"{b}_add")([x, y])
            x = keras.layers.ReLU(name=f"{b}_out_relu")(x)
            x = layers.gate(x, f"stage{s}", name=f"{b}_gate_out")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.dense(num_classes, name="classifier", role="classifier")(x)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}")
