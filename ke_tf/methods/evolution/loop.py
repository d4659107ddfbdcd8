"""Knowledge Evolution (Taha et al., CVPR'21): train the dense network for several generations,
re-initialising the reset hypothesis in between; the fit hypothesis is the slim network.

Per generation g (1-based, the paper's N_g): a fresh Trainer named `gen_{g}` (new optimizer, warmup
+ cosine restarted, per-generation checkpoints so an interrupted run resumes) continues from the
previous generation's last-epoch weights (not the best ones, as KE's code) on its own seeded data
order (KE's code re-creates its shuffling loader every generation, so generations see different
batches). Before generations g >= 2 the reset weights (mask == 0) are re-drawn; BN
parameters/statistics and the classifier bias are kept. `reinit: none` skips the re-draw: the
control that shows what re-initialisation itself does. Training is plain label-smoothed CE of the
dense net (masks never enter the forward pass). After each generation the dense and (kels) slim nets
are evaluated and saved.
"""

import dataclasses

from ke_tf.config import ConfigError, register_section
from ke_tf.io.report import plot_lines, write_json, write_table
from ke_tf.layers.split import REINIT_RULES, SPLIT_MODES, SplitLayerFactory, fit_count, reinitialize_reset_hypothesis
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
from ke_tf.surgery.graph import ChannelGraph
from ke_tf.surgery.slicing import require_prunable, slice_model
from ke_tf.surgery.split_model import slim_model


@dataclasses.dataclass
class EvolutionConfig:
    # KE's no-argument run (train_KE_cls.main) uses 5 generations; its README table shows 10.
    generations: int = 5
    split_rate: float = 0.5  # KE main(): 0.5 (the paper's ResNet-18 setting, -73% MACs)
    split_mode: str = "kels"  # kels (kernel-level, sliceable) | wels (random per weight)
    # Reset rule: "kaiming_uniform" = KE code's torch default U(+-1/sqrt(fan_in)) (~0.41x the
    # initial std); "kaiming_normal" re-draws from the initial He-normal fan_in distribution;
    # "none" keeps training without re-initialisation (the control of KE's claim).
    reinit: str = "kaiming_uniform"

    def validate(self, key):
        if self.generations < 1:
            raise ConfigError(f"{key}.generations must be >= 1, got {self.generations}")
        if not 0.0 < self.split_rate <= 1.0:
            raise ConfigError(f"{key}.split_rate must be in (0, 1], got {self.split_rate}")
        if self.split_mode not in SPLIT_MODES:
            raise ConfigError(f"{key}.split_mode must be one of {', '.join(SPLIT_MODES)}; got {self.split_mode!r}")
        if self.reinit not in REINIT_RULES + (NO_REINIT,):
            raise ConfigError(
                f"{key}.reinit must be one of {', '.join(REINIT_RULES + (NO_REINIT,))}; got {self.reinit!r}"
            )


NO_REINIT = "none"
register_section("evolution", EvolutionConfig)


def fit_keep(model, split_rate):
    """kels fit hypothesis as channels to keep: the first ceil(sr*C) of every prunable channel
    group of `model` (the image's channels and the classes stay whole, as KE's kels masks)."""
    return {
        g: list(range(fit_count(group.channels, split_rate))) for g, group in ChannelGraph(model).prunable().items()
    }


def extract_slim(strategy, model, spec, split_rate):
    """The physically narrower plain network of the kels fit hypothesis and its spec (a user's model
    is sliced through its graph; its spec records the fit widths, the first channels of each group)."""
    keep = fit_keep(model, split_rate)
    with strategy.scope():
        if is_user_spec(spec):
            return slim_model(model), {**spec, "widths": {g: len(ix) for g, ix in keep.items()}}
        return slice_model(model, spec, keep)


def generation_seed(seed, generation):
    """Seed of generation g's reset weights."""
    return int(seed) * 1000 + int(generation)


def generation_data_seed(seed, generation):
    """Seed of generation g's data order and augmentation; generation 1 uses the run's seed, so it
    sees the same stream as a supervised run with that seed."""
    return int(seed) + 7919 * (int(generation) - 1)


def check_sliceable(model, spec):
    """Refuse, before any training, a kels network whose slim net cannot be extracted (option-A
    zero-pad shortcuts, grouped convs), naming the layer and the config key to change."""
    try:
        require_prunable(model, spec_widths(spec))
    except ValueError as e:
        raise ConfigError(
            f"evolution.split_mode=kels needs a sliceable network: {e} (model.options.shortcut: B)"
        ) from None


def run(cfg, strategy):
    """KE for `evolution.generations` generations; writes gen_{g}/trained_params.pkl (dense, with
    masks), gen_{g}/slim_params.pkl (kels), evolution.{md,csv,json}, evolution.png."""
    ev = cfg.section("evolution")
    data = load_configured_data(cfg)
    spec = configured_spec(cfg, data)
    factory = SplitLayerFactory(ev.split_rate, ev.split_mode, seed=cfg.seed)
    with strategy.scope():
        model = build_from_spec(spec, factory)  # a user's model: ke_tf.split_model of it
    if ev.split_mode == "kels" and not is_user_spec(spec):
        check_sliceable(model, spec)
    dense_cx = complexity(model)
    slim_cx = None
    rows = []
    for g in range(1, ev.generations + 1):
        if g > 1 and ev.reinit != NO_REINIT:
            reinitialize_reset_hypothesis(model, generation_seed(cfg.seed, g), ev.reinit)
        _, history, dense = train_stage(
            cfg, strategy, model, data, cfg.run_dir, name=f"gen_{g}", seed=generation_data_seed(cfg.seed, g)
        )
        common = {"generation": g, "split": factory.metadata()}
        save_trained(
            strategy,
            run_path(cfg, f"gen_{g}", "trained_params.pkl"),
            model,
            spec,
            cfg,
            metrics=test_metrics(dense),
            layers={"kind": "split", **factory.metadata()},
            **common,
        )
        row = {
            "generation": g,
            "epochs": len(history),
            "dense_top1": dense["top1"],
            "dense_top5": dense["top5"],
            "dense_loss": dense["loss"],
        }
        if ev.split_mode == "kels":
            slim, slim_spec = extract_slim(strategy, model, spec, ev.split_rate)
            slim_metrics = evaluate_model(strategy, slim, data, cfg.train.eval_batch_size)
            meta = save_trained(
                strategy,
                run_path(cfg, f"gen_{g}", "slim_params.pkl"),
                slim,
                slim_spec,
                cfg,
                metrics=test_metrics(slim_metrics),
                dense_complexity=dense_cx,
                **common,
            )
            slim_cx = meta["complexity"]
            row.update(slim_top1=slim_metrics["top1"], slim_top5=slim_metrics["top5"], slim_loss=slim_metrics["loss"])
        rows.append(row)
        _report(cfg, rows, spec["arch"])
    summary = {
        "method": "evolution",
        "arch": spec["arch"],
        "dataset": data.info.name,
        "generations": ev.generations,
        "split_mode": ev.split_mode,
        "split_rate": ev.split_rate,
        "dense_top1_first": rows[0]["dense_top1"],
        "dense_top1": rows[-1]["dense_top1"],
        "dense_macs": dense_cx["macs"],
        "dense_params": dense_cx["params"],
        "params_file": run_path(cfg, f"gen_{ev.generations}", "trained_params.pkl"),
    }
    if slim_cx is not None:
        summary.update(
            slim_top1_first=rows[0]["slim_top1"],
            slim_top1=rows[-1]["slim_top1"],
            slim_macs=slim_cx["macs"],
            slim_params=slim_cx["params"],
            macs_reduction=1.0 - slim_cx["macs"] / dense_cx["macs"],
            slim_params_file=run_path(cfg, f"gen_{ev.generations}", "slim_params.pkl"),
        )
    write_json(run_path(cfg, "results.json"), {"summary": summary, "generations": rows})
    return summary


def _report(cfg, rows, arch):
    """Per-generation table (md/csv/json) and the dense/slim top-1 curves (PNG)."""
    write_table(run_path(cfg, "evolution"), rows)
    gens = [r["generation"] for r in rows]
    series = {"dense": [100 * r["dense_top1"] for r in rows]}
    if "slim_top1" in rows[0]:
        series["slim (fit hypothesis)"] = [100 * r["slim_top1"] for r in rows]
    plot_lines(
        run_path(cfg, "evolution.png"),
        gens,
        series,
        "generation",
        "test top-1 (%)",
        f"Knowledge Evolution: {arch} on {cfg.data.name}",
    )
