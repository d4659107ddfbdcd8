"""Benchmarks: `--quick` runs every section end to end and writes valid results JSON (timings
themselves are not asserted: they depend on the machine and its load)."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import subprocess
import sys

import numpy as np

from benchmarks import accumulation
from benchmarks.run import SECTIONS, markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"name", "section", "value", "values", "unit", "ratio", "target", "met", "device", "notes"}


def test_quick_run_writes_all_sections(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["benchmarks"]
    assert {r["section"] for r in rows} == set(SECTIONS)
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
