"""Physical channel slicing: a functional model plus kept channels per group (of its
`ChannelGraph`) becomes a narrower model with the same function on the kept channels.

Used for Knowledge Evolution's slim network (keep the fit hypothesis), EKG's pruned network (keep
the surviving filters) and `ke_tf.prune` on any functional Keras model.
"""

import keras
import numpy as np

from ke_tf.surgery.graph import ChannelGraph
from ke_tf.surgery.walk import is_functional, rerun


def checked_keep(graph, keep):
    """`keep` ({group: channel indices}) as sorted int arrays, refusing unknown, kept-whole or empty
    groups and out-of-range or repeated indices."""
    checked = {}
    for name, indices in keep.items():
        if name not in graph.groups:
            raise ValueError(f"unknown channel group {name!r}; groups: {', '.join(graph.groups)}")
        group = graph.groups[name]
        index = np.asarray(sorted(int(i) for i in indices), np.int64)
        if len(index) == group.channels and np.array_equal(index, np.arange(group.channels)):
            continue
        if not group.prunable:
            raise ValueError(f"channel group {name!r} cannot be pruned: kept by {', '.join(group.kept_by)}")
        if len(index) == 0:
            raise ValueError(f"channel group {name!r} would keep no channels")
        if len(set(index.tolist())) != len(index) or index[0] < 0 or index[-1] >= group.channels:
            raise ValueError(f"channel group {name!r}: indices must be distinct and in [0, {group.channels})")
        checked[name] = index
    return checked


def require_prunable(model, names):
    """Raise, naming the layer that keeps it, if a group in `names` cannot lose channels."""
    graph = ChannelGraph(model)
    for name in names:
        group = graph.groups.get(name)
        if group is None:
            raise ValueError(f"{model.name} has no channel group {name!r}")
        if not group.prunable:
            raise ValueError(f"channel group {name!r} cannot be pruned: kept by {', '.join(group.kept_by)}")
    return graph


def sliced_value(graph, variable, keep):
    """`variable`'s value with the channels outside `keep` removed along every axis it has."""
    value = np.asarray(variable.numpy())
    for axis, slots in graph.slots_by_axis().get(id(variable), {}).items():
        names = [graph.group_of(s.dim) for s in slots]
        if not any(n in keep for n in names):
            continue
        parts = [s.indices(keep[n] if n in keep else np.arange(graph.groups[n].channels)) for s, n in zip(slots, names)]
        value = np.take(value, np.sort(np.concatenate(parts)), axis=axis)
    return value


def sliced_arrays(model, keep, graph=None):
    """{variable.path: ndarray} of `model` with channels outside `keep` removed (groups absent from
    `keep` are kept whole)."""
    graph = graph or ChannelGraph(model)
    keep = checked_keep(graph, keep)
    return {v.path: sliced_value(graph, v, keep) for v in model.weights}


def narrow_config(layer, node, graph, widths):
    """`layer`'s config for the narrower model: writers get their group's width, a per-channel
    grouped conv one group per kept channel, a channel-keeping Reshape its new last axis."""
    config = layer.get_config()
    out = graph.layouts.get(id(node.output_tensors[0]))
    if out is None:
        return config
    width = graph.layout_width(out, widths)
    for key in ("filters", "units"):
        if key in config:
            config[key] = width
    if config.get("groups", 1) != 1 and "filters" in config:
        config["groups"] = graph.narrow_groups(layer, node, widths)
    if isinstance(layer, keras.layers.Reshape):
        config["target_shape"] = (*config["target_shape"][:-1], width)
    return config


class GraphRebuilder:
    """Re-runs a functional graph with each layer replaced by `make(layer, node)` (called once per
    layer, so shared layers stay shared) and nested functional models rebuilt on their new inputs."""

    def __init__(self, make, call=None):
        self.make, self.call, self.clones = make, call, {}

    def model(self, model, inputs=None):
        inputs = inputs or [
            keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x._keras_history[0].name) for x in model.inputs
        ]
        outputs = rerun(model, inputs, self._node)
        return keras.Model(
            keras.tree.pack_sequence_as(model._inputs_struct, inputs),
            keras.tree.pack_sequence_as(model._outputs_struct, outputs),
            name=model.name,
        )

    def _node(self, node, args, kwargs):
        op = node.operation
        if id(op) not in self.clones:
            if is_functional(op):
                # The call's symbolic tensors (a recorded `mask=None` argument is no input).
                tensors = [t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)]
                inner = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in tensors]
                self.clones[id(op)] = (op, self.model(op, inner))
            elif isinstance(op, keras.layers.Layer):
                self.clones[id(op)] = (op, self.make(op, node))
            else:
                self.clones[id(op)] = (op, op)  # a stateless Keras operation (`x + y`)
        clone = self.clones[id(op)][1]
        if self.call is not None:
            return self.call(op, clone, node, args, kwargs)
        return clone(*args, **kwargs)

    def layer_pairs(self):
        """(original layer, its clone) of every rebuilt layer, nested models' layers included."""
        return [(op, clone) for op, clone in self.clones.values() if isinstance(op, keras.layers.Layer)]


def copy_weights(pairs, value_of):
    """Assign `value_of(original variable)` to each clone's variables, checking shapes."""
    for original, clone in pairs:
        if is_functional(original):
            continue
        if len(original.weights) != len(clone.weights):
            counts = f"{len(original.weights)} variables, its rebuilt copy {len(clone.weights)}"
            raise ValueError(f"layer {original.name}: {counts}")
        for source, target in zip(original.weights, clone.weights):
            value = value_of(source)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{source.path}: sliced shape {value.shape} != rebuilt shape {tuple(target.shape)}")
            target.assign(value.astype(target.dtype))


def slice_channels(model, keep, graph=None):
    """The narrower functional model of `model` keeping channels `keep` ({group: indices}, groups
    of `ChannelGraph(model)`; others whole), with the sliced weights. Same outputs as `model` whose
    removed channels are never read (see `ke_tf.surgery.gating`)."""
    graph = graph or ChannelGraph(model)
    keep = checked_keep(graph, keep)
    widths = graph.widths(keep)
    rebuild = GraphRebuilder(lambda layer, node: type(layer).from_config(narrow_config(layer, node, graph, widths)))
    narrow = rebuild.model(model)
    copy_weights(rebuild.layer_pairs(), lambda v: sliced_value(graph, v, keep))
    return narrow


def narrow_spec(spec, keep):
    """The ke_tf model spec whose channel-group widths are the sizes of `keep`."""
    from ke_tf.models import spec_widths

    widths = {**spec_widths(spec), **{g: len(ix) for g, ix in keep.items()}}
    return {**spec, "widths": widths}


def slice_model(model, spec, keep, layers=None):
    """A ke_tf-built `model` (from `spec`) narrowed to `keep`, rebuilt from its narrow spec so that
    params files reload it (variables the narrow net lacks, such as masks and gates, are dropped).
    Returns (narrow_model, narrow_spec)."""
    from ke_tf.layers.factory import PLAIN
    from ke_tf.models import build_from_spec, spec_widths

    graph = ChannelGraph(model)
    # A width name of the spec that no group carries is an alias the builder ignores (ResNet-18/34's
    # "stem" is stage1's width): it narrows nothing.
    aliases = set(spec_widths(spec)) - set(graph.groups)
    arrays = sliced_arrays(model, {g: ix for g, ix in keep.items() if g not in aliases}, graph)
    new_spec = narrow_spec(spec, keep)
    narrow = build_from_spec(new_spec, layers or PLAIN)
    for v in narrow.weights:
        if v.path not in arrays:
            raise ValueError(f"variable {v.path} of the narrow network has no source in {model.name}")
        if tuple(arrays[v.path].shape) != tuple(v.shape):
            raise ValueError(f"{v.path}: sliced shape {arrays[v.path].shape} != narrow shape {tuple(v.shape)}")
        v.assign(arrays[v.path].astype(v.dtype))
    return narrow, new_spec
