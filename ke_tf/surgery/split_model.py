"""Knowledge Evolution on any functional Keras 3 model: `split_model` turns its Conv2D/Dense layers
into KE's split layers, `slim_model` extracts the plain network of the kels fit hypothesis.

The kels fit hypothesis of a model is a set of channels: the first ceil(sr*C) of every prunable
group of its `ChannelGraph`, every channel of the groups that cannot shrink (the image, the classes,
boundaries). A split layer's kels mask is the part of its kernel that reads and writes fit channels,
taken from the graph's slots, so it is exact where `kels_mask`'s "first rows" rule is not (a Dense
after a Flatten reads channel c at rows p*C + c, a conv after a Concatenate reads each group at its
offset). Being a variable, the mask is saved with the layer (`.keras`, params files).

Only stock Conv2D and Dense layers are split (KE's code splits conv and linear layers). Depthwise
(and separable) convolutions stay plain: their kernel is per channel, like BN's parameters, so slicing
a group slices them with it, and their reset channels are kept, as KE keeps BN parameters.
"""

import numpy as np

from ke_tf.layers.split import SplitConv2D, SplitDense, fit_count, layer_seed, split_layers
from ke_tf.surgery.deploy import PLAIN_OF_SPLIT
from ke_tf.surgery.graph import ChannelGraph
from ke_tf.surgery.slicing import GraphRebuilder, checked_keep, copy_weights, narrow_config, sliced_value
from ke_tf.surgery.walk import is_functional

SPLIT_OF_PLAIN = {plain: split for split, plain in PLAIN_OF_SPLIT}


def fit_channels(graph, split_rate):
    """{group: first ceil(sr*C) channels} of every prunable group of `graph` (the kels fit hypothesis);
    unprunable groups stay whole."""
    return {name: np.arange(fit_count(g.channels, split_rate)) for name, g in graph.prunable().items()}


def fit_mask(graph, kernel, keep):
    """0/1 mask of `kernel`'s weights that read and write only channels of `keep` (groups absent
    from it, such as the unprunable ones, count as whole)."""
    mask = np.ones(tuple(kernel.shape), np.float32)
    for axis, slots in graph.slots_by_axis().get(id(kernel), {}).items():
        line = np.zeros(kernel.shape[axis], np.float32)
        for slot in slots:
            name = graph.group_of(slot.dim)
            line[slot.indices(keep[name] if name in keep else np.arange(graph.groups[name].channels))] = 1.0
        shape = [1] * mask.ndim
        shape[axis] = -1
        mask = mask * line.reshape(shape)
    return mask


def _role(graph, kernel):
    """KE's role of a kernel: "stem" reads only whole groups (the image), "classifier" writes only
    whole groups (the classes), else "body"."""
    axes = graph.groups_of(kernel)
    whole = {axis: all(not graph.groups[n].prunable for n in names) for axis, names in axes.items()}
    rank = len(kernel.shape)
    if whole.get(rank - 2, True):
        return "stem"
    return "classifier" if whole.get(rank - 1, True) else "body"


class _Forward:
    """A layer's name and forward-pass variables (a split layer's mask left out), for `copy_weights`."""

    def __init__(self, layer):
        mask = layer.mask if isinstance(layer, (SplitConv2D, SplitDense)) else None
        self.name, self.weights = layer.name, [v for v in layer.weights if v is not mask]


def _copy_forward_weights(pairs, value_of):
    """`copy_weights` over the forward-pass variables of every rebuilt layer (masks excluded)."""
    copy_weights([(_Forward(a), _Forward(b)) for a, b in pairs if not is_functional(a)], value_of)


def split_model(model, split_rate=0.5, split_mode="kels", seed=0):
    """A copy of the functional `model` (nested functional models and non-layer ops included) with a
    `SplitConv2D` for every Conv2D and a `SplitDense` for every Dense: same config and weights, a
    kels mask that is the graph's fit hypothesis (or a seeded wels mask; a grouped conv keeps the
    same fit units in every block of its groups)."""
    if split_layers(model):
        raise ValueError(f"{model.name} already has split layers; split its plain model")
    graph = ChannelGraph(model)
    keep = fit_channels(graph, split_rate)

    def make(layer, node):
        split = SPLIT_OF_PLAIN.get(type(layer))
        if split is None:
            return type(layer).from_config(layer.get_config())
        options = {"split_rate": split_rate, "split_mode": split_mode, "seed": layer_seed(seed, layer.name)}
        return split.from_config({**layer.get_config(), **options, "role": _role(graph, layer.kernel)})

    rebuild = GraphRebuilder(make)
    split = rebuild.model(model)
    pairs = rebuild.layer_pairs()
    _copy_forward_weights(pairs, lambda v: np.asarray(v.numpy()))
    if split_mode == "kels":
        for original, clone in pairs:
            if isinstance(clone, (SplitConv2D, SplitDense)):
                clone.mask.assign(fit_mask(graph, original.kernel, keep))
    return split


def _kels_rate(model):
    """The one split rate of `model`'s split layers, all of them kels."""
    layers = split_layers(model)
    modes = {(layer.split_mode, layer.split_rate) for layer in layers}
    if len(modes) != 1 or next(iter(modes))[0] != "kels":
        found = ", ".join(f"{m} {r:g}" for m, r in sorted(modes)) or "no split layers"
        raise ValueError(f"{model.name}: a slim network needs kels split layers of one split rate; found {found}")
    return next(iter(modes))[1]


def _check_masks(graph, model, keep):
    """Refuse a split layer whose mask is not the fit hypothesis of its groups: its slim network
    would not be the dense network with the reset weights zeroed."""
    for layer in split_layers(model):
        if not np.array_equal(layer.mask.numpy(), fit_mask(graph, layer.kernel, keep)):
            raise ValueError(
                f"layer {layer.name}: its mask is not the fit hypothesis of its channel groups "
                "(split the model with ke_tf.split_model)"
            )


def _plain(layer, config):
    """`layer` rebuilt from `config` as a stock Keras layer (a split layer loses its mask)."""
    for split, plain in PLAIN_OF_SPLIT:
        if isinstance(layer, split):
            return plain.from_config({k: v for k, v in config.items() if k not in layer._split_config()})
    return type(layer).from_config(config)


def slim_model(model):
    """The slim network of a kels split functional `model`: its fit channels sliced out into plain
    Conv2D/Dense layers; equal to `model` with every reset weight zeroed."""
    graph = ChannelGraph(model)
    keep = checked_keep(graph, fit_channels(graph, _kels_rate(model)))
    _check_masks(graph, model, keep)
    widths = graph.widths(keep)
    rebuild = GraphRebuilder(lambda layer, node: _plain(layer, narrow_config(layer, node, graph, widths)))
    slim = rebuild.model(model)
    _copy_forward_weights(rebuild.layer_pairs(), lambda v: sliced_value(graph, v, keep))
    return slim
