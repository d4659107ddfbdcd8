"""Learning claims: each method against its proper controls under the same budget, over several
seeds, judged on the paired differences (never on an absolute accuracy).

A claim module (one per method) defines `CLAIM = Claim(...)`. `run_claim` trains every arm for
every seed and `summarise` turns the per-seed metrics into means, spreads and paired verdicts.
A comparison holds when the one-sided 95% lower confidence bound of the mean paired difference
(Student t over the seeds) is above zero: the margin is the seed spread, not a tuned threshold.
"""

import dataclasses
import functools
import importlib
import math
import os
from typing import Callable, Optional, Union

from benchmarks.claims.common import claims_dataset

MODULES = ("ke", "kd", "ban", "reducenet", "lwm", "ekg", "kc")
# One-sided 95% Student-t quantiles by degrees of freedom (seeds - 1).
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """`better` beats `worse` on `metric` (larger is better unless `lower_is_better`)."""

    better: str
    worse: str
    metric: str
    statement: str
    lower_is_better: bool = False

    @property
    def name(self):
        return f"{self.better} vs {self.worse} ({self.metric})"


@dataclasses.dataclass(frozen=True)
class Claim:
    """A method, its arms and the comparisons between them. `run_seed(seed, workdir, context)`
    returns {arm: {metric: value}} for one seed; `prepare(workdir)` (optional) builds what every
    seed shares (e.g. one trained teacher) and returns it as `context`."""

    name: str
    title: str
    setting: Union[str, Callable]
    budget: str
    arms: tuple
    comparisons: tuple
    run_seed: Callable
    prepare: Optional[Callable] = None
    extra_checks: tuple = ()
    seeds: int = 3  # how many seeds the claim needs for its spread (cheap, noisy claims take more)

    def describe(self):
        """The setting in words (a callable setting names the claims dataset it runs on)."""
        return self.setting() if callable(self.setting) else self.setting


def load_claim(name):
    """The `CLAIM` of module `benchmarks.claims.<name>`."""
    if name not in MODULES:
        raise ValueError(f"unknown claim {name!r}; known: {', '.join(MODULES)}")
    return importlib.import_module(f"benchmarks.claims.{name}").CLAIM


def run_claim(name, workdir, seeds=None, progress=None, arms=None):
    """Train every arm of claim `name` for each seed (default: the claim's own `seeds` count)
    under `workdir`; returns `summarise(...)`. `progress` (the runner's tqdm bar) is told each
    seed and advanced after it. `arms` (claims whose `run_seed` takes them) trains only those
    arms, and only the comparisons between them are judged: the slow tests skip arms they do not
    assert."""
    claim = load_claim(name)
    claims_dataset()  # a bad KE_TF_CLAIMS_DATA fails before any training
    if arms is not None:
        claim = dataclasses.replace(
            claim,
            arms=tuple(a for a in claim.arms if a in arms),
            comparisons=tuple(c for c in claim.comparisons if c.better in arms and c.worse in arms),
            run_seed=functools.partial(claim.run_seed, arms=frozenset(arms)),
        )
    seeds = range(claim.seeds) if seeds is None else seeds
    os.makedirs(workdir, exist_ok=True)
    context = claim.prepare(os.path.join(workdir, "shared")) if claim.prepare else None
    per_seed = {}
    for seed in seeds:
        if progress is not None:
            progress.set_postfix_str(f"{name} seed {seed}")
        per_seed[seed] = claim.run_seed(seed, os.path.join(workdir, f"seed{seed}"), context)
        if progress is not None:
            progress.update(1)
    return summarise(claim, per_seed)


def _mean_std(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def paired_verdict(comparison, per_seed):
    """Paired differences better - worse (sign-flipped when lower is better) over the seeds, their
    mean/std, the one-sided 95% lower bound and whether it is above zero."""
    sign = -1.0 if comparison.lower_is_better else 1.0
    diffs = [
        sign * (r[comparison.better][comparison.metric] - r[comparison.worse][comparison.metric])
        for r in per_seed.values()
    ]
    mean, std = _mean_std(diffs)
    n = len(diffs)
    lower = mean - _T95.get(n - 1, 1.645) * std / math.sqrt(n) if n > 1 else float("-inf")
    return {
        "comparison": comparison.name,
        "statement": comparison.statement,
        "diffs": diffs,
        "mean_diff": mean,
        "std_diff": std,
        "lower_bound": lower,
        "holds": lower > 0.0,
        "seeds_won": sum(d > 0 for d in diffs),
    }


def summarise(claim, per_seed):
    """JSON-able result of one claim: per-seed metrics, per-arm mean/std, paired verdicts."""
    arms = {}
    for arm in claim.arms:
        metrics = {}
        for metric in next(iter(per_seed.values()))[arm]:
            mean, std = _mean_std([r[arm][metric] for r in per_seed.values()])
            metrics[metric] = {"mean": mean, "std": std}
        arms[arm] = metrics
    verdicts = [paired_verdict(c, per_seed) for c in claim.comparisons]
    checks = [check(per_seed) for check in claim.extra_checks]
    return {
        "claim": claim.name,
        "title": claim.title,
        "data": claims_dataset(),
        "setting": claim.describe(),
        "budget": claim.budget,
        "seeds": list(per_seed),
        "per_seed": {str(s): r for s, r in per_seed.items()},
        "arms": arms,
        "verdicts": verdicts,
        "checks": checks,
        "holds": all(v["holds"] for v in verdicts) and all(c["holds"] for c in checks),
    }


def failed_verdicts(result):
    """Readable lines for each comparison or check of `result` that does not hold."""
    lines = [
        f"{result['claim']}: {v['comparison']}: paired diffs {[round(d, 4) for d in v['diffs']]}, "
        f"mean {v['mean_diff']:+.4f}, 95% lower bound {v['lower_bound']:+.4f} <= 0"
        for v in result["verdicts"]
        if not v["holds"]
    ]
    lines += [f"{result['claim']}: {c['name']}: {c['detail']}" for c in result["checks"] if not c["holds"]]
    return lines
