"""The objectives in ke_tf/losses.py against their formulas computed by hand in NumPy (float64),
including the power of the temperature each one uses."""

import numpy as np
import pytest
import tensorflow as tf

from ke_tf.losses import bank_distillation, kd_loss, search_objective, transnet_loss


def log_softmax(z, t=1.0):
    z = np.asarray(z, np.float64) / t
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl(p_logits, q_logits, t):
    """KL(softmax(p/t) || softmax(q/t)) per row."""
    lp, lq = log_softmax(p_logits, t), log_softmax(q_logits, t)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def ce(logits, labels):
    return -log_softmax(logits)[np.arange(len(labels)), labels]


LOGITS = np.array([[1.0, 2.0, 0.5], [0.2, -1.0, 1.5]])
LABELS = np.array([0, 2])


def test_kd_loss_is_t_squared_kl():
    teacher = np.array([[3.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
    got = kd_loss(tf.constant(LOGITS), tf.constant(teacher), 3.0).numpy()
    np.testing.assert_allclose(got, 9.0 * kl(teacher, LOGITS, 3.0), rtol=1e-12)


def test_search_objective_is_ce_plus_soft_ce_at_t1():
    ensemble = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    soft = -(np.exp(log_softmax(ensemble)) * log_softmax(LOGITS)).sum(axis=-1)
    got = search_objective(tf.constant(LOGITS), tf.constant(LABELS), tf.constant(ensemble)).numpy()
    np.testing.assert_allclose(got, ce(LOGITS, LABELS) + soft, rtol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_bank_distillation_teaches_from_the_members_closer_to_the_best_than_the_student_with_t1(temperature):
    t = temperature
    best = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    near = best + np.array([[0.1, 0.0, 0.0], [0.0, 0.1, 0.0]])  # closer to the best than the student
    far = np.array([[0.0, 3.0, 0.0], [3.0, 0.0, 0.0]])  # further
    bank = np.stack([best, near, far], axis=-1)  # [B, K, M], member 0 = best
    student_gap = (t * t * kl(best, LOGITS, t)).sum()
    gaps = [(t * t * kl(best, m, t)).sum() for m in (near, far)]
    assert gaps[0] < student_gap < gaps[1]  # the setting chooses the near member only
    teacher = (best + near) / 2
    expected = ce(LOGITS, LABELS) + t * kl(teacher, LOGITS, t)
    got = bank_distillation(tf.constant(LOGITS), tf.constant(LABELS), tf.constant(bank), t).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_transnet_loss_is_per_example_mse_plus_the_gate_penalty():
    rng = np.random.default_rng(0)
    prediction, target = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=(2, 3, 3, 4))
    p, alphas = np.array([1.0, 0.5, -0.2]), [0.0, 0.1, 0.3]
    expected = ((prediction - target) ** 2).mean(axis=(1, 2, 3)) + (np.array(alphas) * p**2).sum()
    got = transnet_loss(tf.constant(prediction), tf.constant(target), tf.constant(p), alphas).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
