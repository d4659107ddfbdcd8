"""Pruning and fine-tuning with `fit` on any functional model: a callback that narrows a gated copy
of the model at scheduled epochs (EKG's search, Lee & Song 2022, or the L1 / random baselines) while
`fit` fine-tunes the sub-network in between; the search's interim sub-networks as EKG's memory bank."""

import keras
import numpy as np

from ke_tf.keras.distill import TeacherBank
from ke_tf.methods.ekg.prune import check_prunable
from ke_tf.methods.ekg.search import CRITERIA, GreedySearch, pick_teachers
from ke_tf.surgery.gating import insert_gates
from ke_tf.surgery.graph import ChannelGraph
from ke_tf.surgery.slicing import slice_channels


class PruneFinetune(keras.callbacks.Callback):
    """Iterative prune -> fine-tune. `gated` is a gated copy of the functional `model` (same weights;
    `model` is never modified): compile it and `fit` it with this callback. At the start of every
    epoch in `schedule` ({epoch: fraction of the original MACs kept}, decreasing) the search
    (`criterion`, `step`, `trim`, `seed` as `ke_tf.prune`) narrows the current sub-network to that
    target on `holdout`; between prunings `fit` fine-tunes it, the gates holding removed channels at
    zero. `prune_to(target)` prunes outside `fit`; `pruned()` is the fine-tuned sub-network sliced
    out; `teachers(n)` the last search's interim sub-networks as a `TeacherBank`. `log`: per pruning,
    the epoch, target, MACs rate reached and holdout CE."""

    def __init__(self, model, holdout, schedule=None, criterion="ekg", step=0.2, trim=0.2, seed=0, progress=False):
        super().__init__()
        self.schedule = dict(schedule or {})
        targets = [self.schedule[e] for e in sorted(self.schedule)]
        if any(not 0 < t < 1 for t in targets) or targets != sorted(targets, reverse=True):
            raise ValueError(f"schedule maps epochs to decreasing MACs fractions kept, in (0, 1); got {schedule}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
        # A private copy with the original's structure: the graph, the L1 scores and the slicing read
        # its weights, synchronised from the fine-tuned gated copy before each use.
        self.shadow = keras.models.clone_model(model)
        self.shadow.set_weights(model.get_weights())
        self.graph = ChannelGraph(self.shadow)
        check_prunable(self.shadow, self.graph)
        self.gated, self.gates = insert_gates(self.shadow, self.graph)
        self.holdout = list(holdout)
        self.options = {"step": step, "trim": trim, "criterion": criterion, "progress": progress}
        self.seed = seed
        self.keep = {g: np.arange(int(layer.gate.shape[0])) for g, layer in self.gates.items()}
        self.log, self.history = [], []

    def on_epoch_begin(self, epoch, logs=None):
        if epoch in self.schedule:
            self.prune_to(self.schedule[epoch], epoch)

    def prune_to(self, target, epoch=None):
        """Search from the current sub-network down to `target` MACs (a fraction of the original's)."""
        self._sync()
        searcher = GreedySearch(
            self.gated,
            self.holdout,
            target,
            seed=self.seed + len(self.log),
            rescale=False,  # the fine-tuned classifier adapts; scoring needs no rescale of the logits
            graph=self.graph,
            gates=self.gates,
            **self.options,
        )
        searcher.keep = dict(self.keep)
        self.keep = searcher.run()
        self.history = searcher.history
        ce = float(self.history[-1][1])
        self.log.append({"epoch": epoch, "target_macs": target, "macs_rate": searcher.rate(), "holdout_ce": ce})
        return self.keep

    def _sync(self):
        """Copy the gated copy's (fine-tuned) weights into the shadow model."""
        trained = {v.path: v for v in self.gated.weights}
        for v in self.shadow.weights:
            v.assign(trained[v.path])

    def pruned(self):
        """The current sub-network as a physically narrower model with the fine-tuned weights."""
        self._sync()
        return slice_channels(self.shadow, self.keep, self.graph)

    def teachers(self, num=5):
        """EKG's memory bank: `num` interim sub-networks of the last search (`pick_teachers`' spacing
        of their holdout losses, best first), sliced out and frozen, as one `TeacherBank` for
        `LabelDistiller(gated, bank, objective)` with `ke_tf.bank_distillation`. Call it right after
        the pruning, before fine-tuning moves the weights."""
        if not self.history:
            raise ValueError("teachers(): no search has run yet (prune_to or fit with a schedule first)")
        self._sync()
        chosen = pick_teachers(self.history, num)
        members = [slice_channels(self.shadow, self.history[t][0], self.graph) for t in chosen]
        for member in members:
            member.trainable = False
        return TeacherBank(members, name="memory_bank")
