"""Benchmark 1: training throughput as a user runs it. The full `Trainer.fit` path (the method
loops' input pipeline with augmentation and prefetch, the distributed iterator, loops of N steps
per tf.function call, one host read per loop, per-epoch history) against Keras
`fit(steps_per_execution=N)` on the same pipeline and a plain `tf.function` training step over a
plain iterator of the same pipeline (the ceiling: the same model and Keras SGD, one call per
step, the loss read at each epoch end), and the achieved model FLOP/s as a fraction of the
device's measured dense matmul/conv peak. Each contender trains 3-epoch stages of N steps per
epoch; epochs 2-3 are timed (steady state: set-up and tracing left out). Rows report the median
over interleaved repeats and the spread of the per-repeat ratios. XLA is timed where
`jit_compile: auto` turns it on (GPUs; on GPUs also off, for comparison). On CPUs `auto` times the
stage's step with and without XLA and keeps the faster: its rows compare the engine under `auto`
(measuring afresh, as a long stage does) with XLA forced off and forced on (the whole step)."""

import contextlib
import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from benchmarks.common import (
    STEADY_EPOCHS,
    EngineRun,
    compare_samples,
    compare_steady,
    entry,
    keras_fit_run,
    model_macs,
    train_config,
    uses_gpu,
)
from benchmarks.pipeline import _load
from ke_tf.engine.iterators import release_in_background

SECTION = "throughput"

# (arch, build options, image side, batch, steps per timed call (= N per loop/execution), dataset)
FULL = [("resnet56", {"shortcut": "B"}, 32, 128, 8, "cifar10"), ("resnet18", {}, 224, 32, 4, "oxford_flowers102")]
QUICK = [("resnet20", {}, 32, 16, 4, "cifar10")]
# The `jit_compile: auto` rows (CPUs): the same fields as FULL/QUICK.
AUTO_FULL = [("resnet56", {"shortcut": "B"}, 32, 128, 8, "cifar10")]


def measure_peak(quick=False, repeats=5):
    """Dense float32 matmul and 3x3 conv FLOP/s (the best of the two is the 'peak')."""
    n = 512 if quick else 4096
    a = tf.random.normal([n, n])
    b = tf.random.normal([n, n])
    matmul = tf.function(lambda: tf.matmul(a, b))
    shape = (8, 16, 16, 64) if quick else (32, 28, 28, 256)
    x = tf.random.normal(shape)
    k = tf.random.normal([3, 3, shape[-1], shape[-1]])
    conv = tf.function(lambda: tf.nn.conv2d(x, k, 1, "SAME"))
    times = {
        name: float(np.median(s))
        for name, s in compare_samples(
            {"matmul": lambda: matmul().numpy(), "conv": lambda: conv().numpy()}, warmup=2, repeats=repeats
        ).items()
    }
    flops = {"matmul": 2.0 * n**3 / times["matmul"], "conv": 2.0 * np.prod(shape) * 9 * shape[-1] / times["conv"]}
    return max(flops.values()), flops


def _model(arch, options, num_classes, side):
    from ke_tf.models import build_model

    keras.utils.set_random_seed(0)
    return build_model(arch, num_classes, (side, side, 3), **options)


def _keras_fit(model, dataset, steps, jit):
    """Keras `fit` over the same stream, N = `steps` steps per execution (one execution per epoch,
    as the engine's loop)."""
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        jit_compile=jit,
        steps_per_execution=steps,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["sparse_categorical_accuracy"],
    )  # the engine counts top-1 too
    return keras_fit_run(model, dataset, steps, STEADY_EPOCHS)


def _plain_step(model, dataset, steps, jit):
    """The ceiling: a tf.function step (forward, gradients, Keras SGD) called per batch of a plain
    tf.data iterator; the loss is read at each epoch end."""
    opt = keras.optimizers.SGD(0.01, momentum=0.9)
    opt.build(model.trainable_variables)

    @tf.function(jit_compile=jit)
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, tf.cast(logits, tf.float32)))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    def run():
        batches = [iter(dataset)]  # released as the engine releases its own (see ke_tf.engine.iterators)
        ends = []
        for _ in range(STEADY_EPOCHS):
            for _ in range(steps):
                loss = step(*next(batches[0]))
            float(loss)
            ends.append(time.perf_counter())
        release_in_background(batches)
        return ends

    return run


def _contenders(arch, options, data, side, batch_size, steps, jit):
    from ke_tf.engine import make_strategy

    classes = data.info.num_classes
    strategy = make_strategy("one_device")
    with strategy.scope():
        model = _model(arch, options, classes, side)
    engine = EngineRun(
        strategy,
        model,
        train_config(batch_size, jit, steps_per_loop=steps),
        None,
        steps,
        data=data,
        epochs_per_call=STEADY_EPOCHS,
    )
    stream = data.stream(batch_size, 0, 0, 10**6)
    return {
        "engine": engine,
        "keras_fit": _keras_fit(_model(arch, options, classes, side), stream, steps, jit),
        "plain_step": _plain_step(_model(arch, options, classes, side), stream, steps, jit),
    }


def _resized(data, side):
    """`data` with its training images resized to `side` x `side` (the quick rows' tiny inputs)."""

    class Resized:
        info = data.info

        def stream(self, *args, **kwargs):
            return data.stream(*args, **kwargs).map(lambda x, *rest: (tf.image.resize(x, (side, side)), *rest))

    return Resized() if side != 32 else data


def xla_auto_rows(repeats=3):
    """Entries (CPUs): the engine under `jit_compile: auto` vs XLA forced off and forced on, with
    the decision `auto` took (measured afresh in a private cache, however short the stage) and
    auto / the faster forced setting (medians over interleaved repeats)."""
    from ke_tf.engine import make_strategy, xla_choice

    rows = []
    for arch, options, side, batch_size, steps, dataset in AUTO_FULL:
        with contextlib.ExitStack() as stack:
            data = _load(dataset, batch_size * steps, stack.enter_context(tempfile.TemporaryDirectory()))
            data = _resized(data, side)
            stack.enter_context(_private_xla_cache(stack.enter_context(tempfile.TemporaryDirectory())))
            runs = {}
            for setting in ("auto", "off", "on"):
                strategy = make_strategy("one_device")
                with strategy.scope():
                    model = _model(arch, options, data.info.num_classes, side)
                cfg = train_config(batch_size, False, jit_compile=setting, steps_per_loop=steps)
                runs[setting] = EngineRun(strategy, model, cfg, None, steps, data=data, epochs_per_call=STEADY_EPOCHS)
            samples = compare_steady(runs, repeats=repeats)
        rates = {k: steps * batch_size / float(np.median(t)) for k, t in samples.items()}
        best = max(("off", "on"), key=rates.get)
        trainer = runs["auto"].trainer
        cpu = xla_choice.describe(xla_choice.machine())
        rows.append(
            entry(
                f"train {arch} {side}x{side} b{batch_size} jit_compile=auto",
                SECTION,
                rates["auto"],
                "images/s",
                ratio=rates["auto"] / rates[best],
                target="auto >= 0.95 x the faster of XLA off / on",
                met=bool(rates["auto"] >= 0.95 * rates[best]),
                notes=(
                    f"{cpu}; auto chose XLA {trainer.jit} ({trainer.xla_note}); img/s auto {rates['auto']:.1f}, "
                    f"off {rates['off']:.1f}, on (whole step) {rates['on']:.1f}; on/off "
                    f"{rates['on'] / rates['off']:.2f}; {len(samples['auto'])} interleaved repeats of 2 timed "
                    f"epochs of {steps} steps"
                ),
                cpu=cpu,
                decision=trainer.jit,
                reason=trainer.xla_note,
                auto=rates["auto"],
                off=rates["off"],
                on=rates["on"],
                auto_vs_best=[min(o, x) / a for a, o, x in zip(samples["auto"], samples["off"], samples["on"])],
            )
        )
    return rows


@contextlib.contextmanager
def _private_xla_cache(folder):
    """`auto` measures afresh (an empty cache in `folder`), whatever the stage's length."""
    from ke_tf.engine import xla_choice

    saved = os.environ.get(xla_choice.CACHE_ENV), xla_choice.MEASURE_MIN_SECONDS
    os.environ[xla_choice.CACHE_ENV] = folder
    xla_choice.MEASURE_MIN_SECONDS = 0.0
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop(xla_choice.CACHE_ENV)
        else:
            os.environ[xla_choice.CACHE_ENV] = saved[0]
        xla_choice.MEASURE_MIN_SECONDS = saved[1]


def run(quick=False, repeats=5, **_):
    """Entries: per model and XLA setting, engine / fit / plain-step images/s and their ratios."""
    repeats = 1 if quick else max(3, repeats)
    peak, peaks = measure_peak(quick, repeats)
    gpu = uses_gpu()
    rows = [
        entry(
            "device peak FLOP/s",
            SECTION,
            peak / 1e9,
            "GFLOP/s",
            notes="max of a dense float32 matmul and 3x3 conv measured in this run",
            **{f"{k}_gflops": v / 1e9 for k, v in peaks.items()},
        )
    ]
    for arch, options, side, batch_size, steps, dataset in QUICK if quick else FULL:
        with contextlib.ExitStack() as stack:
            data = _load(dataset, batch_size * steps, stack.enter_context(tempfile.TemporaryDirectory()))
        macs = model_macs(_model(arch, options, data.info.num_classes, side))
        # The device's default XLA setting; on GPUs also XLA off (--quick: the default only).
        for jit in (False, True) if gpu and not quick else (gpu,):
            samples = compare_steady(_contenders(arch, options, data, side, batch_size, steps, jit), repeats=repeats)
            rates = {k: steps * batch_size / float(np.median(t)) for k, t in samples.items()}
            vs_plain = [p / e for e, p in zip(samples["engine"], samples["plain_step"])]
            vs_fit = [f / e for e, f in zip(samples["engine"], samples["keras_fit"])]
            targeted = jit == gpu  # targets apply to the device's recommended setting
            # Judged on the median over repeats: one repeat on a shared machine varies by ~10%.
            met = bool(np.median(vs_plain) >= 0.95 and np.median(vs_fit) >= 1.0) if targeted else None
            flops = 3 * macs * 2 * rates["engine"]
            rows.append(
                entry(
                    f"train {arch} {side}x{side} b{batch_size} jit={'on' if jit else 'off'}",
                    SECTION,
                    rates["engine"],
                    "images/s",
                    ratio=float(np.median(vs_plain)),
                    target="engine >= 0.95 x plain step and >= fit (medians over repeats)" if targeted else None,
                    met=met,
                    notes=(
                        f"{dataset} pipeline ({len(samples['engine'])} repeats of 2 timed epochs of {steps} steps, "
                        f"N={steps}); engine/plain step {min(vs_plain):.2f}-{max(vs_plain):.2f}, engine/fit "
                        f"{min(vs_fit):.2f}-{max(vs_fit):.2f}; fit {rates['keras_fit']:.1f}, plain step "
                        f"{rates['plain_step']:.1f} img/s; model FLOP/s = 3 x fwd MACs x 2 x img/s = "
                        f"{flops / 1e9:.1f} GFLOP/s = {flops / peak:.0%} of peak"
                    ),
                    dataset=dataset,
                    engine=rates["engine"],
                    keras_fit=rates["keras_fit"],
                    plain_step=rates["plain_step"],
                    engine_vs_plain=vs_plain,
                    engine_vs_fit=vs_fit,
                    forward_macs=macs,
                    model_gflops=flops / 1e9,
                    peak_fraction=flops / peak,
                )
            )
    if not gpu and not quick:  # two XLA compiles: minutes on 2 cores (tests/test_xla_auto.py checks auto)
        rows += xla_auto_rows(repeats)
    return rows
