"""`DatasetInfo`: the static facts a trainer needs about a loaded dataset.

Kept separate (and dependency-free) so models and trainers can type against it
without importing TensorFlow input code.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Description of the data an `ImageData` pipeline produces.

    Attributes:
      name: dataset name ("digits", "cifar10", "cifar100", "oxford_flowers102",
        "image_folder").
      num_classes: number of classes after class subsetting (labels are 0..K-1).
      image_shape: (H, W, C) of the model input produced by the pipelines.
      train_size: number of training examples (after subsetting / holdout).
      test_size: number of test examples (after subsetting).
      mean: per-channel RGB normalisation mean on the 0-255 scale.
      std: per-channel RGB normalisation std on the 0-255 scale.
      class_names: optional names, index i names label i.
    """

    name: str
    num_classes: int
    image_shape: tuple
    train_size: int
    test_size: int
    mean: tuple
    std: tuple
    class_names: tuple = ()
