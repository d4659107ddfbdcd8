"""Optimizers and precision policies from a TrainConfig."""
import keras

from ke_tf.engine.schedules import make_schedule


def set_precision(mode):
    """Global Keras dtype policy; call before building models. fp16 adds loss scaling."""
    keras.mixed_precision.set_global_policy(
        {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[mode])


def make_optimizer(train_cfg, steps_per_epoch):
    """SGD (momentum, Nesterov) or Adam on the config's schedule. Decoupled weight decay uses
    Keras's `weight_decay` (v -= lr*wd*v); coupled L2 is added to gradients by the Trainer."""
    schedule = make_schedule(train_cfg, steps_per_epoch)
    decoupled = train_cfg.weight_decay if train_cfg.weight_decay_mode == "decoupled" else None
    if train_cfg.optimizer == "sgd":
        opt = keras.optimizers.SGD(schedule, momentum=train_cfg.momentum,
                                   nesterov=train_cfg.nesterov, weight_decay=decoupled)
    else:
        opt = keras.optimizers.Adam(schedule, weight_decay=decoupled)
    if train_cfg.mixed_precision == "fp16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt
