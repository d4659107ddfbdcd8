"""Faults and clusters: SIGKILL/SIGTERM mid-run, multi-worker CLI runs, memory of the demo."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import glob
import json
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "digits_resnet20_supervised.yaml")


def _command(run_dir, *extra):
    return [
        sys.executable,
        os.path.join(ROOT, "train_cifar.py"),
        "--config",
        QUICK,
        "--set",
        f"run_dir={run_dir}",
        "--set",
        "data.image_size=16",
        "--set",
        "train.epochs=2",
        "--set",
        "train.batch_size=128",
        "--set",
        "train.progress=false",
        *extra,
    ]


def _env(**extra):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _wait_for(pattern, proc, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        if glob.glob(pattern):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def _summary(run_dir):
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)["summary"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_same_command_finishes_identically(tmp_path):
    every = ["--set", "train.checkpoint_every_steps=3"]
    reference = subprocess.run(
        _command(tmp_path / "ref", *every), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(killed_dir, *every), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # 11 steps per epoch: step 6 is in the middle of the first epoch.
    assert _wait_for(str(killed_dir / "checkpoints" / "train" / "ckpt-6.index"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed_dir / "trained_params.pkl").exists()
    resumed = subprocess.run(_command(killed_dir, *every), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, res = _summary(tmp_path / "ref"), _summary(killed_dir)
    assert res["test_top1"] == pytest.approx(ref["test_top1"], abs=1e-9)
    assert res["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-4)


def test_sigterm_stops_cleanly_with_a_checkpoint(tmp_path):
    proc = subprocess.Popen(
        _command(tmp_path, "--set", "train.epochs=20"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for(str(tmp_path / "train_history.json"), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "stopped by signal" in err and "checkpoint saved" in err
    assert glob.glob(str(tmp_path / "checkpoints" / "train" / "ckpt-*.index"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_cli_run_only_chief_writes(tmp_path):
    ports = [_free_port(), _free_port()]
    procs = []
    for i in range(2):
        tf_config = json.dumps(
            {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": i}}
        )
        run_dir = tmp_path / f"w{i}"  # separate dirs make "who wrote what" observable
        procs.append(
            subprocess.Popen(
                _command(run_dir, "--set", "train.epochs=1"),
                env=_env(TF_CONFIG=tf_config),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert (tmp_path / "w0" / "trained_params.pkl").exists()
    assert (tmp_path / "w0" / "results.json").exists()
    assert not (tmp_path / "w1" / "trained_params.pkl").exists()
    assert not (tmp_path / "w1" / "results.json").exists()
    assert not (tmp_path / "w1" / "checkpoints").exists()


@pytest.mark.slow
def test_demo_run_stays_under_4gb(tmp_path):
    script = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *_command(tmp_path, "--set", "train.epochs=1", "--set", "data.image_size=32")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_kb = int(proc.stdout.strip().splitlines()[-1])
    assert peak_kb < 4 * 1024 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
