"""Teacher -> student distillation: Hinton KD, Born-Again Networks and ReduceNet.

- `kd`: a frozen teacher (loaded from `teacher_params` or trained first, stage "teacher") teaches
  any student: loss = (1 - alpha) * CE + alpha * T^2 KL(p_t^T || p_s^T) (Hinton et al. 2015).
- `ban`: G generations of the same architecture; generation g is a fresh network taught by
  generation g-1 (generation 0 by plain CE, or by `teacher_params`): loss = CE + lambda_e *
  tau^2 * CE(softmax(t/tau), softmax(s/tau)) with lambda_e interpolated per epoch (KC's
  BornAgain.py); generation g initialises and orders its data with seed + 10 g; reports every
  generation and the ensemble (mean softmax) of generations 0..g.
- `reducenet`: stage 1 trains the two-branch ReduceNet teacher; stage 2 drops the bottleneck
  branch, inherits every other weight, optionally trains a linear (lora) branch with an annealed
  ReLU, and is distilled with KD (alpha 0.7, T 5 in the original); the student is then folded
  into a Conv-BN-free deploy model (deploy_params.pkl).
Every stage writes a params pickle that `test.py --trained_param` evaluates.
"""

import dataclasses
import typing

import keras
import numpy as np
import tensorflow as tf

from ke_tf.config import ConfigError, register_section
from ke_tf.engine.evaluate import Evaluator
from ke_tf.io.params import ParamsError, apply_params, load_params, model_arrays
from ke_tf.io.report import plot_lines, write_json, write_table
from ke_tf.layers.activations import annealed_layers, linear_anneal, set_annealing
from ke_tf.losses import ban_loss, hinton_loss
from ke_tf.methods.stage import (
    check_spec_matches_data,
    configured_spec,
    evaluate_model,
    load_configured_data,
    run_path,
    save_trained,
    test_metrics,
    test_source,
    train_stage,
)
from ke_tf.models import build_from_spec, model_spec
from ke_tf.models.reducenet import deploy_spec, get_deploy_model, is_reducenet, variant_spec
from ke_tf.surgery.flops import complexity

MODES = ("kd", "ban", "reducenet")


@dataclasses.dataclass
class DistillationConfig:
    mode: str = "kd"  # kd | ban | reducenet
    teacher_arch: typing.Optional[str] = None  # kd: teacher architecture (default: the student's)
    teacher_options: typing.Dict[str, typing.Any] = dataclasses.field(default_factory=dict)
    teacher_params: typing.Optional[str] = None  # pickled teacher; skips the teacher stage
    teacher_epochs: int = 0  # teacher stage epochs (0: train.epochs)
    alpha: float = 0.9  # kd/reducenet: weight of the KD term
    temperature: float = 4.0
    # ReduceNet's code uses torch KLDivLoss(reduction='mean'), i.e. KL / num_classes; Hinton's KD
    # (and our default) does not divide. True reproduces the code.
    kd_class_mean: bool = False
    # scratch | teacher (copy every variable with the same path); default: teacher for reducenet
    # (its stage 2 inherits the teacher), scratch otherwise. reducenet + scratch is the control
    # that shows what inheriting does.
    student_init: typing.Optional[str] = None
    anneal_epochs: typing.Optional[int] = None  # annealed ReLU reaches identity here (None: last epoch)
    generations: int = 3  # ban
    ban_lambda: float = 0.5  # ban: lambda at the first epoch ...
    ban_lambda_end: float = 0.5  # ... and at the last one
    ban_schedule: str = "geometric"  # geometric (np.geomspace, KC's code) | linear
    ban_tau: float = 1.0

    def validate(self, key):
        for name, value, choices in (
            ("mode", self.mode, MODES),
            ("student_init", self.student_init or "scratch", ("scratch", "teacher")),
            ("ban_schedule", self.ban_schedule, ("geometric", "linear")),
        ):
            if value not in choices:
                raise ConfigError(f"{key}.{name} must be one of {', '.join(choices)}; got {value!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{key}.alpha must be in [0, 1], got {self.alpha}")
        for name in ("temperature", "ban_tau", "generations"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name} must be > 0, got {getattr(self, name)}")
        if self.teacher_epochs < 0:
            raise ConfigError(f"{key}.teacher_epochs must be >= 0, got {self.teacher_epochs}")
        if self.anneal_epochs is not None and self.anneal_epochs < 0:
            raise ConfigError(f"{key}.anneal_epochs must be >= 0, got {self.anneal_epochs}")
        if self.ban_schedule == "geometric" and min(self.ban_lambda, self.ban_lambda_end) <= 0:
            raise ConfigError(f"{key}.ban_lambda and ban_lambda_end must be > 0 for the geometric schedule")


register_section("distillation", DistillationConfig)


# ---- losses ----------------------------------------------------------------------------------
def distill_objective(student, teacher, per_example):
    """Trainer `loss_fn`: `per_example(s, t, labels)` with the teacher frozen in inference mode."""

    def loss_fn(batch, training):
        logits = student(batch[0], training=training)
        target = tf.stop_gradient(teacher(batch[0], training=False))
        return {"loss": per_example(logits, target, batch[1]), "logits": logits}

    return loss_fn


def ban_lambdas(dc, epochs):
    """lambda for each epoch: np.geomspace (KC's BornAgain.py) or np.linspace from ban_lambda to
    ban_lambda_end."""
    space = np.geomspace if dc.ban_schedule == "geometric" else np.linspace
    return [float(v) for v in space(dc.ban_lambda, dc.ban_lambda_end, epochs)]


# ---- helpers ---------------------------------------------------------------------------------
def inherit_weights(student, teacher):
    """Copy every teacher variable whose path and shape match a student variable (ReduceNet's
    stage 2 reuses all weights but the dropped branch); returns the student paths not copied."""
    source = model_arrays(teacher)
    arrays = {
        v.path: source[v.path]
        for v in student.weights
        if v.path in source and tuple(source[v.path].shape) == tuple(v.shape)
    }
    apply_params(student, arrays, source="teacher", strict=False)
    return sorted(v.path for v in student.weights if v.path not in arrays)


def _row(stage, spec, model, metrics):
    return {
        "stage": stage,
        "arch": spec["arch"],
        "variant": spec["options"].get("variant", ""),
        **complexity(model),
        **test_metrics(metrics),
    }


def obtain_teacher(cfg, strategy, data, spec):
    """The frozen teacher: loaded from `distillation.teacher_params` (its own spec) or trained
    from `spec` as stage "teacher" (saved as teacher_params.pkl). Returns (model, spec, metrics, path)."""
    dc = cfg.section("distillation")
    if dc.teacher_params:
        arrays, meta = load_params(dc.teacher_params)
        if "model" not in meta:
            raise ParamsError(f"{dc.teacher_params}: metadata has no 'model' entry; cannot rebuild the teacher")
        spec = meta["model"]
        check_spec_matches_data(spec, data, dc.teacher_params)
        with strategy.scope():
            teacher = build_from_spec(spec)
            apply_params(teacher, arrays, source=dc.teacher_params)
        return teacher, spec, evaluate_model(strategy, teacher, data, cfg.train.eval_batch_size), dc.teacher_params
    with strategy.scope():
        teacher = build_from_spec(spec)
    tc = dataclasses.replace(cfg.train, epochs=dc.teacher_epochs or cfg.train.epochs)
    _, history, final = train_stage(cfg, strategy, teacher, data, cfg.run_dir, name="teacher", train_cfg=tc)
    path = run_path(cfg, "teacher_params.pkl")
    save_trained(strategy, path, teacher, spec, cfg, metrics=test_metrics(final), stage="teacher")
    return teacher, spec, final, path


# ---- kd / reducenet --------------------------------------------------------------------------
def _specs(cfg, data):
    dc = cfg.section("distillation")
    spec = configured_spec(cfg, data)
    if dc.mode == "reducenet":
        if not is_reducenet(spec):
            raise ConfigError(f"distillation.mode reducenet needs model.arch reduce20/reduce56, got {spec['arch']!r}")
        return variant_spec(spec, "teacher"), variant_spec(spec, "student")
    teacher_spec = model_spec(
        dc.teacher_arch or spec["arch"],
        spec["num_classes"],
        spec["input_shape"],
        **(dc.teacher_options if dc.teacher_arch else {**spec["options"], **dc.teacher_options}),
    )
    return teacher_spec, spec


def _annealing_schedule(cfg, model):
    """`on_epoch_begin` making the student's annealed ReLUs follow VanillaNet's linear schedule,
    reaching l = 1 (identity, fusable) by `anneal_epochs` (default: the last epoch); None when the
    model has none."""
    if not annealed_layers(model):
        return None
    dc = cfg.section("distillation")
    last = cfg.train.epochs - 1
    span = last if dc.anneal_epochs is None else dc.anneal_epochs
    if span > last:
        raise ConfigError(
            f"distillation.anneal_epochs {span} must be <= train.epochs - 1 = {last}, "
            "or the annealed branch is still non-linear at the end and cannot be fused"
        )
    return lambda epoch: set_annealing(model, linear_anneal(epoch, span))


def run_kd(cfg, strategy, data):
    """Teacher stage (or loaded teacher), KD student stage, and the deploy model of a ReduceNet."""
    dc = cfg.section("distillation")
    teacher_spec, student_spec = _specs(cfg, data)
    teacher, teacher_spec, teacher_final, teacher_path = obtain_teacher(cfg, strategy, data, teacher_spec)
    rows = [_row("teacher", teacher_spec, teacher, teacher_final)]
    with strategy.scope():
        student = build_from_spec(student_spec)
    inherited = 0
    if (dc.student_init or ("teacher" if dc.mode == "reducenet" else "scratch")) == "teacher":
        inherited = len(student.weights) - len(inherit_weights(student, teacher))
    label_smoothing = cfg.train.label_smoothing
    loss_fn = distill_objective(
        student,
        teacher,
        lambda s, t, y: hinton_loss(s, t, y, dc.alpha, dc.temperature, label_smoothing, dc.kd_class_mean),
    )
    _, history, final = train_stage(
        cfg,
        strategy,
        student,
        data,
        cfg.run_dir,
        on_epoch_begin=_annealing_schedule(cfg, student),
        name="student",
        loss_fn=loss_fn,
    )
    teacher_cx = complexity(teacher)
    student_path = run_path(cfg, "student_params.pkl")
    save_trained(
        strategy,
        student_path,
        student,
        student_spec,
        cfg,
        metrics=test_metrics(final),
        stage="student",
        teacher_params=teacher_path,
        dense_complexity=teacher_cx,
    )
    rows.append(_row("student", student_spec, student, final))
    summary = {
        "method": "distillation",
        "mode": dc.mode,
        "dataset": data.info.name,
        "teacher_arch": teacher_spec["arch"],
        "student_arch": student_spec["arch"],
        "teacher_top1": teacher_final["top1"],
        "student_top1": final["top1"],
        "student_params": rows[-1]["params"],
        "student_macs": rows[-1]["macs"],
        "inherited_variables": inherited,
        "student_params_file": student_path,
    }
    if is_reducenet(student_spec):
        summary.update(_deploy(cfg, strategy, data, student, student_spec, teacher_cx, rows))
    write_table(run_path(cfg, "results"), rows, summary=summary)
    plot_lines(
        run_path(cfg, "student_curve.png"),
        [h["epoch"] + 1 for h in history],
        {
            "student test top-1": [h.get("test_top1") for h in history],
            "teacher test top-1": [teacher_final["top1"]] * len(history),
        },
        "epoch",
        "top-1",
        f"{dc.mode}: {student_spec['arch']} from {teacher_spec['arch']}",
    )
    return summary


def _deploy(cfg, strategy, data, student, student_spec, teacher_cx, rows):
    """Fold the ReduceNet student, evaluate the deploy model and save deploy_params.pkl."""
    with strategy.scope():
        deploy = get_deploy_model(student, student_spec)
    spec = deploy_spec(student_spec)
    final = evaluate_model(strategy, deploy, data, cfg.train.eval_batch_size)
    path = run_path(cfg, "deploy_params.pkl")
    save_trained(
        strategy, path, deploy, spec, cfg, metrics=test_metrics(final), stage="deploy", dense_complexity=teacher_cx
    )
    rows.append(_row("deploy", spec, deploy, final))
    return {
        "deploy_top1": final["top1"],
        "deploy_params": rows[-1]["params"],
        "deploy_macs": rows[-1]["macs"],
        "deploy_params_file": path,
    }


# ---- Born-Again Networks ---------------------------------------------------------------------
def ensemble_predict(models):
    """log of the mean softmax of `models` (inference mode): the ensemble's 'logits'."""

    def predict(x):
        probs = tf.add_n([tf.nn.softmax(tf.cast(m(x, training=False), tf.float32)) for m in models])
        return tf.math.log(tf.maximum(probs / len(models), 1e-12))

    return predict


def run_ban(cfg, strategy, data):
    """G born-again generations (0-based: generation 0 learns from the labels or `teacher_params`);
    each is saved as gen_{g}/trained_params.pkl, as KE's generations, and evaluated alone and as
    the ensemble of generations 0..g (ban.{md,csv,json}, ban.png)."""
    dc = cfg.section("distillation")
    spec = configured_spec(cfg, data)
    teacher = obtain_teacher(cfg, strategy, data, spec)[0] if dc.teacher_params else None
    lambdas = ban_lambdas(dc, cfg.train.epochs)
    with strategy.scope():
        lam = tf.Variable(
            lambdas[0], trainable=False, dtype=tf.float32, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA
        )
    models, rows = [], []
    for g in range(dc.generations):
        keras.utils.set_random_seed(cfg.seed + 10 * g)  # KC: seed += 10 per generation
        with strategy.scope():
            model = build_from_spec(spec)
        loss_fn = (
            None
            if teacher is None
            else distill_objective(
                model, teacher, lambda s, t, y: ban_loss(s, t, y, lam, dc.ban_tau, cfg.train.label_smoothing)
            )
        )
        _, _, final = train_stage(
            cfg,
            strategy,
            model,
            data,
            cfg.run_dir,
            name=f"gen_{g}",
            loss_fn=loss_fn,
            on_epoch_begin=lambda epoch: lam.assign(lambdas[epoch]),
            seed=cfg.seed + 10 * g,
        )  # each generation its own data order
        path = run_path(cfg, f"gen_{g}", "trained_params.pkl")
        save_trained(strategy, path, model, spec, cfg, metrics=test_metrics(final), stage=f"gen_{g}", generation=g)
        models.append(model)
        ensemble = Evaluator(strategy, ensemble_predict(models))(test_source(data, cfg.train.eval_batch_size))
        rows.append(
            {
                "generation": g,
                "test_top1": final["top1"],
                "test_top5": final["top5"],
                "test_loss": final["loss"],
                "ensemble_top1": ensemble["top1"],
                "ensemble_loss": ensemble["loss"],
                "params_file": path,
            }
        )
        teacher = model
    summary = {
        "method": "distillation",
        "mode": "ban",
        "arch": spec["arch"],
        "dataset": data.info.name,
        "generations": dc.generations,
        "first_top1": rows[0]["test_top1"],
        "last_top1": rows[-1]["test_top1"],
        "best_top1": max(r["test_top1"] for r in rows),
        "ensemble_top1": rows[-1]["ensemble_top1"],
        **complexity(models[-1]),
    }
    write_table(run_path(cfg, "ban"), rows, summary=summary)
    write_json(run_path(cfg, "results.json"), {"summary": summary, "generations": rows})
    gens = [r["generation"] for r in rows]
    plot_lines(
        run_path(cfg, "ban.png"),
        gens,
        {"generation": [r["test_top1"] for r in rows], "ensemble of 0..g": [r["ensemble_top1"] for r in rows]},
        "generation",
        "test top-1",
        f"Born-Again Networks: {spec['arch']} on {data.info.name}",
    )
    return summary


def run(cfg, strategy):
    """Run `distillation.mode` (kd | ban | reducenet); returns a flat summary."""
    data = load_configured_data(cfg)
    if cfg.section("distillation").mode == "ban":
        return run_ban(cfg, strategy, data)
    return run_kd(cfg, strategy, data)
