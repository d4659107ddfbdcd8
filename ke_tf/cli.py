"""The ke_tf commands: ke-tf-train (also train_cifar.py and train_flower.py, with a default config),
ke-tf-test (test.py) and ke-tf-export. Expected failures end in one `error:` line, exit status 2.

TensorFlow's start-up log lines are filtered by `ke_tf.tf_startup` (when ke_tf is imported, before
these functions run); `--verbose` keeps them.
"""

import argparse
import logging
import sys
import traceback

VERBOSE_HELP = "keep TensorFlow's own log lines (start-up notices, C++ INFO/WARNING/ERROR)"


def fail(message, debug=False):
    """One clear error line (traceback only with --debug) and exit status 2."""
    if debug:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def guarded(main):
    """Run `main(argv)` turning expected failures into one error line."""

    def wrapper(argv=None):
        argv = sys.argv[1:] if argv is None else argv
        # TensorFlow's logger has its own handler; absl's first log call (a checkpoint save) gives
        # the root logger one as well, which would print each TensorFlow warning twice.
        logging.getLogger("tensorflow").propagate = False
        if hasattr(sys.stdout, "reconfigure"):  # a log capturing stdout and stderr keeps their order
            sys.stdout.reconfigure(line_buffering=True)
        debug = "--debug" in argv
        from ke_tf.config import ConfigError
        from ke_tf.engine.trainer import NonFiniteLossError, StopRequested
        from ke_tf.io.params import ParamsError

        try:
            return main(argv)
        except StopRequested as e:
            print(str(e), file=sys.stderr)
            sys.exit(130)
        except (ConfigError, ParamsError, NonFiniteLossError, ValueError, FileNotFoundError) as e:
            fail(str(e), debug)

    return wrapper


def parser_for(description):
    """An argument parser with the flags every command has (--verbose, --debug)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def list_configs():
    """Print the shipped configs, one `name  description` line each, then the renamed ones."""
    from ke_tf.shipped_configs import RENAMED, describe, shipped_configs

    shipped = shipped_configs()
    width = max(map(len, shipped))
    for name, path in shipped.items():
        print(f"{name:<{width}}  {describe(path)}")
    print("\nRenamed (the old names still work until ke_tf 0.2):")
    width = max(map(len, RENAMED))
    for old, new in RENAMED.items():
        print(f"  {old:<{width}} -> {new}")


def train_main(default_config, description):
    """The training command: --config (a path or a shipped config's name; `default_config` if
    given, else required), --set key=value overrides, --list; returns the run's summary dict."""

    @guarded
    def main(argv):
        parser = parser_for(description)
        parser.add_argument(
            "--config",
            default=default_config,
            help="YAML experiment config: a file, or the name of a shipped config (see --list)"
            + (f"; default {default_config}" if default_config else ""),
        )
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set train.epochs=5 (repeatable)",
        )
        parser.add_argument("--list", action="store_true", help="list the shipped configs and exit")
        args = parser.parse_args(argv)
        if args.list:
            return list_configs()
        if args.config is None:
            parser.error("--config is required: a YAML file or a shipped config's name (--list shows them)")
        from ke_tf.config import load_config
        from ke_tf.io.progress import log_line
        from ke_tf.methods import get_loop
        from ke_tf.runner import run
        from ke_tf.shipped_configs import resolve_config

        path = resolve_config(args.config)
        cfg = load_config(path, args.set)
        get_loop(cfg.method)  # an unknown method fails here, before the log line
        log_line(f"config {path}: method {cfg.method}, run_dir {cfg.run_dir}")
        summary = run(cfg)
        from ke_tf.io.report import vertical_table

        print(vertical_table(summary))
        return summary

    return main


def evaluate_params_file(path, dataset=None, data_dir=None, batch_size=256, classes=None, with_model=False):
    """Rebuild, load and evaluate `path`; returns a metrics dict (and the model and metadata if
    asked)."""
    from ke_tf.data import load_data
    from ke_tf.engine import evaluate, make_strategy
    from ke_tf.io.params import ParamsError
    from ke_tf.models.from_params import load_deployable
    from ke_tf.surgery.flops import complexity

    strategy = make_strategy("auto")
    with strategy.scope():
        model, meta = load_deployable(path)
    data_meta = meta.get("data", {})
    name = dataset or data_meta.get("name")
    if not name:
        raise ParamsError(f"{path}: no dataset recorded; pass --dataset")
    data = load_data(
        name,
        data_dir=data_dir,
        image_size=data_meta.get("image_size"),
        classes=classes if classes is not None else data_meta.get("classes"),
    )
    if data.info.num_classes != meta["model"]["num_classes"]:
        raise ParamsError(
            f"{path}: model has {meta['model']['num_classes']} outputs but dataset "
            f"{name} has {data.info.num_classes} classes"
        )
    metrics = evaluate(strategy, lambda x: model(x, training=False), data.test(batch_size))
    result = {
        "params_file": path,
        "arch": meta["model"]["arch"],
        "dataset": name,
        "test_loss": metrics["loss"],
        "test_top1": metrics["top1"],
        "test_top5": metrics["top5"],
        "examples": metrics["count"],
        **complexity(model),
    }
    dense = meta.get("dense_complexity")
    if dense:
        result["params_reduction"] = 1.0 - result["params"] / dense["params"]
        result["macs_reduction"] = 1.0 - result["macs"] / dense["macs"]
    return (result, model, meta) if with_model else result


TEST_DESCRIPTION = """Evaluate a pickled ke_tf params file: test loss, top-1/top-5, params and MACs.

    ke-tf-test --trained_param runs/quickstart/trained_params.pkl [--json out.json]

The model is rebuilt from the file's metadata (architecture, widths of slim/pruned nets); the
file is loaded with a restricted unpickler, so a params file can never run code.
"""


@guarded
def evaluate_main(argv):
    """The evaluation command (ke-tf-test, test.py); returns the metrics dict."""
    parser = parser_for(TEST_DESCRIPTION)
    parser.add_argument("--trained_param", required=True, help="pickled params file")
    parser.add_argument("--dataset", help="override the dataset recorded in the file")
    parser.add_argument("--data_dir", help="tfds data dir or image-folder root")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    parser.add_argument("--export", metavar="DIR", help="also export the model as SavedModel + TFLite")
    args = parser.parse_args(argv)
    result, model, meta = evaluate_params_file(
        args.trained_param, args.dataset, args.data_dir, args.batch_size, with_model=True
    )
    print(
        f"Test loss: {result['test_loss']:.4f}, Top-1: {100 * result['test_top1']:.2f}%, "
        f"Top-5: {100 * result['test_top5']:.2f}%"
    )
    line = f"Params: {result['params'] / 1e6:.4f}M, MACs: {result['macs'] / 1e6:.2f}M"
    if "macs_reduction" in result:
        line += (
            f" (reduction vs dense: params {100 * result['params_reduction']:.1f}%, "
            f"MACs {100 * result['macs_reduction']:.1f}%)"
        )
    print(line)
    if args.json:
        from ke_tf.io.report import write_json

        write_json(args.json, result)
    if args.export:
        from ke_tf.export import deployable, export_model

        result["exported"] = export_model(deployable(model, meta), args.export)
        print(f"Exported SavedModel and TFLite to {args.export}")
    return result


TRAIN_DESCRIPTION = """Train with any ke_tf method from a YAML experiment config.

    ke-tf-train --list
    ke-tf-train --config digits_resnet20_supervised
    ke-tf-train --config my_experiment.yaml --set train.epochs=10 --set run_dir=runs/short
"""


# Console scripts exit with what their function returns, so these return nothing (status 0).
def train_command():
    """ke-tf-train."""
    train_main(None, TRAIN_DESCRIPTION)()


def test_command():
    """ke-tf-test."""
    evaluate_main()


EXPORT_DESCRIPTION = """Export a trained params file's deployable model as a SavedModel and a TFLite flatbuffer.

    ke-tf-export --trained_param runs/x/trained_params.pkl --out exported/
    ke-tf-test --trained_param runs/x/trained_params.pkl --export exported/   (evaluates too)

Masks and gates are gone from KE slim, EKG-pruned and fused ReduceNet networks, and BN is folded
into the convolutions (ke_tf/export.py).
"""


@guarded
def export_main(argv):
    """The export command (ke-tf-export, python -m ke_tf.export); returns the written paths."""
    from ke_tf.export import export_params_file

    parser = parser_for(EXPORT_DESCRIPTION)
    parser.add_argument("--trained_param", required=True, help="pickled params file")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    paths = export_params_file(args.trained_param, args.out)
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return paths


def export_command():
    """ke-tf-export."""
    export_main()
