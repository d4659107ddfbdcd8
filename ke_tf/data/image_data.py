"""`ImageData`: a train/test `Source` pair plus the deterministic tf.data
pipelines the trainers consume.

Determinism: the epoch order is a stateless permutation keyed by (seed, epoch)
and each example's augmentation uses stateless ops keyed by (seed, epoch,
example index) (`ke_tf.data.stream`). Parallel maps run with
deterministic=True, so `train(..., epoch=e, seed=s)` and `stream(...)` are
bit-identical across calls and processes (needed for exact checkpoint resume).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from ke_tf.data import stream
from ke_tf.data.balanced import per_class_indices
from ke_tf.data.info import DatasetInfo
from ke_tf.data.source import Source

AUTOTUNE = tf.data.AUTOTUNE


class ImageData:
    """A train/test source plus the deterministic pipelines the trainers consume."""

    def __init__(self, info: DatasetInfo, train_source: Source, test_source: Source, transform):
        self.info = info
        self._train = train_source
        self._test = test_source
        self._transform = transform

    def __repr__(self):
        return f"ImageData({self.info})"

    @property
    def train_labels(self) -> np.ndarray:
        """Training labels (int32) in the fixed source order."""
        return self._train.labels

    @property
    def test_labels(self) -> np.ndarray:
        return self._test.labels

    # ------------------------------------------------------------------ pipelines
    def train(
        self, batch_size: int, epoch: int, seed: int, augment: bool = True, drop_remainder: bool = True
    ) -> tf.data.Dataset:
        """Batched (float32 NHWC normalised image, int32 label) for ONE epoch, in the epoch
        order `stream` uses; order and augmentation depend only on (seed, epoch)."""
        _check_batch(batch_size)
        n = len(self._train)
        index = tf.data.Dataset.from_tensor_slices(stream.epoch_order(n, seed, epoch))
        rows = index.map(lambda i: (tf.constant(epoch, tf.int64), i))
        return (
            self._examples(rows, seed, augment)
            .map(lambda x, y, i: (x, y))
            .batch(batch_size, drop_remainder=drop_remainder)
            .prefetch(AUTOTUNE)
        )

    def stream(
        self,
        batch_size: int,
        seed: int,
        first_epoch: int,
        last_epoch: int,
        skip_steps: int = 0,
        shard: stream.InputShard | None = None,
        with_index: bool = False,
    ) -> tf.data.Dataset:
        """A training stage's input for one pipeline: per-replica batches of (image, label[,
        example index]) from step `skip_steps` of `first_epoch` to the end of `last_epoch - 1`
        (see `ke_tf.data.stream`); only this pipeline's images are decoded and augmented."""
        shard = shard or stream.InputShard()
        rows = stream.index_stream(len(self._train), batch_size, shard, seed, first_epoch, last_epoch, skip_steps)
        examples = self._examples(rows, seed, augment=True)
        if not with_index:
            examples = examples.map(lambda x, y, i: (x, y))
        return examples.batch(shard.replica_batch(batch_size), drop_remainder=True).prefetch(AUTOTUNE)

    def _examples(self, rows, seed, augment):
        """(image, label, index) of (epoch, index) rows; augmentation keyed by (seed, epoch, index)."""
        items = tf.constant(self._train.items)
        labels = tf.constant(self._train.labels.astype(np.int32))
        transform = self._transform

        def example(epoch, index):
            item = tf.gather(items, index)
            if augment:
                image = transform.train(item, stream.example_key(stream.epoch_key(seed, epoch), index))
            else:
                image = transform.eval(item)
            return image, tf.gather(labels, index), index

        return rows.map(example, num_parallel_calls=AUTOTUNE, deterministic=True)

    def test(self, batch_size: int, shard: stream.InputShard | None = None) -> tf.data.Dataset:
        """Test split in fixed order, no augmentation, last partial batch kept. With `shard`
        (evaluation under a strategy): this pipeline's rows only, in whole per-replica batches
        padded with label -1 rows (which `Evaluator` ignores)."""
        return self._eval_pipeline(self._test, batch_size, shard)

    def train_eval(self, batch_size: int) -> tf.data.Dataset:
        """Training split in fixed order, no augmentation, partial batch kept
        (for memory banks / feature caching)."""
        return self._eval_pipeline(self._train, batch_size)

    def _eval_pipeline(self, src: Source, batch_size: int, shard=None) -> tf.data.Dataset:
        _check_batch(batch_size)
        transform = self._transform
        items = tf.constant(src.items)
        labels = tf.constant(src.labels.astype(np.int32))
        if shard is None:
            rows = tf.data.Dataset.range(len(src)).map(lambda i: (i, True))
        else:  # padding rows carry label -1 (evaluation skips them)
            rows = shard.eval_rows(len(src), batch_size)
        ds = rows.map(
            lambda i, valid: (transform.eval(tf.gather(items, i)), tf.where(valid, tf.gather(labels, i), -1)),
            num_parallel_calls=AUTOTUNE,
            deterministic=True,
        )
        return ds.batch(shard.eval_batch(batch_size) if shard is not None else batch_size).prefetch(AUTOTUNE)

    # ------------------------------------------------------------------ splitting
    def split_holdout(self, per_class: int, seed: int) -> tuple[ImageData, ImageData]:
        """Carve `per_class` training images per class out of the train split.

        Returns (train_without_holdout, holdout) where `holdout.test()` (and
        `holdout.train_eval()`) iterate the held-out images. The remaining
        train set keeps this object's test split."""
        held = per_class_indices(
            self._train.labels, self.info.num_classes, per_class, seed, f"split_holdout(per_class={per_class})"
        )
        keep = np.setdiff1d(np.arange(len(self._train)), held)
        remain_src, hold_src = self._train.take(keep), self._train.take(held)
        remain = ImageData(
            dataclasses.replace(self.info, train_size=len(keep)), remain_src, self._test, self._transform
        )
        holdout = ImageData(
            dataclasses.replace(self.info, train_size=len(held), test_size=len(held)),
            hold_src,
            hold_src,
            self._transform,
        )
        return remain, holdout


def _check_batch(batch_size: int) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
