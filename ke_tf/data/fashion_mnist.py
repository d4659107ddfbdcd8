"""Fashion-MNIST (Zalando): 60,000 train + 10,000 test 28x28 grey images, 10 classes, offline.

Read from the original gzipped IDX files in `data_dir` (default: where Debian's package
`dataset-fashion-mnist` puts them), else from tensorflow-datasets' prepared `fashion_mnist` in
`data_dir` (or tfds' default dir). Never downloads. Images stay 28x28x1 uint8 in memory and are
replicated to RGB in the pipeline, so every model sees the same 3-channel input as on other data.
Augmentation: pad-(size//8) random crop + horizontal flip; normalisation from the training images.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from ke_tf.data.idx import read_idx
from ke_tf.data.source import Source
from ke_tf.data.transforms import PadCropTransform

NAME = "fashion_mnist"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
SIZE = 28
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES = len(CLASS_NAMES)
IDX_FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class GrayPadCropTransform(PadCropTransform):
    """`PadCropTransform` over 1-channel items: the grey image is replicated to RGB after loading."""

    def _load(self, item):
        return tf.image.grayscale_to_rgb(super()._load(item))


def _read_idx_split(folder: str, split: str) -> Source:
    """One split from its IDX pair, checked: 28x28 images, as many labels as images, labels 0..9."""
    images_path, labels_path = (os.path.join(folder, f) for f in IDX_FILES[split])
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if images.shape[1:] != (SIZE, SIZE):
        raise ValueError(f"{images_path}: images are {images.shape[1:]}, expected ({SIZE}, {SIZE})")
    if len(labels) != len(images):
        raise ValueError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{labels_path}: label {labels.max()} is not a class (0..{NUM_CLASSES - 1})")
    return Source(images[..., None], labels.astype(np.int32), "array")


def _idx_folder(data_dir) -> str | None:
    """The folder holding all four IDX files, None when it holds none; partial sets are an error."""
    folder = data_dir or DEBIAN_DIR
    names = [f for pair in IDX_FILES.values() for f in pair]
    missing = [f for f in names if not os.path.isfile(os.path.join(folder, f))]
    if not missing:
        return folder
    if len(missing) < len(names):
        raise FileNotFoundError(f"{NAME}: {folder} lacks {', '.join(missing)} of the four IDX files")
    return None


def _read_tfds(data_dir) -> tuple[Source, Source, tuple]:
    """Both splits and the class names from tfds' prepared copy (FileNotFoundError if none)."""
    from ke_tf.data import tfds_sources

    train = tfds_sources._read_split(NAME, "train", data_dir, encoded=False)
    test = tfds_sources._read_split(NAME, "test", data_dir, encoded=False)
    _, names = tfds_sources._label_feature(NAME, data_dir)
    return train, test, names


def read_splits(data_dir=None) -> tuple[Source, Source, tuple]:
    """(train, test, class names): the IDX files when present, else tfds, else a one-line hint."""
    folder = _idx_folder(data_dir)
    if folder is not None:
        return _read_idx_split(folder, "train"), _read_idx_split(folder, "test"), CLASS_NAMES
    try:
        return _read_tfds(data_dir)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{NAME}: no IDX files ({', '.join(IDX_FILES['train'] + IDX_FILES['test'])}) in {data_dir or DEBIAN_DIR} "
            f"and no prepared tfds {NAME} in {data_dir or 'the default tfds data dir'}: "
            f"`apt-get install dataset-fashion-mnist` (installs them in {DEBIAN_DIR}) "
            f"or set data.data_dir to the folder holding the four IDX files"
        ) from None


def _grey_statistics(images: np.ndarray) -> tuple[float, float]:
    """Exact mean and std of uint8 pixels via their histogram (no float copy of the images)."""
    counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64)
    mean = float(counts @ values / counts.sum())
    return mean, float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))


def load(data_dir=None, image_size: int | None = None):
    train, test, names = read_splits(data_dir)
    size = int(image_size or SIZE)
    mean, std = _grey_statistics(train.items)
    transform = GrayPadCropTransform(
        kind="array", size=size, pad=max(size // 8, 1), flip=True, mean=(mean,) * 3, std=(std,) * 3, native_size=SIZE
    )
    return train, test, NUM_CLASSES, tuple(names), transform
