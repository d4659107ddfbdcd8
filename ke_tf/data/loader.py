"""`load_data`: name -> `ImageData` dispatch, plus class subsetting and class-balanced subsets."""

from __future__ import annotations

from ke_tf.data import classes as classes_mod
from ke_tf.data.balanced import per_class_indices
from ke_tf.data.image_data import ImageData
from ke_tf.data.info import DatasetInfo

KNOWN = ("digits", "fashion_mnist", "cifar10", "cifar100", "oxford_flowers102", "image_folder")


def load_data(
    name: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    classes: list[int] | None = None,
    split_seed: int = 0,
    on_bad_file: str = "fail",
    test_split: str | None = None,
    train_per_class: int | None = None,
) -> ImageData:
    """Load a dataset as an `ImageData`.

    Args:
      name: one of "digits" (offline default, bundled with scikit-learn),
        "fashion_mnist" (IDX files, e.g. Debian's dataset-fashion-mnist, or tfds),
        "cifar10", "cifar100", "oxford_flowers102" (prepared tfds data, never
        downloaded), "image_folder" (needs data_dir).
      data_dir: tfds data dir, the image folder root, or the Fashion-MNIST IDX folder.
      image_size: output side length (default 32 for digits/CIFAR, 28 for Fashion-MNIST, 224
        otherwise).
      classes: class subset, in order; labels are remapped classes[i] -> i.
      split_seed: seed of the digits stratified train/test split and of `train_per_class`.
      on_bad_file: image_folder only: "fail" (raise) or "skip" (drop + warn).
      test_split: which split `test()` reads: image_folder "tst" (default) or
        "val"; tfds datasets any tfds split (default "test").
      train_per_class: keep this many training images of every class (after `classes`), a
        subset fixed by `split_seed`; the test split is untouched.
    """
    if name not in KNOWN:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN)}")
    if image_size is not None and int(image_size) < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if name in ("digits", "fashion_mnist") and test_split is not None:
        raise ValueError(f"{name} has a fixed train/test split; test_split is not supported")
    if name == "digits":
        from ke_tf.data import digits

        train, test, num_classes, names, transform = digits.load(image_size, split_seed)
    elif name == "fashion_mnist":
        from ke_tf.data import fashion_mnist

        train, test, num_classes, names, transform = fashion_mnist.load(data_dir, image_size)
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
    if train_per_class is not None:
        what = f"{name} train_per_class={train_per_class}"
        train = train.take(per_class_indices(train.labels, num_classes, train_per_class, split_seed, what))

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
