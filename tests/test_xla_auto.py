"""`train.jit_compile: auto` on CPUs: measured, cached per model signature and machine, reported in
the set-up line, and without any effect on the training beyond the XLA setting it chooses."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json

import keras
import numpy as np
import pytest

from ke_tf.config import TrainConfig
from ke_tf.data.stream import TensorData
from ke_tf.engine import Trainer, make_strategy, xla_choice
from ke_tf.losses import classifier_loss
from tests.numerics import float64


def _data(n=64):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8, 8, 3)).astype("float32"), rng.integers(0, 5, size=n).astype("int32")


def _model(width=4):
    """Conv + BN (moving statistics) + Dropout (a seed generator): every kind of state a trial
    step could leave changed."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(width, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x))


def _cfg(**kw):
    base = dict(epochs=2, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-3, progress=False, steps_per_loop=2)
    return TrainConfig(**{**base, **kw})


def _trainer(tmp_path, cfg, width=4):
    strategy = make_strategy("one_device")
    with strategy.scope():
        model = _model(width)
    x, _ = _data()
    return Trainer(cfg, strategy, model, classifier_loss(model), len(x) // cfg.batch_size, str(tmp_path))


def _fit(trainer):
    trainer.fit(TensorData(*_data()), seed=0)
    return trainer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder, and measurement however short the stage."""
    monkeypatch.setenv(xla_choice.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(xla_choice, "MEASURE_MIN_SECONDS", 0.0)
    return tmp_path / "cache" / xla_choice.CACHE_FILE


def _rigged(monkeypatch, xla_wins):
    """Trial timings that make XLA win or lose (the trial steps themselves still run)."""
    run = xla_choice._Trial.seconds_per_step

    def timed(trial, loop, steps):
        run(trial, loop, steps)
        return 1.0 if (loop.replica_step.jit != "off") == xla_wins else 2.0

    monkeypatch.setattr(xla_choice._Trial, "seconds_per_step", timed)


def test_decision_is_cached_and_reused_with_its_log_line(tmp_path, cache, monkeypatch, capsys):
    _rigged(monkeypatch, xla_wins=True)
    first = _fit(_trainer(tmp_path / "a", _cfg(progress=True)))
    assert first.jit == "step"
    assert first.xla_note == f"measured 2.00x faster on {xla_choice.describe(xla_choice.machine())}"
    assert "XLA auto: whole step (measured 2.00x faster on " in capsys.readouterr().out
    (entry,) = json.loads(cache.read_text())["decisions"].values()
    assert entry["xla_seconds_per_step"] == 1.0 and entry["off_seconds_per_step"] == 2.0
    assert entry["compile_seconds"] == 0.0  # warm-up call (rigged 1 s) less one step: the short stage repays it
    trials = []
    monkeypatch.setattr(xla_choice._Trial, "seconds_per_step", lambda *a: trials.append(a))
    second = _fit(_trainer(tmp_path / "b", _cfg(progress=True)))
    assert trials == []  # not measured again
    assert second.jit == "step" and second.xla_note.startswith("cached: 2.00x faster on ")
    assert "XLA auto: whole step (cached: 2.00x faster on " in capsys.readouterr().out


def test_cached_speedup_that_cannot_repay_the_compile_keeps_xla_off(tmp_path, cache):
    trainer = _trainer(tmp_path, _cfg())
    parts = (trainer.model, trainer.variables, trainer.loss_fn, trainer.train_cfg, 1, False)
    key = xla_choice.signature(*parts, "step", xla_choice.machine())
    timings = {"off_seconds_per_step": 2.0, "xla_seconds_per_step": 1.0, "compile_seconds": 1e6}
    xla_choice.store(str(cache), key, {**timings, "cpu": "a CPU"})
    _fit(trainer)
    assert trainer.jit == "off"
    assert trainer.xla_note == "cached: XLA 2.00x faster on a CPU, but 8 steps would not repay its 1000000 s compile"


def test_short_stage_is_not_measured(tmp_path, monkeypatch):
    """Short by its MACs: no trial step at all; short by a trial's timing: no XLA compile."""
    monkeypatch.setenv(xla_choice.CACHE_ENV, str(tmp_path / "cache"))
    trials = []
    run = xla_choice._Trial.seconds_per_step
    monkeypatch.setattr(xla_choice._Trial, "seconds_per_step", lambda *a: trials.append(a) or run(*a))
    trainer = _fit(_trainer(tmp_path / "run", _cfg()))
    assert trainer.jit == "off" and trainer.xla_note.endswith("by its MACs: too short to measure it")
    assert trials == []
    monkeypatch.setattr(xla_choice, "ASSUMED_TRAIN_FLOPS", 1.0)  # estimated long: the trial times it
    trainer = _fit(_trainer(tmp_path / "run2", _cfg()))
    assert trainer.jit == "off" and trainer.xla_note.endswith("s without XLA: too short to measure it")
    assert len(trials) == 2  # the traced step and one timed round without XLA, no XLA loop
    assert not (tmp_path / "cache").exists()


def test_cache_key_follows_the_model_signature(tmp_path):
    mach = xla_choice.machine()

    def key(width=4, batch=16, flags=None):
        trainer = _trainer(tmp_path, _cfg(batch_size=batch), width)
        parts = (trainer.model, trainer.variables, trainer.loss_fn, trainer.train_cfg, 1, False)
        return xla_choice.signature(*parts, "step", {**mach, "flags": flags or mach["flags"]})

    base = key()
    assert key() == base
    with float64():
        changed = [key()]
    changed += [key(width=6), key(batch=32), key(flags=["avx512f"])]
    assert len({base, *changed}) == 5


def test_corrupt_cache_is_ignored_with_one_warning(tmp_path, capsys):
    path = str(tmp_path / "xla_auto.json")
    for text in ("{not json", json.dumps({"version": 1, "decisions": {"k": {"cpu": "x"}}})):
        with open(path, "w") as f:
            f.write(text)
        xla_choice._warned.clear()
        assert xla_choice.load(path) == {} and xla_choice.load(path) == {}
        assert capsys.readouterr().err.count("warning: ignoring the XLA auto cache") == 1
    timings = dict.fromkeys(xla_choice.TIMINGS, 1.0)
    xla_choice.store(path, "k", timings)  # rewritten whole
    assert xla_choice.load(path) == {"k": timings}


def test_workers_take_the_chiefs_cached_decision(tmp_path, monkeypatch):
    """A worker whose own cache is empty follows the chief's (a cluster mean above 0), unmeasured."""
    monkeypatch.setenv(xla_choice.CACHE_ENV, str(tmp_path / "cache"))
    use, loop, _ = xla_choice.choose("gradients", None, None, None, None, 10, False, lambda v: 0.5)
    assert use and loop is None


@pytest.mark.parametrize("xla_wins", [True, False])
def test_measured_run_equals_the_run_with_the_choice_forced(tmp_path, cache, monkeypatch, xla_wins):
    _rigged(monkeypatch, xla_wins)
    with float64():
        auto = _fit(_trainer(tmp_path / "auto", _cfg()))
        assert auto.jit == ("step" if xla_wins else "off") and auto.xla_note.startswith("measured")
        forced = _fit(_trainer(tmp_path / "forced", _cfg(jit_compile="on" if xla_wins else "off")))
    for a, b in zip(auto.model.variables, forced.model.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for a, b in zip(auto.optimizer.variables, forced.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
