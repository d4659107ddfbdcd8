"""Benchmark 3: peak memory of one training step of batch B as k=4 accumulated micro-batches vs
one batch, each in a fresh subprocess (peak RSS on CPU; TF's peak allocator bytes on GPU), and
whether both give the same weights after the step.

BN runs in inference mode (moving statistics) in this benchmark: with batch statistics each
micro-batch normalises by its own mean/variance, so accumulation is, as in every framework,
only equal to the big batch for BN-free losses; with frozen BN the two steps are the same maths.
Untrained ResNets with frozen BN have huge activations, so "equal" is judged relative to the
step's update: ||w(k=4) - w(k=1)|| / ||w(k=1) - w0|| <= 1e-3 for every variable.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks.common import entry

SECTION = "accumulation"
FULL = ("resnet56", 10, 32, 256)
QUICK = ("resnet20", 10, 16, 32)
K = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mib():
    """This process's peak RSS. Linux's VmHWM belongs to the address space, so it starts fresh at
    exec; ru_maxrss would inherit the (large) peak of the benchmark process that spawned us."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB; macOS: bytes


def child(arch, classes, side, batch_size, accum, out):
    """One step of the engine in this (fresh) process; writes weights to `out`, prints peaks."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from benchmarks.common import EngineRun, random_batch, train_config, uses_gpu
    from ke_tf.engine import make_strategy
    from ke_tf.models import build_model

    strategy = make_strategy("one_device")
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(arch, classes, (side, side, 3))
    batch = random_batch(batch_size, (side, side, 3), classes)
    steps = EngineRun(
        strategy,
        model,
        train_config(batch_size, uses_gpu(), accum_steps=accum),
        batch,
        1,
        loss_fn=_frozen_bn_loss(model),
    )
    initial = [v.numpy() for v in model.trainable_variables]
    before = _rss_mib()
    gpu = uses_gpu()
    if gpu:
        tf.config.experimental.reset_memory_stats("GPU:0")
    steps()
    result = {"peak_rss_mib": _rss_mib(), "rss_before_step_mib": before}
    if gpu:
        result["gpu_peak_mib"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    np.savez(out, *[w for v, w0 in zip(model.trainable_variables, initial) for w in (w0, v.numpy())])
    print("RESULT " + json.dumps(result))


def _frozen_bn_loss(model):
    from ke_tf.losses import cross_entropy

    def loss_fn(batch, training):
        logits = model(batch[0], training=False)
        return {"loss": cross_entropy(logits, batch[1], 0.0), "logits": logits}

    return loss_fn


def update_relative_difference(one, accumulated):
    """max over variables of ||w_acc - w_one|| / ||w_one - w0|| (lists alternate w0, w1)."""
    worst = 0.0
    for w0, a, b in zip(one[0::2], one[1::2], accumulated[1::2]):
        update = np.linalg.norm(a - w0)
        if update > 0:
            worst = max(worst, float(np.linalg.norm(b - a) / update))
    return worst


def _spawn(arch, classes, side, batch_size, accum, out):
    env = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.accumulation",
        "--child",
        arch,
        str(classes),
        str(side),
        str(batch_size),
        str(accum),
        out,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"accumulation child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def run(quick=False, **_):
    arch, classes, side, batch_size = QUICK if quick else FULL
    tmp = tempfile.mkdtemp(prefix="ke_tf_accum_")
    res, weights = {}, {}
    for k in (1, K):
        path = os.path.join(tmp, f"k{k}.npz")
        res[k] = _spawn(arch, classes, side, batch_size, k, path)
        with np.load(path) as f:
            weights[k] = [f[f"arr_{i}"] for i in range(len(f.files))]
    max_diff = update_relative_difference(weights[1], weights[K])
    equal = max_diff <= 1e-3
    key = "gpu_peak_mib" if "gpu_peak_mib" in res[1] else "peak_rss_mib"
    # The step's own peak: process high-water mark minus what the process held before the step.
    step = {k: res[k][key] - (0 if key == "gpu_peak_mib" else res[k]["rss_before_step_mib"]) for k in res}
    # Tiny (--quick) models can peak before the step (tracing), leaving no step increase to compare.
    ratio = step[K] / step[1] if step[1] > 0 else None
    met = bool(ratio <= 0.75 and equal) if ratio is not None else None
    return [
        entry(
            f"grad accumulation k={K} peak memory {arch} B={batch_size}",
            SECTION,
            step[K],
            "MiB",
            ratio=ratio,
            target="step peak ratio <= 0.75 and weights allclose",
            met=met,
            notes=f"{'GPU allocator peak' if key == 'gpu_peak_mib' else 'peak RSS increase during the step'}"
            f" (fresh subprocess each) k={K}: {step[K]:.0f} MiB vs k=1: {step[1]:.0f} MiB; "
            f"process peaks {res[K][key]:.0f} vs {res[1][key]:.0f} MiB; weights allclose="
            f"{equal} (max ||w4-w1||/||update|| {max_diff:.1e}); BN frozen so micro-batches are exact",
            step_peak_k1_mib=step[1],
            step_peak_k4_mib=step[K],
            process_peak_k1_mib=res[1][key],
            process_peak_k4_mib=res[K][key],
            weights_allclose=equal,
            max_update_relative_diff=max_diff,
        )
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=6, metavar=("ARCH", "CLASSES", "SIDE", "BATCH", "K", "OUT"), required=True)
    a = parser.parse_args().child
    child(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5])
