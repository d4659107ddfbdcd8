"""The offline default dataset: scikit-learn's 8x8 handwritten digits.

1,797 real images (values 0..16, 10 classes) ship with scikit-learn, so this
works with no network and no data directory. Images are scaled to uint8
0..255, bilinearly upsampled to `image_size` and replicated to RGB; a fixed
stratified 80/20 split (seeded by `split_seed`) gives 1437 train / 360 test.
Augmentation is pad-(size//8) random crop without flips (digits are not
flip-invariant); normalisation statistics come from the full training split.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ke_tf.data.source import Source
from ke_tf.data.transforms import PadCropTransform

NUM_CLASSES = 10
DEFAULT_SIZE = 32


def _images_uint8(images: np.ndarray, size: int) -> np.ndarray:
    x = images.astype(np.float32) * (255.0 / 16.0)
    x = tf.image.resize(x[..., None], [size, size], method="bilinear").numpy()
    x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return np.repeat(x, 3, axis=-1)


def load(image_size: int | None = None, split_seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    size = int(image_size or DEFAULT_SIZE)
    raw = load_digits()
    labels = raw.target.astype(np.int32)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=split_seed
    )
    images = _images_uint8(raw.images, size)
    train = Source(images[train_idx], labels[train_idx], "array")
    test = Source(images[test_idx], labels[test_idx], "array")
    pixels = train.items.reshape(-1, 3).astype(np.float64)
    mean = tuple(float(v) for v in pixels.mean(axis=0))
    std = tuple(float(v) for v in pixels.std(axis=0))
    transform = PadCropTransform(kind="array", size=size, pad=max(size // 8, 1), flip=False, mean=mean, std=std)
    names = tuple(str(i) for i in range(NUM_CLASSES))
    return train, test, NUM_CLASSES, names, transform
