"""ReduceNet ("Shrink, Distill"; ohmydroid/reducenet): CIFAR ResNets whose blocks train with an
extra non-linear bottleneck branch (teacher), drop it for a plain student that inherits every
other weight and is distilled from the teacher, then fold into a Conv-BN-free deploy net.

Variants (option `variant`):
- "teacher": block = ReLU(BN-ReLU-conv3x3-BN of [conv3x3(x) + bottleneck(x)] + shortcut(x));
- "student": the same without the bottleneck (= ResNet-20/56 with 1x1-projection shortcuts),
  optionally with the linear `lora` branch (1x1 conv + BN, `lora_act` "annealed" for VanillaNet's
  annealed ReLU);
- "deploy": the fused student: only Conv2D-with-bias, ReLU, add, pool and the classifier.
reduce20 w1 (CIFAR-10, 32x32): teacher 412.1K params / 62.0M MACs, student 272.5K / 40.8M.
Channel groups are those of the CIFAR ResNets ("stage{s}", "s{s}b{j}").
"""

import keras

from ke_tf.layers.factory import PLAIN, padded_conv
from ke_tf.layers.reparam import ReduceConv
from ke_tf.models import build_from_spec, model_spec, register_arch
from ke_tf.models.resnet_cifar import DEPTHS, cifar_default_widths
from ke_tf.surgery.deploy import deploy_model, transfer_weights

VARIANTS = ("teacher", "student", "deploy")
REDUCE_DEPTHS = (20, 56)


def _shortcut(x, out_channels, strides, name, layers, deploy):
    """Identity, or 1x1 conv (+BN) projection when the shape changes (ReduceNet uses option B)."""
    if strides == 1 and x.shape[-1] == out_channels:
        return x
    x = layers.conv(out_channels, 1, strides, name=f"{name}_short_conv", use_bias=deploy)(x)
    return x if deploy else layers.bn(name=f"{name}_short_bn")(x)


def reducenet(
    depth,
    num_classes,
    input_shape=(32, 32, 3),
    widths=None,
    layers=PLAIN,
    variant="teacher",
    expansion=1.0,
    width_mult=1.0,
    lora=False,
    lora_act="linear",
    padding="same",
    name=None,
):
    """Build ReduceNet-`depth` (`variant` teacher | student | deploy) as a functional model;
    `padding="torch"` pads strided convs as PyTorch (checkpoints converted by `ke_tf.convert`)."""
    if depth not in REDUCE_DEPTHS:
        raise ValueError(f"ReduceNet depth must be one of {REDUCE_DEPTHS}, got {depth}")
    if variant not in VARIANTS:
        raise ValueError(f"ReduceNet variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if lora and variant != "student":
        raise ValueError("ReduceNet: the lora branch exists only in the student variant")
    deploy = variant == "deploy"
    n = DEPTHS[depth]
    w = {**cifar_default_widths(depth, width_mult), **(widths or {})}
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layers.conv(w["stage1"], 3, 1, name="stem_conv", role="stem", group="stage1", use_bias=deploy)(inputs)
    if not deploy:
        x = layers.bn(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for s in (1, 2, 3):
        for j in range(n):
            b = f"s{s}b{j}"
            strides = 2 if (s > 1 and j == 0) else 1
            if deploy:
                y = padded_conv(layers, x, w[b], 3, strides, f"{b}_conv1", padding, group=b, use_bias=True)
            else:
                y = ReduceConv(
                    w[b],
                    strides,
                    expansion=expansion,
                    bottleneck=variant == "teacher",
                    lora=lora,
                    lora_act=lora_act,
                    padding=padding,
                    name=f"{b}_rep",
                )(x)
            y = keras.layers.ReLU(name=f"{b}_relu1")(y)
            y = layers.conv(w[f"stage{s}"], 3, 1, name=f"{b}_conv2", group=f"stage{s}", use_bias=deploy)(y)
            if not deploy:
                y = layers.bn(name=f"{b}_bn2")(y)
            x = _shortcut(x, w[f"stage{s}"], strides, b, layers, deploy)
            x = keras.layers.Add(name=f"{b}_add")([x, y])
            x = keras.layers.ReLU(name=f"{b}_relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.dense(num_classes, name="classifier", role="classifier")(x)
    return keras.Model(inputs, outputs, name=name or f"reduce{depth}_{variant}")


for _d in REDUCE_DEPTHS:
    register_arch(
        f"reduce{_d}",
        lambda num_classes, input_shape, widths, layers, _d=_d, **o: reducenet(
            _d, num_classes, input_shape, widths, layers, **o
        ),
        lambda _d=_d, width_mult=1.0, **o: cifar_default_widths(_d, width_mult),
    )


def is_reducenet(spec):
    return spec["arch"] in {f"reduce{d}" for d in REDUCE_DEPTHS}


def variant_spec(spec, variant, **options):
    """`spec` of a ReduceNet turned into `variant` (other options kept, `options` override)."""
    opts = {**spec.get("options", {}), **options, "variant": variant}
    if variant != "student":
        opts.pop("lora", None)
        opts.pop("lora_act", None)
    return {**spec, "options": opts}


def deploy_spec(spec):
    """Spec of the fused deploy model of the ReduceNet `spec` (rebuilds with `build_from_spec`)."""
    return variant_spec(spec, "deploy")


def student_spec_of(model):
    """The spec of a ReduceNet student, read from its layers (depth, channel widths, classes)."""
    units = [layer for layer in model.layers if isinstance(layer, ReduceConv)]
    widths = {layer.name[: -len("_rep")]: layer.filters for layer in units}
    widths.update({f"stage{s}": model.get_layer(f"s{s}b0_conv2").filters for s in (1, 2, 3)})
    return model_spec(
        f"reduce{2 * len(units) + 2}",
        model.get_layer("classifier").units,
        model.input_shape[1:],
        widths,
        variant="student",
        padding=units[0].padding,
    )


def get_deploy_model(model, spec=None):
    """Fold a trained ReduceNet student `model` into its deploy model (built from
    `deploy_spec(spec)`; `spec` defaults to `student_spec_of(model)`): `deploy_model`'s weights,
    every BN folded into the conv before it and each block's `_rep` unit fused into its `_conv1`.
    Equal to `model` in inference mode up to the round-off of its dtype."""
    deploy = build_from_spec(deploy_spec(spec or student_spec_of(model)))
    transfer_weights(deploy_model(model), deploy, source_name=_student_name)
    return deploy


def _student_name(name):
    """The student layer whose deployed weights the deploy layer `name` takes: s1b0_conv1 <- s1b0_rep."""
    return name[: -len("_conv1")] + "_rep" if name.endswith("_conv1") else name
