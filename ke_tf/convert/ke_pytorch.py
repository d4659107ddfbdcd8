"""Knowledge Evolution's PyTorch ResNets (ahmdtaha/knowledge_evolution `Split_ResNet18/34/50`,
torchvision module names, each SplitConv/SplitLinear with its `mask`) -> ke_tf ImageNet ResNets.

A checkpoint with masks becomes a split (KE dense) network carrying the same masks (its split rate,
unless given, read from the classifier mask: a slim net's all-ones masks give 1.0); one without
(torchvision, or a slim net saved without masks) a plain one. Strided convs and the max-pool
use PyTorch's symmetric padding (`padding="torch"`); channel widths are read from the weights,
so slim nets convert too.
"""

import re

from ke_tf.convert.common import changed_widths, convert, out_channels
from ke_tf.models import default_widths, model_spec
from ke_tf.models.resnet import CONFIGS

_BLOCK = re.compile(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)$")
_TOP = {"conv1": "stem_conv", "bn1": "stem_bn", "fc": "classifier"}
IGNORED_LEAVES = ("num_batches_tracked",)


def layer_of(key):
    """(ke_tf layer, torch leaf) of a torchvision-ResNet key; None for BN's step counter."""
    if key.rsplit(".", 1)[-1] in IGNORED_LEAVES:
        return None
    m = _BLOCK.match(key)
    if m:
        s, j, module, leaf = m.groups()
        name = {"downsample.0": "short_conv", "downsample.1": "short_bn"}.get(module, module)
        return f"s{s}b{j}_{name}", leaf
    module, _, leaf = key.rpartition(".")
    return (_TOP[module], leaf) if module in _TOP else (key, leaf)  # unknown keys fail by name later


def infer_widths(depth, arrays, source):
    """Channel-group widths of the checkpoint's network (slim KE nets are narrower)."""
    kind, blocks = CONFIGS[depth]
    widths = {"stem": out_channels(arrays, "conv1.weight", source)}
    for s, n in enumerate(blocks, start=1):
        for j in range(n):
            p = f"layer{s}.{j}."
            if kind == "basic":
                widths[f"s{s}b{j}"] = out_channels(arrays, p + "conv1.weight", source)
                widths[f"stage{s}"] = out_channels(arrays, p + "conv2.weight", source)
            else:
                widths[f"s{s}b{j}a"] = out_channels(arrays, p + "conv1.weight", source)
                widths[f"s{s}b{j}b"] = out_channels(arrays, p + "conv2.weight", source)
                widths[f"stage{s}"] = out_channels(arrays, p + "conv3.weight", source)
    if kind == "basic":
        widths.pop("stem")  # the stem writes stage 1's residual stream
    return widths


def fit_fraction(arrays):
    """KE's split rate as its classifier mask holds it: the fraction of fit weights (kels keeps
    ceil(sr*in) of the fc inputs for every class; wels draws each weight with probability sr)."""
    return float(arrays["fc.mask"].mean()) if "fc.mask" in arrays else None


def convert_ke_pytorch(
    arrays, arch, source="<state_dict>", image_size=224, split_rate=None, split_mode="kels", extra_meta=None
):
    """Convert a KE/torchvision ResNet state_dict (`{key: ndarray}`) to ke_tf `arch`
    (resnet18/34/50); returns (model, arrays, metadata)."""
    depth = int(arch.replace("resnet", "")) if arch.startswith("resnet") else None
    if depth not in CONFIGS:
        raise ValueError(
            f"--arch for ke_pytorch must be one of {', '.join(f'resnet{d}' for d in CONFIGS)}, got {arch!r}"
        )
    num_classes = out_channels(arrays, "fc.weight", source)
    widths = changed_widths(default_widths(arch), infer_widths(depth, arrays, source))
    spec = model_spec(arch, num_classes, (image_size, image_size, 3), widths, padding="torch")
    split = any(k.endswith(".mask") for k in arrays)
    rate = split_rate or fit_fraction(arrays) or 1.0
    layers = (
        {"kind": "split", "split_rate": float(rate), "split_mode": split_mode, "seed": 0}
        if split
        else {"kind": "plain"}
    )
    return convert(
        source, arrays, spec, layer_of, layers_meta=layers, extra_meta={"format": "ke_pytorch", **(extra_meta or {})}
    )
