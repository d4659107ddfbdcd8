"""Seeded weights shared by the golden generator (run with the originals, in a side environment)
and the conformance tests (ke_tf, no torch): numpy only, so both build identical state dicts
from the key names and shapes stored in a golden instead of storing the weights."""

import numpy as np


def seeded_state(shapes, seed, keep=None):
    """`{key: float32 array}` for `shapes` (`{key: shape}`, in order): BN scales and running
    variances U(0.5, 1.5), other floats N(0, 1/fan_in) (activations keep their scale through deep
    nets); `keep` (`{key: array}`) passes given arrays through (masks, step counters, switches)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if keep and key in keep:
            state[key] = keep[key]
        elif key.endswith(("running_var", "moving_variance:0")) or (len(shape) == 1 and key.endswith("weight")):
            state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            state[key] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return state


def golden_images(n, size, seed):
    """`n` NCHW float32 images in [0, 1) and the same images NHWC."""
    x = np.random.default_rng(seed).random((n, 3, size, size)).astype(np.float32)
    return x, np.ascontiguousarray(x.transpose(0, 2, 3, 1))
