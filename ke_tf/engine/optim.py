"""Optimizers and precision policies from a TrainConfig."""

import keras

from ke_tf.engine.schedules import make_schedule


def set_precision(mode):
    """Global Keras dtype policy; call before building models (fp16: the Trainer scales the loss)."""
    keras.mixed_precision.set_global_policy(
        {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[mode]
    )


def make_optimizer(train_cfg, steps_per_epoch):
    """SGD (momentum, Nesterov) or Adam on the config's schedule: the update rule only. The
    Trainer applies weight decay (coupled L2 or decoupled) and fp16 loss scaling itself, on the
    all-reduced gradients."""
    schedule = make_schedule(train_cfg, steps_per_epoch)
    if train_cfg.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov)
    return keras.optimizers.Adam(schedule)
