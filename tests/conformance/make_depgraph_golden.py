"""Write tests/golden/depgraph_torchvision.json: Torch-Pruning's dependency groups for three torchvision models.

The golden is a reference for ke_tf's channel dependency graph (structural pruning). It is produced by Torch-Pruning
(``DependencyGraph().build_dependency`` + ``get_all_groups``) on torchvision ``resnet50``, ``mobilenet_v2`` and
``densenet121`` (weights=None, num_classes=10, eval mode, example input 1x3x64x64), with the final classifier Linear
in ``ignored_layers`` and ``root_module_types=[nn.Conv2d, nn.Linear]``. The tests that read it need no torch.

This script runs in a SIDE environment, never in the repo's own venv (torch is no dependency of ke_tf):

    python3 -m venv /work/side/tpcuda
    /work/side/tpcuda/bin/pip install torch==2.14.1 torchvision==0.29.1 torch-pruning==1.6.1
    cd /work/main && /work/side/tpcuda/bin/python tests/conformance/make_depgraph_golden.py

(PyPI's torch wheel is the CUDA build; it runs on CPU. A ``+cpu`` torch with PyPI's torchvision does NOT work:
torchvision's compiled ops need libtorch_cuda and ``import torchvision`` fails. Any torch/torchvision pair whose ops
load together will do; the versions used are written into the golden.) The venv takes ~5.5 GB; the run ~30 s.

JSON layout (``models[arch]``):

- ``num_groups``, ``channels`` (the channel count of each group, in group order), ``channels_total``.
- ``groups``: sorted by the position of the group's root module in ``model.named_modules()``. Each has
  ``root`` (module name), ``root_kind`` (``conv`` | ``depthwise`` | ``linear``), ``root_dim`` (always ``out``: TP
  roots every group at an out-channel pruning function), ``channels`` (length of the root's index list),
  ``summary`` (member counts, see below), ``members`` and ``ops``.
- ``members``: the parametrised layers of the group, sorted by ``named_modules()`` order, each
  ``[name, kind, role, idx]``: kind ``conv`` (groups == 1), ``depthwise`` (groups == in == out channels),
  ``bn`` (BatchNorm2d), ``linear``; role ``out`` or ``in`` for conv/linear (TP's prune_out_channels /
  prune_in_channels); for ``bn`` and ``depthwise`` the role is ``out``: TP prunes them with one function for both sides
  (prune_in_channels is prune_out_channels), they carry the channels through. ``idx`` is ``[start, stop]`` (half-open,
  in the member's own channel coordinates) when the indices form a contiguous ascending range, else the full list.
  An index that is not the identity ``[0, channels]`` comes from a concatenation (index mapping, DenseNet).
- ``ops``: the non-parametrised graph nodes TP put in the group: ``[kind, tp_name, idx]`` for concat nodes
  (kind ``concat``; ``idx`` in the concat OUTPUT coordinates), and ``[kind, grad_fn, count]`` aggregated for the rest
  (kind ``elementwise`` for add/relu/pool/mean..., ``reshape`` for flatten). ``concats`` (per model) lists each
  concat node: ``tp_name``, ``offsets`` (the channel offsets of its inputs), ``consumers`` (module names reached
  through the node's direct outputs, elementwise ops skipped).
- ``summary``: ``conv_out``, ``conv_in``, ``depthwise``, ``bn``, ``linear_out``, ``linear_in``, ``concat``,
  ``elementwise``, ``add`` (AddBackward elementwise nodes, i.e. residual adds), ``reshape``, ``other``.

The root is TP's choice (the first not-yet-grouped Conv2d/Linear in its trace order: in MobileNetV2 the depthwise conv,
in ResNet-50 a stage's downsample conv); a consumer should match groups by their member sets, not by root. The
``TBackward0`` elementwise node in the groups that reach the classifier is TP's trace of the Linear's weight transpose.
The script asserts that the groups partition every layer side they touch: for each (layer, in/out) the index sets over
all groups are disjoint and cover its channels, and every Conv2d/BN (not the classifier) has its out side in a group.
"""

import importlib.metadata
import json
import os
import sys
from collections import Counter

import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision
from torch_pruning import ops as tp_ops

ARCHS = ("resnet50", "mobilenet_v2", "densenet121")
INPUT_SHAPE = (1, 3, 64, 64)
NUM_CLASSES = 10
SUMMARY_KEYS = (
    "conv_out",
    "conv_in",
    "depthwise",
    "bn",
    "linear_out",
    "linear_in",
    "concat",
    "elementwise",
    "add",
    "reshape",
    "other",
)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden", "depgraph_torchvision.json")


def _dist_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _idx(idxs):
    idxs = [int(i) for i in idxs]
    if idxs and idxs == list(range(idxs[0], idxs[0] + len(idxs))):
        return [idxs[0], idxs[0] + len(idxs)]
    return idxs


def _kind(module):
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups == module.out_channels and module.out_channels > 1
        if depthwise:
            assert module.in_channels == module.out_channels, module
            return "depthwise"
        assert module.groups == 1, f"grouped conv not covered: {module}"
        return "conv"
    if isinstance(module, nn.BatchNorm2d):
        return "bn"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _node_kind(node):
    t = node.type
    if t == tp_ops.OPTYPE.CONCAT:
        return "concat"
    if t == tp_ops.OPTYPE.ELEMENTWISE:
        return "elementwise"
    if t == tp_ops.OPTYPE.RESHAPE:
        return "reshape"
    return t.name.lower()


def _consumers(node, names, seen=None):
    """Module names reached from ``node``'s outputs, walking through elementwise nodes."""
    seen = set() if seen is None else seen
    out = []
    for o in node.outputs:
        if id(o) in seen:
            continue
        seen.add(id(o))
        if id(o.module) in names:
            out.append(names[id(o.module)])
        elif o.type == tp_ops.OPTYPE.ELEMENTWISE:
            out.extend(_consumers(o, names, seen))
        else:
            out.append(f"<{_node_kind(o)}:{o.module!r}>")
    return out


def describe(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES).eval()
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    example = torch.randn(*INPUT_SHAPE)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    raw = list(dg.get_all_groups(ignored_layers=[classifier], root_module_types=[nn.Conv2d, nn.Linear]))

    groups = []
    coverage = {}  # (module name, role) -> list of channel indices over all groups
    for g in raw:
        root_dep, root_idxs = g[0].dep, g[0].idxs
        root = root_dep.target.module
        assert dg.is_out_channel_pruning_fn(root_dep.handler)
        root_kind = _kind(root)
        members, concat_ops, other_ops = [], [], Counter()
        summary = Counter()
        for item in g:
            dep, idxs = item.dep, item.idxs
            assert list(item.root_idxs) == sorted(item.root_idxs), "root indices out of order"
            node = dep.target
            kind = _kind(node.module) if id(node.module) in names else None
            if kind is None:
                nk = _node_kind(node)
                if nk == "concat":
                    concat_ops.append(["concat", f"_ConcatOp_{node.module.id}", _idx(idxs)])
                    summary["concat"] += 1
                else:
                    gf = type(node.grad_fn).__name__ if node.grad_fn is not None else None
                    other_ops[(nk, gf)] += 1
                    key = nk if nk in ("elementwise", "reshape") else "other"
                    summary[key] += 1
                    if nk == "elementwise" and gf and gf.startswith("AddBackward"):
                        summary["add"] += 1
                continue
            fn = dep.handler
            if kind in ("bn", "depthwise"):
                role = "out"
            elif fn == dg.get_pruner_of_module(node.module).prune_out_channels:
                role = "out"
            elif fn == dg.get_pruner_of_module(node.module).prune_in_channels:
                role = "in"
            else:
                raise AssertionError(f"unknown pruning fn {fn} on {names[id(node.module)]}")
            name = names[id(node.module)]
            members.append([name, kind, role, _idx(idxs)])
            summary[kind if kind in ("bn", "depthwise") else f"{kind}_{role}"] += 1
            coverage.setdefault((name, kind, role), []).extend(int(i) for i in idxs)
        members.sort(key=lambda m: (order[id(modules[m[0]])], m[2]))
        for k in SUMMARY_KEYS:
            summary.setdefault(k, 0)
        groups.append(
            {
                "root": names[id(root)],
                "root_kind": root_kind,
                "root_dim": "out",
                "channels": len(root_idxs),
                "summary": {k: summary[k] for k in SUMMARY_KEYS},
                "members": members,
                "ops": concat_ops + [[k, gf, n] for (k, gf), n in sorted(other_ops.items(), key=str)],
                "_order": order[id(root)],
            }
        )
    groups.sort(key=lambda g: g.pop("_order"))

    # Sanity: every (layer, side) is split by the groups into disjoint sets that cover all its channels.
    for (name, kind, role), idxs in coverage.items():
        m = modules[name]
        if kind == "bn":
            total = m.num_features
        elif kind == "linear":
            total = m.out_features if role == "out" else m.in_features
        else:
            total = m.out_channels if role == "out" else m.in_channels
        assert sorted(idxs) == list(range(total)), f"{arch}: {name} {role} not partitioned by the groups"
    for name, m in modules.items():
        kind = _kind(m)
        if kind is None or m is classifier:
            continue
        assert (name, kind, "out") in coverage, f"{arch}: {name} out-channels in no group"

    concats = []
    for node in dg.module2node.values():
        if node.type == tp_ops.OPTYPE.CONCAT:
            concats.append(
                {
                    "tp_name": f"_ConcatOp_{node.module.id}",
                    "offsets": list(node.module.offsets) if node.module.offsets is not None else None,
                    "consumers": sorted(set(_consumers(node, names)), key=lambda n: order.get(id(modules.get(n)), -1)),
                }
            )
    concats.sort(key=lambda c: (len(c["offsets"] or []), c["consumers"]))

    channels = [g["channels"] for g in groups]
    return {
        "classifier": names[id(classifier)],
        "num_groups": len(groups),
        "channels": channels,
        "channels_total": sum(channels),
        "concats": concats,
        "groups": groups,
    }


def main():
    golden = {
        "generator": "tests/conformance/make_depgraph_golden.py",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "torch_pruning": _dist_version("torch-pruning"),
            "torch_pruning.__version__": getattr(tp, "__version__", None),
        },
        "input_shape": list(INPUT_SHAPE),
        "options": {
            "weights": None,
            "num_classes": NUM_CLASSES,
            "mode": "eval",
            "build_dependency": "tp.DependencyGraph().build_dependency(model, example_inputs)",
            "get_all_groups": {
                "ignored_layers": ["<final classifier nn.Linear>"],
                "root_module_types": ["Conv2d", "Linear"],
            },
        },
        "models": {arch: describe(arch) for arch in ARCHS},
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    text = json.dumps(golden, separators=(",", ":"))
    # One group per line keeps diffs readable without a pretty-printer's size.
    text = text.replace(',{"root":', ',\n{"root":').replace('[{"root":', '[\n{"root":')
    with open(OUT, "w") as f:
        f.write(text + "\n")
    for arch, d in golden["models"].items():
        print(f"{arch}: {d['num_groups']} groups, channels={d['channels']}")
    print(f"wrote {os.path.normpath(OUT)} ({len(text)} bytes)")


if __name__ == "__main__":
    main()
