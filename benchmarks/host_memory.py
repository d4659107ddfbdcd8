"""Benchmark: training with glibc's default malloc pad against the 64 MiB pad `import ke_tf` sets
(`ke_tf/engine/host_memory.py`). The setting acts once per process, so each contender is the
digits quickstart CLI in its own process; the number is the steady-state epoch time (epochs after
the first) from the run's history, interleaved over repeats."""

import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks.common import entry

SECTION = "host_memory"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = {"epochs": 4, "image_size": 32}
QUICK = {"epochs": 2, "image_size": 8}
CONTENDERS = {"glibc default": "0", "ke_tf pad": "64"}


def _steady_epoch_seconds(pad_mb, epochs, image_size, run_dir):
    command = [
        sys.executable,
        os.path.join(ROOT, "train_cifar.py"),
        "--config",
        "digits_resnet20_supervised",
        "--set",
        f"run_dir={run_dir}",
        "--set",
        f"train.epochs={epochs}",
        "--set",
        f"data.image_size={image_size}",
        "--set",
        "train.progress=false",
        "--set",
        "train.checkpoint_every_epochs=0",
    ]
    env = {**os.environ, "KE_TF_MALLOC_TOP_PAD_MB": pad_mb, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MALLOC_TOP_PAD_", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    with open(os.path.join(run_dir, "train_history.json")) as f:
        history = json.load(f)
    return statistics.mean(e["seconds"] for e in history[1:])


def run(quick=False, repeats=5, **_):
    setting = QUICK if quick else FULL
    samples = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name, pad_mb in CONTENDERS.items():
                run_dir = os.path.join(tmp, f"{pad_mb}_{r}")
                samples[name].append(_steady_epoch_seconds(pad_mb, run_dir=run_dir, **setting))
    default, padded = (statistics.median(samples[name]) for name in CONTENDERS)
    speedup = default / padded
    return [
        entry(
            f"64 MiB malloc pad, digits quickstart ResNet-20 {setting['image_size']}px b64",
            SECTION,
            speedup,
            "x speed-up",
            ratio=speedup,
            target=">= 1.0",
            met=bool(speedup >= 1.0),
            notes="steady epoch seconds with glibc's default M_TOP_PAD / with KE_TF_MALLOC_TOP_PAD_MB=64, "
            "each contender a CLI process; median over repeats",
            default_s=default,
            padded_s=padded,
            samples=samples,
        )
    ]
