"""Shared machinery of the method loops: load the configured data, train one stage of a loop
with the Trainer and evaluate it, save params with rebuild metadata."""

import os
import weakref

from ke_tf.data import load_data
from ke_tf.engine.evaluate import Evaluator
from ke_tf.engine.strategy import is_chief
from ke_tf.engine.trainer import Trainer
from ke_tf.io.params import ParamsError, save_params
from ke_tf.io.report import plot_lines
from ke_tf.losses import classifier_loss
from ke_tf.models import model_spec
from ke_tf.models.user import user_model_spec
from ke_tf.surgery.flops import complexity


def load_configured_data(cfg, classes=None):
    """The ImageData the config's `data` section names (optionally a class subset)."""
    d = cfg.data
    return load_data(
        d.name,
        data_dir=d.data_dir,
        image_size=d.image_size,
        classes=classes if classes is not None else d.classes,
        split_seed=d.split_seed,
        train_per_class=d.train_per_class,
        on_bad_file=d.on_bad_file,
        **({"test_split": d.test_split} if d.name == "image_folder" else {}),
    )


_EVALUATORS = weakref.WeakKeyDictionary()


def configured_spec(cfg, data, num_classes=None):
    """The model spec of `cfg.model` (arch and options, or the user's `keras_file` / `application`)
    for `data`'s image shape and its number of classes (or `num_classes`: an incremental task's seen
    classes)."""
    m = cfg.model
    classes = data.info.num_classes if num_classes is None else num_classes
    shape = tuple(data.info.image_shape)
    if m.user_key:
        return user_model_spec(classes, shape, m.keras_file, m.application, m.options)
    return model_spec(m.arch, classes, shape, **m.options)


def check_spec_matches_data(spec, data, source):
    """Raise ParamsError naming `source` when a trained net's spec does not fit `data`."""
    expected = (tuple(spec["input_shape"]), spec["num_classes"])
    given = (tuple(data.info.image_shape), data.info.num_classes)
    if expected != given:
        raise ParamsError(
            f"{source}: net expects input {expected[0]} / {expected[1]} classes but data gives {given[0]} / {given[1]}"
        )


def model_evaluator(strategy, model):
    """Evaluator of `model` in inference mode (BN moving statistics); one per model and strategy,
    so its traced pass is reused across stages, generations and tasks."""
    cached = _EVALUATORS.get(model)
    if cached is None or cached.strategy is not strategy:
        cached = _EVALUATORS[model] = Evaluator(strategy, lambda x: model(x, training=False))
    return cached


def test_source(data, batch_size):
    """`data`'s test split as an evaluation source (each input pipeline reads its own rows)."""
    return lambda shard: data.test(batch_size, shard)


def evaluate_model(strategy, model, data, batch_size):
    """Test-set loss/top-1/top-5 of `model` in inference mode."""
    return model_evaluator(strategy, model)(test_source(data, batch_size))


def train_stage(
    cfg,
    strategy,
    model,
    data,
    run_dir,
    name="train",
    loss_fn=None,
    variables=None,
    train_cfg=None,
    extra_checkpoint=None,
    eval_model=None,
    on_epoch_begin=None,
    seed=None,
):
    """Train `model` (built in `strategy.scope()`) on `data` (anything with `stream(...)`,
    `test(batch_size, shard)` and `info`) for one stage; resumes from this stage's checkpoints.
    `on_epoch_begin(epoch)` updates per-epoch schedule state; `seed` (default `cfg.seed`) sets the
    data order and augmentation, so stages of one run (generations) can see different streams.
    Returns (trainer, history, final test metrics)."""
    tc = train_cfg or cfg.train
    loss_fn = loss_fn or classifier_loss(model, tc.label_smoothing)
    steps = data.info.train_size // tc.batch_size
    trainer = Trainer(
        tc, strategy, model, loss_fn, steps, run_dir, variables=variables, extra_checkpoint=extra_checkpoint, name=name
    )
    evaluator = model_evaluator(strategy, eval_model or model)
    source = test_source(data, tc.eval_batch_size)
    last = {}

    def eval_fn(epoch):
        last.update(epoch=epoch, metrics=evaluator(source))
        return test_metrics(last["metrics"])

    history = trainer.fit(data, cfg.seed if seed is None else seed, eval_fn=eval_fn, on_epoch_begin=on_epoch_begin)
    # The last epoch is always evaluated; re-evaluate only when this call trained nothing (resumed done).
    final = last["metrics"] if last.get("epoch") == tc.epochs - 1 else evaluator(source)
    if is_chief(strategy):
        plot_history(os.path.join(run_dir, f"{name}_curve.png"), history, name)
    return trainer, history, final


def plot_history(path, history, title):
    """Per-epoch curves of a stage: train/test top-1 for classifiers, the training loss otherwise."""
    epochs = [h["epoch"] + 1 for h in history]
    if history and "test_top1" in history[-1]:
        series = {
            "train top-1": [h["train_top1"] for h in history],
            "test top-1": [h.get("test_top1", float("nan")) for h in history],
        }
        return plot_lines(path, epochs, series, "epoch", "top-1", title)
    return plot_lines(path, epochs, {"train loss": [h["train_loss"] for h in history]}, "epoch", "loss", title)


def save_trained(strategy, path, model, spec, cfg, metrics=None, **extra):
    """Write `model`'s params with the metadata `test.py` needs to rebuild and evaluate it
    (chief only; atomic). Returns the metadata."""
    metadata = {
        "model": spec,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "metrics": metrics or {},
        "complexity": complexity(model),
        "data": {"name": cfg.data.name, "image_size": spec["input_shape"][0], "classes": cfg.data.classes},
        **extra,
    }
    if is_chief(strategy):
        save_params(path, model, metadata)
    return metadata


def test_metrics(metrics):
    """An evaluation dict as `test_*` entries for params metadata and summaries."""
    return {f"test_{k}": v for k, v in metrics.items() if k != "count"}


def run_path(cfg, *parts):
    return os.path.join(cfg.run_dir, *parts)
