"""Evaluation under a strategy: loss, top-1, top-5 with BN moving statistics (inference mode)."""

import tensorflow as tf

from ke_tf.data.stream import InputShard
from ke_tf.engine.iterators import release_in_background
from ke_tf.engine.strategy import instance_function
from ke_tf.losses import at_least_float32


def distribute_eval_input(strategy, source):
    """A distributed dataset of evaluation batches. `source` is either `shard -> dataset of
    per-replica batches` (each input pipeline reads only its share, before decoding; e.g.
    `lambda shard: data.test(256, shard)`) or a dataset of global batches (every worker reads it
    all and keeps its share)."""
    if isinstance(source, tf.data.Dataset):
        options = tf.data.Options()
        # Shard by data, not files: in-memory/tfds pipelines have fewer files than workers.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return strategy.experimental_distribute_dataset(source.with_options(options))
    return strategy.distribute_datasets_from_function(lambda context: source(InputShard.from_context(context)))


class Evaluator:
    """Loss/top-1/top-5 of `predict(images) -> logits` over batches of (images, labels, ...).
    A whole pass is one tf.function call (traced once per evaluator, whatever the last batch's
    size) with one host read at the end."""

    def __init__(self, strategy, predict):
        self.strategy = strategy
        self.predict = predict
        self._run = instance_function(self._evaluate)

    def _replica(self, batch):
        """Sums over the batch's real rows (label >= 0; sharded sources pad with label -1), in
        float64: a float32 sum would depend on how the test set is split into batches and replicas."""
        images, labels = batch[0], tf.cast(batch[1], tf.int32)
        valid = tf.cast(labels >= 0, tf.float64)
        labels = tf.maximum(labels, 0)
        logits = at_least_float32(self.predict(images))
        ce = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        ranked = tf.cast(logits, tf.float32)  # in_top_k takes float32 only
        k5 = min(5, int(logits.shape[-1]))

        def total(values):
            return tf.reduce_sum(tf.cast(values, tf.float64) * valid)

        return tf.stack(
            [
                total(ce),
                total(tf.math.in_top_k(labels, ranked, 1)),
                total(tf.math.in_top_k(labels, ranked, k5)),
                tf.reduce_sum(valid),
            ]
        )

    def _evaluate(self, batches):
        totals = tf.zeros([4], tf.float64)
        for batch in batches:
            sums = self.strategy.run(self._replica, args=(batch,))
            totals += self.strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)
        return totals

    def __call__(self, source):
        """{"loss", "top1", "top5", "count"} with the loss as mean cross-entropy; `source` as in
        `distribute_eval_input`."""
        batches = [iter(distribute_eval_input(self.strategy, source))]
        loss, top1, top5, count = self._run(batches[0]).numpy().tolist()
        release_in_background(batches)
        n = max(count, 1.0)
        return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "count": int(count)}


def evaluate(strategy, predict, source):
    """One-off evaluation (see `Evaluator`)."""
    return Evaluator(strategy, predict)(source)
