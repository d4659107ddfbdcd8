"""BatchNormalization on TF's fused kernel (`SyncBatchNormalization(fused=True)`, ke_tf's models):
as accurate as Keras's unfused path against a float64 run of the same step, taken only where it
applies (float32 NHWC training outside XLA), differentiable twice (LwM's Grad-CAM, EKG's importance)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from ke_tf.layers.batchnorm import SyncBatchNormalization  # noqa: E402

QUANTITIES = ("output", "d input", "d gamma", "d beta", "moving mean", "moving variance")


def bn_step(x, w, gamma, beta, fused, dtype):
    """One training call of a BN layer on `x`: [output, dL/dx, dL/dgamma, dL/dbeta, moving mean,
    moving variance] for L = sum(output * w), as float64 arrays."""
    layer = SyncBatchNormalization(fused=fused, momentum=0.9, epsilon=1e-5, dtype=dtype)
    layer.build(x.shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    xt = tf.constant(x, dtype)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True)
        loss = tf.reduce_sum(y * tf.constant(w, dtype))
    grads = tape.gradient(loss, [xt, layer.gamma, layer.beta])
    return [np.asarray(a, np.float64) for a in (y, *grads, layer.moving_mean, layer.moving_variance)]


def well_conditioned(shape, seed):
    """Per-channel offsets and scales as conv activations have them, the loss weights and BN's affine."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.normal(rng.uniform(-2, 2, c), rng.uniform(0.3, 3, c), size=shape)
    return x, rng.normal(size=shape), rng.uniform(0.5, 1.5, c), rng.normal(size=c)


@pytest.mark.parametrize("shape", [(64, 16, 16, 16), (64, 8, 8, 64)])
def test_fused_kernel_is_as_accurate_as_the_unfused_path(shape):
    """Relative RMS error against float64, averaged over 6 seeds, of every quantity a training step
    uses: fused <= unfused (5% allowance: both are float32 rounding of different summation orders;
    measured ratios 0.77-1.03 on AVX2, oneDNN on and off)."""
    errors = {True: [], False: []}
    for seed in range(6):
        x, w, gamma, beta = well_conditioned(shape, seed)
        reference = bn_step(x, w, gamma, beta, False, "float64")
        for fused in errors:
            out = bn_step(x, w, gamma, beta, fused, "float32")
            errors[fused].append([np.linalg.norm(o - r) / np.linalg.norm(r) for o, r in zip(out, reference)])
    fused, unfused = np.mean(errors[True], axis=0), np.mean(errors[False], axis=0)
    worse = [f"{q}: {f:.2e} > {u:.2e}" for q, f, u in zip(QUANTITIES, fused, unfused) if f > 1.05 * u]
    assert not worse, worse


def _op_types(fn, *args):
    return {op.type for op in fn.get_concrete_function(*args).graph.get_operations()}


@pytest.mark.parametrize(
    "fused, dtype, jit, expected",
    [
        (True, "float32", False, True),
        (True, "float32", True, False),
        (True, "float64", False, False),
        (False, "float32", False, False),
    ],
)
def test_fused_kernel_only_where_it_applies(fused, dtype, jit, expected):
    layer = SyncBatchNormalization(fused=fused, dtype=dtype)
    layer.build((4, 4, 4, 3))
    train = tf.function(lambda x: layer(x, training=True), jit_compile=jit)
    assert ("FusedBatchNormV3" in _op_types(train, tf.zeros((4, 4, 4, 3), dtype))) == expected
    infer = tf.function(lambda x: layer(x, training=False))
    assert "FusedBatchNormV3" not in _op_types(infer, tf.zeros((4, 4, 4, 3), dtype))


def test_second_order_gradients_match_the_unfused_path():
    """d/dgamma of ||dL/dx||^2 (a gradient of a gradient, as Grad-CAM attention losses take): fused ==
    unfused up to float32 rounding (measured 1e-6 relative; bound 1e-4)."""
    x, w, gamma, beta = well_conditioned((16, 8, 8, 8), 0)
    results = []
    for fused in (True, False):
        layer = SyncBatchNormalization(fused=fused, momentum=0.9, epsilon=1e-5)
        layer.build(x.shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        xt = tf.constant(x, tf.float32)
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(xt)
                loss = tf.reduce_sum(layer(xt, training=True) * tf.constant(w, tf.float32) ** 2)
            penalty = tf.reduce_sum(tf.square(inner.gradient(loss, xt)))
        results.append(np.asarray(outer.gradient(penalty, layer.gamma), np.float64))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4)
