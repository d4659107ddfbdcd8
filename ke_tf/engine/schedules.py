"""Learning-rate schedules evaluated on the optimizer's update counter (so resume restores them).

All take per-epoch hyperparameters converted to steps by `make_schedule`.
"""

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="ke_tf")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup lr*(step+1)/warmup_steps, then `kind`:
    constant; cosine to `final_lr` (KE); step decay x`factor` at `boundaries` (EKG, CIFAR);
    logspace: geometric decay lr -> final_lr (knowledge-consistency Trans-Nets)."""

    def __init__(self, lr, total_steps, kind="cosine", warmup_steps=0, final_lr=0.0, boundaries=(), factor=0.1):
        self.lr = float(lr)
        self.total_steps = int(total_steps)
        self.kind = kind
        self.warmup_steps = int(warmup_steps)
        self.final_lr = float(final_lr)
        self.boundaries = [int(b) for b in boundaries]
        self.factor = float(factor)

    def __call__(self, step):
        # Only the ops `kind` needs: the schedule runs in every training step's graph.
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.lr, tf.float32)
        if self.kind in ("cosine", "logspace"):
            decay_steps = float(max(1, self.total_steps - self.warmup_steps))
            t = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
            if self.kind == "cosine":
                value = self.final_lr + 0.5 * (self.lr - self.final_lr) * (1.0 + tf.cos(math.pi * t))
            else:
                value = lr * tf.pow(self.final_lr / self.lr, t)
        elif self.kind == "step" and self.boundaries:
            passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries])
            value = lr * tf.pow(self.factor, passed)
        else:
            value = lr
        if self.warmup_steps > 0:
            warm = lr * (step + 1.0) / self.warmup_steps
            value = tf.where(step < self.warmup_steps, warm, value)
        return value

    def get_config(self):
        return {
            "lr": self.lr,
            "total_steps": self.total_steps,
            "kind": self.kind,
            "warmup_steps": self.warmup_steps,
            "final_lr": self.final_lr,
            "boundaries": self.boundaries,
            "factor": self.factor,
        }


def make_schedule(train_cfg, steps_per_epoch):
    """The schedule a TrainConfig describes, in optimizer updates."""
    return WarmupSchedule(
        lr=train_cfg.lr,
        total_steps=train_cfg.epochs * steps_per_epoch,
        kind=train_cfg.schedule,
        warmup_steps=round(train_cfg.warmup_epochs * steps_per_epoch),
        final_lr=train_cfg.final_lr,
        boundaries=[round(e * steps_per_epoch) for e in train_cfg.decay_epochs],
        factor=train_cfg.decay_factor,
    )
