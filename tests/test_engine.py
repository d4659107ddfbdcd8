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
from ke_tf.data.stream import TensorData
from ke_tf.engine import Hook, NonFiniteLossError, Trainer, WarmupSchedule, make_strategy
from ke_tf.losses import classifier_loss, cross_entropy
from tests.numerics import assert_all_identical, assert_identical, assert_within_measured_bound, float64

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


def _train(tmp_path, cfg, model=None, epochs=None, name="train", data=None, loss=None):
    strategy = make_strategy("one_device")
    if model is None or callable(model) and not isinstance(model, keras.Model):
        with strategy.scope():
            model = (model or _model)()
    x, y = data or _data()
    trainer = Trainer(
        cfg,
        strategy,
        model,
        (loss or classifier_loss)(model, cfg.label_smoothing),
        len(x) // cfg.batch_size,
        str(tmp_path),
        name=name,
    )
    trainer.fit(TensorData(x, y), seed=0, epochs=epochs)
    return model, trainer


def _weights(model):
    return [v.numpy() for v in model.weights]


def _cfg(**kw):
    base = dict(
        epochs=2,
        batch_size=16,
        lr=0.1,
        momentum=0.9,
        schedule="cosine",
        weight_decay=1e-3,
        progress=False,
        jit_compile="off",
    )
    return TrainConfig(**{**base, **kw})


def test_accumulated_micro_batches_equal_one_large_batch(tmp_path):
    with float64():
        one, _ = _train(tmp_path / "a", _cfg(batch_size=32))
        accumulated, _ = _train(tmp_path / "b", _cfg(batch_size=32, accum_steps=4))
    assert_all_identical(_weights(accumulated), _weights(one))


def test_xla_whole_step_matches_graph_mode(tmp_path):
    with float64():
        plain, _ = _train(tmp_path / "a", _cfg())
        jit, trainer = _train(tmp_path / "b", _cfg(jit_compile="on"))
    assert trainer.jit == "step"  # one device: forward, gradients and update in one XLA cluster
    assert_all_identical(_weights(jit), _weights(plain))


@pytest.mark.parametrize(
    "mode,expected",
    [
        # PyTorch-style coupled L2: w1 = w0 - lr * (dCE/dw + wd * w0)
        ("coupled", lambda w, g, lr, wd: w - lr * (g + wd * w)),
        # Keras/AdamW-style decoupled decay: w1 = w0 - lr * wd * w0 - lr * dCE/dw
        ("decoupled", lambda w, g, lr, wd: w - lr * wd * w - lr * g),
    ],
)
def test_sgd_step_matches_hand_computed_weight_decay(tmp_path, mode, expected):
    cfg = _cfg(
        epochs=1, batch_size=64, momentum=0.0, schedule="constant", lr=0.5, weight_decay=0.01, weight_decay_mode=mode
    )
    with float64():
        with make_strategy("one_device").scope():
            model = _model()
        x, y = _data()
        w0 = [v.numpy() for v in model.trainable_variables]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(cross_entropy(model(x, training=True), y))
        grads = tape.gradient(loss, model.trainable_variables)
        _train(tmp_path, cfg, model=model, data=(x, y))
    assert_all_identical(
        [v.numpy() for v in model.trainable_variables], [expected(w, g.numpy(), 0.5, 0.01) for w, g in zip(w0, grads)]
    )


def test_loop_length_changes_calls_not_results(tmp_path):
    """Steps per tf.function call: one call per loop, loops end at epoch ends, same weights."""
    strategy = make_strategy("one_device")
    with float64():
        one, _ = _train(tmp_path / "a", _cfg(steps_per_loop=1))
        with strategy.scope():
            model = _model()
        x, y = _data()
        trainer = Trainer(_cfg(steps_per_loop=3), strategy, model, classifier_loss(model), 4, str(tmp_path / "b"))
        calls = []
        run = trainer.loop.run
        trainer.loop.run = lambda it, n, stop: calls.append(n) or run(it, n, stop)
        trainer.fit(TensorData(x, y), seed=0)
    assert calls == [3, 1, 3, 1]  # 4 steps per epoch: never across an epoch end
    assert_all_identical(_weights(model), _weights(one))


def test_release_in_background_drops_the_last_reference_off_the_calling_thread():
    """Destroying an autotuned tf.data iterator can block for its autotune period (seconds to a
    minute); the engine hands its iterators to a thread that drops the last reference and that
    Python joins at exit (a daemon thread could abort the process during shutdown)."""
    import threading
    import weakref

    from ke_tf.engine.iterators import release_in_background

    class Held:
        pass

    dropped_on = []
    holder = [Held()]
    ref = weakref.ref(holder[0], lambda _: dropped_on.append(threading.current_thread()))
    release_in_background(holder).join(10)
    assert holder == [] and ref() is None
    assert dropped_on and dropped_on[0] is not threading.main_thread() and not dropped_on[0].daemon


def test_stage_and_evaluation_iterators_are_released_in_the_background(tmp_path, monkeypatch):
    """Trainer.fit gives its stage iterator, the Evaluator each pass's iterator, to
    release_in_background, owning no other reference (the list is emptied)."""
    import importlib

    from ke_tf.engine import iterators

    evaluate_module = importlib.import_module("ke_tf.engine.evaluate")  # the package exports a function of that name
    trainer_module = importlib.import_module("ke_tf.engine.trainer")
    released = []

    def spy(holder):
        released.append([type(item).__name__ for item in holder])
        thread = iterators.release_in_background(holder)
        assert holder == []
        return thread

    monkeypatch.setattr(trainer_module, "release_in_background", spy)
    monkeypatch.setattr(evaluate_module, "release_in_background", spy)
    model, trainer = _train(tmp_path, _cfg(epochs=1))
    assert released == [["DistributedIterator"]]
    x, y = _data()
    metrics = evaluate_module.evaluate(trainer.strategy, model, tf.data.Dataset.from_tensor_slices((x, y)).batch(16))
    assert metrics["count"] == len(x) and len(released) == 2


def test_resume_after_stop_reaches_the_same_weights(tmp_path):
    cfg = _cfg(epochs=3)
    with float64():
        full, _ = _train(tmp_path / "full", cfg, model=lambda: _model(bn=True))
        # Stop after the first epoch (the run is killed), then resume with a fresh model object.
        _train(tmp_path / "resumed", cfg, model=lambda: _model(bn=True), epochs=1)
        resumed, trainer = _train(tmp_path / "resumed", cfg, model=lambda: _model(bn=True, seed=5))
    assert trainer.step == 3 * 4
    assert_all_identical(_weights(resumed), _weights(full))
    history = json.loads((tmp_path / "resumed" / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]


def _signal_at(step):
    """A loss wrapper that sends this process a real SIGTERM during training step `step`."""
    count = [0]

    def tick():
        count[0] += 1
        if count[0] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return np.int32(0)

    def wrap(model, label_smoothing=0.0):
        base = classifier_loss(model, label_smoothing)

        def loss_fn(batch, training):
            with tf.control_dependencies([tf.numpy_function(tick, [], tf.int32)]):
                return base(tf.nest.map_structure(tf.identity, batch), training)

        return loss_fn

    return wrap


def test_signal_mid_epoch_saves_and_resume_matches(tmp_path):
    cfg = _cfg(epochs=2, steps_per_loop=1)
    from ke_tf.engine import StopRequested

    with float64():
        full, _ = _train(tmp_path / "full", cfg, model=lambda: _model(bn=True))
        with pytest.raises(StopRequested, match="step 6"):
            _train(tmp_path / "stopped", cfg, model=lambda: _model(bn=True), loss=_signal_at(6))
        assert tf.train.latest_checkpoint(str(tmp_path / "stopped" / "checkpoints" / "train")).endswith("ckpt-6")
        resumed, _ = _train(tmp_path / "stopped", cfg, model=lambda: _model(bn=True, seed=3))
    assert_all_identical(_weights(resumed), _weights(full))


def test_on_epoch_begin_runs_before_each_epoch_including_a_resumed_one(tmp_path):
    cfg = _cfg(epochs=3)
    strategy = make_strategy("one_device")
    x, y = _data()
    seen = []
    for epochs in (1, None):  # stop after epoch 1, then resume to the end
        with strategy.scope():
            model = _model()
        trainer = Trainer(cfg, strategy, model, classifier_loss(model), 4, str(tmp_path))
        trainer.fit(TensorData(x, y), seed=0, epochs=epochs, on_epoch_begin=seen.append)
    assert seen == [0, 1, 2]


def test_a_user_hook_gets_each_epochs_metrics_after_the_stage_reporting(tmp_path):
    """`fit(hooks=[...])`: each hook's on_epoch_end gets the epoch, its metrics (with the
    evaluation's) and the history so far, after the history file is written; on_train_end once."""
    calls = []

    class Recorder(Hook):
        def on_epoch_end(self, epoch, metrics, history):
            on_disk = json.loads((tmp_path / "train_history.json").read_text())
            calls.append((epoch, dict(metrics), len(history), on_disk[-1]["epoch"]))

        def on_train_end(self, history):
            calls.append(("end", len(history)))

    strategy = make_strategy("one_device")
    with strategy.scope():
        model = _model()
    x, y = _data()
    trainer = Trainer(_cfg(epochs=2), strategy, model, classifier_loss(model), 4, str(tmp_path))
    history = trainer.fit(TensorData(x, y), seed=0, eval_fn=lambda epoch: {"test_top1": 0.5}, hooks=[Recorder()])
    assert calls == [(0, history[0], 1, 0), (1, history[1], 2, 1), ("end", 2)]
    assert history[1]["test_top1"] == 0.5 and math.isfinite(history[1]["train_loss"])


def _poisoned(model, label_smoothing=0.0):
    """The NaN image makes its example's loss NaN."""
    base = classifier_loss(model)

    def loss_fn(batch, training):
        out = base(batch, training)
        return {**out, "loss": out["loss"] + 0.0 * tf.reduce_sum(batch[0], axis=[1, 2, 3])}

    return loss_fn


def test_non_finite_loss_stops_without_applying_or_is_skipped(tmp_path):
    from ke_tf.data.stream import epoch_order

    x, y = _data()
    x[20] = np.nan
    bad_step = int(np.flatnonzero(epoch_order(64, 0, 0).numpy() == 20)[0]) // 16
    with pytest.raises(NonFiniteLossError, match=f"step {bad_step}"):
        _, _ = _train(tmp_path / "stop", _cfg(epochs=1, steps_per_loop=4), data=(x, y), loss=_poisoned)
    strategy = make_strategy("one_device")
    with strategy.scope():
        model = _model(bn=True)
    before = _weights(model)
    stopped = Trainer(_cfg(epochs=1), strategy, model, _poisoned(model), 4, str(tmp_path / "stop2"))
    with pytest.raises(NonFiniteLossError):
        stopped.fit(TensorData(x, y), seed=0)
    assert stopped.step == bad_step  # the steps before the NaN batch were applied, that one was not
    assert int(stopped.optimizer.iterations.numpy()) == bad_step
    # The NaN step's update never ran (BN moving statistics did see the batch: the error says so).
    assert not any(np.isnan(v.numpy()).any() for v in model.trainable_variables + stopped.optimizer.variables)
    with strategy.scope():
        other = _model(bn=True)
    skip = Trainer(
        _cfg(epochs=1, on_nan="skip", steps_per_loop=1), strategy, other, _poisoned(other), 4, str(tmp_path / "skip")
    )
    skip.fit(TensorData(x, y), seed=0)
    assert skip.step == 4  # the skipped step still counts, so epochs stay aligned with the data
    assert skip.history[-1]["skipped_steps"] == 1
    assert not any(np.isnan(w).any() for w in _weights(other))  # BN statistics too: restored on skip
    assert not np.allclose(_weights(other)[0], before[0])


def test_batch_not_divisible_by_accumulation_is_a_config_error():
    from ke_tf.config import ConfigError

    strategy = make_strategy("one_device")
    with strategy.scope():
        model = _model()
    with pytest.raises(ConfigError, match="train.batch_size 18 is not divisible by 1 replica"):
        Trainer(_cfg(batch_size=18, accum_steps=4), strategy, model, classifier_loss(model), 3, "/tmp/unused")


def test_sync_bn_auto_synchronises_small_replica_batches_only():
    from ke_tf.engine.bn_statistics import synchronise_bn

    assert not synchronise_bn(_cfg(batch_size=256, sync_bn="on"), 1)  # one replica: nothing to sync
    assert synchronise_bn(_cfg(batch_size=256, sync_bn="on"), 2)
    assert not synchronise_bn(_cfg(batch_size=16, sync_bn="off"), 8)
    assert not synchronise_bn(_cfg(batch_size=128, sync_bn="auto"), 4)  # 32 images per replica
    assert synchronise_bn(_cfg(batch_size=128, sync_bn="auto"), 8)  # 16
    assert synchronise_bn(_cfg(batch_size=128, accum_steps=2, sync_bn="auto"), 4)  # BN sees micro-batches of 16


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
    constant = WarmupSchedule(0.05, total_steps=100, kind="constant", warmup_steps=4)
    assert [round(float(constant(s)), 8) for s in (0, 3, 4, 99)] == [0.0125, 0.05, 0.05, 0.05]
    assert round(float(WarmupSchedule(0.05, total_steps=100, kind="step")(50)), 8) == 0.05  # no boundaries


def test_loss_scale_halves_on_overflow_grows_after_a_run_and_ignores_inactive_steps():
    from ke_tf.engine.loss_scale import LossScale

    scale = LossScale(initial_scale=8.0, growth_steps=2)
    scale.update(tf.constant(False))
    assert float(scale.scale) == 4.0 and int(scale.finite_steps) == 0
    scale.update(tf.constant(True))
    assert float(scale.scale) == 4.0 and int(scale.finite_steps) == 1
    scale.update(tf.constant(False), active=tf.constant(False))  # the step a NaN stop ended on
    assert float(scale.scale) == 4.0 and int(scale.finite_steps) == 1
    scale.update(tf.constant(True))
    assert float(scale.scale) == 8.0 and int(scale.finite_steps) == 0


@pytest.mark.parametrize(
    "mode,policy,dtype", [("bf16", "mixed_bfloat16", "bfloat16"), ("fp16", "mixed_float16", "float16")]
)
def test_mixed_precision_trains(tmp_path, mode, policy, dtype):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model, trainer = _train(tmp_path, _cfg(epochs=1, mixed_precision=mode))
        assert model.layers[1].compute_dtype == dtype
        assert (trainer.loss_scale is not None) == (mode == "fp16")
        assert math.isfinite(trainer.history[-1]["train_loss"])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_fp16_coupled_l2_decay_equals_fp32(tmp_path):
    """With a loss whose gradient is zero, one step only applies the L2 term: fp16 (loss-scaled)
    must decay the weights exactly as fp32 does (L2 is added to the unscaled gradients)."""

    def zero_gradient(model, label_smoothing=0.0):
        def loss_fn(batch, training):
            logits = model(batch[0], training=training)
            return {"loss": 0.0 * tf.reduce_sum(tf.cast(logits, tf.float32), axis=-1), "logits": logits}

        return loss_fn

    cfg = dict(epochs=1, batch_size=64, momentum=0.0, schedule="constant", lr=0.5, weight_decay=0.01)
    decays = {}
    for mode, policy in (("none", "float32"), ("fp16", "mixed_float16")):
        keras.mixed_precision.set_global_policy(policy)
        try:
            strategy = make_strategy("one_device")
            with strategy.scope():
                model = _model()
            w0 = [v.numpy() for v in model.trainable_variables]
            _train(tmp_path / mode, _cfg(mixed_precision=mode, **cfg), model=model, loss=zero_gradient)
            decays[mode] = [w - v.numpy() for w, v in zip(w0, model.trainable_variables)]
        finally:
            keras.mixed_precision.set_global_policy("float32")
    assert np.abs(decays["none"][0]).max() > 1e-4  # the conv kernel decayed
    for fp32, fp16 in zip(decays["none"], decays["fp16"]):  # float32 weights under both policies
        assert_within_measured_bound(
            fp16,
            fp32,
            1e-6,
            "decay w0 - w1 rounds twice at float32 weights |w| < 1: "
            "<= 1.2e-7; a missing or loss-scaled decay moves it >= 1e-4",
        )


# ---- several replicas and workers (subprocesses: the device split precedes TF's start) ----------
def _worker(out, *args, env=None, wait=True):
    command = [sys.executable, WORKER, str(out), *map(str, args)]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _finish(proc):
    """(returncode, stderr) of a `_worker(..., wait=False)` process once it ends."""
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _weights_of(result):
    return {k[3:]: v for k, v in result.items() if k.startswith("w__")}


def _assert_close(a, b):
    """Two results' weights equal at float64 round-off (their workers ran with --float64)."""
    assert_all_identical(b, a)


def test_two_replicas_with_sync_bn_equal_one_device_and_without_it_replicas_agree(tmp_path):
    """A BN ResNet-20 on batches whose two halves have different statistics: with sync_bn, 2
    replicas train the same weights and BN statistics as 1 device; without it each replica
    normalises with its own half, but the moving statistics stay identical on both replicas."""
    args = ["--model", "resnet20", "--data", "noise", "--float64"]
    # The three runs at once: each is mostly single-threaded tracing, so on 2 cores this halves the wall time.
    procs = {
        name: _worker(tmp_path / f"{name}.npz", "--replicas", replicas, "--sync-bn", sync, *args, wait=False)
        for name, replicas, sync in (("one", 1, 1), ("sync", 2, 1), ("local", 2, 0))
    }
    results = {}
    for name, proc in procs.items():
        code, err = _finish(proc)
        assert code == 0, err[-3000:]
        results[name] = _load(tmp_path / f"{name}.npz")
    assert int(results["sync"]["replicas"]) == 2 and int(results["sync"]["step"]) == 4
    _assert_close(_weights_of(results["one"]), _weights_of(results["sync"]))
    # Evaluation of the untrained net on 360 test images in batches of 64 split over 2 replicas:
    # every image counted once (the padded rows are not), the same loss and accuracy.
    for name in ("sync", "local"):
        assert int(results[name]["eval_count"]) == int(results["one"]["eval_count"]) == 360
        for key in ("eval_loss", "eval_top1", "eval_top5"):
            assert_identical(results[name][key], results["one"][key], err_msg=key)
    local = results["local"]
    stats = [k for k in local if k.startswith("replica0__") and "moving_" in k]
    assert len(stats) == 2 * 19  # every BN layer of ResNet-20
    for k in stats:
        np.testing.assert_array_equal(local[k], local[k.replace("replica0__", "replica1__")], err_msg=k)
    # Per-replica statistics are a real difference (so the agreement above is not vacuous).
    assert not np.allclose(local["w__stem_bn/moving_mean"], results["sync"]["w__stem_bn/moving_mean"], atol=1e-4)


def test_fp16_overflow_on_one_replica_skips_the_step_on_every_replica(tmp_path):
    """An overflow in replica 1's gradients only: no replica applies the step, weights stay
    finite and equal across replicas, the loss scale halves and the step counter advances."""
    proc = _worker(tmp_path / "fp16.npz", "--replicas", 2, "--fp16-overflow", "--epochs", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = _load(tmp_path / "fp16.npz")
    steps = int(r["step"])
    assert steps > 1 and int(r["iterations"]) == steps
    assert float(r["loss_scale"]) == 2.0**15 / 2**steps
    for k in (k for k in r if k.startswith("init__")):
        np.testing.assert_array_equal(r["w__" + k[6:]], r[k], err_msg=k)
    for k in (k for k in r if k.startswith("replica0__")):
        assert np.isfinite(r[k]).all()
        np.testing.assert_array_equal(r[k], r[k.replace("replica0__", "replica1__")], err_msg=k)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_workers(tmp_path, tag, args_by_worker, run_dirs=None, beside=None):
    """Run two localhost MultiWorkerMirroredStrategy workers; returns their (returncode, stderr).
    `beside` (a started `_worker` process, e.g. the single-process reference) runs meanwhile and
    its outcome is appended."""
    ports = [_free_port(), _free_port()]
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(
                {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": i}}
            ),
        )
        run_dir = (run_dirs or [tmp_path / f"{tag}_run"] * 2)[i]
        procs.append(
            _worker(
                tmp_path / f"{tag}.npz", "--multi-worker", "--run-dir", run_dir, *args_by_worker[i], env=env, wait=False
            )
        )
    return [_finish(p) for p in procs + ([beside] if beside else [])]


def test_multi_worker_matches_single_process_and_shards_input_per_worker(tmp_path):
    """Two localhost workers end with identical weights equal to one process with the same
    global batch; only the chief writes outputs; each worker decodes half of the images."""
    single = _worker(tmp_path / "single.npz", "--replicas", 1, "--data", "noise", "--float64", wait=False)
    for code, err in _two_workers(tmp_path, "mw", [["--data", "noise", "--float64"]] * 2, beside=single):
        assert code == 0, err[-3000:]
    chief, worker = _load(tmp_path / "mw.npz"), _load(str(tmp_path / "mw.npz") + ".worker1.npz")
    assert not (tmp_path / "mw.npz.worker0.npz").exists()
    assert int(chief["replicas"]) == 2
    for k, v in _weights_of(chief).items():
        np.testing.assert_array_equal(v, worker["w__" + k], err_msg=k)
    _assert_close(_weights_of(_load(tmp_path / "single.npz")), _weights_of(chief))
    # Input sharding: on digits (real decode + augment), each worker maps half the images. With
    # per-worker BN statistics (sync_bn off) the workers still hold identical BN moving statistics.
    one = _worker(tmp_path / "count1.npz", "--replicas", 1, "--epochs", 1, wait=False)
    for code, err in _two_workers(tmp_path, "count", [["--epochs", 1, "--sync-bn", 0]] * 2, beside=one):
        assert code == 0, err[-3000:]
    total = int(_load(tmp_path / "count1.npz")["input_count"])
    assert total == int(_load(tmp_path / "count1.npz")["step"]) * 32
    chief, worker = _load(tmp_path / "count.npz"), _load(str(tmp_path / "count.npz") + ".worker1.npz")
    assert int(chief["input_count"]) == int(worker["input_count"]) == total // 2
    for k, v in _weights_of(chief).items():
        np.testing.assert_array_equal(v, worker["w__" + k], err_msg=k)


@pytest.mark.slow  # minutes on 2 cores: CI runs it with the slow suite
def test_sigterm_to_one_worker_stops_every_worker_at_the_same_step_and_resumes(tmp_path):
    """A real SIGTERM to worker 1 mid-epoch: both workers checkpoint at the same step and exit
    130; rerunning both ends with the weights of an uninterrupted run. A worker that cannot see
    the chief's checkpoints fails with a clear error on every worker instead of hanging."""
    args = ["--data", "noise", "--epochs", 3, "--steps-per-loop", 1, "--float64"]
    single = _worker(tmp_path / "single.npz", "--replicas", 1, *args)
    assert single.returncode == 0, single.stderr[-3000:]
    stopped = _two_workers(tmp_path, "pre", [args, args + ["--kill-at", 3]])
    assert [code for code, _ in stopped] == [130, 130], [err[-2000:] for _, err in stopped]
    assert "stopped by another worker's signal at step 3" in stopped[0][1]
    assert "stopped by signal 15 at step 3" in stopped[1][1]
    assert tf.train.latest_checkpoint(str(tmp_path / "pre_run" / "checkpoints" / "train")).endswith("ckpt-3")
    lost = _two_workers(tmp_path, "lost", [args, args], run_dirs=[tmp_path / "pre_run", tmp_path / "elsewhere"])
    for code, err in lost:
        assert code != 0 and "workers restored different steps" in err, err[-2000:]
    for code, err in _two_workers(tmp_path, "pre", [args, args]):
        assert code == 0, err[-3000:]
    resumed = _load(tmp_path / "pre.npz")
    assert int(resumed["step"]) == 6
    _assert_close(_weights_of(_load(tmp_path / "single.npz")), _weights_of(resumed))
