"""Shared benchmark machinery: device description, interleaved median timing, result entries
and small model/trainer builders (so every benchmark times the same things the same way)."""

import os
import platform
import statistics
import tempfile
import time

import numpy as np


def device_description():
    """What the numbers were measured on: CPU model and vector extensions, cores, GPUs, TF/Keras versions."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    gpu_names = []
    for g in gpus:
        details = tf.config.experimental.get_device_details(g)
        gpu_names.append(details.get("device_name", g.name))
    from ke_tf.engine.xla_choice import machine

    cpu = machine()
    return {
        "cpu": cpu["cpu"],
        "vector_extensions": cpu["flags"],  # AVX-512 and AVX2 machines differ (XLA, kernels)
        "cores": os.cpu_count(),
        "gpus": gpu_names,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


def uses_gpu():
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


# Epochs per steady-state timed stage (`compare_steady`): the first is set-up, the others are timed.
STEADY_EPOCHS = 3


def compare_samples(fns, warmup=1, repeats=5):
    """Seconds per whole call of each `fns[name]()` in every repeat; the contenders are interleaved
    round-robin so load changes on a shared machine hit all of them alike. {name: [seconds]}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def compare(fns, warmup=1, repeats=5):
    """Median seconds per call of each `fns[name]()` (see `compare_samples`). {name: seconds}."""
    return {name: statistics.median(s) for name, s in compare_samples(fns, warmup, repeats).items()}


def entry(name, section, value, unit, ratio=None, target=None, met=None, notes="", **values):
    """One results.json row; `values` holds the raw numbers behind `value`/`ratio`."""
    return {
        "name": name,
        "section": section,
        "value": _plain(value),
        "values": _plain(values),
        "unit": unit,
        "ratio": _plain(ratio),
        "target": target,
        "met": met,
        "notes": notes,
    }


def _plain(x):
    """JSON-safe copy (numpy scalars -> float, rounded)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, str)) or x is None:
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    return float(f"{float(x):.4g}")


def train_config(batch_size, jit, **overrides):
    """A TrainConfig for timing: constant LR SGD, no weight decay (Keras fit gets the identical
    optimizer), no checkpoints, progress bars or log lines."""
    from ke_tf.config import TrainConfig

    base = dict(
        epochs=1,
        batch_size=batch_size,
        optimizer="sgd",
        lr=0.01,
        momentum=0.9,
        schedule="constant",
        weight_decay=0.0,
        jit_compile="on" if jit else "off",
        checkpoint_every_epochs=0,
        progress=False,
    )
    return TrainConfig(**{**base, **overrides})


def random_batch(batch_size, image_shape, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch_size, *image_shape)).astype("float32")
    y = rng.integers(0, num_classes, size=batch_size).astype("int32")
    return x, y


class EngineRun:
    """Times ke_tf's real `Trainer.fit` path (the stage's distributed iterator over `data`'s
    stream, the loop tf.function, one host read per loop, history): each call trains
    `epochs_per_call` more epochs of `steps` steps in ONE stage and returns the times at which
    its epochs ended (see `compare_steady`). `data` defaults to `batch` repeated `steps` times."""

    def __init__(self, strategy, model, cfg, batch, steps, data=None, loss_fn=None, epochs_per_call=1):
        from ke_tf.data.stream import TensorData
        from ke_tf.engine import Trainer
        from ke_tf.losses import classifier_loss

        self.data = data if data is not None else TensorData(*(np.concatenate([a] * steps) for a in batch))
        self.run_dir = tempfile.mkdtemp(prefix="ke_tf_bench_")
        self.trainer = Trainer(cfg, strategy, model, loss_fn or classifier_loss(model), steps, self.run_dir)
        self.epochs = 0
        self.epochs_per_call = epochs_per_call

    def __call__(self):
        self.epochs += self.epochs_per_call
        ends = []
        self.trainer.fit(
            self.data,
            seed=0,
            epochs=self.epochs,
            resume=False,
            eval_fn=lambda epoch: ends.append(time.perf_counter()) or {},
        )
        return ends


def keras_fit_run(model, dataset, steps, epochs):
    """`model.fit` (compiled by the caller) over `epochs` epochs of `steps` steps of `dataset` in
    one call; returns the times at which its epochs ended (see `compare_steady`)."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ends.append(time.perf_counter())

    ends = []

    def run():
        ends.clear()
        model.fit(dataset, epochs=epochs, steps_per_epoch=steps, verbose=0, callbacks=[EpochClock()])
        return list(ends)

    return run


def compare_steady(fns, repeats=5):
    """Steady-state seconds per epoch: each `fns[name]()` trains several epochs in one stage (or
    `fit` call) and returns the times its epochs ended; the first epoch (stage set-up, tracing,
    iterator start) is left out, per-epoch bookkeeping stays in. Contenders are interleaved
    round-robin as in `compare_samples`. {name: [seconds per epoch, one per repeat]}"""
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            ends = fn()
            if len(ends) < 2:
                raise ValueError(f"{name}: steady-state timing needs at least 2 epochs per call, got {len(ends)}")
            samples[name].append((ends[-1] - ends[0]) / (len(ends) - 1))
    return samples


def model_macs(model):
    from ke_tf.surgery.flops import complexity

    return complexity(model)["macs"]
