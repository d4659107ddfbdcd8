"""Numerical identities in tests. An identity (fused == unfused, slim == masked, N replicas == 1,
accumulated == large batch, resumed == uninterrupted, ours == the original's) is computed under the
float64 dtype policy and compared at float64 round-off, so it holds on any CPU: AVX2 or AVX-512,
oneDNN on or off, any thread count. A float32 comparison is kept only where float32 itself is the
point, with a bound that a measurement gave (`assert_within_measured_bound`)."""

import contextlib

import keras
import numpy as np

# float64's machine epsilon is 2.2e-16. Float32 training steps through BN on 2-32 image batches
# measured 7.9e-4 relative error from 6e-8 round-off on an AVX2 EPYC (~1e4 x amplification); the same
# amplification leaves float64 near 1e-12. 1e-9 of a tensor's scale is far above that and far below
# what a wrong step, mask or fold changes (>= 1e-6).
IDENTITY_TOL = 1e-9


@contextlib.contextmanager
def float64():
    """Build (and run) models under the float64 dtype policy; the caller's policy is restored."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _require_float64(array, what, err_msg):
    if np.asarray(array).dtype != np.float64:
        raise AssertionError(
            f"{err_msg or 'identity'}: {what} is {np.asarray(array).dtype}; an identity is computed in float64 "
            "(build the models under tests.numerics.float64()), or compared with "
            "assert_within_measured_bound when float32 itself is the point"
        )


def assert_identical(actual, expected, tol=IDENTITY_TOL, err_msg=""):
    """`actual` equals `expected` up to float64 round-off, relative to `expected`'s largest
    magnitude (at least 1: a value cancelled to ~0 by BN has no scale of its own). Both must be
    float64 arrays."""
    _require_float64(actual, "the actual value", err_msg)
    _require_float64(expected, "the expected value", err_msg)
    expected = np.asarray(expected)
    np.testing.assert_allclose(
        np.asarray(actual),
        expected,
        rtol=0,
        atol=tol * max(1.0, float(np.abs(expected).max(initial=0.0))),
        err_msg=err_msg,
    )


def assert_all_identical(actual, expected, tol=IDENTITY_TOL):
    """`assert_identical` for two equal-length lists, or two dicts with the same keys."""
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected)
        pairs = [(actual[k], expected[k], str(k)) for k in expected]
    else:
        assert len(actual) == len(expected)
        pairs = [(a, b, f"item {i}") for i, (a, b) in enumerate(zip(actual, expected))]
    for a, b, name in pairs:
        assert_identical(a, b, tol, err_msg=name)


def assert_within_measured_bound(actual, expected, bound, measured):
    """A float32 comparison: `actual` within `bound` of `expected`'s scale. `measured` says where
    the bound comes from (e.g. the spread between two summation orders of the reference)."""
    assert measured and bound > 0, "a float32 bound needs the measurement it comes from"
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(
        np.asarray(actual, np.float64),
        expected,
        rtol=0,
        atol=bound * max(1.0, float(np.abs(expected).max(initial=0.0))),
        err_msg=f"bound {bound:g} ({measured})",
    )


def randomise_statistics(model, seed=0, spread=0.3):
    """Seeded non-trivial BN statistics, gamma, beta and biases (nested models included), so that
    an identity which folds, slices or masks them is really exercised."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        shape = tuple(v.shape)
        if v.name == "moving_variance":
            v.assign(rng.uniform(0.5, 2.0, shape))
        elif v.name == "gamma":
            v.assign(rng.uniform(0.5, 1.5, shape))
        elif v.name in ("moving_mean", "beta", "bias"):
            v.assign(rng.normal(0, spread, shape))
