"""Born-Again Networks: the ensemble of the born-again generations beats the last generation alone
(Furlanello et al.'s BANE). Run through the BAN loop itself (generation 0 by CE, generations 1..2
taught by their predecessor), on data-poor digits or Fashion-MNIST where one network does not
saturate."""

from benchmarks.claims import Claim, Comparison
from benchmarks.claims.common import data_poor, data_poor_setting, plain_config

GENERATIONS, EPOCHS = 3, 30


def run_seed(seed, workdir, context):
    from ke_tf.engine import make_strategy
    from ke_tf.methods.distillation.loop import run_ban

    cfg = plain_config(
        workdir,
        seed,
        EPOCHS,
        model={"options": {"width_mult": 0.25}},
        distillation={"mode": "ban", "generations": GENERATIONS},
    )
    summary = run_ban(cfg, make_strategy("auto"), data_poor())
    return {
        "ensemble": {"top1": summary["ensemble_top1"]},
        "last generation": {"top1": summary["last_top1"]},
        "generation 0": {"top1": summary["first_top1"]},
    }


CLAIM = Claim(
    name="ban",
    title="Born-Again Networks",
    setting=lambda: (
        f"{data_poor_setting()}, quarter-width ResNet-20, lambda 0.5, tau 1; "
        "ensemble = mean softmax of generations 0..2."
    ),
    budget=f"{GENERATIONS} generations x {EPOCHS} epochs.",
    arms=("ensemble", "last generation", "generation 0"),
    comparisons=(
        Comparison("ensemble", "last generation", "top1", "the ensemble of generations beats the last generation"),
        Comparison("last generation", "generation 0", "top1", "the born-again generation beats the CE generation 0"),
    ),
    run_seed=run_seed,
    seeds=5,
)
