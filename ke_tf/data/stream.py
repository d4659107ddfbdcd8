"""Training streams: the examples one input pipeline feeds its replicas, from a stage's resume
point to its last epoch, as per-replica batches.

Epoch e's order is a seeded permutation computed in the graph (so a whole stage is ONE dataset,
built once), and each pipeline keeps only the positions of that order its replicas consume before
anything is decoded or augmented. Global batch i is positions [i*B, (i+1)*B) of the epoch order
and replica r (of R) receives the contiguous slice [i*B + r*b, i*B + (r+1)*b), b = B/R, so the
union of the replicas' batches is exactly the batch one device would see: N replicas with
synchronised BN compute what one device computes, and resuming at step s skips exactly s batches.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class InputShard:
    """Which rows one input pipeline produces. MirroredStrategy hands a pipeline's consecutive
    batches to its local replicas in order, so pipeline p (of P) feeds global replicas
    p*L .. p*L+L-1 with L = replicas / P."""

    replicas: int = 1
    pipeline: int = 0
    num_pipelines: int = 1

    def __post_init__(self):
        if self.replicas % self.num_pipelines:
            raise ValueError(f"{self.replicas} replicas do not split over {self.num_pipelines} input pipelines")

    @classmethod
    def from_context(cls, context):
        """The shard of a `tf.distribute.InputContext` (one per worker)."""
        return cls(context.num_replicas_in_sync, context.input_pipeline_id, context.num_input_pipelines)

    @property
    def local_replicas(self):
        return self.replicas // self.num_pipelines

    def replica_batch(self, global_batch):
        if global_batch % self.replicas:
            raise ValueError(f"global batch {global_batch} is not divisible by {self.replicas} replicas")
        return global_batch // self.replicas

    def eval_batch(self, global_batch):
        """Per-replica evaluation batch (evaluation needs no equal split)."""
        return -(-global_batch // self.replicas)

    def positions(self, global_batch, steps, skip=0):
        """Positions in an epoch order this pipeline reads, in feeding order, for global steps
        skip .. steps-1 of batches of `global_batch`."""
        b = self.replica_batch(global_batch)
        grid = np.arange(steps * global_batch, dtype=np.int64).reshape(steps, self.replicas, b)
        local = grid[skip:, self.pipeline * self.local_replicas : (self.pipeline + 1) * self.local_replicas]
        return local.reshape(-1)

    def eval_rows(self, n, global_batch):
        """Dataset of (index, valid) evaluation rows of this pipeline: every P-th of the n rows,
        padded (valid False, index clamped to n-1) so that every replica gets whole batches in
        every step. An empty per-replica batch, which uneven inputs would otherwise produce,
        breaks some kernels (oneDNN convolutions return the wrong shape)."""
        chunk = self.replicas * self.eval_batch(global_batch)
        padded = -(-n // chunk) * chunk
        rows = tf.data.Dataset.range(padded).shard(self.num_pipelines, self.pipeline)
        return rows.map(lambda i: (tf.minimum(i, n - 1), i < n))


def epoch_key(seed, epoch):
    """Stateless RNG key of (seed, epoch): drives the epoch order and every augmentation."""
    return tf.random.experimental.stateless_fold_in(
        tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)]), tf.cast(epoch, tf.int64)
    )


def example_key(key, index):
    """Stateless RNG key of one example in one epoch."""
    return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))


def epoch_order(n, seed, epoch):
    """Seeded permutation of range(n) for `epoch` (int64; 64-bit sort keys, so no ties)."""
    keys = tf.random.stateless_uniform([n], seed=epoch_key(seed, epoch), minval=None, maxval=None, dtype=tf.int64)
    return tf.argsort(keys, stable=True)


def index_stream(n, batch_size, shard, seed, first_epoch, last_epoch, skip_steps=0):
    """Dataset of (epoch, example index) this pipeline feeds from step `skip_steps` of
    `first_epoch` to the end of epoch `last_epoch - 1`, for global batches of `batch_size` (the
    last partial global batch of each epoch is dropped)."""
    steps = n // batch_size
    if steps < 1:
        raise ValueError(f"{n} examples leave no full global batch of {batch_size}")
    if not 0 <= skip_steps < steps:
        raise ValueError(f"cannot resume at step {skip_steps} of an epoch of {steps} steps")

    def rows(epoch, positions):
        index = tf.gather(epoch_order(n, seed, epoch), positions)
        return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(index), tf.cast(epoch, tf.int64)), index))

    stream = rows(first_epoch, tf.constant(shard.positions(batch_size, steps, skip_steps)))
    if last_epoch > first_epoch + 1:
        full = tf.constant(shard.positions(batch_size, steps))
        stream = stream.concatenate(
            tf.data.Dataset.range(first_epoch + 1, last_epoch).flat_map(lambda epoch: rows(epoch, full))
        )
    return stream


class TensorData:
    """In-memory arrays (images, labels, ...) as a training source with the stream interface;
    no augmentation. For tests, benchmarks and small feature tables."""

    def __init__(self, *arrays):
        self.arrays = [np.asarray(a) for a in arrays]
        self.size = len(self.arrays[0])

    def stream(self, batch_size, seed, first_epoch, last_epoch, skip_steps=0, shard=None):
        shard = shard or InputShard()
        tensors = [tf.constant(a) for a in self.arrays]
        rows = index_stream(self.size, batch_size, shard, seed, first_epoch, last_epoch, skip_steps)
        return rows.batch(shard.replica_batch(batch_size), drop_remainder=True).map(
            lambda epoch, index: tuple(tf.gather(t, index) for t in tensors)
        )
