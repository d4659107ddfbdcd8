"""Class subsetting: keep a chosen list of classes and remap them to 0..K-1.

Used for class-incremental tasks: `classes=[68, 56]` keeps those two classes
and relabels 68 -> 0, 56 -> 1 (the order given defines the new labels).
"""

from __future__ import annotations

import numpy as np

from ke_tf.data.source import Source


def check_classes(classes, num_classes: int, name: str) -> list[int]:
    """Validate a class subset against a dataset with `num_classes` classes."""
    classes = list(classes)
    if not classes:
        raise ValueError(f"{name}: `classes` is empty; give at least one class id")
    bad = [c for c in classes if not isinstance(c, (int, np.integer)) or not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(f"{name}: class ids {bad} are not in the dataset (valid ids: 0..{num_classes - 1})")
    dup = sorted({int(c) for c in classes if classes.count(c) > 1})
    if dup:
        raise ValueError(f"{name}: duplicate class ids {dup} in `classes`")
    return [int(c) for c in classes]


def select_classes(source: Source, classes: list[int], num_classes: int) -> Source:
    """Keep only examples of `classes` (fixed order preserved), relabelled so
    classes[i] -> i, via a dense mapping vector (-1 marks dropped classes)."""
    mapping = np.full(num_classes, -1, dtype=np.int32)
    mapping[np.asarray(classes)] = np.arange(len(classes), dtype=np.int32)
    new = mapping[source.labels]
    keep = np.flatnonzero(new >= 0)
    return source.take(keep).relabel(new[keep])


def subset_names(class_names, classes) -> tuple:
    if not class_names:
        return ()
    return tuple(class_names[c] for c in classes)
