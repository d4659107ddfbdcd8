"""`ImageData`: a train/test `Source` pair plus the deterministic tf.data
pipelines the trainers consume.

Determinism: the epoch order is a numpy permutation seeded by
hash(seed, epoch), and each example's augmentation uses stateless ops seeded
by (hash(seed, epoch), original example index). Parallel maps run with
deterministic=True, so `train(..., epoch=e, seed=s)` is bit-identical across
calls and processes (needed for exact checkpoint resume).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from ke_tf.data import augment
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
    def train(self, batch_size: int, epoch: int, seed: int, augment: bool = True,
              drop_remainder: bool = True) -> tf.data.Dataset:
        """Batched (float32 NHWC normalised image, int32 label) for ONE epoch.

        Order and augmentation depend only on (seed, epoch)."""
        _check_batch(batch_size)
        src = self._train
        mixed = _epoch_seed(seed, epoch)
        perm = np.random.RandomState(mixed).permutation(len(src))
        ds = tf.data.Dataset.from_tensor_slices(
            (src.items[perm], src.labels[perm].astype(np.int32), perm.astype(np.int64)))
        transform = self._transform

        if augment:
            base = tf.constant(mixed, tf.int64)

            def fn(item, label, index):
                return transform.train(item, tf.stack([base, index])), label
        else:
            def fn(item, label, index):
                return transform.eval(item), label

        ds = ds.map(fn, num_parallel_calls=AUTOTUNE, deterministic=True)
        return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(AUTOTUNE)

    def test(self, batch_size: int) -> tf.data.Dataset:
        """Test split in fixed order, no augmentation, last partial batch kept."""
        return self._eval_pipeline(self._test, batch_size)

    def train_eval(self, batch_size: int) -> tf.data.Dataset:
        """Training split in fixed order, no augmentation, partial batch kept
        (for memory banks / feature caching)."""
        return self._eval_pipeline(self._train, batch_size)

    def _eval_pipeline(self, src: Source, batch_size: int) -> tf.data.Dataset:
        _check_batch(batch_size)
        transform = self._transform
        ds = tf.data.Dataset.from_tensor_slices((src.items, src.labels.astype(np.int32)))
        ds = ds.map(lambda item, label: (transform.eval(item), label),
                    num_parallel_calls=AUTOTUNE, deterministic=True)
        return ds.batch(batch_size).prefetch(AUTOTUNE)

    # ------------------------------------------------------------------ splitting
    def split_holdout(self, per_class: int, seed: int) -> tuple["ImageData", "ImageData"]:
        """Carve `per_class` training images per class out of the train split.

        Returns (train_without_holdout, holdout) where `holdout.test()` (and
        `holdout.train_eval()`) iterate the held-out images. The remaining
        train set keeps this object's test split."""
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        labels = self._train.labels
        rng = np.random.RandomState(seed)
        held = []
        for c in range(self.info.num_classes):
            idx = np.flatnonzero(labels == c)
            if len(idx) < per_class:
                raise ValueError(
                    f"class {c} has only {len(idx)} training images; cannot hold out {per_class}")
            held.append(rng.choice(idx, per_class, replace=False))
        held = np.sort(np.concatenate(held))
        keep = np.setdiff1d(np.arange(len(labels)), held)
        remain_src, hold_src = self._train.take(keep), self._train.take(held)
        remain = ImageData(dataclasses.replace(self.info, train_size=len(keep)),
                           remain_src, self._test, self._transform)
        holdout = ImageData(dataclasses.replace(self.info, train_size=len(held), test_size=len(held)),
                            hold_src, hold_src, self._transform)
        return remain, holdout


def _epoch_seed(seed: int, epoch: int) -> int:
    return augment.epoch_seed(seed, epoch)


def _check_batch(batch_size: int) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
