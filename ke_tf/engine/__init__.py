"""Training engine: strategies, optimizers/schedules, the Trainer (epoch driver), its reporting hooks and evaluation."""

from ke_tf.engine.evaluate import Evaluator, evaluate
from ke_tf.engine.optim import make_optimizer, set_precision
from ke_tf.engine.reporting import Hook
from ke_tf.engine.schedules import WarmupSchedule, make_schedule
from ke_tf.engine.strategy import is_chief, jit_scope, make_strategy
from ke_tf.engine.trainer import NonFiniteLossError, StopRequested, Trainer

__all__ = [
    "Trainer",
    "Hook",
    "Evaluator",
    "evaluate",
    "make_optimizer",
    "make_schedule",
    "make_strategy",
    "is_chief",
    "jit_scope",
    "set_precision",
    "WarmupSchedule",
    "NonFiniteLossError",
    "StopRequested",
]
