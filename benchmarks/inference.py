"""Benchmark 4: inference latency speed-up of the compact networks the methods produce, next to
their MAC ratio: KE's slim network (kels sr=0.5 fit hypothesis sliced out), an EKG-style pruned
ResNet-56 B (~50% MACs: first half of every block-inner group kept) and the fused ReduceNet
deploy model vs its student (BN folded, branches merged). KE and EKG pairs are compared as they
are exported: BN folded into the convs of both networks (`ke_tf.surgery.folding`)."""

import re

import keras
import numpy as np
import tensorflow as tf

from benchmarks.common import compare, entry, model_macs, uses_gpu
from ke_tf.surgery.folding import fold_batchnorm

SECTION = "inference"
BATCH = 64


def _sizes(quick):
    """(KE arch, classes, side), (EKG side), (ReduceNet depth) per mode."""
    if quick:
        return ("resnet18", 10, 32), 16, 20, 8
    return ("resnet18", 102, 224), 32, 56, BATCH


def ke_pair(arch, classes, side):
    from ke_tf.layers.split import SplitLayerFactory
    from ke_tf.methods.evolution.loop import fit_keep
    from ke_tf.models import build_model, model_spec
    from ke_tf.surgery.slicing import slice_model

    keras.utils.set_random_seed(0)
    dense = build_model(arch, classes, (side, side, 3), layers=SplitLayerFactory(0.5, "kels"))
    spec = model_spec(arch, classes, (side, side, 3))
    slim, slim_spec = slice_model(dense, spec, fit_keep(dense, 0.5))
    return fold_batchnorm(dense, spec), fold_batchnorm(slim, slim_spec)


def ekg_pair(depth, side):
    from ke_tf.models import build_model, default_widths, model_spec
    from ke_tf.surgery.slicing import slice_model

    arch = f"resnet{depth}"
    keras.utils.set_random_seed(0)
    dense = build_model(arch, 10, (side, side, 3), shortcut="B")
    spec = model_spec(arch, 10, (side, side, 3), shortcut="B")
    keep = {g: list(range(c // 2)) for g, c in default_widths(arch).items() if re.fullmatch(r"s\d+b\d+", g)}
    pruned, pruned_spec = slice_model(dense, spec, keep)
    return fold_batchnorm(dense, spec), fold_batchnorm(pruned, pruned_spec)


def reduce_pair(depth, side):
    from ke_tf.models import build_from_spec, model_spec
    from ke_tf.models.reducenet import get_deploy_model

    spec = model_spec(f"reduce{depth}", 10, (side, side, 3), variant="student")
    keras.utils.set_random_seed(0)
    student = build_from_spec(spec)
    return student, get_deploy_model(student, spec)


def _predictor(model, x):
    fn = tf.function(lambda t: model(t, training=False), jit_compile=uses_gpu())
    return lambda: fn(x).numpy()


def speedup_row(name, section, big, small, x, mac_ratio, repeats, notes=""):
    """Entry: inference latency of `big` over `small` on `x` (interleaved, median), as a fraction
    of their MAC ratio (target >= 0.8)."""
    times = compare({"big": _predictor(big, x), "small": _predictor(small, x)}, warmup=2, repeats=repeats)
    speedup = times["big"] / times["small"]
    ratio = speedup / mac_ratio
    return entry(
        name,
        section,
        speedup,
        "x speed-up",
        ratio=ratio,
        target=">= 0.8 x MAC ratio",
        met=bool(ratio >= 0.8),
        notes=f"batch {len(x)} latency {times['big'] * 1e3:.1f} -> {times['small'] * 1e3:.1f} ms; "
        f"MAC ratio {mac_ratio:.2f}; ratio = speed-up / MAC ratio" + (f"; {notes}" if notes else ""),
        latency_dense_ms=times["big"] * 1e3,
        latency_small_ms=times["small"] * 1e3,
        mac_ratio=mac_ratio,
    )


def run(quick=False, repeats=5, **_):
    (ke_arch, ke_classes, ke_side), cifar_side, depth, batch = _sizes(quick)
    pairs = {
        f"KE slim {ke_arch} sr=0.5 vs dense ({ke_side}x{ke_side}, BN folded)": (
            ke_pair(ke_arch, ke_classes, ke_side),
            ke_side,
        ),
        f"EKG pruned resnet{depth}-B ~50% MACs vs dense (BN folded)": (ekg_pair(depth, cifar_side), cifar_side),
        f"ReduceNet-{depth} deploy (fused) vs student": (reduce_pair(depth, cifar_side), cifar_side),
    }
    rows = []
    for name, ((big, small), side) in pairs.items():
        x = tf.constant(np.random.default_rng(0).normal(size=(batch, side, side, 3)).astype("float32"))
        rows.append(speedup_row(name, SECTION, big, small, x, model_macs(big) / model_macs(small), repeats))
    return rows
