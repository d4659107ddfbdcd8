"""Class orders and task splits for class-incremental learning."""

from __future__ import annotations

import numpy as np


def class_order(num_classes: int, seed: int) -> list[int]:
    """Seeded class permutation (np.random.RandomState(seed).permutation).

    seed=1993 with 100 classes reproduces the iCaRL / PyCIL CIFAR-100 order
    (68, 56, 78, 8, 23, 84, 90, 65, 74, 76, ...)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]


def incremental_tasks(order: list[int], first: int, increment: int) -> list[list[int]]:
    """Split `order` into a base task of `first` classes followed by tasks of
    `increment` classes each (e.g. 50 + 5x10, 10x10)."""
    order = [int(c) for c in order]
    n = len(order)
    if first < 1 or increment < 1:
        raise ValueError(f"first ({first}) and increment ({increment}) must be >= 1")
    if first > n:
        raise ValueError(f"first task has {first} classes but the order only has {n}")
    if (n - first) % increment:
        raise ValueError(
            f"{n} classes do not split into a first task of {first} plus tasks of {increment}: "
            f"{n - first} remaining classes is not a multiple of {increment}"
        )
    tasks = [order[:first]]
    tasks += [order[i : i + increment] for i in range(first, n, increment)]
    return tasks
