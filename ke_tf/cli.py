"""Command-line plumbing shared by train_cifar.py, train_flower.py and test.py."""
import argparse
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
        debug = "--debug" in argv
        from ke_tf.config import ConfigError
        from ke_tf.engine.trainer import NonFiniteLossError, StopRequested
        from ke_tf.params import ParamsError
        try:
            return main(argv)
        except StopRequested as e:
            print(str(e), file=sys.stderr)
            sys.exit(130)
        except (ConfigError, ParamsError, NonFiniteLossError, ValueError, FileNotFoundError) as e:
            fail(str(e), debug)
    return wrapper


def train_main(default_config, description):
    """Entry point of the training scripts: --config YAML, --set key=value overrides."""
    @guarded
    def main(argv):
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--config", default=default_config, help="YAML experiment config")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config key, e.g. --set train.epochs=5 (repeatable)")
        parser.add_argument("--debug", action="store_true", help="show tracebacks")
        args = parser.parse_args(argv)
        from ke_tf.config import load_config
        from ke_tf.loops import get_loop, register_sections
        register_sections()
        cfg = load_config(args.config, args.set)
        loop = get_loop(cfg.method)
        # The strategy comes first: MultiWorkerMirroredStrategy must exist before any TF op.
        from ke_tf.engine import make_strategy, set_precision
        strategy = make_strategy(cfg.distribute.strategy, cfg.distribute.cpu_replicas)
        set_precision(cfg.train.mixed_precision)
        import tensorflow as tf
        tf.keras.utils.set_random_seed(cfg.seed)
        summary = loop.run(cfg, strategy)
        from ke_tf.report import markdown_table
        print(markdown_table([summary]))
        return summary
    return main
