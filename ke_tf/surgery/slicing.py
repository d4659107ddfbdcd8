"""Physical channel slicing: turn a network plus kept channel indices per channel group into a
narrower plain network with the same function on the kept channels.

Used for Knowledge Evolution's slim network (keep the fit hypothesis) and EKG's pruned network
(keep the surviving filters). Channel groups come from the `channel_group` tag that model
builders put on every conv (`ke_tf.layers.factory.tag_group`); other layers inherit the group of
their input, so BN, gates and the classifier's input rows are sliced consistently.
"""

import numpy as np

from ke_tf.layers.factory import PLAIN
from ke_tf.models import build_from_spec, spec_widths

INPUT = "input"
LOGITS = "logits"


def _producer(tensor):
    history = getattr(tensor, "_keras_history", None)
    return history[0] if history else None


def layer_groups(model):
    """{layer name: (input group, output group)} for every layer of a functional `model`."""
    import keras

    from ke_tf.models.resnet_cifar import ZeroPadShortcut

    out_group, groups = {}, {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            out_group[layer.name] = INPUT
            continue
        node = layer._inbound_nodes[0]
        in_groups = [out_group[_producer(t).name] for t in node.input_tensors]
        if isinstance(layer, ZeroPadShortcut):
            raise ValueError(
                f"{layer.name}: option-A (zero-pad) shortcuts cannot be sliced; build the network with shortcut='B'"
            )
        if len(set(in_groups)) > 1:
            raise ValueError(f"{layer.name}: merges channel groups {sorted(set(in_groups))}")
        tag = getattr(layer, "channel_group", None)
        if tag is not None:
            out = tag
        elif isinstance(layer, keras.layers.Dense):
            out = LOGITS
        else:
            out = in_groups[0]
        out_group[layer.name] = out
        groups[layer.name] = (in_groups[0], out)
    return groups


def _take(array, axis, index):
    return array if index is None else np.take(array, index, axis=axis)


def _slice(array, layer, in_idx, out_idx):
    """Slice one variable of `layer` by its input/output channel indices."""
    import keras

    if array.ndim == 4:  # conv kernel or a mask shaped like it: [kh, kw, in, out]
        if getattr(layer, "groups", 1) != 1:
            raise ValueError(f"{layer.name}: grouped convolutions cannot be sliced")
        array = _take(array, 2, in_idx)
        return array if isinstance(layer, keras.layers.DepthwiseConv2D) else _take(array, 3, out_idx)
    if array.ndim == 2:  # dense kernel [in, out]
        return _take(_take(array, 0, in_idx), 1, out_idx)
    if array.ndim == 1:
        writes = getattr(layer, "channel_group", None) is not None or isinstance(layer, keras.layers.Dense)
        return _take(array, 0, out_idx if writes else in_idx)
    return array


def sliced_arrays(model, keep):
    """{variable.path: ndarray} of `model` with channels outside `keep` (group -> sorted indices;
    missing groups are kept whole) removed."""
    groups = layer_groups(model)
    index = {g: np.asarray(sorted(ix), dtype=np.int64) for g, ix in keep.items()}
    arrays = {}
    for layer in model.layers:
        if layer.name not in groups:
            continue
        in_g, out_g = groups[layer.name]
        for v in layer.weights:
            arrays[v.path] = _slice(np.asarray(v.numpy()), layer, index.get(in_g), index.get(out_g))
    return arrays


def narrow_spec(spec, keep):
    """The model spec whose channel-group widths are the sizes of `keep`."""
    widths = {**spec_widths(spec), **{g: len(ix) for g, ix in keep.items()}}
    return {**spec, "widths": widths}


def slice_model(model, spec, keep, layers=PLAIN):
    """Build the narrower network of `spec` keeping `keep` channels and copy the sliced weights
    (variables the narrow net lacks, such as masks and gates, are dropped). Returns
    (narrow_model, narrow_spec)."""
    for g, ix in keep.items():
        if len(ix) == 0:
            raise ValueError(f"channel group {g!r} would keep no channels")
    new_spec = narrow_spec(spec, keep)
    narrow = build_from_spec(new_spec, layers)
    arrays = sliced_arrays(model, keep)
    for v in narrow.weights:
        if v.path not in arrays:
            raise ValueError(f"variable {v.path} of the narrow network has no source in {model.name}")
        if tuple(arrays[v.path].shape) != tuple(v.shape):
            raise ValueError(f"{v.path}: sliced shape {arrays[v.path].shape} != narrow shape {tuple(v.shape)}")
        v.assign(arrays[v.path].astype(v.dtype))
    return narrow, new_spec
