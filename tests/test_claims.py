"""Learning claims (slow): each method against its proper control over its seeds (3, or 5 for a
cheap, noisy claim), through the same code as `python -m benchmarks.claims`. A comparison passes
when the one-sided 95% lower bound of its mean paired difference is above zero (the margin is the
seed spread, not a number tuned on one machine). Comparisons the README table reports as not
holding are not asserted here. EKG's search against random pruning is asserted on a trained
MobileNetV2 through `ke_tf.prune` (tests/test_prune.py; the same GreedySearch), not again on the
ResNet-20 claim here: CI's 90 minutes. `python -m benchmarks.claims` reports every claim's table."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from benchmarks.claims import run_claim

pytestmark = pytest.mark.slow


def assert_holds(result, *comparisons, checks=()):
    """Each named comparison (and check) of `result` holds; the message shows the paired numbers."""
    verdicts = {v["comparison"]: v for v in result["verdicts"]}
    for name in comparisons:
        v = verdicts[name]
        assert v["holds"], (
            f"{result['claim']}: {name}: paired diffs {[round(d, 4) for d in v['diffs']]}, "
            f"mean {v['mean_diff']:+.4f}, 95% lower bound {v['lower_bound']:+.4f}"
        )
    found = {c["name"]: c for c in result["checks"]}
    for name in checks:
        assert found[name]["holds"], f"{result['claim']}: {name}: {found[name]['detail']}"


def test_ke_reinitialising_the_reset_hypothesis_makes_the_slim_net_work(tmp_path):
    # The slim-from-scratch arm is reported by `python -m benchmarks.claims`, not asserted: not trained here.
    assert_holds(run_claim("ke", str(tmp_path), arms=("KE", "no re-init")), "KE vs no re-init (slim_top1)")


def test_kd_student_follows_the_teacher_more_than_the_ce_student(tmp_path):
    # KD vs CE on top-1 holds with default oneDNN (lower bound +1.9 points over 5 seeds) but not
    # with TF_ENABLE_ONEDNN_OPTS=0 (-0.7): reported in the README, not asserted.
    assert_holds(run_claim("kd", str(tmp_path)), "KD vs CE (teacher_agreement)")


def test_ban_ensemble_beats_its_last_generation(tmp_path):
    # The last generation against generation 0 holds with default oneDNN only: not asserted.
    assert_holds(run_claim("ban", str(tmp_path)), "ensemble vs last generation (top1)")


def test_reducenet_inheriting_student_beats_scratch_and_fuses_exactly(tmp_path):
    assert_holds(
        run_claim("reducenet", str(tmp_path)),
        "distilled vs scratch (top1)",
        checks=("fused == unfused after annealing",),
    )
