"""BatchNormalization on TF's fused kernel (ke_tf's default, `SyncBatchNormalization(fused=True)`)
against Keras 3's unfused path: the engine's training step of the same network, XLA off (under XLA
the layer takes the unfused path)."""

import keras

from benchmarks.common import EngineRun, compare_steady, entry, random_batch, train_config

SECTION = "batchnorm"
FULL = ("resnet56", 10, 32, 128, 4)
QUICK = ("resnet20", 10, 16, 16, 2)


def _set_fused(model, fused):
    from ke_tf.layers.batchnorm import SyncBatchNormalization

    for layer in model._flatten_layers():
        if isinstance(layer, SyncBatchNormalization):
            layer.fused = fused


def run(quick=False, repeats=5, **_):
    import statistics

    from ke_tf.engine import make_strategy
    from ke_tf.models import build_model

    arch, classes, side, batch_size, steps = QUICK if quick else FULL
    batch = random_batch(batch_size, (side, side, 3), classes)
    strategy = make_strategy("one_device")
    fns = {}
    for name, fused in (("fused", True), ("unfused", False)):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_model(arch, classes, (side, side, 3), shortcut="B")
        _set_fused(model, fused)
        fns[name] = EngineRun(strategy, model, train_config(batch_size, jit=False), batch, steps, epochs_per_call=3)
    samples = compare_steady(fns, repeats=repeats)
    per_repeat = [u / f for f, u in zip(samples["fused"], samples["unfused"])]
    ratio = statistics.median(samples["unfused"]) / statistics.median(samples["fused"])
    images = batch_size * steps
    return [
        entry(
            f"train {arch}-B {side}x{side} b{batch_size}, BN on the fused kernel vs unfused, XLA off",
            SECTION,
            images / statistics.median(samples["fused"]),
            "img/s",
            ratio=ratio,
            target=">= 1.0",
            met=bool(ratio >= 1.0),
            notes=f"unfused / fused epoch time, per repeat {min(per_repeat):.2f}-{max(per_repeat):.2f}",
            fused_s=samples["fused"],
            unfused_s=samples["unfused"],
        )
    ]
