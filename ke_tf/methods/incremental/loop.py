"""Class-incremental learning without exemplars: LwM (Dhar et al., CVPR 2019) and its baselines.

A base task is learned with CE; each later task trains a student, made from the frozen previous
model (the teacher) with K new output units, on the new classes' data only, with
  L = CE + beta * L_D(old logits, T) + gamma * L_AD(Grad-CAM maps of the teacher's top old class)
(lwm; lwf drops L_AD, finetune keeps CE only); L_D is LwF's distillation, without Hinton's T^2.
After every task all seen classes are evaluated (argmax over all seen outputs); the accuracy
matrix, average incremental accuracy and forgetting are written as tables, a plot and per-task
params files that test.py can evaluate.
"""

import dataclasses
import os
import typing

import numpy as np

from ke_tf.config import ConfigError, TrainConfig, register_section
from ke_tf.data import class_order, incremental_tasks
from ke_tf.io.report import markdown_table, plot_lines, write_json, write_table
from ke_tf.losses import incremental_objective
from ke_tf.methods.incremental.gradcam import feature_model, grad_cam, incremental_outputs, save_overlays
from ke_tf.methods.stage import configured_spec, load_configured_data, run_path, save_trained, train_stage
from ke_tf.models import build_from_spec

VARIANTS = ("lwm", "lwf", "finetune")


@dataclasses.dataclass
class IncrementalConfig:
    RENAMED_KEYS = {"method": "variant"}  # a class attribute, not a field
    variant: str = "lwm"  # lwm | lwf | finetune (`method` before 0.1: still read, with a note)
    compare: typing.List[str] = dataclasses.field(default_factory=list)  # run these on one base model
    order_seed: typing.Optional[int] = 1993  # class order seed (1993: iCaRL/PyCIL CIFAR-100); None: 0..n-1
    first: int = 50  # classes of the base task
    increment: int = 10  # classes of every later task
    num_tasks: typing.Optional[int] = None  # stop after this many tasks (None: all classes)
    beta: float = 1.0  # weight of L_D, no T^2 inside (paper leaves it open; FACIL/stony-hub use 1)
    gamma: float = 1.0  # weight of L_AD (same)
    temperature: float = 2.0  # L_D temperature (LwF's T=2)
    ce_over: str = "all"  # CE over all seen outputs | only the new task's outputs
    attention_layer: typing.Optional[str] = None  # Grad-CAM layer (None: last conv block)
    base_train: typing.Dict[str, typing.Any] = dataclasses.field(default_factory=dict)  # train.* overrides for task 0
    gradcam_images: int = 8  # test images in the Grad-CAM overlay PNG (0: none)

    def validate(self, key):
        if self.variant not in VARIANTS:
            raise ConfigError(f"{key}.variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}")
        bad = [m for m in self.compare if m not in VARIANTS]
        if bad or len(set(self.compare)) != len(self.compare):
            raise ConfigError(f"{key}.compare must list distinct variants of {', '.join(VARIANTS)}; got {self.compare}")
        for name in ("first", "increment"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_tasks is not None and self.num_tasks < 1:
            raise ConfigError(f"{key}.num_tasks must be >= 1, got {self.num_tasks}")
        for name in ("beta", "gamma", "gradcam_images"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"{key}.temperature must be > 0, got {self.temperature}")
        if self.ce_over not in ("all", "new"):
            raise ConfigError(f"{key}.ce_over must be one of all, new; got {self.ce_over!r}")
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(self.base_train) - fields)
        if unknown:
            raise ConfigError(f"unknown config key {key}.base_train.{unknown[0]} (known: {', '.join(sorted(fields))})")


register_section("incremental", IncrementalConfig)


# ---- tasks and data ------------------------------------------------------------------------
def task_split(icfg, num_classes):
    """The class lists of the tasks, in the configured class order."""
    order = class_order(num_classes, icfg.order_seed) if icfg.order_seed is not None else list(range(num_classes))
    if icfg.num_tasks is not None:
        used = icfg.first + (icfg.num_tasks - 1) * icfg.increment
        if used > num_classes:
            raise ConfigError(
                f"incremental: {icfg.num_tasks} tasks of {icfg.first}+{icfg.increment} classes "
                f"need {used} classes; the dataset has {num_classes}"
            )
        order = order[:used]
    try:
        return incremental_tasks(order, icfg.first, icfg.increment)
    except ValueError as e:
        raise ConfigError(f"incremental: {e}") from None


class TaskData:
    """One task's training data with labels shifted by `offset` into the seen-class index space
    (tasks are consecutive in the class order); tests on all seen classes. Duck-types the
    `ImageData` methods `train_stage` uses."""

    def __init__(self, task_data, offset, seen_data):
        self.info = dataclasses.replace(seen_data.info, train_size=task_data.info.train_size)
        self._task = task_data
        self._offset = offset
        self._seen = seen_data

    def stream(self, *args, **kwargs):
        offset = self._offset
        return self._task.stream(*args, **kwargs).map(lambda x, y: (x, y + offset))

    def test(self, batch_size, shard=None):
        return self._seen.test(batch_size, shard)


# ---- model growth and losses ---------------------------------------------------------------
def extend_head(teacher, spec):
    """A model built from `spec` (more classes than `teacher`) with every teacher weight copied;
    the classifier's old output columns are copied and its new columns keep their fresh init,
    so the old outputs are unchanged."""
    student = build_from_spec(spec)
    source = {v.path: v for v in teacher.weights}
    for v in student.weights:
        old = source[v.path].numpy()
        if old.shape == tuple(v.shape):
            v.assign(old)
            continue
        if not v.path.startswith("classifier/") or old.shape[:-1] != tuple(v.shape)[:-1]:
            raise ValueError(
                f"extend_head: {v.path} has shape {old.shape} in the teacher and "
                f"{tuple(v.shape)} in the student; only the classifier may grow"
            )
        new = v.numpy()
        new[..., : old.shape[-1]] = old
        v.assign(new)
    return student


def incremental_loss(variant, icfg, student, teacher=None, n_old=0):
    """Trainer `loss_fn` for one task: CE on the new labels (+ KD on the old outputs for lwf/lwm,
    + Grad-CAM attention distillation for lwm). With no teacher (base task) it is plain CE."""
    beta = icfg.beta if teacher is not None and variant in ("lwf", "lwm") else 0.0
    gamma = icfg.gamma if teacher is not None and variant == "lwm" else 0.0
    fms = (
        (feature_model(student, icfg.attention_layer), feature_model(teacher, icfg.attention_layer)) if gamma else None
    )
    ce_over = icfg.ce_over if teacher is not None else "all"

    def loss_fn(batch, training):
        images, labels = batch[0], batch[1]
        outputs = incremental_outputs(student, teacher, images, training, beta, gamma, fms)
        loss = incremental_objective(outputs, labels, n_old, beta, gamma, icfg.temperature, ce_over)
        return {"loss": loss, "logits": outputs["logits"]}

    return loss_fn


# ---- metrics -------------------------------------------------------------------------------
def predict_logits(model, dataset):
    """(logits, true labels) arrays of `model` in inference mode over `dataset`. Eager: a graph
    traced for each new (grown) model costs more than it saves on one pass, and made TensorFlow
    warn about retracing."""
    logits, labels = [], []
    for images, y in dataset:
        logits.append(np.asarray(model(images, training=False), np.float32))
        labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def task_accuracies(preds, labels, task_sizes):
    """Class-incremental accuracy on each task's classes (tasks are consecutive label ranges)."""
    bounds = np.cumsum([0] + list(task_sizes))
    accs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mask = (labels >= lo) & (labels < hi)
        accs.append(float(np.mean(preds[mask] == labels[mask])) if mask.any() else None)
    return accs


def average_incremental_accuracy(seen_accs):
    """Mean of the all-seen-classes accuracy after every task, the first included (iCaRL)."""
    return float(np.mean(seen_accs))


def forgetting(matrix):
    """FACIL forgetting after the last row of the lower-triangular accuracy `matrix`
    (matrix[t][j]: accuracy on task j after task t): mean over old tasks j of
    max_{j<=t<last} matrix[t][j] - matrix[last][j]; 0 after the first task."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return float(np.mean([max(matrix[t][j] for t in range(j, last)) - matrix[last][j] for j in range(last)]))


# ---- the loop ------------------------------------------------------------------------------
def _evaluate(model, seen_data, tasks, t, batch_size):
    """Class-incremental metrics after task t (argmax over all seen outputs) plus the seed
    repository's old-head accuracy (old-class images, argmax over the old outputs only)."""
    logits, labels = predict_logits(model, seen_data.test(batch_size))
    preds = np.argmax(logits, axis=-1)
    accs = task_accuracies(preds, labels, [len(c) for c in tasks[: t + 1]])
    n_old = sum(len(c) for c in tasks[:t])
    old = labels < n_old
    if not old.any():
        return {
            "acc_seen": float(np.mean(preds == labels)),
            "acc_old": None,
            "acc_new": accs[-1],
            "acc_old_head": None,
        }, accs
    return {
        "acc_seen": float(np.mean(preds == labels)),
        "acc_old": float(np.mean(preds[old] == labels[old])),
        "acc_new": accs[-1],
        "acc_old_head": float(np.mean(np.argmax(logits[old, :n_old], axis=-1) == labels[old])),
    }, accs


def _save_gradcam(path, model, seen_data, seen, icfg, n):
    images, labels = next(iter(seen_data.test(n)))
    maps, logits, preds = grad_cam(feature_model(model, icfg.attention_layer), images)
    titles = [f"y={seen[int(y)]} p={seen[int(p)]}" for y, p in zip(labels.numpy(), preds.numpy())]
    return save_overlays(path, images.numpy(), maps.numpy(), titles, seen_data.info.mean, seen_data.info.std)


class _VariantRun:
    """One variant's chain of models and its per-task results."""

    def __init__(self, variant, run_dir):
        self.variant, self.dir = variant, run_dir
        self.rows, self.matrix, self.files, self.history = [], [], [], {}
        self.model = None

    def record(self, t, n_classes, metrics, accs, path):
        self.matrix.append(accs)
        self.rows.append(
            {"variant": self.variant, "task": t, "classes": n_classes, **metrics, "forgetting": forgetting(self.matrix)}
        )
        self.files.append(path)

    def summary(self):
        return {
            "avg_incremental_acc": average_incremental_accuracy([r["acc_seen"] for r in self.rows]),
            "final_acc": self.rows[-1]["acc_seen"],
            "forgetting": self.rows[-1]["forgetting"],
        }


def run(cfg, strategy):
    """Learn the configured task sequence with each variant (all continuing from one base model,
    task by task so each task's data is loaded once); returns a flat summary."""
    icfg = cfg.section("incremental")
    if cfg.data.classes is not None:
        raise ConfigError(
            "data.classes must be unset for method incremental; the tasks come from "
            "incremental.order_seed/first/increment/num_tasks"
        )
    variants = list(icfg.compare) or [icfg.variant]
    full = load_configured_data(cfg)
    tasks = task_split(icfg, full.info.num_classes)
    input_shape = tuple(full.info.image_shape)
    base_cfg = dataclasses.replace(cfg.train, **icfg.base_train)
    base_cfg.validate("incremental.base_train")
    eval_bs = cfg.train.eval_batch_size
    runs = [_VariantRun(m, cfg.run_dir if len(variants) == 1 else os.path.join(cfg.run_dir, m)) for m in variants]

    def seen_classes(t):
        return [c for task in tasks[: t + 1] for c in task]

    def spec(t):
        return configured_spec(cfg, full, num_classes=len(seen_classes(t)))

    def save(model, t, run, metrics):
        path = os.path.join(run.dir, f"task_{t}", "trained_params.pkl")
        save_trained(
            strategy,
            path,
            model,
            spec(t),
            cfg,
            metrics=metrics,
            data={"name": cfg.data.name, "image_size": input_shape[0], "classes": seen_classes(t)},
            incremental={"variant": run.variant, "task": t, "tasks": tasks},
        )
        return path

    for t in range(len(tasks)):
        n_old = len(seen_classes(t - 1)) if t else 0
        seen_data = load_configured_data(cfg, classes=seen_classes(t))
        task_data = TaskData(load_configured_data(cfg, classes=tasks[t]), n_old, seen_data)
        if t == 0:  # the base task: plain CE, one model shared by every compared variant
            with strategy.scope():
                base = build_from_spec(spec(0))
            _, history, _ = train_stage(
                cfg,
                strategy,
                base,
                task_data,
                cfg.run_dir,
                name="task_0",
                loss_fn=incremental_loss("finetune", icfg, base),
                train_cfg=base_cfg,
            )
            metrics, accs = _evaluate(base, seen_data, tasks, 0, eval_bs)
            base.trainable = False
            for run in runs:
                run.model, run.history["task_0"] = base, history
                run.record(0, len(tasks[0]), metrics, accs, save(base, 0, run, metrics))
            continue
        for run in runs:
            teacher = run.model
            with strategy.scope():
                student = extend_head(teacher, spec(t))
            loss_fn = incremental_loss(run.variant, icfg, student, teacher, n_old)
            _, run.history[f"task_{t}"], _ = train_stage(
                cfg, strategy, student, task_data, run.dir, name=f"task_{t}", loss_fn=loss_fn
            )
            metrics, accs = _evaluate(student, seen_data, tasks, t, eval_bs)
            student.trainable = False
            run.model = student
            run.record(t, len(seen_classes(t)), metrics, accs, save(student, t, run, metrics))

    for run in runs:
        if icfg.gradcam_images:
            _save_gradcam(
                os.path.join(run.dir, "gradcam.png"),
                run.model,
                seen_data,
                seen_classes(len(tasks) - 1),
                icfg,
                icfg.gradcam_images,
            )
        write_table(os.path.join(run.dir, "incremental"), run.rows, summary=run.summary())
        write_json(
            os.path.join(run.dir, "results.json"),
            {
                "variant": run.variant,
                "tasks": tasks,
                "rows": run.rows,
                "accuracy_matrix": run.matrix,
                "summary": run.summary(),
                "params_files": run.files,
                "history": run.history,
            },
        )
    all_rows = [r for run in runs for r in run.rows]
    print(markdown_table(all_rows))
    write_table(run_path(cfg, "comparison"), all_rows, summary={run.variant: run.summary() for run in runs})
    plot_lines(
        run_path(cfg, "accuracy.png"),
        [r["classes"] for r in runs[0].rows],
        {run.variant: [r["acc_seen"] for r in run.rows] for run in runs},
        "number of classes",
        "accuracy on all seen classes",
        f"{cfg.data.name} class-incremental ({len(tasks[0])}+{len(tasks) - 1}x{icfg.increment})",
    )
    summary = {
        "method": "incremental",
        "variants": ",".join(variants),
        "arch": cfg.model.arch,
        "dataset": cfg.data.name,
        "tasks": len(tasks),
    }
    for run in runs:
        summary.update({f"{run.variant}_{k}": v for k, v in run.summary().items()})
    return summary
