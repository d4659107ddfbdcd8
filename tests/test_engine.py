"""Engine: distributed equivalence, accumulation, resume, schedules, weight decay, NaN handling."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import math
import signal
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from ke_tf.config import TrainConfig
from ke_tf.engine import NonFiniteLossError, Trainer, WarmupSchedule, make_strategy
from ke_tf.losses import classifier_loss, cross_entropy

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "engine_worker.py")


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 8, 8, 3)).astype("float32"), rng.integers(0, 5, size=n).astype("int32"))


def _model(bn=False, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    if bn:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="fc")(x))


def _train(tmp_path, cfg, model=None, epochs=None, name="train", data=None):
    strategy = make_strategy("one_device")
    if model is None or callable(model) and not isinstance(model, keras.Model):
        with strategy.scope():
            model = (model or _model)()
    x, y = data or _data()
    trainer = Trainer(cfg, strategy, model, classifier_loss(model, cfg.label_smoothing),
                      len(x) // cfg.batch_size, str(tmp_path), name=name)
    trainer.fit(_epoch_data(x, y, cfg.batch_size), epochs=epochs)
    return model, trainer


def _epoch_data(x, y, batch_size):
    """Per-epoch order that depends only on the epoch (as ImageData.train), not on TF's seed."""
    def data(epoch):
        order = np.random.default_rng(epoch).permutation(len(x))
        return tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(batch_size, drop_remainder=True)
    return data


def _weights(model):
    return [v.numpy() for v in model.weights]


def _cfg(**kw):
    base = dict(epochs=2, batch_size=16, lr=0.1, momentum=0.9, schedule="cosine", weight_decay=1e-3,
                progress=False, jit_compile="off")
    return TrainConfig(**{**base, **kw})


def test_accumulated_micro_batches_equal_one_large_batch(tmp_path):
    one, _ = _train(tmp_path / "a", _cfg(batch_size=32))
    accumulated, _ = _train(tmp_path / "b", _cfg(batch_size=32, accum_steps=4))
    for a, b in zip(_weights(one), _weights(accumulated)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_xla_loss_and_gradients_match_graph_mode(tmp_path):
    plain, _ = _train(tmp_path / "a", _cfg())
    jit, trainer = _train(tmp_path / "b", _cfg(jit_compile="on"))
    assert trainer.jit
    for a, b in zip(_weights(plain), _weights(jit)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sgd_step_matches_hand_computed_coupled_l2_and_momentum(tmp_path):
    """One SGD step: w1 = w0 - lr * (dCE/dw + wd * w0) (PyTorch-style coupled L2)."""
    cfg = _cfg(epochs=1, batch_size=64, momentum=0.0, schedule="constant", lr=0.5, weight_decay=0.01)
    with make_strategy("one_device").scope():
        model = _model()
    x, y = _data()
    w0 = [v.numpy() for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(cross_entropy(model(x, training=True), y))
    grads = tape.gradient(loss, model.trainable_variables)
    expected = [w - 0.5 * (g.numpy() + 0.01 * w) for w, g in zip(w0, grads)]
    _train(tmp_path, cfg, model=model, data=(x, y))
    for e, v in zip(expected, model.trainable_variables):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-6)


def test_decoupled_weight_decay_differs_from_coupled(tmp_path):
    coupled, _ = _train(tmp_path / "a", _cfg(weight_decay=0.05))
    decoupled, _ = _train(tmp_path / "b", _cfg(weight_decay=0.05, weight_decay_mode="decoupled"))
    assert not np.allclose(_weights(coupled)[0], _weights(decoupled)[0])


def test_resume_after_stop_reaches_the_same_weights(tmp_path):
    cfg = _cfg(epochs=3)
    full, _ = _train(tmp_path / "full", cfg, model=lambda: _model(bn=True))
    # Stop after the first epoch (the run is killed), then resume with a fresh model object.
    _train(tmp_path / "resumed", cfg, model=lambda: _model(bn=True), epochs=1)
    resumed, trainer = _train(tmp_path / "resumed", cfg, model=lambda: _model(bn=True, seed=5))
    assert trainer.step == 3 * 4
    for a, b in zip(_weights(full), _weights(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    history = json.loads((tmp_path / "resumed" / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]


def test_signal_mid_epoch_saves_and_resume_matches(tmp_path):
    cfg = _cfg(epochs=2)
    full, _ = _train(tmp_path / "full", cfg)

    strategy = make_strategy("one_device")
    with strategy.scope():
        model = _model()
    x, y = _data()
    trainer = Trainer(cfg, strategy, model, classifier_loss(model), 4, str(tmp_path / "stopped"))
    apply = trainer._apply

    def apply_then_signal(grads):  # a real SIGTERM arrives in the middle of epoch 2
        apply(grads)
        if trainer.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
    trainer._apply = apply_then_signal
    from ke_tf.engine import StopRequested
    with pytest.raises(StopRequested, match="step 6"):
        trainer.fit(_epoch_data(x, y, 16))
    resumed, trainer = _train(tmp_path / "stopped", cfg, model=lambda: _model(seed=3))
    for a, b in zip(_weights(full), _weights(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_on_epoch_begin_runs_before_each_epoch_including_a_resumed_one(tmp_path):
    cfg = _cfg(epochs=3)
    strategy = make_strategy("one_device")
    x, y = _data()
    seen = []
    for epochs in (1, None):  # stop after epoch 1, then resume to the end
        with strategy.scope():
            model = _model()
        trainer = Trainer(cfg, strategy, model, classifier_loss(model), 4, str(tmp_path))
        trainer.fit(_epoch_data(x, y, 16), epochs=epochs, on_epoch_begin=seen.append)
    assert seen == [0, 1, 2]


def test_non_finite_loss_stops_without_applying(tmp_path):
    strategy = make_strategy("one_device")
    with strategy.scope():
        model, other = _model(), _model()
    x, y = _data()
    x[20] = np.nan
    before = _weights(model)

    def poisoned(m):  # the NaN image makes its example's loss NaN
        base = classifier_loss(m)

        def loss_fn(batch, training):
            out = base(batch, training)
            return {**out, "loss": out["loss"] + 0.0 * tf.reduce_sum(batch[0], axis=[1, 2, 3])}
        return loss_fn
    trainer = Trainer(_cfg(epochs=1, batch_size=16), strategy, model, poisoned(model), 4, str(tmp_path))
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        trainer.fit(lambda e: tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True))
    assert trainer.step == 1  # the first batch was applied, the NaN batch was not
    skip = Trainer(_cfg(epochs=1, batch_size=16, on_nan="skip"), strategy, other, poisoned(other),
                   4, str(tmp_path / "skip"))
    skip.fit(lambda e: tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True))
    assert skip.step == 4  # the skipped step still counts, so epochs stay aligned with the data
    assert not any(np.isnan(w).any() for w in _weights(other))
    assert not np.allclose(_weights(other)[0], before[0])


def test_label_smoothing_matches_hand_value():
    logits = np.array([[2.0, 0.5, -1.0]], "float32")
    eps = 0.1
    target = np.array([1 - eps + eps / 3, eps / 3, eps / 3])
    logp = logits[0] - np.log(np.exp(logits[0]).sum())
    np.testing.assert_allclose(cross_entropy(logits, [0], eps).numpy()[0], -(target * logp).sum(), rtol=1e-6)


def test_schedules_hand_values():
    cos = WarmupSchedule(0.1, total_steps=110, kind="cosine", warmup_steps=10, final_lr=0.0)
    np.testing.assert_allclose(float(cos(0)), 0.01, rtol=1e-6)
    np.testing.assert_allclose(float(cos(9)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(cos(60)), 0.05, rtol=1e-5)
    np.testing.assert_allclose(float(cos(110)), 0.0, atol=1e-7)
    step = WarmupSchedule(0.01, total_steps=100, kind="step", boundaries=[30, 60, 80], factor=0.2)
    assert [round(float(step(s)), 8) for s in (0, 29, 30, 60, 80, 99)] == [0.01, 0.01, 0.002, 0.0004, 8e-05, 8e-05]
    log = WarmupSchedule(1e-4, total_steps=100, kind="logspace", final_lr=1e-6)
    np.testing.assert_allclose(float(log(50)), 1e-5, rtol=1e-4)
    assert WarmupSchedule.from_config(log.get_config()).get_config() == log.get_config()


@pytest.mark.parametrize("mode,policy,dtype", [("bf16", "mixed_bfloat16", "bfloat16"),
                                               ("fp16", "mixed_float16", "float16")])
def test_mixed_precision_trains(tmp_path, mode, policy, dtype):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model, trainer = _train(tmp_path, _cfg(epochs=1, mixed_precision=mode))
        assert model.layers[1].compute_dtype == dtype
        assert (type(trainer.optimizer).__name__ == "LossScaleOptimizer") == (mode == "fp16")
        assert math.isfinite(trainer.history[-1]["train_loss"])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _run_worker(out, replicas, env=None):
    return subprocess.run([sys.executable, WORKER, str(out), str(replicas)], env=env,
                          capture_output=True, text=True, timeout=300)


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_two_replicas_equal_one_replica(tmp_path):
    for r in (1, 2):
        proc = _run_worker(tmp_path / f"r{r}.npz", r)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _load(tmp_path / "r1.npz"), _load(tmp_path / "r2.npz")
    assert int(one.pop("replicas")) == 1 and int(two.pop("replicas")) == 2
    for k in one:
        np.testing.assert_allclose(one[k], two[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_worker_matches_single_process(tmp_path):
    """Two localhost workers (own TF_CONFIG) end with identical weights equal to one process
    with the same global batch; only the chief writes outputs."""
    single = _run_worker(tmp_path / "single.npz", 1)
    assert single.returncode == 0, single.stderr[-3000:]
    ports = [_free_port(), _free_port()]
    procs = []
    for i in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": i}}))
        out = tmp_path / f"mw{i}.npz"
        procs.append(subprocess.Popen([sys.executable, WORKER, str(out), "0", "multi_worker"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    chief = _load(tmp_path / "mw0.npz")
    assert not (tmp_path / "mw1.npz").exists()  # only the chief writes
    worker = _load(str(tmp_path / "mw1.npz") + ".worker.npz")
    ref = _load(tmp_path / "single.npz")
    assert int(chief.pop("replicas")) == 2
    ref.pop("replicas")
    for k in ref:
        np.testing.assert_array_equal(chief[k], worker[k], err_msg=k)
        np.testing.assert_allclose(chief[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
