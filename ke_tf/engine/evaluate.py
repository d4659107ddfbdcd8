"""Evaluation under a strategy: loss, top-1, top-5 with BN moving statistics (inference mode)."""
import tensorflow as tf
from tqdm.auto import tqdm

from ke_tf.engine.trainer import distribute_options


class Evaluator:
    """Loss/top-1/top-5 of `predict(images) -> logits` over datasets of (images, labels, ...)
    batches, with the distributed step traced once and reused across epochs."""

    def __init__(self, strategy, predict):
        self.strategy = strategy
        self.predict = predict
        self._step = tf.function(self._distributed_step)

    def _replica(self, batch):
        images, labels = batch[0], tf.cast(batch[1], tf.int32)
        logits = tf.cast(self.predict(images), tf.float32)
        ce = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        k5 = min(5, int(logits.shape[-1]))
        return (tf.reduce_sum(ce),
                tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32)),
                tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, k5), tf.float32)),
                tf.cast(tf.shape(labels)[0], tf.float32))

    def _distributed_step(self, batch):
        return [self.strategy.reduce("SUM", v, axis=None) for v in self.strategy.run(self._replica, args=(batch,))]

    def __call__(self, dataset, desc="eval", progress=False):
        """{"loss", "top1", "top5", "count"} with the loss as mean cross-entropy."""
        totals = [0.0, 0.0, 0.0, 0.0]
        dist = self.strategy.experimental_distribute_dataset(distribute_options(dataset))
        for batch in tqdm(dist, desc=desc, disable=not progress, leave=False):
            totals = [t + float(v) for t, v in zip(totals, self._step(batch))]
        n = max(totals[3], 1.0)
        return {"loss": totals[0] / n, "top1": totals[1] / n, "top5": totals[2] / n, "count": int(totals[3])}


def evaluate(strategy, predict, dataset, desc="eval", progress=False):
    """One-off evaluation (see `Evaluator`)."""
    return Evaluator(strategy, predict)(dataset, desc, progress)
