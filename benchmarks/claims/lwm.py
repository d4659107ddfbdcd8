"""LwM (Dhar et al., CVPR 2019): adding Grad-CAM attention distillation (L_AD) to LwF's
distillation keeps more of the old classes than LwF alone, and both beat fine-tuning.

Per seed (the seed of the class order, of the base model and of every arm): digits 5 + 5
(one incremental step, no exemplars), one base model shared by the three arms, each arm trained
on the new classes only, evaluated class-incrementally (argmax over all 10 outputs) on the test
split. LwF is LwM with gamma = 0 (same beta, T); fine-tuning is CE only.
"""

import json
import os

from benchmarks.claims import Claim, Comparison
from benchmarks.claims.common import data_overrides, data_setting, dataset_config

ARMS = ("lwm", "lwf", "finetune")
# The protocol of the claim on top of the quickstart config (kept there: beta = gamma = 1, T = 2,
# CE over all seen outputs, Grad-CAM at the last block, SGD lr 1e-3, 6 epochs per task).
OVERRIDES = ("train.progress=false", "incremental.gradcam_images=0", f"incremental.compare=[{', '.join(ARMS)}]")


def run_seed(seed, workdir, context):
    """Train the three arms from one base model; per arm the last task's class-incremental
    accuracy on all, old and new classes, and the forgetting of the base task (with one step:
    base-task accuracy after the base task minus old_acc)."""
    from ke_tf.cli import train_main

    overrides = [f"run_dir={workdir}", f"seed={seed}", f"incremental.order_seed={seed}", *data_overrides(), *OVERRIDES]
    train_main(dataset_config("resnet20_lwm"), __doc__)([a for o in overrides for a in ("--set", o)])
    with open(os.path.join(workdir, "comparison.json")) as f:
        rows = json.load(f)["rows"]
    last = {r["variant"]: r for r in rows if r["task"] == max(r["task"] for r in rows)}
    return {
        arm: {
            "final_acc": last[arm]["acc_seen"],
            "old_acc": last[arm]["acc_old"],
            "new_acc": last[arm]["acc_new"],
            "forgetting": last[arm]["forgetting"],
        }
        for arm in ARMS
    }


CLAIM = Claim(
    name="lwm",
    title="LwM",
    setting=lambda: (
        f"{data_setting()}, 5 base + 5 new classes (class order = seed), ResNet-20 x0.5, no exemplars; "
        "beta = gamma = 1, T = 2 (LwF's L_D, no T^2), Grad-CAM of the teacher's top old class at the last block."
    ),
    budget="base 8 epochs SGD lr 0.05; incremental task 6 epochs SGD lr 1e-3 cosine, same for every arm.",
    arms=ARMS,
    comparisons=(
        Comparison(
            "lwm", "lwf", "final_acc", "LwM's L_AD adds to LwF's distillation on all seen classes (the paper's claim)"
        ),
        Comparison("lwm", "finetune", "final_acc", "LwM beats fine-tuning on all seen classes"),
        Comparison("lwm", "lwf", "forgetting", "L_AD makes LwF forget less of the base task", lower_is_better=True),
        Comparison(
            "lwm", "finetune", "forgetting", "LwM forgets less of the base task than fine-tuning", lower_is_better=True
        ),
        Comparison(
            "lwf",
            "finetune",
            "forgetting",
            "LwF's distillation alone forgets less than fine-tuning",
            lower_is_better=True,
        ),
    ),
    run_seed=run_seed,
)
