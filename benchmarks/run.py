"""Run the ke_tf benchmarks and write `benchmarks/results.json` + a markdown table.

    python -m benchmarks.run [--quick] [--only NAME ...] [--repeats N] [--out PATH]

Sections: throughput, host_sync, host_memory, split_overhead, batchnorm, accumulation, inference, pruning, pipeline,
scaling. Every number is a ratio measured in the same run (warm-up, then the median of `--repeats` interleaved timings).
"""

import argparse
import json
import os
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `ke_tf` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import (  # noqa: E402
    accumulation,
    batchnorm,
    common,
    host_memory,
    host_sync,
    inference,
    pipeline,
    pruning,
    scaling,
    split_overhead,
    throughput,
)

SECTIONS = {
    "throughput": throughput,
    "host_sync": host_sync,
    "host_memory": host_memory,
    "split_overhead": split_overhead,
    "batchnorm": batchnorm,
    "accumulation": accumulation,
    "inference": inference,
    "pruning": pruning,
    "pipeline": pipeline,
    "scaling": scaling,
}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")


def _train_rates(rows):
    """{dataset: engine images/s at the device's default jit} from throughput rows, for `pipeline`."""
    return {
        r["values"]["dataset"]: r["values"]["engine"]
        for r in rows
        if r["section"] == "throughput" and r["target"] and "dataset" in r["values"]
    }


def run_all(names, quick=False, repeats=5, on_section=None):
    """Run the named sections in order; a failing section is recorded, not fatal.
    `on_section(rows so far)` runs after each section (the JSON is saved as it grows)."""
    rows = []
    for name in names:
        start = time.time()
        try:
            kwargs = {"train_rates": _train_rates(rows)} if name == "pipeline" else {}
            section_rows = SECTIONS[name].run(quick=quick, repeats=repeats, **kwargs)
        except Exception as e:  # report and continue with the other benchmarks
            traceback.print_exc()
            section_rows = [
                common.entry(f"{name} failed", name, None, "", met=False, notes=f"{type(e).__name__}: {e}"[:500])
            ]
        for row in section_rows:
            row["seconds"] = round(time.time() - start, 1)
        rows.extend(section_rows)
        print(f"[benchmarks] {name}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
        if on_section is not None:
            on_section(rows)
    return rows


def markdown(rows):
    """The results as a markdown table (value, ratio, target, met)."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| benchmark | value | unit | ratio | target | met | notes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {fmt(r['value'])} | {r['unit']} | {fmt(r['ratio'])} | "
            f"{r['target'] or '-'} | {fmt(r['met'])} | {r['notes']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, sizes and repeats (smoke test)")
    parser.add_argument(
        "--only", action="append", choices=sorted(SECTIONS), help="run only this benchmark (repeatable)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per contender (median)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="results JSON path")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    repeats = 1 if args.quick else args.repeats
    names = [n for n in SECTIONS if n in args.only] if args.only else list(SECTIONS)
    start = time.time()
    device = common.device_description()
    from ke_tf.io.params import atomic_write_bytes

    def save(rows):
        """Write the rows so far, so an interrupted run keeps its finished sections."""
        for row in rows:
            row["device"] = device
        result = {
            "device": device,
            "quick": args.quick,
            "repeats": repeats,
            "seconds": round(time.time() - start, 1),
            "benchmarks": rows,
        }
        atomic_write_bytes(args.out, json.dumps(result, indent=1).encode())
        return result

    rows = run_all(names, quick=args.quick, repeats=repeats, on_section=save)
    result = save(rows)
    print(
        f"Device: {device['cpu']}, {device['cores']} cores, GPUs: {', '.join(device['gpus']) or 'none'}, "
        f"TF {device['tensorflow']}, Keras {device['keras']}"
    )
    print(markdown(rows))
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
