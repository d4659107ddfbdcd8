"""Per-dataset-family preprocessing: how one raw `Source` item becomes a
normalised float32 image, with (train) or without (eval) augmentation.

  * `PadCropTransform`   — CIFAR / digits: zero-pad + random crop (+ flip).
  * `ResizedCropTransform` — Flowers / image folders: random-resized-crop +
    flip for training, resize-shorter-side + centre crop for evaluation.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from ke_tf.data import augment
from ke_tf.data.source import decode_item


@dataclasses.dataclass(frozen=True)
class PadCropTransform:
    kind: str  # Source kind of the items
    size: int  # output side length
    pad: int  # zero padding before the random crop
    flip: bool  # random horizontal flip (False for digits)
    mean: tuple
    std: tuple
    native_size: int | None = None  # stored image side; resized if != size

    def _load(self, item):
        image = decode_item(item, self.kind)
        if self.native_size is not None and self.native_size != self.size:
            image = augment.resize_to(image, self.size)
        return image

    def train(self, item, seed):
        image = self._load(item)
        crop_seed, flip_seed = tf.unstack(augment.split_seed(seed, 2))
        image = augment.pad_random_crop(image, self.pad, crop_seed)
        if self.flip:
            image = augment.random_flip(image, flip_seed)
        return self._finish(image)

    def eval(self, item):
        return self._finish(self._load(item))

    def _finish(self, image):
        image = augment.normalize(image, self.mean, self.std)
        image.set_shape([self.size, self.size, 3])
        return image


@dataclasses.dataclass(frozen=True)
class ResizedCropTransform:
    kind: str
    size: int  # crop side (224 by default)
    resize: int  # shorter side before the eval centre crop (256 for 224)
    mean: tuple
    std: tuple

    def train(self, item, seed):
        image = decode_item(item, self.kind)
        crop_seed, flip_seed = tf.unstack(augment.split_seed(seed, 2))
        image = augment.random_resized_crop(image, self.size, crop_seed)
        image = augment.random_flip(image, flip_seed)
        return self._finish(image)

    def eval(self, item):
        image = decode_item(item, self.kind)
        return self._finish(augment.resize_center_crop(image, self.resize, self.size))

    def _finish(self, image):
        image = augment.normalize(image, self.mean, self.std)
        image.set_shape([self.size, self.size, 3])
        return image
