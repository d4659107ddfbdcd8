"""Seeded class-balanced sampling: `per_class` examples of every class, the same for the same seed.

One rule for both uses: the methods' held-out split (`ImageData.split_holdout`) and the small
training subsets of `data.train_per_class` (`load_data`).
"""

from __future__ import annotations

import numpy as np


def per_class_indices(labels: np.ndarray, num_classes: int, per_class: int, seed: int, what: str) -> np.ndarray:
    """Sorted indices of `per_class` examples of each class 0..num_classes-1, drawn with
    np.random.RandomState(seed) class by class; errors start with `what` (the caller's request)."""
    if per_class < 1:
        raise ValueError(f"{what}: the number per class must be >= 1, got {per_class}")
    rng = np.random.RandomState(seed)
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"{what}: class {c} has only {len(idx)} training images, fewer than {per_class}")
        chosen.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(chosen))
