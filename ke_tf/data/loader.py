"""`load_data`: name -> `ImageData` dispatch, plus class subsetting."""

from __future__ import annotations

from ke_tf.data import classes as classes_mod
from ke_tf.data.image_data import ImageData
from ke_tf.data.info import DatasetInfo

KNOWN = ("digits", "cifar10", "cifar100", "oxford_flowers102", "image_folder")


def load_data(
    name: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    classes: list[int] | None = None,
    split_seed: int = 0,
    on_bad_file: str = "fail",
    test_split: str | None = None,
) -> ImageData:
    """Load a dataset as an `ImageData`.

    Args:
      name: one of "digits" (offline default, bundled with scikit-learn),
        "cifar10", "cifar100", "oxford_flowers102" (prepared tfds data, never
        downloaded), "image_folder" (needs data_dir).
      data_dir: tfds data dir, or the image folder root.
      image_size: output side length (default 32 for digits/CIFAR, 224 otherwise).
      classes: class subset, in order; labels are remapped classes[i] -> i.
      split_seed: seed of the digits stratified train/test split.
      on_bad_file: image_folder only: "fail" (raise) or "skip" (drop + warn).
      test_split: which split `test()` reads: image_folder "tst" (default) or
        "val"; tfds datasets any tfds split (default "test").
    """
    if name not in KNOWN:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN)}")
    if image_size is not None and int(image_size) < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if name == "digits":
        from ke_tf.data import digits

        if test_split is not None:
            raise ValueError("digits has a fixed train/test split; test_split is not supported")
        train, test, num_classes, names, transform = digits.load(image_size, split_seed)
    elif name == "image_folder":
        from ke_tf.data import image_folder

        train, test, num_classes, names, transform = image_folder.load(data_dir, image_size, test_split, on_bad_file)
    else:
        from ke_tf.data import tfds_sources

        train, test, num_classes, names, transform = tfds_sources.load(name, data_dir, image_size, test_split)

    if classes is not None:
        classes = classes_mod.check_classes(classes, num_classes, name)
        train = classes_mod.select_classes(train, classes, num_classes)
        test = classes_mod.select_classes(test, classes, num_classes)
        names = classes_mod.subset_names(names, classes)
        num_classes = len(classes)

    info = DatasetInfo(
        name=name,
        num_classes=num_classes,
        image_shape=(transform.size, transform.size, 3),
        train_size=len(train),
        test_size=len(test),
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        class_names=tuple(names),
    )
    return ImageData(info, train, test, transform)
