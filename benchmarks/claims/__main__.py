"""Run the learning claims and write `benchmarks/claims.json`, `claims.md` and `claims.png`.

    python -m benchmarks.claims [--seeds N] [--only ke kd ...] [--out benchmarks/claims.json]
    python -m benchmarks.claims --data fashion_mnist --only kd ban   # -> benchmarks/claims_fashion_mnist.json
    python -m benchmarks.claims --table      # print the README table from the JSON

Claims run with --only are merged into an existing JSON, so the claims can be run one at a time.
"""

import argparse
import datetime
import json
import os
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `ke_tf` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.claims import MODULES, failed_verdicts, load_claim, run_claim  # noqa: E402
from benchmarks.claims.common import DATASETS  # noqa: E402
from benchmarks.claims.table import claims_plot, claims_table  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "claims.json")


def default_out(data):
    """benchmarks/claims.json for digits, benchmarks/claims_<data>.json for another dataset."""
    return DEFAULT_OUT if data == "digits" else f"{os.path.splitext(DEFAULT_OUT)[0]}_{data}.json"


def _arguments(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.claims", description=__doc__.splitlines()[0])
    p.add_argument(
        "--seeds", type=int, default=None, help="seeds per claim (at least 2; default: each claim's own, 3 or more)"
    )
    p.add_argument("--only", nargs="+", choices=MODULES, default=list(MODULES), help="claims to run")
    p.add_argument("--data", choices=DATASETS, default="digits", help="the dataset the claims run on")
    p.add_argument("--out", default=None, help="results JSON, merged with an existing one (default: per --data)")
    p.add_argument("--workdir", default=None, help="where runs write (default: a temporary folder)")
    p.add_argument("--table", action="store_true", help="only print the markdown table of --out")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 2:
        p.error("--seeds must be at least 2: a claim is judged on the spread of paired differences")
    args.out = args.out or default_out(args.data)
    return args


def _load(path):
    if not os.path.exists(path):
        return {"claims": {}}
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    args = _arguments(argv)
    os.environ["KE_TF_CLAIMS_DATA"] = args.data
    results = _load(args.out)
    if args.table:
        print(claims_table(results))
        return results
    from tqdm import tqdm

    from benchmarks.common import device_description
    from ke_tf.io.report import write_json

    workdir = args.workdir or tempfile.mkdtemp(prefix="ke_tf_claims_")
    machine = {
        **device_description(),
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "date": datetime.date.today().isoformat(),
    }
    seeds = {name: range(args.seeds or load_claim(name).seeds) for name in args.only}
    bar = tqdm(total=sum(len(s) for s in seeds.values()), desc="claims", unit="seed")
    for name in args.only:
        result = run_claim(name, os.path.join(workdir, name), seeds[name], progress=bar)
        results["claims"][name] = {**result, "machine": machine}
        write_json(args.out, results)
        for line in failed_verdicts(result):
            tqdm.write("does not hold: " + line)
    bar.close()
    stem = os.path.splitext(args.out)[0]
    table = claims_table(results)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    claims_plot(results, stem + ".png")
    print(table)
    return results


if __name__ == "__main__":
    main()
