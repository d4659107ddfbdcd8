"""Benchmark 6: samples/s with 2 replicas vs 1 under MirroredStrategy. With >= 2 GPUs this is
real scaling; otherwise the CPU is split into 2 logical devices (in a subprocess: the split must
happen before TensorFlow initialises), which share the same cores and so only measure the
strategy's overhead (ideal ratio 1.0, not 2.0)."""

import argparse
import json
import os
import subprocess
import sys

from benchmarks.common import entry

SECTION = "scaling"
FULL = ("resnet20", 10, 32, 128, 2)
QUICK = ("resnet20", 10, 16, 16, 2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(arch, classes, side, batch_size, steps, repeats):
    """Time the engine on 1 and 2 replicas in this fresh process; prints a RESULT line."""
    import tensorflow as tf

    gpu = len(tf.config.list_physical_devices("GPU")) >= 2
    import keras

    from benchmarks.common import EngineRun, compare, random_batch, train_config
    from ke_tf.engine import make_strategy

    if gpu:
        two = tf.distribute.MirroredStrategy(["/gpu:0", "/gpu:1"])
        one = tf.distribute.OneDeviceStrategy("/gpu:0")
    else:
        two = make_strategy("auto", cpu_replicas=2)
        one = tf.distribute.OneDeviceStrategy("/cpu:0")
    batch = random_batch(batch_size, (side, side, 3), classes)
    fns = {}
    for name, strategy in (("one", one), ("two", two)):
        from ke_tf.models import build_model

        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_model(arch, classes, (side, side, 3))
        fns[name] = EngineRun(strategy, model, train_config(batch_size, gpu), batch, steps)
    times = compare(fns, warmup=1, repeats=repeats)
    print("RESULT " + json.dumps({"gpu": gpu, **{k: steps * batch_size / t for k, t in times.items()}}))


def run(quick=False, repeats=5, **_):
    arch, classes, side, batch_size, steps = QUICK if quick else FULL
    env = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.scaling",
        "--child",
        arch,
        str(classes),
        str(side),
        str(batch_size),
        str(steps),
        str(1 if quick else repeats),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"scaling child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    res = json.loads(lines[-1][len("RESULT ") :])
    ratio = res["two"] / res["one"]
    target, ok = (">= 1.8 (2 GPUs)", ratio >= 1.8) if res["gpu"] else (">= 0.85 (overhead check)", ratio >= 0.85)
    where = (
        "2 GPUs"
        if res["gpu"]
        else "2 logical CPU devices on the same cores: checks the strategy's overhead only, not scaling"
    )
    return [
        entry(
            f"MirroredStrategy 2 vs 1 replicas {arch} b{batch_size}",
            SECTION,
            res["two"],
            "samples/s",
            ratio=ratio,
            target=target,
            met=bool(ok),
            notes=f"{where}; 1 replica {res['one']:.1f} samples/s, 2 replicas {res['two']:.1f}",
            one_replica=res["one"],
            two_replicas=res["two"],
        )
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--child", nargs=6, metavar=("ARCH", "CLASSES", "SIDE", "BATCH", "STEPS", "REPEATS"), required=True
    )
    a = parser.parse_args().child
    child(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), int(a[5]))
