"""Benchmarks: `--quick` runs the in-process sections end to end and writes valid results JSON
(timings themselves are not asserted: they depend on the machine and its load)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import accumulation
from benchmarks.claims import run_claim
from benchmarks.run import SECTIONS, markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"name", "section", "value", "values", "unit", "ratio", "target", "met", "device", "notes"}


# Sections that time fresh TensorFlow processes (about 4 of the quick run's 5.5 minutes on 2 cores):
# left out of CI's smoke run for its 90-minute budget; `benchmarks/run.py --quick` runs them all.
PROCESS_SECTIONS = ("host_sync", "host_memory", "scaling")
IN_PROCESS = [name for name in SECTIONS if name not in PROCESS_SECTIONS]


@pytest.mark.slow  # minutes on 2 cores: CI runs it with the slow suite
def test_quick_run_writes_valid_sections(tmp_path):
    out = tmp_path / "results.json"
    only = [arg for name in IN_PROCESS for arg in ("--only", name)]
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", *only, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["benchmarks"]
    assert {r["section"] for r in rows} == set(IN_PROCESS)
    failed = [r["notes"] for r in rows if r["name"].endswith("failed")]
    assert not failed, failed
    for r in rows:
        assert KEYS <= set(r), r
        assert r["met"] in (True, False, None)
        assert isinstance(r["value"], (int, float)) and np.isfinite(r["value"]), r
        assert r["device"]["tensorflow"] and r["device"]["cores"] >= 1
    accum = next(r for r in rows if r["section"] == "accumulation")
    assert accum["values"]["weights_allclose"] is True
    assert markdown(rows).count("\n") == len(rows) + 1 and rows[0]["name"] in proc.stdout


def test_update_relative_difference():
    w0, w1 = np.zeros(3), np.array([3.0, 4.0, 0.0])
    assert accumulation.update_relative_difference([w0, w1], [w0, w1 + [0.0, 0.0, 0.05]]) == 0.01


def test_claim_verdict_is_the_paired_lower_bound():
    """Paired differences over seeds; the claim holds when mean - t(0.95, n-1) * sd / sqrt(n) > 0."""
    from benchmarks.claims import Comparison, paired_verdict

    per_seed = {
        0: {"a": {"acc": 0.50, "loss": 1.0}, "b": {"acc": 0.30, "loss": 1.2}},
        1: {"a": {"acc": 0.60, "loss": 1.0}, "b": {"acc": 0.35, "loss": 0.9}},
        2: {"a": {"acc": 0.55, "loss": 1.0}, "b": {"acc": 0.36, "loss": 1.3}},
    }
    v = paired_verdict(Comparison("a", "b", "acc", ""), per_seed)
    diffs = np.array([0.20, 0.25, 0.19])
    assert v["diffs"] == pytest.approx(diffs)
    assert v["lower_bound"] == pytest.approx(diffs.mean() - 2.920 * diffs.std(ddof=1) / np.sqrt(3))
    assert v["holds"] and v["seeds_won"] == 3
    # lower is better: differences are b - a; 0.2, -0.1, 0.3 have too much spread to hold
    v = paired_verdict(Comparison("a", "b", "loss", "", lower_is_better=True), per_seed)
    assert v["diffs"] == pytest.approx([0.2, -0.1, 0.3]) and v["seeds_won"] == 2 and not v["holds"]


@pytest.mark.parametrize("data", ["digits", "fashion_mnist"])
def test_readme_claims_table_is_generated_from_the_committed_json(data):
    """The README's "Claims reproduced" tables are exactly what `python -m benchmarks.claims
    --table [--data fashion_mnist]` renders from benchmarks/claims.json and claims_fashion_mnist.json."""
    from benchmarks.claims.__main__ import default_out
    from benchmarks.claims.table import claims_table

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(default_out(data)) as f:
        table = claims_table(json.load(f))
    with open(os.path.join(root, "README.md")) as f:
        assert table in f.read()


@pytest.mark.parametrize(
    "name,arms,trained,comparisons",
    [
        ("ke", ("KE", "no re-init"), ["ke", "no_reinit"], ["KE vs no re-init (slim_top1)"]),
        ("ekg", ("EKG", "random", "dense"), ["ekg", "random"], ["EKG vs random (top1)", "EKG vs random (holdout_ce)"]),
    ],
)
def test_claim_with_a_subset_of_arms_trains_and_judges_only_those(
    tmp_path, monkeypatch, name, arms, trained, comparisons
):
    """The slow tests ask for the arms they assert: the others are never trained nor judged."""
    import importlib

    module = importlib.import_module(f"benchmarks.claims.{name}")
    runs = []

    def fake_run(config, run_dir, seed, *overrides):
        runs.append(os.path.basename(run_dir))
        good = os.path.basename(run_dir) in ("ke", "ekg")
        top1 = 0.9 if good else 0.1 + 0.01 * seed
        return {
            "slim_top1": top1,
            "slim_top1_first": 0.1,
            "dense_top1": 0.95,
            "dense_top1_first": 0.9,
            "slim_macs": 1,
            "test_top1": top1,
            "macs": 1,
            "dense_test_top1": 0.95,
            "search_holdout_ce": 0.3 if good else 2.0 + 0.1 * seed,
            "macs_reduction": 0.6,
        }

    monkeypatch.setattr(module, "run", fake_run)
    result = run_claim(name, str(tmp_path), seeds=range(3), arms=arms)
    assert sorted(set(runs) - {"shared"}) == trained and runs.count(trained[0]) == 3
    assert [v["comparison"] for v in result["verdicts"]] == comparisons
    assert result["holds"] and set(result["arms"]) == set(arms)


def test_claims_run_on_the_dataset_asked_for(monkeypatch, tmp_path):
    """`--data fashion_mnist` (KE_TF_CLAIMS_DATA): the claims describe, configure and load
    Fashion-MNIST (the data-poor subset checked on the real files when installed), the results go
    to their own JSON; an unknown dataset fails before any training."""
    from benchmarks.claims import load_claim
    from benchmarks.claims.__main__ import default_out
    from benchmarks.claims.common import data_overrides, data_poor, dataset_config
    from ke_tf.data import fashion_mnist

    monkeypatch.setenv("KE_TF_CLAIMS_DATA", "fashion_mnist")
    assert load_claim("ke").describe().startswith("Fashion-MNIST 16x16 (150 training images per class")
    assert dataset_config("resnet20_ke") == "fashion_mnist_resnet20_ke"
    assert data_overrides() == ("data.image_size=16", "data.train_per_class=150")
    assert load_claim("kd").describe().startswith("Data-poor Fashion-MNIST (500 training images, 50 per class")
    assert os.path.basename(default_out("fashion_mnist")) == "claims_fashion_mnist.json"
    if os.path.isdir(fashion_mnist.DEBIAN_DIR):
        data = data_poor()
        assert (data.info.train_size, data.info.test_size) == (500, 10000)
        assert np.all(np.bincount(data.train_labels, minlength=10) == 50)
    monkeypatch.setenv("KE_TF_CLAIMS_DATA", "cifar10")
    with pytest.raises(ValueError, match="KE_TF_CLAIMS_DATA='cifar10'"):
        run_claim("kd", str(tmp_path))
