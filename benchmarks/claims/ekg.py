"""EKG filter pruning: its sub-network search loses less than L1-norm pruning and random pruning
at the same MACs, with the same fine-tuning.

One dense ResNet-20 (seed 0) is shared; every arm searches on the same holdout (fixed
`ekg.holdout_seed`), reaches the same MACs target and gets the same plain fine-tuning (no
memory-bank distillation for any arm, so only the search differs). Seeds vary the fine-tuning
order and the random arm's choices.
"""

import os

from benchmarks.claims import Claim, Comparison
from benchmarks.claims.common import data_overrides, data_setting, dataset_config, run

FINETUNE_EPOCHS = 2
COMMON = (
    "ekg.reduction_rate=0.6",
    f"train.epochs={FINETUNE_EPOCHS}",
    "train.decay_epochs=[]",
    "ekg.distill=false",
    "ekg.holdout_per_class=16",
)


SEARCHES = (("ekg", "EKG"), ("l1", "L1-norm"), ("random", "random"))  # ekg.criterion, arm
ARMS = ("EKG", "L1-norm", "random", "dense")


def _run(run_dir, seed, *overrides):
    return run(dataset_config("resnet20_ekg"), run_dir, seed, *data_overrides(), *COMMON, *overrides)


def prepare(workdir):
    summary = _run(workdir, 0)
    return {"dense": os.path.join(workdir, "dense_params.pkl"), "dense_top1": summary["dense_test_top1"]}


def run_seed(seed, workdir, context, arms=ARMS):
    """The searched `arms` of one seed (each run seeded alike, so leaving one out changes no other)."""
    result = {}
    for criterion, arm in SEARCHES:
        if arm not in arms:
            continue
        summary = _run(
            os.path.join(workdir, criterion),
            seed,
            f"ekg.criterion={criterion}",
            f"ekg.trained_param={context['dense']}",
        )
        result[arm] = {
            "top1": summary["test_top1"],
            "holdout_ce": summary["search_holdout_ce"],
            "macs_reduction": summary["macs_reduction"],
        }
    result["dense"] = {"top1": context["dense_top1"], "holdout_ce": float("nan"), "macs_reduction": 0.0}
    return result


def same_macs(per_seed):
    reductions = [r[arm]["macs_reduction"] for r in per_seed.values() for _, arm in SEARCHES if arm in r]
    return {
        "name": "same MACs for every arm",
        "holds": min(reductions) >= 0.6 and max(reductions) < 0.62,
        "detail": f"MACs removed {min(reductions):.3f} .. {max(reductions):.3f} (target 0.6)",
    }


CLAIM = Claim(
    name="ekg",
    title="EKG pruning",
    setting=lambda: (
        f"{data_setting()}, ResNet-20 (1x1 shortcuts) pre-trained 10 epochs once (seed 0); 60% of the MACs "
        "removed by each search on the same 160-image holdout; plain fine-tuning (no memory bank) for all."
    ),
    budget=f"search to the MACs target, then {FINETUNE_EPOCHS} fine-tuning epochs per arm.",
    arms=ARMS,
    comparisons=(
        Comparison("EKG", "random", "top1", "EKG's sub-network beats random pruning after fine-tuning"),
        Comparison("EKG", "L1-norm", "top1", "EKG's sub-network beats L1-norm pruning after fine-tuning"),
        Comparison(
            "EKG",
            "random",
            "holdout_ce",
            "EKG's search finds a lower holdout loss than random pruning",
            lower_is_better=True,
        ),
        Comparison(
            "EKG",
            "L1-norm",
            "holdout_ce",
            "EKG's search finds a lower holdout loss than L1-norm "
            "(both searches are deterministic for one dense net: no seed spread)",
            lower_is_better=True,
        ),
    ),
    run_seed=run_seed,
    prepare=prepare,
    extra_checks=(same_macs,),
)
