"""Training engine: strategies, optimizers/schedules, the Trainer and evaluation."""
from ke_tf.engine.evaluate import Evaluator, evaluate
from ke_tf.engine.optim import make_optimizer, set_precision
from ke_tf.engine.schedules import WarmupSchedule, make_schedule
from ke_tf.engine.strategy import is_chief, make_strategy, resolve_jit
from ke_tf.engine.trainer import NonFiniteLossError, StopRequested, Trainer, distribute_options

__all__ = ["Trainer", "Evaluator", "evaluate", "make_optimizer", "make_schedule", "make_strategy", "is_chief",
           "resolve_jit", "set_precision", "WarmupSchedule", "NonFiniteLossError", "StopRequested",
           "distribute_options"]
