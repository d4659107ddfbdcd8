"""Evaluate a pickled ke_tf params file: test loss, top-1/top-5, params and MACs.

    python test.py --trained_param runs/quickstart/trained_params.pkl [--json out.json]

The model is rebuilt from the file's metadata (architecture, widths of slim/pruned nets); the
file is loaded with a restricted unpickler, so a params file can never run code.
"""
import argparse

from ke_tf.cli import guarded


def evaluate_params_file(path, dataset=None, data_dir=None, batch_size=256, classes=None, with_model=False):
    """Rebuild, load and evaluate `path`; returns a metrics dict (and the model and metadata if
    asked)."""
    from ke_tf.data import load_data
    from ke_tf.engine import evaluate, make_strategy
    from ke_tf.export import load_deployable
    from ke_tf.flops import complexity
    from ke_tf.params import ParamsError

    strategy = make_strategy("auto")
    with strategy.scope():
        model, meta = load_deployable(path)
    data_meta = meta.get("data", {})
    name = dataset or data_meta.get("name")
    if not name:
        raise ParamsError(f"{path}: no dataset recorded; pass --dataset")
    data = load_data(name, data_dir=data_dir, image_size=data_meta.get("image_size"),
                     classes=classes if classes is not None else data_meta.get("classes"))
    if data.info.num_classes != meta["model"]["num_classes"]:
        raise ParamsError(f"{path}: model has {meta['model']['num_classes']} outputs but dataset "
                          f"{name} has {data.info.num_classes} classes")
    metrics = evaluate(strategy, lambda x: model(x, training=False), data.test(batch_size))
    result = {"params_file": path, "arch": meta["model"]["arch"], "dataset": name,
              "test_loss": metrics["loss"], "test_top1": metrics["top1"], "test_top5": metrics["top5"],
              "examples": metrics["count"], **complexity(model)}
    dense = meta.get("dense_complexity")
    if dense:
        result["params_reduction"] = 1.0 - result["params"] / dense["params"]
        result["macs_reduction"] = 1.0 - result["macs"] / dense["macs"]
    return (result, model, meta) if with_model else result


@guarded
def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trained_param", required=True, help="pickled params file")
    parser.add_argument("--dataset", help="override the dataset recorded in the file")
    parser.add_argument("--data_dir", help="tfds data dir or image-folder root")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    parser.add_argument("--export", metavar="DIR", help="also export the model as SavedModel + TFLite")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    result, model, meta = evaluate_params_file(args.trained_param, args.dataset, args.data_dir, args.batch_size,
                                               with_model=True)
    print(f"Test loss: {result['test_loss']:.4f}, Top-1: {100 * result['test_top1']:.2f}%, "
          f"Top-5: {100 * result['test_top5']:.2f}%")
    line = f"Params: {result['params'] / 1e6:.4f}M, MACs: {result['macs'] / 1e6:.2f}M"
    if "macs_reduction" in result:
        line += (f" (reduction vs dense: params {100 * result['params_reduction']:.1f}%, "
                 f"MACs {100 * result['macs_reduction']:.1f}%)")
    print(line)
    if args.json:
        from ke_tf.report import write_json
        write_json(args.json, result)
    if args.export:
        from ke_tf.export import deployable, export_model
        result["exported"] = export_model(deployable(model, meta), args.export)
        print(f"Exported SavedModel and TFLite to {args.export}")
    return result


if __name__ == "__main__":
    main()
