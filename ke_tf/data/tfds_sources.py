"""CIFAR-10/100 and Oxford Flowers-102 from TensorFlow Datasets (never downloads).

Splits are read once into memory (CIFAR as uint8 arrays, ~150 MB; Flowers as
still-encoded JPEG bytes) so that epoch order can be an exact, seed-only
permutation. If the prepared data is missing, a `FileNotFoundError` explains
how to prepare the tfds data directory.
"""

from __future__ import annotations

import numpy as np

from ke_tf.data.source import Source
from ke_tf.data.transforms import PadCropTransform, ResizedCropTransform

CIFAR_STATS = {
    "cifar10": ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    "cifar100": ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
}
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# tfds split names used for (train, default test) per dataset; edit / extend
# here to e.g. train Flowers on "train+validation".
SPLITS = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "oxford_flowers102": ("train", "test"),
}
FLOWERS_SIZE = 224


def _missing(name: str, data_dir, err: Exception) -> FileNotFoundError:
    where = data_dir if data_dir is not None else "the default tfds data dir (~/tensorflow_datasets)"
    return FileNotFoundError(
        f"tfds dataset {name!r} is not prepared in {where}. This library never downloads: "
        f"prepare it on a machine with network access (e.g. `tfds build {name} --data_dir DIR` or "
        f"tfds.builder({name!r}, data_dir=DIR).download_and_prepare()) and pass data_dir=DIR. "
        f"(tfds said: {str(err).splitlines()[0] if str(err) else type(err).__name__})"
    )


def _read_split(name: str, split: str, data_dir, encoded: bool) -> Source:
    import tensorflow_datasets as tfds

    kwargs = {}
    if encoded:
        kwargs["decoders"] = {"image": tfds.decode.SkipDecoding()}
    try:
        ds = tfds.load(
            name, split=split, data_dir=data_dir, as_supervised=True, download=False, shuffle_files=False, **kwargs
        )
    except (AssertionError, tfds.core.registered.DatasetNotFoundError) as err:
        raise _missing(name, data_dir, err) from err
    except Exception as err:  # DataDirNotFound / missing split etc. differ by tfds version
        if "not found" in str(err).lower() or "could not find" in str(err).lower():
            raise _missing(name, data_dir, err) from err
        raise
    items, labels = [], []
    for x, y in tfds.as_numpy(ds.batch(1024)):
        items.append(x)
        labels.append(y)
    if not labels:
        raise ValueError(f"tfds split {name}[{split}] in {data_dir} is empty")
    items = np.concatenate(items) if not encoded else np.array([b for chunk in items for b in chunk], dtype=object)
    return Source(items, np.concatenate(labels).astype(np.int32), "encoded" if encoded else "array")


def _label_feature(name: str, data_dir):
    import tensorflow_datasets as tfds

    feature = tfds.builder(name, data_dir=data_dir).info.features["label"]
    return feature.num_classes, tuple(feature.names)


def load(name: str, data_dir=None, image_size: int | None = None, test_split: str | None = None):
    train_split, default_test = SPLITS[name]
    test_split = test_split or default_test
    encoded = name == "oxford_flowers102"
    train = _read_split(name, train_split, data_dir, encoded)
    test = _read_split(name, test_split, data_dir, encoded)
    num_classes, names = _label_feature(name, data_dir)
    if name in CIFAR_STATS:
        mean, std = CIFAR_STATS[name]
        size = int(image_size or 32)
        transform = PadCropTransform(
            kind="array", size=size, pad=max(size // 8, 1), flip=True, mean=mean, std=std, native_size=32
        )
    else:
        size = int(image_size or FLOWERS_SIZE)
        transform = ResizedCropTransform(
            kind="encoded", size=size, resize=int(round(size * 256 / 224)), mean=IMAGENET_MEAN, std=IMAGENET_STD
        )
    return train, test, num_classes, names, transform
