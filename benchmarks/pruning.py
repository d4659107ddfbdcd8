"""Benchmark: structural pruning of Keras applications through the channel graph
(`ke_tf.surgery.graph`). Rows: (1) real CPU inference speed-up of ResNet50 and MobileNetV2 pruned to
~50% MACs (every prunable group cut to the same kept fraction, both networks deployed with BN
folded) divided by the MAC ratio, target >= 0.8; (2) graph + slice seconds and EKG search cost
(seconds per scored candidate on the holdout) as the model grows (ResNet-20, ResNet-56, ResNet50)."""

import time

import keras
import numpy as np
import tensorflow as tf

from benchmarks.common import entry
from benchmarks.inference import speedup_row

SECTION = "pruning"
TARGET_MACS = 0.5
ROUND_TO = 8  # kept widths in multiples of 8: CPU conv kernels vectorise over 8 float32 channels


def _apps(quick):
    """(input side, {name: builder}); the quick run times MobileNetV2 only, small."""
    side = 32 if quick else 224
    alpha = 0.35 if quick else 1.0
    apps = {
        "MobileNetV2": lambda: keras.applications.MobileNetV2(
            weights=None, input_shape=(side, side, 3), alpha=alpha, classes=10
        )
    }
    if not quick:
        apps["ResNet50"] = lambda: keras.applications.ResNet50(weights=None, input_shape=(side, side, 3), classes=10)
    return side, apps


def uniform_keep(graph, target, round_to=1):
    """{group: first k channels} with one kept fraction for every prunable group (k rounded down to
    a multiple of `round_to`, at least one), the largest whose MACs are <= `target` of the full
    model's (bisection on the fraction)."""
    full = graph.macs(graph.widths())

    def keep_at(fraction):
        kept = {
            n: max(round_to, int(g.channels * fraction) // round_to * round_to) for n, g in graph.prunable().items()
        }
        return {n: np.arange(min(k, graph.groups[n].channels)) for n, k in kept.items()}

    low, high = 0.0, 1.0
    for _ in range(20):
        middle = (low + high) / 2
        if graph.macs(graph.widths(keep_at(middle))) <= target * full:
            low = middle
        else:
            high = middle
    return keep_at(low)


def speedup_rows(quick, repeats):
    from ke_tf.surgery.deploy import deploy_model
    from ke_tf.surgery.graph import ChannelGraph
    from ke_tf.surgery.slicing import slice_channels

    side, apps = _apps(quick)
    batch = 4 if quick else 32
    rows = []
    for name, build in apps.items():
        keras.utils.set_random_seed(0)
        dense = build()
        graph = ChannelGraph(dense)
        keep = uniform_keep(graph, TARGET_MACS, ROUND_TO)
        pruned = slice_channels(dense, keep, graph)
        mac_ratio = graph.macs(graph.widths()) / graph.macs(graph.widths(keep))
        x = tf.constant(np.random.default_rng(0).normal(size=(batch, side, side, 3)).astype("float32"))
        name = f"{name} pruned to ~{TARGET_MACS:.0%} MACs vs dense ({side}x{side}, BN folded)"
        notes = f"widths rounded to {ROUND_TO}"
        rows.append(speedup_row(name, SECTION, deploy_model(dense), deploy_model(pruned), x, mac_ratio, repeats, notes))
    return rows


def _models(quick):
    from ke_tf.models import build_model

    side = 16 if quick else 32
    yield "ResNet-20", build_model("resnet20", 10, (side, side, 3), shortcut="B"), side
    if not quick:
        yield "ResNet-56", build_model("resnet56", 10, (side, side, 3), shortcut="B"), side
        yield "ResNet50", keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10), 32


def cost_rows(quick):
    """Seconds to build the graph and slice, and per scored EKG candidate, as the model grows."""
    from ke_tf.methods.ekg.search import GreedySearch
    from ke_tf.surgery.gating import insert_gates
    from ke_tf.surgery.graph import ChannelGraph
    from ke_tf.surgery.slicing import slice_channels

    rows = []
    holdout_size = 16 if quick else 256
    for name, model, side in _models(quick):
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        graph = ChannelGraph(model)
        graph_s = time.perf_counter() - start
        start = time.perf_counter()
        slice_channels(model, uniform_keep(graph, TARGET_MACS), graph)
        slice_s = time.perf_counter() - start
        gated, gates = insert_gates(model, graph)
        x = rng.normal(size=(holdout_size, side, side, 3)).astype("float32")
        y = rng.integers(0, 10, holdout_size)
        search = GreedySearch(gated, [(x, y)], TARGET_MACS, progress=False, graph=graph, gates=gates)
        search.evaluate(search.keep, None)  # traces the forward
        start = time.perf_counter()
        repeats = 2 if quick else 5
        for _ in range(repeats):
            search.evaluate(search.keep, None)
        candidate_s = (time.perf_counter() - start) / repeats
        rows.append(
            entry(
                f"{name}: graph + slice, EKG candidate ({len(graph.prunable())} groups)",
                SECTION,
                candidate_s,
                "s per candidate",
                notes=f"graph {graph_s:.2f} s, slice {slice_s:.2f} s, candidate scored on {holdout_size} images",
                graph_s=graph_s,
                slice_s=slice_s,
                groups=len(graph.prunable()),
                params=model.count_params(),
            )
        )
    return rows


def run(quick=False, repeats=5, **_):
    return speedup_rows(quick, repeats) + cost_rows(quick)
