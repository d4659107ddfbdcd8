"""EKG sub-network search on a gated network (Lee & Song, ECCV 2022), re-implemented from the
paper and the original code (sseung0703/EKG@0c0b516, `prune_utils.py`): Taylor filter importance, a
greedy one-group-at-a-time width search scored on a held-out split against a running-mean ensemble
of the chosen sub-networks, analytic MACs of a masked candidate, and the memory-bank teacher choice.
Weights never change during the search.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from ke_tf.engine.bn_statistics import moving_statistics
from ke_tf.io.progress import progress_bar
from ke_tf.layers.gates import model_gates, set_masks
from ke_tf.losses import cross_entropy, search_objective
from ke_tf.surgery.graph import MODEL_OUTPUT, ChannelGraph


class MaskedMacs:
    """MACs of a gated model as a function of its group widths, without building anything (equal to
    `ke_tf.surgery.flops.count_macs` of the physically pruned model: `ChannelGraph.macs`)."""

    def __init__(self, graph, gates):
        self.graph = graph
        self.full_widths = {g: int(layer.gate.shape[0]) for g, layer in gates.items()}
        self.full = self(self.full_widths)

    def __call__(self, widths):
        return self.graph.macs({**self.graph.widths(), **widths})


def classifier_input(graph):
    """(name of the Dense layer writing the model's output, the group it reads), or (None, None)
    when the output is not written by a Dense reading one prunable group."""
    for op, _, (x,), out in reversed(graph.layer_calls):
        group = graph.groups[graph.group_of(out.segments[0].dim)]
        if isinstance(op, keras.layers.Dense) and MODEL_OUTPUT in group.kept_by:
            names = [graph.group_of(s.dim) for s in x.segments]
            if len(names) == 1 and graph.groups[names[0]].prunable:
                return op.name, names[0]
    return None, None


class ClassifierRescale:
    """The reference's norm-preserving rescale of a masked kernel, W' = normalize(W*M) * ||W||,
    for the classifier: pruning its input channels scales the logits by s = ||W|| / ||W_kept||
    around the bias. (The reference rescales conv kernels too, but every conv here feeds a BN
    whose batch statistics, used by the search and by fine-tuning, cancel a per-layer scale; the
    classifier's rescale is not cancelled: it sharpens the pruned net's softmax.)"""

    def __init__(self, model, graph):
        name, self.group = classifier_input(graph)
        if name is None:
            raise ValueError(f"{model.name}: no Dense classifier reads one prunable group (set ekg.rescale: false)")
        self.layer = model.get_layer(name)
        self.row_norms = np.square(self.layer.kernel.numpy()).sum(axis=1)
        self.scale = tf.Variable(1.0, trainable=False, dtype=self.layer.kernel.dtype)

    def factor(self, keep):
        """s for the kept channels `keep` ({group: indices}); 1 when the input group is unpruned."""
        if self.group not in keep:
            return 1.0
        return float(np.sqrt(self.row_norms.sum() / self.row_norms[np.asarray(keep[self.group])].sum()))

    def set(self, keep):
        self.scale.assign(self.factor(keep))

    def __call__(self, logits):
        bias = tf.cast(self.layer.bias, logits.dtype) if self.layer.use_bias else 0.0
        return bias + tf.cast(self.scale, logits.dtype) * (logits - bias)

    def rescale_kernel(self, sliced_model, keep):
        """Give the physically pruned `sliced_model`'s classifier the same rescale."""
        layer = sliced_model.get_layer(self.layer.name)
        layer.kernel.assign(layer.kernel * self.factor(keep))


def batch_stat_forward(model, rescale=None):
    """Compiled forward in BN batch-statistics mode that leaves the moving statistics untouched
    (the reference scores candidates with batch statistics and frozen moving averages; Keras BN
    always updates them in training mode, so they are restored after the call); `rescale` (a
    `ClassifierRescale`) is applied to the logits."""
    stats = moving_statistics(model)

    @tf.function(reduce_retracing=True)
    def forward(x):
        saved = [tf.identity(v.value) for v in stats]
        logits = model(x, training=True)
        if rescale is not None:
            logits = rescale(logits)
        with tf.control_dependencies([logits]):
            for v, s in zip(stats, saved):
                v.assign(s)
        return logits

    return forward


def importance_fn(gates, forward):
    """Compiled `(x, y, ensemble) -> [|dL/dgate_g|]` per group: with a 0/1 gate shared by all sites
    of a group, dL/dgate_c = sum over sites, batch and positions of a_c * dL/da_c, the first-order
    (Taylor) loss change of removing channel c from the whole group."""
    gates = list(gates.values())

    @tf.function(reduce_retracing=True)
    def score(x, y, ensemble):
        variables = [g.gate.value for g in gates]
        with tf.GradientTape() as tape:
            tape.watch(variables)
            loss = tf.reduce_mean(search_objective(forward(x), y, ensemble))
        return [tf.abs(g) for g in tape.gradient(loss, variables)]

    return score


def trimmed_otsu(costs, trim=0.2):
    """Otsu threshold of `costs` after dropping ceil(trim*n) values at each end: the split
    maximising w0*w1*(m0-m1)^2, returned as the midpoint of the two values at the split."""
    values = np.sort(np.asarray(costs, np.float64))
    n = len(values)
    cut = math.ceil(trim * n)
    core = values[cut : n - cut] if n - 2 * cut >= 2 else values
    if len(core) < 2:
        return float(core[-1])
    best, threshold = -1.0, float(core[-1])
    for s in range(1, len(core)):
        w0 = s / len(core)
        between = w0 * (1 - w0) * (core[:s].mean() - core[s:].mean()) ** 2
        if between > best:
            best, threshold = between, float(core[s - 1] + core[s]) / 2
    return threshold


CRITERIA = ("ekg", "l1", "random")


def filter_l1(graph, gates):
    """{group: per-channel L1 norm of every kernel writing that group} (Li et al. 2017's filter
    score, summed over a residual stage's convs and a grouped conv's blocks: pruned together)."""
    norms = {g: np.zeros(int(layer.gate.shape[0])) for g, layer in gates.items()}
    for name in norms:
        group = graph.groups[name]
        for slot in group.slots:
            kernel = getattr(slot.layer, "kernel", None)
            if slot.layer in group.producers and slot.variable is kernel and slot.axis == len(kernel.shape) - 1:
                other = tuple(range(len(kernel.shape) - 1))
                norms[name] += np.abs(kernel.numpy()).sum(axis=other).reshape(slot.blocks, -1).sum(axis=0)
    return norms


class GreedySearch:
    """EKG's greedy search. `holdout` is a list of (images, labels) batches of the held-out
    split; `criterion` "ekg" (importance + scored candidates), "l1" (least-L1 filters, every
    group cut to the same kept fraction: Li et al.'s uniform L1-norm pruning) or "random" (random
    group and random filters); the baselines reach the same MACs target step by step. A model
    gated by `ke_tf.surgery.gating.insert_gates` passes its `gates` and the `graph` of the model it
    was gated from; a model built with gates (`GatedLayerFactory`) needs neither."""

    def __init__(
        self,
        model,
        holdout,
        target_rate,
        step=0.2,
        trim=0.2,
        criterion="ekg",
        seed=0,
        progress=True,
        rescale=True,
        graph=None,
        gates=None,
    ):
        self.model = model
        self.gates = gates or model_gates(model)
        graph = graph or ChannelGraph(model)
        self.macs = MaskedMacs(graph, self.gates)
        self.target = target_rate * self.macs.full
        self.holdout = [(tf.convert_to_tensor(x), tf.convert_to_tensor(y)) for x, y in holdout]
        self.rescale = ClassifierRescale(model, graph) if rescale else None
        self.forward = batch_stat_forward(model, self.rescale)
        self.score_fn = importance_fn(self.gates, self.forward)
        sites = {g: len(layer._inbound_nodes) for g, layer in self.gates.items()}
        full = self.macs.full_widths
        # Reference: step = max(1/C, search_step/num_sites) of the width; a residual stage's gate
        # is applied after every block, so it moves by about one channel per step.
        self.steps = {g: max(1, int(round(full[g] * step / sites[g]))) for g in full}
        self.trim = trim
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
        self.criterion = criterion
        self.l1 = filter_l1(graph, self.gates) if criterion == "l1" else None
        self.rng = np.random.RandomState(seed)
        self.progress = progress
        self.keep = {g: np.arange(c) for g, c in full.items()}
        self.history = []

    # ---- evaluation -----------------------------------------------------------------------
    def widths(self, keep=None):
        return {g: len(ix) for g, ix in (keep or self.keep).items()}

    def rate(self, keep=None):
        return self.macs(self.widths(keep)) / self.macs.full

    def mask(self, keep):
        """Make the gated model compute the sub-network `keep` (gates and classifier rescale)."""
        set_masks(self.gates, keep)
        if self.rescale is not None:
            self.rescale.set(keep)

    def evaluate(self, keep, ensemble):
        """(logits [N, K], mean CE, mean score) of the sub-network `keep` on the holdout."""
        self.mask(keep)
        logits = np.concatenate([self.forward(x).numpy() for x, _ in self.holdout])
        labels = np.concatenate([y.numpy() for _, y in self.holdout])
        ce = cross_entropy(logits, labels).numpy()
        target = logits if ensemble is None else ensemble
        score = search_objective(logits, labels, target).numpy()
        return logits, float(ce.mean()), float(score.mean())

    def importance(self, ensemble):
        """{group: per-channel importance} of the current sub-network (per-batch |.| summed)."""
        self.mask(self.keep)
        total = {g: np.zeros(int(layer.gate.shape[0])) for g, layer in self.gates.items()}
        start = 0
        for x, y in self.holdout:
            n = int(x.shape[0])
            grads = self.score_fn(x, y, tf.constant(ensemble[start : start + n]))
            for g, grad in zip(self.gates, grads):
                total[g] += grad.numpy()
            start += n
        return total

    # ---- one step -------------------------------------------------------------------------
    def _shrunk(self, group, order, count):
        """`keep` with the `count` first channels of `order` removed from `group`."""
        drop = set(order[:count].tolist())
        return {**self.keep, group: np.asarray([c for c in self.keep[group] if c not in drop])}

    def _candidate(self, group, order):
        """Remove one step (fine-searched so the last step lands just under the target)."""
        count = min(self.steps[group], len(self.keep[group]) - 1)
        keep = self._shrunk(group, order, count)
        if self.macs(self.widths(keep)) <= self.target:
            for smaller in range(1, count):
                trial = self._shrunk(group, order, smaller)
                if self.macs(self.widths(trial)) <= self.target:
                    return trial
        return keep

    def _orders(self, scores):
        """Per prunable group: its active channels, least important first."""
        orders = {}
        for g, active in self.keep.items():
            if len(active) > 1:
                orders[g] = (
                    active[np.argsort(scores[g][active], kind="stable")] if scores else self.rng.permutation(active)
                )
        return orders

    def step(self, ensemble):
        """Commit the best next sub-network; returns (its holdout logits, CE, score)."""
        if self.criterion in ("random", "l1"):
            orders = self._orders(self.l1 if self.criterion == "l1" else None)
            if not orders:
                raise ValueError("search: every group is down to one channel before the MACs target")
            if self.criterion == "l1":
                full = self.macs.full_widths
                group = max(orders, key=lambda g: len(self.keep[g]) / full[g])
            else:
                group = list(orders)[self.rng.randint(len(orders))]
            self.keep = self._candidate(group, orders[group])
            return self.evaluate(self.keep, ensemble)
        scores = self.importance(ensemble)
        orders = self._orders(scores)
        if not orders:
            raise ValueError("search: every group is down to one channel before the MACs target")
        costs = {g: float(scores[g][o[: min(self.steps[g], len(o) - 1)]].sum()) for g, o in orders.items()}
        threshold = trimmed_otsu(list(costs.values()), self.trim)
        best = None
        for g in orders:
            if costs[g] > threshold:
                continue
            keep = self._candidate(g, orders[g])
            result = self.evaluate(keep, ensemble)
            if best is None or result[2] < best[1][2]:
                best = (keep, result)
        self.keep = best[0]
        return best[1]

    def run(self):
        """Search until MACs <= target; returns the kept channels per group. `history` holds
        (keep, holdout CE) of the dense net and every accepted sub-network, in order."""
        ensemble, ce, _ = self.evaluate(self.keep, None)
        members = 1
        self.history = [(dict(self.keep), ce)]
        bar = progress_bar(desc=f"EKG search ({self.criterion})", unit="step", disable=not self.progress)
        while self.macs(self.widths()) > self.target:
            logits, ce, score = self.step(ensemble)
            # Pseudo-supernet: running mean of the logits of the dense net and every chosen net.
            ensemble = (ensemble * members + logits) / (members + 1)
            members += 1
            self.history.append((dict(self.keep), ce))
            bar.update(1)
            bar.set_postfix(macs_rate=f"{self.rate():.3f}", score=f"{score:.4f}")
        bar.close()
        self.mask(self.keep)
        return self.keep


def pick_teachers(history, num):
    """Memory-bank members: for k = 1..num the interim net whose holdout loss is nearest to
    (1-k/num)*L(pruned) + (k/num)*L(dense) (the paper's spacing; the final net itself is
    excluded). Returned sorted by loss, best first."""
    final_loss, candidates = history[-1][1], list(range(len(history) - 1))
    dense_loss = history[0][1]
    chosen = []
    for k in range(1, num + 1):
        if not candidates:
            break
        target = (1 - k / num) * final_loss + (k / num) * dense_loss
        i = min(candidates, key=lambda c: abs(history[c][1] - target))
        chosen.append(i)
        candidates.remove(i)
    return sorted(chosen, key=lambda c: history[c][1])


def memory_bank(searcher, teachers, dataset):
    """Logits [N, K, len(teachers)] of each teacher sub-network of `searcher.history` on
    `dataset` (fixed order), computed like the search (BN batch statistics, rescale)."""
    bank = []
    for t in teachers:
        searcher.mask(searcher.history[t][0])
        bank.append(np.concatenate([searcher.forward(x).numpy() for x, _ in dataset]))
    return np.stack(bank, axis=-1).astype(np.float32)
