"""What a stage reports: its set-up line, and hooks the epoch driver calls after every epoch
(chief only: TensorBoard scalars, `run_dir/<stage>_history.json`, one log line)."""

import json
import os

import tensorflow as tf

from ke_tf.io.params import atomic_write_bytes
from ke_tf.io.progress import log_line


def setup_line(replicas, strategy, sync_bn, jit, steps_per_loop, precision, xla_note=None):
    """`N replica(s) (Strategy, BN mode), XLA ..., steps per loop ..., precision ...`; `xla_note`:
    why `jit_compile: auto` chose as it did on a CPU (`XLA auto: whole step (measured ...)`)."""
    bn = ("synchronised BN" if sync_bn else "BN statistics averaged") if replicas > 1 else "one replica"
    xla = {"off": "off", "gradients": "loss+gradients", "step": "whole step"}[jit]
    xla = f"auto: {xla} ({xla_note})" if xla_note else xla
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


class Hook:
    """What the epoch driver calls, as Keras's callbacks: override either method. `history` is the
    stage's list of epoch metrics dicts (a resumed stage's earlier epochs included), `metrics`
    its last entry. Pass your own to `Trainer.fit(hooks=...)`; they run on every worker."""

    def on_epoch_end(self, epoch, metrics, history):
        pass

    def on_train_end(self, history):
        pass


class TensorBoardScalars(Hook):
    """The epoch's numeric metrics as scalars `<name>/<key>` under `run_dir/tensorboard/<name>`."""

    def __init__(self, run_dir, name):
        self.name = name
        self.writer = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard", name))

    def on_epoch_end(self, epoch, metrics, history):
        with self.writer.as_default():
            for key, value in metrics.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    tf.summary.scalar(f"{self.name}/{key}", value, step=epoch + 1)
        self.writer.flush()

    def on_train_end(self, history):
        self.writer.close()


class HistoryFile(Hook):
    """The whole history as `run_dir/<name>_history.json`, rewritten atomically after every epoch
    (a resumed stage reads it back with `read_history`)."""

    def __init__(self, run_dir, name):
        self.path = history_path(run_dir, name)

    def on_epoch_end(self, epoch, metrics, history):
        atomic_write_bytes(self.path, json.dumps(history, indent=1, default=float).encode())


class EpochLine(Hook):
    """One log line per epoch (`epoch_line`)."""

    def __init__(self, name, epochs):
        self.name, self.epochs = name, epochs

    def on_epoch_end(self, epoch, metrics, history):
        log_line(epoch_line(self.name, metrics, self.epochs))


def stage_hooks(run_dir, name, epochs, chief, progress):
    """The reporting of a stage of `epochs` epochs: on the chief, TensorBoard, the history file and
    (with `progress`) the epoch line; other workers report nothing."""
    if not chief:
        return []
    return [TensorBoardScalars(run_dir, name), HistoryFile(run_dir, name)] + (
        [EpochLine(name, epochs)] if progress else []
    )
