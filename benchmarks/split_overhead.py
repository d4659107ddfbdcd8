"""Benchmark 2: training-step cost of Knowledge Evolution's split layers (SplitLayerFactory:
kernels carry a fit-hypothesis mask variable) relative to the plain network."""

import keras

from benchmarks.common import EngineRun, compare, entry, random_batch, train_config, uses_gpu

SECTION = "split_overhead"
FULL = ("resnet56", 10, 32, 128, 2)
QUICK = ("resnet20", 10, 16, 16, 2)


def run(quick=False, repeats=5, **_):
    from ke_tf.engine import make_strategy
    from ke_tf.layers.factory import PLAIN
    from ke_tf.layers.split import SplitLayerFactory
    from ke_tf.models import build_model

    arch, classes, side, batch_size, steps = QUICK if quick else FULL
    batch = random_batch(batch_size, (side, side, 3), classes)
    strategy = make_strategy("one_device")
    jit = uses_gpu()
    fns = {}
    for name, layers in (("plain", PLAIN), ("split", SplitLayerFactory(0.5, "kels"))):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_model(arch, classes, (side, side, 3), layers=layers)
        fns[name] = EngineRun(strategy, model, train_config(batch_size, jit), batch, steps)
    times = compare(fns, warmup=1, repeats=repeats)
    ratio = times["split"] / times["plain"]
    return [
        entry(
            f"split-mask step overhead {arch} b{batch_size}",
            SECTION,
            ratio,
            "x step time",
            ratio=ratio,
            target="<= 1.05",
            met=bool(ratio <= 1.05),
            notes="split step time / plain step time (engine step, kels sr=0.5, jit "
            f"{'on' if jit else 'off'}); masks are non-trainable and stay out of the forward pass",
            plain_s=times["plain"] / steps,
            split_s=times["split"] / steps,
        )
    ]
