"""EKG filter pruning (Lee & Song, ECCV 2022): dense net (pre-trained here or loaded) -> greedy
sub-network search with ensemble knowledge on a held-out split -> memory bank of interim
sub-networks -> physical slicing -> fine-tuning distilled from the memory bank.

Writes `slimmed_params.pkl` (after search), `memory_bank.npy`, `trained_params.pkl` (after
fine-tuning; `test.py` rebuilds the pruned net from its metadata) and `results.json`.

Deliberate differences from the original code (sseung0703/EKG@0c0b516, `prune_utils.py`, `op_utils.py`):
- the norm-preserving kernel rescale only for the classifier (`ekg.rescale`, see
  `ke_tf.methods.ekg.search.ClassifierRescale`): every gated conv feeds a BN whose batch statistics cancel
  a per-layer scale, the classifier has none; the sliced net equals the rescaled masked net;
- importance |sum over a group's sites of a*dL/da| (the first-order loss change of removing the
  channel from the whole group; the reference sums per-site absolute values);
- MACs/target rate in the ke_tf convention (conv + FC MACs; the reference also counts BN);
- one augmented view per image while fine-tuning (the reference's second view doubles the cost);
- no 1-epoch learning-rate-1e-3 tune on a train subset before the search;
- memory-bank members spaced between the pruned and dense holdout losses (the paper's formula,
  not the code's min..max of the history).
"""

import dataclasses
import hashlib
import io
import json
import os
import shutil
import typing

import numpy as np
import tensorflow as tf

from ke_tf.config import ConfigError, register_section
from ke_tf.engine.strategy import is_chief
from ke_tf.io.params import apply_params, atomic_write_bytes, file_sha256, load_params, model_arrays
from ke_tf.io.report import plot_lines, write_json
from ke_tf.layers.gates import GatedLayerFactory
from ke_tf.losses import bank_distillation
from ke_tf.methods.ekg.search import CRITERIA, GreedySearch, classifier_input, memory_bank, pick_teachers
from ke_tf.methods.stage import (
    configured_spec,
    evaluate_model,
    load_configured_data,
    run_path,
    save_trained,
    test_metrics,
    train_stage,
)
from ke_tf.models import build_from_spec, spec_widths
from ke_tf.models.user import is_user_spec
from ke_tf.surgery.flops import complexity
from ke_tf.surgery.gating import insert_gates
from ke_tf.surgery.graph import ChannelGraph
from ke_tf.surgery.slicing import require_prunable, slice_channels, slice_model


@dataclasses.dataclass
class EKGConfig:
    trained_param: typing.Optional[str] = None  # dense params file; None -> pre-train here
    pretrain_epochs: int = 200
    pretrain_lr: float = 0.1
    pretrain_decay_epochs: typing.List[float] = dataclasses.field(default_factory=lambda: [100, 150])
    pretrain_weight_decay: float = 5e-4
    search_target_rate: float = 0.45  # remaining MACs fraction (train_cifar's 0.45)
    reduction_rate: typing.Optional[float] = None  # alternative: removed MACs fraction (1 - target)
    search_step: float = 0.2
    holdout_per_class: int = 32  # D_val of the reference
    search_batch_size: int = 256
    otsu_trim: float = 0.2
    criterion: str = "ekg"  # ekg | l1 | random (baselines: see GreedySearch)
    holdout_seed: int = 0  # which train images form the holdout (not `seed`:
    # runs compared across seeds search on the same one)
    num_teacher: int = 5
    distill: bool = True  # memory-bank KD during fine-tuning
    rescale: bool = True  # the reference's norm-preserving classifier rescale
    temperature: float = 4.0

    def validate(self, key):
        for name in ("search_target_rate", "search_step", "reduction_rate"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise ConfigError(f"{key}.{name} must be in (0, 1), got {value}")
        if not 0 <= self.otsu_trim < 0.5:
            raise ConfigError(f"{key}.otsu_trim must be in [0, 0.5), got {self.otsu_trim}")
        for name in ("pretrain_epochs", "holdout_per_class", "search_batch_size", "num_teacher"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name} must be > 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"{key}.temperature must be > 0, got {self.temperature}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"{key}.criterion must be one of {', '.join(CRITERIA)}; got {self.criterion!r}")

    @property
    def target_rate(self):
        return 1.0 - self.reduction_rate if self.reduction_rate is not None else self.search_target_rate


register_section("ekg", EKGConfig)


# ---- memory-bank distillation ------------------------------------------------------------------
class BankData:
    """`ImageData` whose training batches also carry each image's memory-bank logits, looked up
    by the example index the training stream carries (so the pairing cannot drift from the
    epoch order)."""

    def __init__(self, data, bank):
        if len(bank) != data.info.train_size:
            raise ValueError(f"memory bank has {len(bank)} rows but the training set {data.info.train_size}")
        self.data, self.bank, self.info = data, bank, data.info

    def stream(self, batch_size, seed, first_epoch, last_epoch, skip_steps=0, shard=None):
        bank = tf.constant(self.bank)
        images = self.data.stream(batch_size, seed, first_epoch, last_epoch, skip_steps, shard, with_index=True)
        return images.map(lambda x, y, index: (x, y, tf.gather(bank, index)))

    def test(self, batch_size, shard=None):
        return self.data.test(batch_size, shard)


def bank_distillation_loss(model, temperature):
    """Trainer `loss_fn` of EKG's fine-tuning: `losses.bank_distillation` of `model` on
    (images, labels, memory-bank logits)."""

    def loss_fn(batch, training):
        images, labels, bank = batch  # bank [B, K, M], member 0 = best
        logits = model(images, training=training)
        return {"loss": bank_distillation(logits, labels, bank, temperature), "logits": logits}

    return loss_fn


# ---- phases ----------------------------------------------------------------------------------
def _pretrain_config(cfg, e):
    return dataclasses.replace(
        cfg.train,
        epochs=e.pretrain_epochs,
        lr=e.pretrain_lr,
        schedule="step",
        decay_epochs=list(e.pretrain_decay_epochs),
        decay_factor=0.1,
        weight_decay=e.pretrain_weight_decay,
    )


def dense_model(cfg, strategy, data, spec):
    """The dense network: loaded from `ekg.trained_param`, or pre-trained (and saved as
    dense_params.pkl)."""
    e = cfg.section("ekg")
    with strategy.scope():
        model = build_from_spec(spec)
    check_prunable(model, spec, e.rescale)  # fails now, not after pre-training
    if e.trained_param:
        arrays, _ = load_params(e.trained_param)
        apply_params(model, arrays, source=e.trained_param)
        return model, {}
    _, history, final = train_stage(
        cfg, strategy, model, data, cfg.run_dir, name="pretrain", train_cfg=_pretrain_config(cfg, e)
    )
    save_trained(strategy, run_path(cfg, "dense_params.pkl"), model, spec, cfg, metrics=test_metrics(final))
    return model, {"pretrain_epochs": len(history)}


def check_prunable(model, spec, rescale):
    """Refuse a dense net the search cannot prune (option-A shortcuts of ke_tf's ResNets; a user's
    model without a prunable channel group, or without the Dense classifier `ekg.rescale` needs)."""
    if not is_user_spec(spec):
        require_prunable(model, spec_widths(spec))
        return
    graph = ChannelGraph(model)
    if not graph.prunable():
        raise ConfigError(f"model {spec['arch']}: no channel group can be pruned (boundaries: {graph.boundaries})")
    if rescale and classifier_input(graph)[0] is None:
        raise ConfigError(
            f"model {spec['arch']}: ekg.rescale needs a Dense classifier reading one prunable channel group; "
            "set ekg.rescale: false"
        )


def gated_copy(strategy, dense, spec):
    """The gated version of `dense` (a ke_tf arch) with the same weights (all gates open)."""
    with strategy.scope():
        gated = build_from_spec(spec, GatedLayerFactory())
    arrays = model_arrays(dense)
    for v in gated.weights:
        if v.name != "gate":
            v.assign(arrays[v.path])
    return gated


class Gated:
    """What the search masks: the gated copy of a dense net (same weights, all gates open) and, for
    a user's model, the dense net's `graph` and the `gates` `insert_gates` put on its groups."""

    def __init__(self, strategy, dense, spec):
        self.dense, self.spec = dense, spec
        self.graph = self.gates = None
        if not is_user_spec(spec):
            self.model = gated_copy(strategy, dense, spec)
            return
        self.graph = ChannelGraph(dense)
        with strategy.scope():
            self.model, self.gates = insert_gates(dense, self.graph)

    def sliced(self, strategy, keep):
        """(the dense net narrowed to `keep` with its weights, its spec)."""
        with strategy.scope():
            if self.graph is None:
                return slice_model(self.model, self.spec, keep)
            widths = {g: len(ix) for g, ix in keep.items()}
            return slice_channels(self.dense, keep, self.graph), {**self.spec, "widths": widths}


def search(cfg, strategy, data, gated):
    """Greedy search on a held-out split of the `Gated` net; returns (keep, searcher)."""
    e = cfg.section("ekg")
    _, holdout = data.split_holdout(e.holdout_per_class, e.holdout_seed)
    searcher = GreedySearch(
        gated.model,
        list(holdout.test(e.search_batch_size)),
        e.target_rate,
        e.search_step,
        e.otsu_trim,
        e.criterion,
        seed=cfg.seed,
        progress=cfg.train.progress,
        rescale=e.rescale,
        graph=gated.graph,
        gates=gated.gates,
    )
    keep = searcher.run()
    return {g: [int(c) for c in ix] for g, ix in keep.items()}, searcher


def slim(cfg, strategy, data, dense_spec):
    """Pre-train/load, search, build the memory bank and slice; resumes from slimmed_params.pkl."""
    e = cfg.section("ekg")
    slimmed_path, bank_path = run_path(cfg, "slimmed_params.pkl"), run_path(cfg, "memory_bank.npy")
    fingerprint = search_fingerprint(cfg, dense_spec)
    if os.path.exists(slimmed_path) and os.path.exists(bank_path):
        arrays, meta = load_params(slimmed_path)
        bank = np.load(bank_path)
        if (
            meta.get("ekg", {}).get("fingerprint") == fingerprint
            and meta["ekg"].get("bank_sha256") == hashlib.sha256(bank.tobytes()).hexdigest()
        ):
            with strategy.scope():
                model = build_from_spec(meta["model"])
            apply_params(model, arrays, source=slimmed_path)
            return model, meta["model"], bank, meta["ekg"]
        print(f"EKG: {slimmed_path} / {bank_path} come from another search setting or are stale; searching again")
        if is_chief(strategy):  # fine-tuning checkpoints of the old sub-network no longer apply
            shutil.rmtree(run_path(cfg, "checkpoints", "finetune"), ignore_errors=True)
    dense, info = dense_model(cfg, strategy, data, dense_spec)
    dense_metrics = evaluate_model(strategy, dense, data, cfg.train.eval_batch_size)
    gated = Gated(strategy, dense, dense_spec)
    keep, searcher = search(cfg, strategy, data, gated)
    teachers = pick_teachers(searcher.history, e.num_teacher)
    bank = memory_bank(searcher, teachers, data.train_eval(e.search_batch_size))
    if is_chief(strategy):
        buffer = io.BytesIO()
        np.save(buffer, bank)
        atomic_write_bytes(bank_path, buffer.getvalue())
    model, spec = gated.sliced(strategy, keep)
    if searcher.rescale is not None:
        searcher.rescale.rescale_kernel(model, keep)
    # Inference mode with the dense net's BN statistics (uncalibrated for the pruned net: low).
    slimmed = evaluate_model(strategy, model, data, cfg.train.eval_batch_size)
    record = {
        **info,
        "keep": keep,
        "search_steps": len(searcher.history) - 1,
        "macs_rate": searcher.rate(),
        "holdout_ce": searcher.history[-1][1],
        "teachers": teachers,
        "teacher_holdout_ce": [searcher.history[t][1] for t in teachers],
        "dense_complexity": complexity(dense),
        "dense_test_top1": dense_metrics["top1"],
        "slimmed_test_top1": slimmed["top1"],
        "fingerprint": fingerprint,
        "bank_sha256": hashlib.sha256(bank.tobytes()).hexdigest(),
        "search_trajectory": [
            {"step": i, "macs": searcher.macs(searcher.widths(k)), "holdout_ce": ce}
            for i, (k, ce) in enumerate(searcher.history)
        ],
    }
    plot_lines(
        run_path(cfg, "search.png"),
        [r["macs"] / 1e6 for r in record["search_trajectory"]],
        {"holdout CE": [r["holdout_ce"] for r in record["search_trajectory"]]},
        "MACs (M) of the chosen sub-network",
        "holdout CE",
        f"EKG search ({e.criterion})",
    )
    save_trained(
        strategy,
        slimmed_path,
        model,
        spec,
        cfg,
        metrics=test_metrics(slimmed),
        dense_complexity=record["dense_complexity"],
        ekg=record,
    )
    return model, spec, bank, record


def run(cfg, strategy):
    """EKG pruning of `cfg.model.arch` (shortcut B), or of the user's model, on `cfg.data`."""
    e = cfg.section("ekg")
    data = load_configured_data(cfg)
    dense_spec = configured_spec(cfg, data)
    model, spec, bank, record = slim(cfg, strategy, data, dense_spec)
    if e.distill:
        _, history, final = train_stage(
            cfg,
            strategy,
            model,
            BankData(data, bank),
            cfg.run_dir,
            name="finetune",
            loss_fn=bank_distillation_loss(model, e.temperature),
        )
    else:
        _, history, final = train_stage(cfg, strategy, model, data, cfg.run_dir, name="finetune")
    path = run_path(cfg, "trained_params.pkl")
    metadata = save_trained(
        strategy,
        path,
        model,
        spec,
        cfg,
        metrics=test_metrics(final),
        dense_complexity=record["dense_complexity"],
        ekg=record,
    )
    dense_c = record["dense_complexity"]
    summary = {
        "method": "ekg",
        "arch": spec["arch"],
        "dataset": data.info.name,
        "criterion": e.criterion,
        "dense_test_top1": record["dense_test_top1"],
        "slimmed_test_top1": record["slimmed_test_top1"],
        "search_holdout_ce": record["holdout_ce"],
        "test_top1": final["top1"],
        "test_top5": final["top5"],
        "test_loss": final["loss"],
        **metadata["complexity"],
        "macs_reduction": 1.0 - metadata["complexity"]["macs"] / dense_c["macs"],
        "params_reduction": 1.0 - metadata["complexity"]["params"] / dense_c["params"],
        "search_steps": record["search_steps"],
        "finetune_epochs": len(history),
        "params_file": path,
    }
    write_json(run_path(cfg, "results.json"), {"summary": summary, "ekg": record, "history": history})
    return summary


def search_fingerprint(cfg, dense_spec):
    """What the search result depends on: the dense net (its params file's hash, or the pre-training
    recipe), the data, the search settings and the seed. A stale slimmed/bank pair is not reused."""
    e = cfg.section("ekg")
    source = (
        {"trained_param_sha256": file_sha256(e.trained_param)}
        if e.trained_param
        else {"pretrain": dataclasses.asdict(_pretrain_config(cfg, e))}
    )
    search = {k: v for k, v in dataclasses.asdict(e).items() if k not in ("distill", "temperature", "trained_param")}
    payload = {"model": dense_spec, "data": dataclasses.asdict(cfg.data), "seed": cfg.seed, "search": search, **source}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
