"""Resume that survives damage: a damaged newest checkpoint is skipped, checkpoints of another
model or config are refused until `train.resume: restart`, in one process and on two workers."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import re

import pytest
from test_engine import _cfg, _load, _model, _train, _two_workers, _weights, _weights_of

from ke_tf.config import ConfigError
from ke_tf.data.stream import TensorData
from ke_tf.engine.checkpoints import CheckpointError
from tests.numerics import assert_all_identical, float64


@pytest.fixture
def resume_points(monkeypatch):
    """The (epoch, step within it) every training stream starts at: where a run resumed."""
    starts = []
    stream = TensorData.stream

    def spy(self, batch_size, seed, first_epoch, last_epoch, skip_steps=0, shard=None):
        starts.append((first_epoch, skip_steps))
        return stream(self, batch_size, seed, first_epoch, last_epoch, skip_steps, shard)

    monkeypatch.setattr(TensorData, "stream", spy)
    return starts


def _damage(folder, step):
    """Truncate checkpoint `step`'s data file to half its size (an interrupted copy, a full disk)."""
    data = folder / f"ckpt-{step}.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)


def test_resume_skips_a_damaged_checkpoint_and_fails_clearly_when_none_restores(tmp_path, resume_points, capsys):
    cfg = _cfg(epochs=2)  # 4 steps per epoch: checkpoints 4 and 8
    folder = tmp_path / "checkpoints" / "train"
    with float64():
        full, _ = _train(tmp_path, cfg, model=lambda: _model(bn=True))
        _damage(folder, 8)
        resumed, trainer = _train(tmp_path, cfg, model=lambda: _model(bn=True, seed=5))
    assert resume_points == [(0, 0), (1, 0)] and trainer.step == 8  # resumed from step 4, not 0
    assert_all_identical(_weights(resumed), _weights(full))
    warning = [line for line in capsys.readouterr().err.splitlines() if "cannot be restored" in line]
    assert warning == [
        f"warning: checkpoint {folder / 'ckpt-8'} cannot be restored "
        "(IndexError: Read less bytes than requested); trying an older one"
    ]
    _damage(folder, 4)
    _damage(folder, 8)
    with pytest.raises(
        CheckpointError,
        match=f"no checkpoint in {re.escape(str(folder))} can be restored "
        r"\(ckpt-8: .*; ckpt-4: .*\): .*train.resume=restart",
    ) as failure:
        with float64():
            _train(tmp_path, cfg, model=lambda: _model(bn=True))
    assert isinstance(failure.value, ConfigError)  # the CLI's one `error:` line, exit status 2


def test_checkpoints_of_another_model_or_config_are_refused_until_restart(tmp_path, resume_points):
    _train(tmp_path, _cfg(epochs=1), model=lambda: _model(bn=False))
    folder = tmp_path / "checkpoints" / "train"
    with pytest.raises(
        CheckpointError,
        match=rf"checkpoints in {re.escape(str(folder))} were made from another "
        r"model or config: 4 model variable\(s\) only in this model \(bn/gamma, "
        r"bn/beta, bn/moving_mean, \.\.\.\)\. To train this one, use another "
        r"run_dir, or --set train.resume=restart",
    ):
        _train(tmp_path, _cfg(epochs=1), model=lambda: _model(bn=True))
    with pytest.raises(CheckpointError, match="train.batch_size 16 there, 32 here; steps per epoch 4 there, 2 here"):
        _train(tmp_path, _cfg(epochs=1, batch_size=32))
    assert resume_points == [(0, 0)]  # the refused runs trained nothing
    with float64():
        restarted, _ = _train(tmp_path, _cfg(epochs=1, resume="restart"), model=lambda: _model(bn=True))
        fresh, _ = _train(tmp_path / "fresh", _cfg(epochs=1), model=lambda: _model(bn=True))
    assert_all_identical(_weights(restarted), _weights(fresh))
    assert "bn/gamma" in json.loads((folder / "made_from.json").read_text())["variables"]
    # Checkpoints written before records existed resume as they always did.
    with pytest.raises(CheckpointError, match=r"variable dtypes \['float64'\] there, \['float32'\] here"):
        _train(tmp_path, _cfg(epochs=2), model=lambda: _model(bn=True))
    (folder / "made_from.json").unlink()
    with float64():
        _, trainer = _train(tmp_path, _cfg(epochs=2), model=lambda: _model(bn=True))
    assert resume_points[-1] == (1, 0) and trainer.step == 8


@pytest.mark.slow  # minutes on 2 cores: CI runs it with the slow suite
def test_two_workers_skip_a_damaged_checkpoint_and_both_refuse_another_model(tmp_path):
    """Both workers resume from the chief's newest checkpoint that restores (the damaged newest
    one skipped) and end with the weights of the uninterrupted run; checkpoints of another model
    are refused on both workers, neither left waiting for the other."""
    args = ["--epochs", 2, "--sync-bn", 0, "--float64"]  # digits: 9 steps of 32 per epoch, checkpoints 9 and 18
    for code, err in _two_workers(tmp_path, "full", [args, args]):
        assert code == 0, err[-3000:]
    full = _load(tmp_path / "full.npz")
    run_dirs = [tmp_path / "full_run"] * 2
    folder = run_dirs[0] / "checkpoints" / "train"
    _damage(folder, 18)
    for code, err in _two_workers(tmp_path, "resumed", [args, args], run_dirs=run_dirs):
        assert code == 0 and f"checkpoint {folder / 'ckpt-18'} cannot be restored" in err, err[-3000:]
    chief, worker = _load(tmp_path / "resumed.npz"), _load(str(tmp_path / "resumed.npz") + ".worker1.npz")
    # Each worker decoded its half of one epoch only: the run resumed at step 9, not 0.
    assert int(chief["input_count"]) == int(worker["input_count"]) == int(full["input_count"]) // 2
    assert int(chief["step"]) == 18
    assert_all_identical(_weights_of(chief), _weights_of(full))
    assert_all_identical(_weights_of(worker), _weights_of(full))
    for code, err in _two_workers(tmp_path, "other", [args + ["--model", "resnet20"]] * 2, run_dirs=run_dirs):
        assert code != 0 and "were made from another model or config" in err and "train.resume=restart" in err, err[
            -3000:
        ]
