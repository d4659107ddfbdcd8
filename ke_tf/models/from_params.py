"""Rebuild the network a params file describes (its metadata's model spec and layer kind) with its
trained weights: what `ke-tf-test`, the exporter, the feature cache and the converters share.

A spec of a user's model (`ke_tf.models.user`) rebuilds from the `.keras` file it names, loaded in
safe mode and refused if changed since training, or from a `keras.applications` constructor: a
params file holds plain data only, so nothing in it is executed."""

from ke_tf.io.params import ParamsError, apply_params, load_params
from ke_tf.layers.factory import PLAIN
from ke_tf.models import build_from_spec


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
    """(model, metadata): the network params file `path` describes, with its weights loaded."""
    arrays, meta = load_params(path)
    if "model" not in meta:
        raise ParamsError(f"{path}: metadata has no 'model' entry; cannot rebuild the network")
    return apply_params(build_from_spec(meta["model"], layer_factory(meta)), arrays, source=path), meta
