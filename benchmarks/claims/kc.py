"""Knowledge consistency (Liang et al., ICLR 2020): two nets trained on the same task share
knowledge, so a Trans-Net g(x_A) reconstructs more of net B's feature, and its linear (order-0)
part explains more of it, when A is another trained net than when A is an untrained net of the
same architecture.

Per seed: nets A and B trained on digits from seeds (2s+1, 2s+2), an untrained A' (the same spec,
initialised from seed 2s+1); the consistency loop fits a Trans-Net x_A -> x_B at B's tap for each
of A and A' and reports the variance of each order on the test split relative to Var(x_B).
"""

import os

from benchmarks.claims import Claim, Comparison
from benchmarks.claims.common import data_overrides, data_setting, dataset_config

ARMS = ("trained_a", "untrained_a")
OVERRIDES = (
    "train.progress=false",
    "consistency.transnet.progress=false",
    "consistency.in_modes=[]",
    "model.options.width_mult=0.5",
    "train.epochs=6",
)


def _consistency(run_dir, overrides):
    from ke_tf.cli import train_main

    sets = [f"run_dir={run_dir}", *data_overrides(), *OVERRIDES, *overrides]
    return train_main(dataset_config("resnet20_consistency"), __doc__)([a for o in sets for a in ("--set", o)])


def _untrained_copy(trained_path, path, seed):
    """A params file of a freshly initialised net with `trained_path`'s spec."""
    import keras

    from ke_tf.io.params import load_params, save_params
    from ke_tf.models import build_from_spec

    spec = load_params(trained_path)[1]["model"]
    keras.utils.set_random_seed(seed)
    save_params(path, build_from_spec(spec), {"model": spec})
    return path


def _metrics(summary):
    return {
        "order0_rel": summary["var_order0_rel"],
        "residual_rel": summary["var_residual_rel"],
        "net_a_top1": summary["net_a_top1"],
        "net_b_top1": summary["net_b_top1"],
    }


def run_seed(seed, workdir, context):
    """Trans-Nets onto the same trained B from a trained A and from an untrained A'."""
    seeds = (2 * seed + 1, 2 * seed + 2)
    trained = _consistency(os.path.join(workdir, "trained"), [f"consistency.seeds=[{seeds[0]}, {seeds[1]}]"])
    net_b = os.path.join(workdir, "trained", "net_b", "trained_params.pkl")
    net_a = os.path.join(workdir, "trained", "net_a", "trained_params.pkl")
    untrained_a = _untrained_copy(net_a, os.path.join(workdir, "untrained_a.pkl"), seeds[0])
    untrained = _consistency(
        os.path.join(workdir, "untrained"), [f"consistency.net_a={untrained_a}", f"consistency.net_b={net_b}"]
    )
    return {"trained_a": _metrics(trained), "untrained_a": _metrics(untrained)}


def _nets_are_trained(per_seed):
    """Control: A and B must have learned the task (top-1 over 4x chance), else the claim compares
    two kinds of untrained A."""
    accs = [round(r["trained_a"][k], 4) for r in per_seed.values() for k in ("net_a_top1", "net_b_top1")]
    return {"name": "nets A and B trained", "detail": f"test top-1 of A, B per seed: {accs}", "holds": min(accs) > 0.4}


CLAIM = Claim(
    name="kc",
    title="Knowledge consistency",
    setting=lambda: (
        f"{data_setting()}, ResNet-20 x0.5 nets trained from two seeds; tap s2b2_add (8x8x32, pre-ReLU); "
        "Trans-Net depth 3, alpha 0.1; order-0 variance / Var(x_B) on the test split."
    ),
    budget="nets 6 epochs SGD lr 0.05 cosine; Trans-Net 60 epochs Adam 1e-3 -> 1e-5 log-decayed (10x the "
    "reference LR, which underfits in this budget: configs/digits_resnet20_consistency.yaml).",
    arms=ARMS,
    comparisons=(
        Comparison(
            "trained_a",
            "untrained_a",
            "order0_rel",
            "order 0 from a trained A explains more of Var(x_B) than from an untrained A",
        ),
        Comparison(
            "trained_a",
            "untrained_a",
            "residual_rel",
            "less of x_B is left unexplained from a trained A",
            lower_is_better=True,
        ),
    ),
    run_seed=run_seed,
    extra_checks=(_nets_are_trained,),
)
