"""ReduceNet: the student (the teacher minus its bottleneck branch) that inherits the teacher's
weights and is distilled beats the same student trained from scratch by CE for the same epochs;
after its annealed ReLU reaches identity the student fuses into a plain net with the same logits.

One two-branch teacher (seed 0) is shared; per seed both students get the same data order and the
same annealing schedule; the control is `distillation.student_init=scratch, alpha=0`.
"""

import os

import numpy as np

from benchmarks.claims import Claim, Comparison
from benchmarks.claims.common import claims_dataset, data_overrides, data_setting, dataset_config, run

TEACHER_EPOCHS, STUDENT_EPOCHS = 8, 4
COMMON = ("data.image_size=16", f"train.epochs={STUDENT_EPOCHS}", f"distillation.teacher_epochs={TEACHER_EPOCHS}")


def _run(run_dir, seed, *overrides):
    return run(dataset_config("reduce20_reducenet"), run_dir, seed, *data_overrides(), *COMMON, *overrides)


def prepare(workdir):
    summary = _run(workdir, 0)
    return {"teacher_params": os.path.join(workdir, "teacher_params.pkl"), "teacher_top1": summary["teacher_top1"]}


def fused_gap(summary):
    """Largest |student - deploy| logit on the test split, relative to the largest student logit."""
    from ke_tf.data import load_data
    from ke_tf.io.params import apply_params, load_params
    from ke_tf.models import build_from_spec

    x = np.concatenate([x for x, _ in load_data(claims_dataset(), image_size=16).test(256)])
    logits = []
    for key in ("student_params_file", "deploy_params_file"):
        arrays, meta = load_params(summary[key])
        model = build_from_spec(meta["model"])
        apply_params(model, arrays)
        logits.append(np.asarray(model(x, training=False)))
    return float(np.abs(logits[0] - logits[1]).max() / np.abs(logits[0]).max())


def run_seed(seed, workdir, context):
    teacher = f"distillation.teacher_params={context['teacher_params']}"
    distilled = _run(os.path.join(workdir, "distilled"), seed, teacher)
    scratch = _run(
        os.path.join(workdir, "scratch"), seed, teacher, "distillation.student_init=scratch", "distillation.alpha=0.0"
    )
    return {
        "distilled": {
            "top1": distilled["student_top1"],
            "deploy_top1": distilled["deploy_top1"],
            "fused_gap": fused_gap(distilled),
        },
        "scratch": {
            "top1": scratch["student_top1"],
            "deploy_top1": scratch["deploy_top1"],
            "fused_gap": fused_gap(scratch),
        },
        "teacher": {"top1": context["teacher_top1"], "deploy_top1": float("nan"), "fused_gap": 0.0},
    }


def fused_equals_unfused(per_seed):
    gap = max(r[arm]["fused_gap"] for r in per_seed.values() for arm in ("distilled", "scratch"))
    return {
        "name": "fused == unfused after annealing",
        "holds": gap < 1e-4,
        "detail": f"largest relative logit gap {gap:.1e} (tolerance 1e-4)",
    }


CLAIM = Claim(
    name="reducenet",
    title="ReduceNet",
    setting=lambda: (
        f"{data_setting()}, ReduceNet-20 (width 0.5) teacher with the bottleneck branch "
        "(trained once, seed 0); student = teacher minus that branch plus a 1x1 branch behind an annealed ReLU, "
        "KD alpha 0.7, T 5; "
        "control: the same student from scratch by CE (alpha 0), same annealing."
    ),
    budget=f"teacher {TEACHER_EPOCHS} epochs (shared), each student {STUDENT_EPOCHS} epochs.",
    arms=("distilled", "scratch", "teacher"),
    comparisons=(
        Comparison("distilled", "scratch", "top1", "the inheriting, distilled student beats the student from scratch"),
    ),
    run_seed=run_seed,
    prepare=prepare,
    extra_checks=(fused_equals_unfused,),
    seeds=5,
)
