"""EKG's TF2 params pickles (sseung0703/EKG `utils.save_model`: `{Keras-2 variable name: ndarray}`,
e.g. "BasicBlock0.0/conv1/kernel:0") -> ke_tf ResNets; pruned ("slimmed") files convert too,
their channel widths are read from the kernels.

CIFAR ResNet-20/56 become ke_tf `resnet20`/`resnet56` with 1x1-projection shortcuts (option B,
EKG's `conv3`/`bn3`); ResNet-18/34/50 (1000 classes) the ImageNet ResNets. EKG pads with TF's
"SAME", as Keras does, so no padding option is needed. Kernels are already HWIO; BN variables
are stored as [1, 1, 1, C].
"""

import re

from ke_tf.convert.common import changed_widths, convert
from ke_tf.io.params import ParamsError
from ke_tf.models import default_widths, model_spec
from ke_tf.models.resnet import CONFIGS as IMAGENET
from ke_tf.models.resnet_cifar import DEPTHS as CIFAR

_BLOCK = re.compile(r"BasicBlock(\d)\.(\d+)/(conv|bn)(\d)/(\w+):0$")
_TOP = {"conv": "stem_conv", "bn": "stem_bn", "fc": "classifier"}
_LEAVES = {"biases": "bias"}


def layer_mapper(bottleneck):
    """`layer_of` for EKG names; bottleneck blocks number their convs 0-2 (ke_tf: 1-3), conv3
    is the projection shortcut in both block kinds."""

    def layer_of(key):
        m = _BLOCK.match(key)
        if m:
            i, j, kind, k, leaf = m.groups()
            if k == "3":
                name = "short_conv" if kind == "conv" else "short_bn"
            else:
                name = f"{kind}{int(k) + 1 if bottleneck else k}"
            return f"s{int(i) + 1}b{j}_{name}", leaf
        module, _, leaf = key.partition("/")
        return _TOP.get(module, module), leaf.split(":")[0]

    return layer_of


def keras2_leaf(leaf, value, is_bn):
    """EKG's variables are already in Keras layout; biases are called `biases`."""
    return _LEAVES.get(leaf, leaf), value


def _out(arrays, name, source):
    key = f"{name}/kernel:0"
    if key not in arrays:
        raise ParamsError(f"{source}: missing key {key!r}; wrong --arch or not an EKG params file?")
    return int(arrays[key].shape[-1])


def convert_ekg_tf2(arrays, arch, source="<params>", image_size=None, extra_meta=None):
    """Convert an EKG params dict (`{name: ndarray}`) to ke_tf `arch` (resnet20/56 or
    resnet18/34/50); returns (model, arrays, metadata)."""
    depth = int(arch.replace("resnet", "")) if arch.startswith("resnet") else None
    if depth not in CIFAR and depth not in IMAGENET:
        raise ValueError(f"--arch for ekg_tf2 must be a ResNet (resnet20/56 or resnet18/34/50), got {arch!r}")
    cifar = depth in CIFAR
    blocks = (CIFAR[depth],) * 3 if cifar else IMAGENET[depth][1]
    bottleneck = not cifar and IMAGENET[depth][0] == "bottleneck"
    widths = {} if cifar or not bottleneck else {"stem": _out(arrays, "conv", source)}
    for i, n in enumerate(blocks):
        s = i + 1
        for j in range(n):
            p = f"BasicBlock{i}.{j}/"
            if bottleneck:
                widths[f"s{s}b{j}a"] = _out(arrays, p + "conv0", source)
                widths[f"s{s}b{j}b"] = _out(arrays, p + "conv1", source)
            else:
                widths[f"s{s}b{j}"] = _out(arrays, p + "conv1", source)
            widths[f"stage{s}"] = _out(arrays, p + "conv2", source)
    size = image_size or (32 if cifar else 224)
    options = {"shortcut": "B"} if cifar else {}
    spec = model_spec(
        arch, _out(arrays, "fc", source), (size, size, 3), changed_widths(default_widths(arch), widths), **options
    )
    return convert(
        source,
        arrays,
        spec,
        layer_mapper(bottleneck),
        leaf_of=keras2_leaf,
        extra_meta={"format": "ekg_tf2", **(extra_meta or {})},
    )
