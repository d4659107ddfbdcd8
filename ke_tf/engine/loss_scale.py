"""Dynamic loss scaling for fp16, owned by the engine rather than Keras's LossScaleOptimizer.

Keras 3's LossScaleOptimizer decides "finite?" on replica 0's local gradients before the
all-reduce, so an overflow on another replica writes inf into every replica's weights (measured
with 2 logical CPU replicas, TF 2.21 / Keras 3.15).
Here the Trainer decides on the all-reduced gradients (identical on every replica) and updates
the scale in cross-replica context. Same policy as Keras: start at 2^15, halve on overflow,
double after 2000 finite steps in a row.
"""

import tensorflow as tf


class LossScale(tf.Module):
    """Scale and growth counter as mirrored variables (checkpointed with the Trainer)."""

    def __init__(self, initial_scale=2.0**15, growth_steps=2000):
        super().__init__(name="loss_scale")
        self.growth_steps = int(growth_steps)
        once = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.scale = tf.Variable(
            float(initial_scale), trainable=False, dtype=tf.float32, aggregation=once, name="scale"
        )
        self.finite_steps = tf.Variable(0, trainable=False, dtype=tf.int64, aggregation=once, name="finite_steps")

    def update(self, finite, active=True):
        """After a step (cross-replica context): halve on overflow, double after a run of
        `growth_steps` finite steps; `active` False (a step the Trainer stopped before) changes
        nothing."""
        grown = self.finite_steps + 1 >= self.growth_steps
        new_scale = tf.where(finite, tf.where(grown, self.scale * 2.0, self.scale), self.scale / 2.0)
        new_count = tf.where(finite & ~grown, self.finite_steps + 1, tf.zeros_like(self.finite_steps))
        self.scale.assign(tf.where(active, tf.maximum(new_scale, 1.0), self.scale))
        self.finite_steps.assign(tf.where(active, new_count, self.finite_steps))
