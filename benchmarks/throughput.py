"""Benchmark 1: training-step throughput of the ke_tf engine vs Keras `fit` vs a plain eager
GradientTape loop (same model, batch and SGD optimizer), with XLA on and off, plus achieved
model FLOP/s as a fraction of the device's measured dense matmul/conv peak."""
import keras
import numpy as np
import tensorflow as tf

from benchmarks.common import EngineFit, EngineSteps, compare, entry, model_macs, random_batch, train_config, uses_gpu

SECTION = "throughput"

# (arch, num_classes, image side, batch, steps per timed call, dataset whose pipeline feeds it)
FULL = [("resnet56", 10, 32, 128, 2, "cifar10"), ("resnet18", 1000, 224, 32, 1, "oxford_flowers102")]
QUICK = [("resnet20", 10, 16, 16, 2, "cifar10")]


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
    times = compare({"matmul": lambda: matmul().numpy(), "conv": lambda: conv().numpy()},
                    warmup=2, repeats=repeats)
    flops = {"matmul": 2.0 * n ** 3 / times["matmul"],
             "conv": 2.0 * np.prod(shape) * 9 * shape[-1] / times["conv"]}
    return max(flops.values()), flops


def _model(arch, num_classes, side, seed=0):
    from ke_tf.models import build_model
    keras.utils.set_random_seed(seed)
    return build_model(arch, num_classes, (side, side, 3))


def _keras_fit(arch, num_classes, side, batch, steps, jit):
    """Keras `fit` on the same repeated batch, SGD(lr, momentum) as the engine's config."""
    model = _model(arch, num_classes, side)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    data = tf.data.Dataset.from_tensors(batch).repeat()
    return lambda: model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)


def _eager(arch, num_classes, side, batch, steps):
    """The textbook loop: GradientTape + apply_gradients, no tf.function."""
    model = _model(arch, num_classes, side)
    opt = keras.optimizers.SGD(0.01, momentum=0.9)
    x, y = tf.constant(batch[0]), tf.constant(batch[1])

    def run():
        for _ in range(steps):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, model(x, training=True)))
            opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        float(loss)
    return run


def _engine(arch, num_classes, side, batch, steps, jit, kind=EngineSteps):
    from ke_tf.engine import make_strategy
    strategy = make_strategy("one_device")
    with strategy.scope():
        model = _model(arch, num_classes, side)
    return kind(strategy, model, train_config(len(batch[0]), jit), batch, steps)


def run(quick=False, repeats=5, **_):
    """Entries: per model and jit setting engine/keras/eager images/s; engine vs Keras ratio."""
    peak, peaks = measure_peak(quick, repeats)
    gpu = uses_gpu()
    rows = [entry("device peak FLOP/s", SECTION, peak / 1e9, "GFLOP/s",
                  notes="max of a dense float32 matmul and 3x3 conv measured in this run",
                  **{f"{k}_gflops": v / 1e9 for k, v in peaks.items()})]
    for arch, classes, side, batch_size, steps, dataset in (QUICK if quick else FULL):
        batch = random_batch(batch_size, (side, side, 3), classes)
        macs = model_macs(_model(arch, classes, side))
        eager = _eager(arch, classes, side, batch, steps)
        eager_rate = None
        # --quick times only the device's default XLA setting (an XLA compile dominates a smoke run).
        for jit in ((gpu,) if quick else (False, True)):
            fns = {"engine": _engine(arch, classes, side, batch, steps, jit),
                   "keras_fit": _keras_fit(arch, classes, side, batch, steps, jit)}
            if eager_rate is None:  # eager and the fit path once, at the first setting
                fns["eager"] = eager
                fns["engine_fit"] = _engine(arch, classes, side, batch, steps, jit, EngineFit)
            times = compare(fns, warmup=1, repeats=repeats)
            rates = {k: steps * batch_size / t for k, t in times.items()}
            eager_rate = rates.pop("eager", eager_rate)
            fit_rate = rates.pop("engine_fit", None)
            ratio = rates["engine"] / rates["keras_fit"]
            # The target is for the device's recommended setting: XLA on GPU, off on CPU.
            targeted = jit == gpu
            flops = 3 * macs * 2 * rates["engine"]
            rows.append(entry(
                f"train step {arch} {side}x{side} b{batch_size} jit={'on' if jit else 'off'}", SECTION,
                rates["engine"], "images/s", ratio=ratio, target="engine >= keras fit" if targeted else None,
                met=bool(ratio >= 1.0) if targeted else None,
                notes=(f"ratio = engine / Keras fit; eager GradientTape loop {eager_rate:.1f} img/s "
                       f"(engine {rates['engine'] / eager_rate:.2f}x eager); "
                       + (f"engine fit() incl. per-epoch setup at {steps} step(s)/epoch {fit_rate:.1f} img/s; "
                          if fit_rate else "") + f"model FLOP/s = 3 x fwd MACs "
                       f"x 2 x img/s = {flops / 1e9:.1f} GFLOP/s = {flops / peak:.0%} of peak"),
                dataset=dataset, engine=rates["engine"], keras_fit=rates["keras_fit"], eager=eager_rate,
                engine_fit_path=fit_rate,
                forward_macs=macs, model_gflops=flops / 1e9, peak_fraction=flops / peak))
    return rows
