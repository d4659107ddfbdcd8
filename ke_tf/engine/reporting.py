"""What a stage reports: its set-up line, one line per epoch, and (chief only) TensorBoard
scalars and `run_dir/<stage>_history.json`, rewritten atomically after every epoch."""

import json
import os

import tensorflow as tf

from ke_tf.io.params import atomic_write_bytes


def setup_line(replicas, strategy, sync_bn, jit, steps_per_loop, precision):
    """`N replica(s) (Strategy, BN mode), XLA ..., steps per loop ..., precision ...`."""
    bn = ("synchronised BN" if sync_bn else "BN statistics averaged") if replicas > 1 else "one replica"
    xla = {"off": "off", "gradients": "loss+gradients", "step": "whole step"}[jit]
    return (
        f"{replicas} replica(s) ({type(strategy).__name__}, {bn}), XLA {xla}, "
        f"steps per loop {steps_per_loop or 'auto'}, precision {precision}"
    )


def epoch_line(name, m, epochs):
    """One epoch's metrics dict `m` as the log line `name epoch e/E | loss | top-1 | ...`."""
    parts = [
        f"{name} epoch {m['epoch'] + 1}/{epochs}",
        f"loss {m['train_loss']:.4f}",
        f"top-1 {100 * m['train_top1']:.2f}%",
    ]
    if "test_top1" in m:
        parts.append(f"test top-1 {100 * m['test_top1']:.2f}%")
    parts += [f"lr {m['lr']:.3g}", f"{m['images_per_sec']:.0f} img/s", f"{m['seconds']:.1f}s"]
    if m["skipped_steps"] or m["overflow_steps"]:
        parts.append(f"skipped {m['skipped_steps']} / fp16 overflows {m['overflow_steps']}")
    return " | ".join(parts)


def history_path(run_dir, name):
    return os.path.join(run_dir, f"{name}_history.json")


def read_history(run_dir, name, before_epoch):
    """The stage's saved epoch metrics before `before_epoch` (a resumed stage continues them)."""
    path = history_path(run_dir, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [h for h in json.load(f) if h["epoch"] < before_epoch]


class HistoryWriter:
    """TensorBoard scalars under `run_dir/tensorboard/<name>` and the history JSON, on the chief;
    other workers write nothing."""

    def __init__(self, run_dir, name, chief):
        self.run_dir, self.name = run_dir, name
        self.writer = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard", name)) if chief else None

    def write(self, history):
        """Record the last epoch of `history` (its scalars) and the whole history (JSON)."""
        if self.writer is None:
            return
        metrics = history[-1]
        with self.writer.as_default():
            for key, value in metrics.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    tf.summary.scalar(f"{self.name}/{key}", value, step=metrics["epoch"] + 1)
        self.writer.flush()
        data = json.dumps(history, indent=1, default=float).encode()
        atomic_write_bytes(history_path(self.run_dir, self.name), data)
