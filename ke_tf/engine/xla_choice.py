"""`train.jit_compile: auto` on CPUs: XLA or not, decided by timing the stage's own loop of steps
both ways, because XLA speeds a train step up on some CPUs and slows it down several times on
others (README: Benchmarks). Every variable the trial steps touch is copied before and restored
after them, so the run trains exactly as with the chosen setting forced. The
result is remembered per model signature and machine in a small JSON file
(`$KE_TF_CACHE_DIR`, else `$XDG_CACHE_HOME/ke_tf`, else `~/.cache/ke_tf`), so later stages and
runs of the same model do not measure again."""

import datetime
import hashlib
import json
import os
import platform
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from ke_tf.engine.iterators import release_in_background
from ke_tf.io.params import atomic_write_bytes

CACHE_ENV = "KE_TF_CACHE_DIR"
CACHE_FILE = "xla_auto.json"
CACHE_VERSION = 1
# A stage shorter than this without XLA is not measured (XLA stays off): an XLA compile of a
# ResNet train step takes tens of seconds on 2 cores, more than such a stage could win back.
MEASURE_MIN_SECONDS = 120.0
# Training FLOP/s assumed before any trial step: a stage whose MACs would take less than
# MEASURE_MIN_SECONDS even at this pessimistic rate skips the trial (and its input pipeline) too.
ASSUMED_TRAIN_FLOPS = 5e9
ROUND_SECONDS = 1.0  # work per timed trial round
MAX_ROUND_STEPS = 50
TIMINGS = ("off_seconds_per_step", "xla_seconds_per_step", "compile_seconds")
VECTOR_FLAGS = ("amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "fma", "avx")

_warned = set()


def cache_path():
    """The decision cache file."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "ke_tf")
    return os.path.join(folder, CACHE_FILE)


def machine():
    """{"cpu": model name, "flags": the vector extensions present, "cpus": usable CPUs}."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "flags": [f for f in VECTOR_FLAGS if f in flags], "cpus": cpus}


def describe(mach):
    """`AMD EPYC avx2`: the CPU model and its widest vector extension."""
    widest = next((f for f in ("avx512f", "avx2", "avx") if f in mach["flags"]), "")
    return f"{mach['cpu']} {widest}".strip()


def signature(model, variables, loss_fn, train_cfg, replicas, sync_bn, jit, mach):
    """Cache key: what the step's cost depends on (the model's and trained variables' shapes and
    dtypes, the loss, batch, precision, optimizer, replicas, XLA scope, versions) and the machine."""
    parts = {
        "model": [(tuple(v.shape), str(v.dtype)) for v in model.variables],
        "trained": [(tuple(v.shape), str(v.dtype)) for v in variables],
        "loss": f"{getattr(loss_fn, '__module__', '')}.{getattr(loss_fn, '__qualname__', type(loss_fn).__qualname__)}",
        "train": [
            train_cfg.batch_size,
            train_cfg.accum_steps,
            train_cfg.mixed_precision,
            train_cfg.optimizer,
            train_cfg.weight_decay_mode,
            train_cfg.on_nan,
        ],
        "policy": keras.config.dtype_policy().name,
        "replicas": replicas,
        "sync_bn": sync_bn,
        "jit": jit,
        "versions": [tf.__version__, keras.__version__],
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", ""),
        "machine": mach,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load(path):
    """The cached decisions {key: entry}; a missing file is empty, a corrupt one is ignored with
    one warning line (it is rewritten by the next measurement)."""
    try:
        with open(path, "rb") as f:
            content = json.loads(f.read())
        decisions = content["decisions"] if content.get("version") == CACHE_VERSION else None
        if not isinstance(decisions, dict) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), (int, float)) for k in TIMINGS) for e in decisions.values()
        ):
            raise ValueError("not a version-1 table of timings")
        return decisions
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        if path not in _warned:
            _warned.add(path)
            print(f"warning: ignoring the XLA auto cache {path} ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return {}


def store(path, key, entry):
    """Add `entry` under `key` to the cache file (rewritten atomically)."""
    decisions = load(path)
    decisions[key] = entry
    try:
        atomic_write_bytes(path, json.dumps({"version": CACHE_VERSION, "decisions": decisions}, indent=1).encode())
    except OSError as e:
        print(f"warning: cannot write the XLA auto cache {path} ({e})", file=sys.stderr, flush=True)


class _Trial:
    """Timed calls of loops over the iterator in `holder` (a list, released in the background
    afterwards: see `release_in_background`); every variable a timed loop touches is saved before
    its first call and restored by `restore`."""

    def __init__(self, holder):
        self.holder = holder
        self.saved = {}

    def seconds_per_step(self, loop, steps):
        for v in loop.variables(self.holder[0]):
            if id(v) not in self.saved:
                self.saved[id(v)] = (v, np.array(v.numpy()))
        start = time.perf_counter()
        loop.call(self.holder[0], steps)
        return (time.perf_counter() - start) / steps

    def restore(self):
        for v, value in self.saved.values():
            v.assign(value)


def _agree(flag, chief, cluster_mean):
    """The chief's `flag` on every worker (`cluster_mean`: None for a single process)."""
    if cluster_mean is None:
        return flag
    return cluster_mean(1.0 if chief and flag else 0.0) > 0


def _cached(entry, remaining_steps):
    """Whether a cached measurement says XLA pays for its compile over `remaining_steps`, and why."""
    t_off, t_xla, compile_s = (entry[k] for k in TIMINGS)
    if t_xla >= t_off:
        return False, f"cached: XLA {t_xla / t_off:.2f}x slower on {entry.get('cpu', 'this CPU')}"
    if (t_off - t_xla) * remaining_steps <= compile_s:
        return False, (
            f"cached: XLA {t_off / t_xla:.2f}x faster on {entry.get('cpu', 'this CPU')}, but {remaining_steps} steps "
            f"would not repay its {compile_s:.0f} s compile"
        )
    return True, f"cached: {t_off / t_xla:.2f}x faster on {entry.get('cpu', 'this CPU')}"


def estimated_seconds(model, batch_size, steps):
    """Seconds `steps` train steps take at ASSUMED_TRAIN_FLOPS (2 FLOPs per MAC forward, twice that
    backward); None when the model's MACs cannot be counted (unknown spatial sizes)."""
    from ke_tf.surgery.flops import count_macs

    try:
        return 6.0 * count_macs(model) * batch_size * steps / ASSUMED_TRAIN_FLOPS
    except (TypeError, ValueError):
        return None


def choose(jit, key_parts, off_loop, make_loop, trial_input, remaining_steps, chief, cluster_mean):
    """(use XLA, the StepLoop compiled with `jit` if one was built, the reason for the log line)
    for a CPU stage of `remaining_steps`. `off_loop` is the stage's loop without XLA, `make_loop()`
    builds the one with `jit`, `trial_input()` a distributed iterator over the stage's first batch
    repeated. Every worker runs the same trial steps and decides on the cluster's mean timings, or
    on the chief's cache."""
    mach = machine()
    key = signature(*key_parts, jit, mach) if chief else None
    path = cache_path()
    entry = load(path).get(key) if chief else None
    if _agree(entry is not None, chief, cluster_mean):
        use, why = _cached(entry, remaining_steps) if chief else (False, "")
        return _agree(use, chief, cluster_mean), None, why
    estimate = estimated_seconds(key_parts[0], key_parts[3].batch_size, remaining_steps)
    if estimate is not None and estimate < MEASURE_MIN_SECONDS:
        return False, None, f"stage of ~{estimate:.0f} s by its MACs: too short to measure it"
    holder = [trial_input()]
    trial = _Trial(holder)
    mean = cluster_mean or float
    try:
        trial.seconds_per_step(off_loop, 1)  # traced here; the stage reuses the trace
        t_off = mean(trial.seconds_per_step(off_loop, 2))
        if t_off * remaining_steps < MEASURE_MIN_SECONDS:
            return False, None, f"stage of ~{t_off * remaining_steps:.0f} s without XLA: too short to measure it"
        steps = int(np.clip(round(ROUND_SECONDS / t_off), 1, MAX_ROUND_STEPS))
        xla_loop = make_loop()
        compile_s = trial.seconds_per_step(xla_loop, 1)
        t_xla = trial.seconds_per_step(xla_loop, steps)
        t_off = mean(min(t_off, trial.seconds_per_step(off_loop, steps)))
        t_xla = mean(min(t_xla, trial.seconds_per_step(xla_loop, steps)))
        compile_s = mean(max(compile_s - t_xla, 0.0))
    finally:
        trial.restore()
        release_in_background(holder)
    use = bool(t_xla < t_off)  # from cluster means: every worker decides alike
    cpu = describe(mach)
    if chief:
        store(
            path,
            key,
            {
                "off_seconds_per_step": t_off,
                "xla_seconds_per_step": t_xla,
                "compile_seconds": compile_s,
                "jit": jit,
                "cpu": cpu,
                "measured": datetime.date.today().isoformat(),
            },
        )
    why = f"measured {t_off / t_xla:.2f}x faster" if t_xla < t_off else f"measured XLA {t_xla / t_off:.2f}x slower"
    return use, xla_loop, f"{why} on {cpu}"
