"""Export a trained params file's deployable model as a SavedModel and a TFLite flatbuffer.

    ke-tf-export --trained_param runs/x/trained_params.pkl --out exported/
    ke-tf-test --trained_param runs/x/trained_params.pkl --export exported/   (evaluates too)

The deployable model is what the file's metadata rebuilds: a KE slim net, an EKG-pruned net or a
fused ReduceNet student are all plain networks, so the exported graph carries no masks or gates,
and BN is folded into the convolutions.
"""

import os

from ke_tf.io.params import atomic_write_bytes
from ke_tf.models.from_params import load_deployable


def deployable(model, meta):
    """The network to ship: plain ke_tf networks get BN folded into their convs (same outputs in
    inference mode, fewer memory-bound ops); split (KE dense) nets are exported as trained."""
    if (meta.get("layers") or {}).get("kind", "plain") != "plain":
        return model
    from ke_tf.surgery.folding import fold_batchnorm

    return fold_batchnorm(model, meta["model"])


def export_model(model, out_dir):
    """Write `out_dir/saved_model` (serving signature: float32 NHWC images -> logits) and
    `out_dir/model.tflite`; returns their paths."""
    import tensorflow as tf

    saved = os.path.join(out_dir, "saved_model")
    model.export(saved, format="tf_saved_model", verbose=False)
    tflite = os.path.join(out_dir, "model.tflite")
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    atomic_write_bytes(tflite, converter.convert())
    return {"saved_model": saved, "tflite": tflite}


def export_params_file(path, out_dir):
    """Export the deployable model of params file `path` into `out_dir`."""
    model, meta = load_deployable(path)
    return export_model(deployable(model, meta), out_dir)


if __name__ == "__main__":  # python -m ke_tf.export
    from ke_tf.cli import export_command

    export_command()
