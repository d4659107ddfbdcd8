"""`ke_tf.prune`: EKG's sub-network search (or the L1 / random baselines) on any functional Keras 3
model, ending in a physically narrower model.

The model's `ChannelGraph` gives the channel groups, `insert_gates` a gated copy the search masks,
`GreedySearch` the kept channels and `slice_channels` the pruned model, as `ke_tf.methods.ekg.loop`
does for ke_tf's own builders (here without their specs, and without training: fine-tune the result
yourself, e.g. with `ke_tf.bank_distillation` on the memory bank `bank_data` asks for).
"""

import keras

from ke_tf.methods.ekg.search import GreedySearch, classifier_input, memory_bank, pick_teachers
from ke_tf.surgery.flops import complexity
from ke_tf.surgery.gating import insert_gates
from ke_tf.surgery.graph import ChannelGraph
from ke_tf.surgery.slicing import slice_channels


def check_prunable(model, graph, rescale=False):
    """Refuse, before any work, what the search cannot do: nothing prunable, probabilities out
    instead of logits (the search's cross-entropies take logits), a rescale without a classifier."""
    if not graph.prunable():
        raise ValueError(f"{model.name}: no channel group can be pruned (boundaries: {graph.boundaries})")
    classifier = classifier_input(graph)[0]
    if classifier is not None and model.get_layer(classifier).activation is not keras.activations.linear:
        raise ValueError(
            f"{model.name}: its classifier {classifier!r} applies an activation; prune the model that outputs logits "
            "(keras.applications: classifier_activation=None)"
        )
    if rescale and classifier is None:
        raise ValueError(
            f"{model.name}: rescale=True needs a Dense layer writing the model's output (logits) from one prunable "
            "channel group; pass rescale=False"
        )


def _searcher(model, graph, holdout, target_macs, criterion, step, trim, seed, rescale, progress):
    """A `GreedySearch` over an auto-gated copy of `model` (the gates are the graph's prunable groups)."""
    if not 0 < target_macs < 1:
        raise ValueError(f"target_macs is the fraction of the MACs kept, in (0, 1); got {target_macs}")
    check_prunable(model, graph, rescale)
    gated, gates = insert_gates(model, graph)
    batches = list(holdout)
    return GreedySearch(
        gated, batches, target_macs, step, trim, criterion, seed, progress, rescale, graph=graph, gates=gates
    )


def _widths(group, kept):
    """A group's units before and after; `blocks` where grouped convs cut it (a unit per block)."""
    widths = {"before": int(group.channels), "after": len(kept)}
    return {**widths, "blocks": group.blocks} if group.blocks > 1 else widths


def _report(model, pruned, graph, searcher, criterion, target_macs):
    """Plain-data (JSON-serialisable) summary of one pruning run."""
    keep = {g: [int(c) for c in ix] for g, ix in searcher.keep.items()}
    full = searcher.macs.full
    return {
        "criterion": criterion,
        "target_macs": float(target_macs),
        "widths": {g: _widths(group, keep[g]) for g, group in graph.prunable().items()},
        "boundaries": graph.report()["boundaries"],
        "inexact": graph.report()["inexact"],
        "before": complexity(model),
        "after": complexity(pruned),
        "trajectory": [
            {"step": i, "macs_rate": float(searcher.macs(searcher.widths(k)) / full), "holdout_ce": float(ce)}
            for i, (k, ce) in enumerate(searcher.history)
        ],
        "keep": keep,
    }


def prune(
    model,
    holdout,
    target_macs=0.5,
    criterion="ekg",
    step=0.2,
    trim=0.2,
    seed=0,
    rescale=True,
    progress=True,
    bank_data=None,
    num_teachers=5,
):
    """Prune the channels of a functional Keras `model` until its MACs are at most `target_macs` times
    the original's; returns `(pruned_model, report)`, or `(pruned_model, report, bank)` with `bank_data`.

    `holdout`: (images, labels) batches (a list or a `tf.data.Dataset`) the search scores sub-networks
    on, held out of the training set. `criterion`: "ekg" (Lee & Song 2022), "l1" (least-L1 filters,
    uniform) or "random"; `step`, `trim`, `seed`: as `GreedySearch`. `rescale`: EKG's norm-preserving
    rescale of the Dense classifier whose inputs lose channels (the model must output its logits). The
    pruned model keeps the original's weights, BN statistics included (fine-tune it); `model` is not
    modified. `report`: criterion, per-group widths before/after (in units: `blocks` channels each
    where grouped convs cut a group into blocks), boundaries (layers whose channels were
    kept), `inexact` (layers such as LayerNormalization over channels, whose masked scoring only
    approximates the sliced net), params/MACs before/after, the search trajectory (MACs rate and holdout
    CE per step) and the kept channel indices. `bank_data`: (images, labels) batches in a fixed order
    (your training set, unshuffled); `bank` [N, classes, teachers] holds the logits of `num_teachers`
    interim sub-networks on them, best first: the memory bank of `ke_tf.bank_distillation`, row i for
    example i.
    """
    graph = ChannelGraph(model)
    searcher = _searcher(model, graph, holdout, target_macs, criterion, step, trim, seed, rescale, progress)
    keep = searcher.run()
    pruned = slice_channels(model, keep, graph)
    if searcher.rescale is not None:
        searcher.rescale.rescale_kernel(pruned, keep)
    report = _report(model, pruned, graph, searcher, criterion, target_macs)
    if bank_data is None:
        return pruned, report
    teachers = pick_teachers(searcher.history, num_teachers)
    report["teachers"] = [{"step": t, "holdout_ce": float(searcher.history[t][1])} for t in teachers]
    return pruned, report, memory_bank(searcher, teachers, bank_data)
