"""ReduceNet's PyTorch checkpoints (ohmydroid/reducenet `reducenet20/56`, teacher or student)
-> ke_tf `reduce20`/`reduce56`.

The variant comes from the checkpoint's `scaler` (1: teacher, whose blocks sum the non-linear
`branch1`; 0: student) and `lora` (1: the linear branch is active) unless given. Branches the
variant does not run (a student's inherited `branch1`, an inactive `lora_branch`) are not
converted. Module map per block: branch2.0 -> `_rep/conv`, branch1.{0,1,3,4} ->
`_rep/b1_{conv1,bn1,conv2,bn2}`, lora_branch.{0,1} -> `_rep/lora_{conv,bn}`, fuse.0 -> `_rep/bn`,
fuse.{2,3} -> `_conv2`/`_bn2`, shortcut.{0,1} -> `_short_conv`/`_short_bn`.
"""

import re

from ke_tf.convert.common import changed_widths, convert, out_channels
from ke_tf.io.params import ParamsError
from ke_tf.models import default_widths, model_spec
from ke_tf.models.resnet_cifar import DEPTHS

_BLOCK = re.compile(r"layer(\d)\.(\d+)\.(\w+)\.(\d)\.(\w+)$")
_MODULES = {
    ("branch2", "0"): "_rep/conv",
    ("branch1", "0"): "_rep/b1_conv1",
    ("branch1", "1"): "_rep/b1_bn1",
    ("branch1", "3"): "_rep/b1_conv2",
    ("branch1", "4"): "_rep/b1_bn2",
    ("lora_branch", "0"): "_rep/lora_conv",
    ("lora_branch", "1"): "_rep/lora_bn",
    ("fuse", "0"): "_rep/bn",
    ("fuse", "2"): "_conv2",
    ("fuse", "3"): "_bn2",
    ("shortcut", "0"): "_short_conv",
    ("shortcut", "1"): "_short_bn",
}
_TOP = {"conv1.0": "stem_conv", "conv1.1": "stem_bn", "linear": "classifier"}


def _flag(arrays, key, source):
    if key not in arrays:
        raise ParamsError(f"{source}: missing key {key!r}; not a ReduceNet checkpoint?")
    return float(arrays[key].reshape(-1)[0])


def layer_mapper(variant, lora):
    """`layer_of` for one variant: skips the branches that variant does not run."""
    skipped = {"lora_branch"} if not lora else set()
    if variant != "teacher":
        skipped.add("branch1")

    def layer_of(key):
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked" or (leaf in ("scaler", "lora") and key.count(".") <= 2):
            return None  # BN step counters; the network's (and each block's) scaler/lora switches
        m = _BLOCK.match(key)
        if m:
            s, j, branch, index, leaf = m.groups()
            if branch in skipped:
                return None
            return f"s{s}b{j}" + _MODULES.get((branch, index), f"_{branch}.{index}"), leaf
        module, _, leaf = key.rpartition(".")
        return _TOP.get(module, module), leaf

    return layer_of


def convert_reducenet_pytorch(arrays, arch, source="<state_dict>", variant=None, image_size=32, extra_meta=None):
    """Convert a ReduceNet state_dict (`{key: ndarray}`) to ke_tf `arch` (reduce20/reduce56);
    returns (model, arrays, metadata)."""
    depth = int(arch.replace("reduce", "")) if arch.startswith("reduce") else None
    if depth not in (20, 56):
        raise ValueError(f"--arch for reducenet_pytorch must be reduce20 or reduce56, got {arch!r}")
    lora = _flag(arrays, "lora", source) == 1.0
    variant = variant or ("teacher" if _flag(arrays, "scaler", source) == 1.0 else "student")
    if variant not in ("teacher", "student"):
        raise ValueError(f"ReduceNet checkpoints hold a teacher or a student, not {variant!r}")
    if lora and variant == "teacher":
        raise ParamsError(f"{source}: lora is on in a teacher checkpoint; ke_tf's teacher has no lora branch")
    widths = {}
    for s in (1, 2, 3):
        widths[f"stage{s}"] = out_channels(arrays, f"layer{s}.0.fuse.2.weight", source)
        for j in range(DEPTHS[depth]):
            widths[f"s{s}b{j}"] = out_channels(arrays, f"layer{s}.{j}.branch2.0.weight", source)
    options = {"variant": variant, "padding": "torch"}
    if variant == "teacher":
        options["expansion"] = out_channels(arrays, "layer1.0.branch1.0.weight", source) / widths["s1b0"]
    if lora:
        options["lora"] = True
    spec = model_spec(
        arch,
        out_channels(arrays, "linear.weight", source),
        (image_size, image_size, 3),
        changed_widths(default_widths(arch), widths),
        **options,
    )
    return convert(
        source,
        arrays,
        spec,
        layer_mapper(variant, lora),
        extra_meta={"format": "reducenet_pytorch", **(extra_meta or {})},
    )
