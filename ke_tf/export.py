"""Export a trained params file's deployable model as a SavedModel and a TFLite flatbuffer.

    ke-tf-export --trained_param runs/x/trained_params.pkl --out exported/
    ke-tf-test --trained_param runs/x/trained_params.pkl --export exported/   (evaluates too)

The deployable model is what the file's metadata rebuilds: a KE slim net, an EKG-pruned net or a
fused ReduceNet student are all plain networks, so the exported graph carries no masks or gates,
and BN is folded into the convolutions.
"""
import os

from ke_tf.layers.factory import PLAIN
from ke_tf.models import build_from_spec
from ke_tf.params import ParamsError, apply_params, load_params


def layer_factory(meta):
    """The layer factory a params file was trained with (KE's dense nets carry split masks)."""
    layers = dict(meta.get("layers") or {"kind": "plain"})
    kind = layers.pop("kind", "plain")
    if kind == "split":
        from ke_tf.layers.split import SplitLayerFactory
        return SplitLayerFactory(**layers)
    if kind != "plain":
        raise ParamsError(f"unknown layer kind {kind!r} in params metadata")
    return PLAIN


def load_deployable(path):
    """Rebuild the model a params file describes and load its weights."""
    arrays, meta = load_params(path)
    if "model" not in meta:
        raise ParamsError(f"{path}: metadata has no 'model' entry; cannot rebuild the network")
    return apply_params(build_from_spec(meta["model"], layer_factory(meta)), arrays, source=path), meta


def deployable(model, meta):
    """The network to ship: plain ke_tf networks get BN folded into their convs (same outputs in
    inference mode, fewer memory-bound ops); split (KE dense) nets are exported as trained."""
    if (meta.get("layers") or {}).get("kind", "plain") != "plain":
        return model
    from ke_tf.folding import fold_batchnorm
    return fold_batchnorm(model, meta["model"])


def export_model(model, out_dir):
    """Write `out_dir/saved_model` (serving signature: float32 NHWC images -> logits) and
    `out_dir/model.tflite`; returns their paths."""
    import tensorflow as tf
    saved = os.path.join(out_dir, "saved_model")
    model.export(saved, format="tf_saved_model", verbose=False)
    tflite = os.path.join(out_dir, "model.tflite")
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    from ke_tf.params import atomic_write_bytes
    atomic_write_bytes(tflite, converter.convert())
    return {"saved_model": saved, "tflite": tflite}


def export_params_file(path, out_dir):
    """Export the deployable model of params file `path` into `out_dir`."""
    model, meta = load_deployable(path)
    return export_model(deployable(model, meta), out_dir)


def main(argv=None):
    """The export command (ke-tf-export, python -m ke_tf.export); returns the written paths."""
    from ke_tf.cli import guarded, parser_for

    @guarded
    def run(args_list):
        parser = parser_for(__doc__)
        parser.add_argument("--trained_param", required=True, help="pickled params file")
        parser.add_argument("--out", required=True, help="output folder")
        args = parser.parse_args(args_list)
        paths = export_params_file(args.trained_param, args.out)
        for kind, p in paths.items():
            print(f"{kind}: {p}")
        return paths
    return run(argv)


if __name__ == "__main__":
    main()
