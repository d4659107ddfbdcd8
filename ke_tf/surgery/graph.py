"""Channel dependency graph of any functional Keras 3 model (DepGraph, Fang et al., CVPR 2023).

A channel *dimension* is the last axis of a tensor. Every variable that writes or reads it holds a
slice of it (a `Slot`); per-channel layers pass it through and elementwise merges tie their inputs'
dimensions together. The connected components are the *groups*: keeping channels K of a group keeps,
at the same index map, K's slice of every slot in it. A layer the graph cannot reason about is a
*boundary*: the dimensions it touches are kept whole and the layer is listed in `boundaries` (a
custom layer may say why in a `channel_boundary` attribute). A grouped convolution cuts the
dimensions it reads and writes into equal blocks (its groups) that must keep the same channels
(Torch-Pruning does the same), so a group's unit of pruning is one index in every block.
Channels-last models only (Keras's default data format).
"""

import dataclasses
import math

import keras
import numpy as np

from ke_tf.surgery.walk import functional_nodes, is_functional

_L = keras.layers
_CONVS = (_L.Conv1D, _L.Conv2D, _L.Conv3D)
_POOLS = (
    _L.MaxPooling1D,
    _L.MaxPooling2D,
    _L.MaxPooling3D,
    _L.AveragePooling1D,
    _L.AveragePooling2D,
    _L.AveragePooling3D,
    _L.GlobalAveragePooling1D,
    _L.GlobalAveragePooling2D,
    _L.GlobalAveragePooling3D,
    _L.GlobalMaxPooling1D,
    _L.GlobalMaxPooling2D,
    _L.GlobalMaxPooling3D,
)
# Layers whose output channel c depends only on input channel c and that own no per-channel state.
_PASS_THROUGH = _POOLS + (
    _L.ReLU,
    _L.LeakyReLU,
    _L.ELU,
    _L.Dropout,
    _L.SpatialDropout1D,
    _L.SpatialDropout2D,
    _L.SpatialDropout3D,
    _L.GaussianNoise,
    _L.GaussianDropout,
    _L.AlphaDropout,
    _L.ActivityRegularization,
    _L.Identity,
    _L.ZeroPadding1D,
    _L.ZeroPadding2D,
    _L.ZeroPadding3D,
    _L.Cropping1D,
    _L.Cropping2D,
    _L.Cropping3D,
    _L.UpSampling1D,
    _L.UpSampling2D,
    _L.UpSampling3D,
)
_MERGES = (_L.Add, _L.Subtract, _L.Multiply, _L.Average, _L.Maximum, _L.Minimum)
# Keras 3 operations that are not layers (`x + y` on KerasTensors, `keras.ops.relu(x)`), by class.
_MERGE_OPS = frozenset({"Add", "Subtract", "Multiply", "Maximum", "Minimum", "Divide", "TrueDivide"})
_UNARY_OPS = frozenset(
    {
        "Relu",
        "Relu6",
        "Sigmoid",
        "HardSigmoid",
        "Tanh",
        "Silu",
        "HardSilu",
        "Gelu",
        "Elu",
        "Selu",
        "LeakyRelu",
        "Softplus",
        "Softsign",
        "Abs",
        "Negative",
        "Square",
        "Sqrt",
        "Exp",
        "Cast",
    }
)
_CHANNEL_MIXING_ACTIVATIONS = frozenset({"softmax", "log_softmax"})
MODEL_INPUT = "model input"
MODEL_OUTPUT = "model output"


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one dimension's channels sit along `axis` of `variable`. A group's unit u stands for the
    dimension's channels b * units + u of its blocks b < blocks (one block unless grouped convs cut
    it); channel c is index p * period + offset + c * multiplier + j for every repeat p < repeat and
    j < multiplier (offset: position in a concatenation; repeat: spatial positions a Flatten laid out
    before it; multiplier: a depthwise channel multiplier). `divisor`: the slot holds one of that many
    equal shares of the blocks (a grouped kernel's input axis holds one group's channels)."""

    layer: object
    variable: object
    axis: int
    dim: int
    offset: int = 0
    period: int = 0
    repeat: int = 1
    multiplier: int = 1
    divisor: int = 1
    blocks: int = 1
    units: int = 0

    def indices(self, kept):
        """Indices along `axis` that units `kept` (sorted ints of the group) occupy."""
        kept = np.asarray(kept, np.int64)
        channels = (np.arange(self.blocks)[:, None] * self.units + kept).ravel()
        within = self.offset + (channels[:, None] * self.multiplier + np.arange(self.multiplier)).ravel()
        return (np.arange(self.repeat)[:, None] * self.period + within).ravel()


@dataclasses.dataclass
class Group:
    """Channels that must be removed together: `slots` hold them, `prunable` unless a boundary, the
    model's input or output touches them (`kept_by` says which). `channels` counts units, each
    standing for one channel in each of `blocks` equal blocks (1 unless grouped convs cut it)."""

    name: str
    dim: int
    channels: int
    slots: list
    kept_by: list
    producers: list
    blocks: int = 1

    @property
    def prunable(self):
        return not self.kept_by


@dataclasses.dataclass(frozen=True)
class _Segment:
    """`size` channels of dimension `dim`, each repeated `multiplier` times in place (depthwise)."""

    dim: int
    size: int
    multiplier: int = 1

    @property
    def width(self):
        return self.size * self.multiplier


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Channels of a tensor's last axis: dimensions laid end to end (concatenation), repeated
    `repeat` times (a Flatten of spatial positions)."""

    segments: tuple
    repeat: int = 1

    @property
    def width(self):
        return sum(s.width for s in self.segments)

    def multiplied(self, multiplier):
        """The layout of a depthwise output: every channel repeated `multiplier` times in place."""
        return _Layout(tuple(dataclasses.replace(s, multiplier=s.multiplier * multiplier) for s in self.segments))


class _Dims:
    """Union-find over channel dimensions, with the reasons a dimension must be kept."""

    def __init__(self):
        self.parent, self.size, self.kept, self.blocks = [], [], [], []

    def new(self, size, kept_by=None):
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.kept.append([kept_by] if kept_by else [])
        self.blocks.append(1)
        return len(self.parent) - 1

    def find(self, d):
        while self.parent[d] != d:
            self.parent[d] = self.parent[self.parent[d]]
            d = self.parent[d]
        return d

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)
            self.kept[min(a, b)] += self.kept[max(a, b)]
            self.blocks[min(a, b)] = math.lcm(self.blocks[a], self.blocks[b])

    def cut(self, d, blocks):
        """Dimension `d` (with all it is tied to) keeps the same channels in each of `blocks` blocks."""
        root = self.find(d)
        self.blocks[root] = math.lcm(self.blocks[root], blocks)

    def keep(self, d, reason):
        root = self.find(d)
        if reason not in self.kept[root]:
            self.kept[root].append(reason)


class UnsupportedLayerError(ValueError):
    """Raised with `strict=True` for a layer the graph treats as a boundary."""


class ChannelGraph:
    """The channel groups of a functional `model` (nested functional models expanded).

    `groups`: {name: Group} in graph order; a group is named after the `channel_group` tag of a
    layer writing it when ke_tf's builders set one (their width names), else after the first layer
    writing it. `boundaries`: [(layer name, reason)] of layers whose channels are kept. `inexact`:
    [(layer name, reason)] of prunable layers whose sliced output is not the masked one
    (LayerNormalization over channels), so a search that scores masked sub-networks approximates them.
    `strict=True` raises `UnsupportedLayerError` at the first boundary instead."""

    def __init__(self, model, strict=False):
        if not is_functional(model):
            raise ValueError(
                f"{model.name} is a subclassed {type(model).__name__}, whose graph Keras does not record; "
                "build it functionally (keras.Input -> layers -> keras.Model(inputs, outputs)) to prune, split or "
                "slice it"
            )
        self.model, self.strict = model, strict
        self._dims = _Dims()
        self._slots, self._slot_dims, self._producers, self._out_dim = [], {}, {}, {}
        self.boundaries = []
        self.inexact = []  # (layer name, why): layers whose sliced output differs from the masked one
        self.layer_calls = []  # (layer, input layouts, output layout) for MAC predictions
        self.layouts, self._input_names = {}, {}
        for x in model.inputs:
            self.layouts[id(x)] = self._fresh(x, MODEL_INPUT)
            self._input_names[self.layouts[id(x)].segments[0].dim] = x._keras_history[0].name
        self._walk(model)
        for x in model.outputs:
            self._keep_layout(self.layouts[id(x)], MODEL_OUTPUT)
        self.groups = self._collect()

    # ---- building -------------------------------------------------------------------------------
    def _fresh(self, tensor, kept_by=None):
        return _Layout((_Segment(self._dims.new(tensor.shape[-1], kept_by), int(tensor.shape[-1])),))

    def _keep_layout(self, layout, reason):
        for s in layout.segments:
            self._dims.keep(s.dim, reason)

    def _walk(self, model):
        for node in functional_nodes(model):
            op = node.operation
            ins = [self.layouts[id(t)] for t in node.input_tensors]
            if is_functional(op):
                self.layouts.update({id(x): layout for x, layout in zip(op.inputs, ins)})
                self._walk(op)
                outs = [self.layouts[id(x)] for x in op.outputs]
            else:
                outs = self._apply(op, node, ins)
            for t, layout in zip(node.output_tensors, outs):
                self.layouts[id(t)] = layout

    def _apply(self, op, node, ins):
        """Output layouts of one call of `op`, recording its slots; a boundary when unknown."""
        rule = self._rule(op, node, ins)
        if rule is None:
            default = f"{type(op).__name__} is not a layer the graph can reason about"
            return self._boundary(op, node, ins, getattr(op, "channel_boundary", default))
        if isinstance(rule, str):
            return self._boundary(op, node, ins, rule)
        return rule

    def _boundary(self, op, node, ins, reason):
        if self.strict:
            raise UnsupportedLayerError(f"layer {op.name!r}: {reason} (strict=True)")
        self.boundaries.append((op.name, reason))
        for layout in ins:
            self._keep_layout(layout, f"boundary {op.name}")
        outs = [self._fresh(t, f"boundary {op.name}") for t in node.output_tensors]
        for layout in outs:
            self._producers[layout.segments[0].dim] = op
        return outs

    def _rule(self, op, node, ins):
        """The layouts `op` outputs (recording slots), a reason string for a boundary, or None."""
        from ke_tf.layers.gates import ChannelGate

        x = ins[0] if ins else None
        if not isinstance(op, keras.layers.Layer):
            return self._op_rule(op, node, ins)
        if isinstance(op, _L.DepthwiseConv2D) or isinstance(op, _L.DepthwiseConv1D):
            return self._depthwise(op, node, x, op.depth_multiplier, {"kernel": -2}, {"bias": 0})
        if isinstance(op, _L.SeparableConv2D) or isinstance(op, _L.SeparableConv1D):
            return self._separable(op, node, x)
        if isinstance(op, _CONVS):
            if op.groups == 1:
                return self._reader_writer(op, node, x, in_axis=-2)
            if op.groups == x.width:
                multiplier = op.filters // op.groups
                return self._depthwise(op, node, x, multiplier, {}, {"kernel": -1, "mask": -1, "bias": 0})
            return self._grouped(op, node, x)
        if isinstance(op, _L.Dense):
            return self._reader_writer(op, node, x, in_axis=0)
        if x is None or x.repeat != 1 and not isinstance(op, (_L.Dropout, _L.Identity)):
            return None if x is None else "channels already flattened with their positions"
        if isinstance(op, _L.BatchNormalization):
            if op.axis not in (-1, len(node.input_tensors[0].shape) - 1):
                return "BatchNormalization over a non-channel axis"
            self._per_channel(op, x, {"gamma": 0, "beta": 0, "moving_mean": 0, "moving_variance": 0})
            return [x]
        if isinstance(op, _L.LayerNormalization):
            return self._layer_norm(op, node, x)
        if isinstance(op, ChannelGate):
            self._per_channel(op, x, {"gate": 0})
            return [x]
        if isinstance(op, _L.PReLU):
            self._per_channel(op, x, {"alpha": -1})
            return [x]
        if isinstance(op, _L.Activation):
            name = getattr(op.activation, "__name__", "")
            return "activation mixing channels" if name in _CHANNEL_MIXING_ACTIVATIONS else [x]
        if isinstance(op, _L.Rescaling):
            scalar = all(np.ndim(v) == 0 for v in (op.scale, op.offset))
            return [x] if scalar else "per-channel Rescaling"
        if isinstance(op, _PASS_THROUGH):
            return [x]
        if isinstance(op, _MERGES):
            return self._merge(op, ins)
        if isinstance(op, _L.Concatenate):
            return self._concatenate(op, node, ins)
        if isinstance(op, _L.Flatten):
            return self._flatten(node, x)
        if isinstance(op, _L.Reshape):
            return self._reshape(node, x)
        return None

    def _op_rule(self, op, node, ins):
        name = type(op).__name__
        if name in _UNARY_OPS or (name in _MERGE_OPS and len(ins) == 1):
            return [ins[0]] if ins[0].repeat == 1 else None
        if name in _MERGE_OPS:
            return self._merge(op, ins)
        if name == "Concatenate":
            return self._concatenate(op, node, ins)
        return None

    # ---- rules with slots ------------------------------------------------------------------------
    def _slot(self, op, name, axis, layout, multiplier=1, divisor=1):
        variable = getattr(op, name, None)
        if variable is None:
            return
        axis = axis % len(variable.shape)
        period = layout.width * multiplier
        offset = 0
        for s in layout.segments:
            each = s.multiplier * multiplier
            key = (id(variable), axis, offset, period, layout.repeat, each)
            if key in self._slot_dims:  # a shared layer: every call reads/writes the same channels
                self._dims.union(self._slot_dims[key], s.dim)
            else:
                self._slot_dims[key] = s.dim
                self._slots.append(Slot(op, variable, axis, s.dim, offset, period, layout.repeat, each, divisor))
            offset += s.size * each

    def _per_channel(self, op, layout, variables):
        for name, axis in variables.items():
            self._slot(op, name, axis, layout)

    def _layer_norm(self, op, node, x):
        """LayerNormalization over the channel axis prunes like a per-channel layer (gamma, beta), but
        its statistics span the channels: the sliced net normalises over the kept channels only, the
        masked (gated) net over all of them, so it is listed in `inexact`."""
        rank = len(node.input_tensors[0].shape)
        axes = op.axis if isinstance(op.axis, (list, tuple)) else [op.axis]
        if sorted(a % rank for a in axes) != [rank - 1]:
            return "LayerNormalization over more than the channel axis"
        self._per_channel(op, x, {"gamma": 0, "beta": 0})
        self.inexact.append((op.name, "LayerNormalization statistics span the channels: sliced != masked"))
        return [x]

    def _output_dim(self, op, tensor):
        """The one output dimension of `op` (shared layers write the same dimension at every call)."""
        if id(op) not in self._out_dim:
            mixing = getattr(getattr(op, "activation", None), "__name__", "") in _CHANNEL_MIXING_ACTIVATIONS
            self._out_dim[id(op)] = self._dims.new(tensor.shape[-1], f"{op.name} softmax" if mixing else None)
            self._producers[self._out_dim[id(op)]] = op
        return _Layout((_Segment(self._out_dim[id(op)], int(tensor.shape[-1])),))

    def _reader_writer(self, op, node, x, in_axis):
        """Conv/Dense: reads `x` on the kernel's input axis, writes a new dimension."""
        if x.repeat != 1 and not isinstance(op, _L.Dense):
            return "channels already flattened with their positions"
        out = self._output_dim(op, node.output_tensors[0])
        for name in ("kernel", "mask"):
            self._slot(op, name, in_axis, x)
            self._slot(op, name, -1, out)
        self._slot(op, "bias", 0, out)
        self.layer_calls.append((op, node, (x,), out))
        return [out]

    def _depthwise(self, op, node, x, multiplier, per_input, per_output):
        """A per-channel convolution: output channel c * multiplier + j reads input channel c only, so
        its output is the input's layout, each channel repeated `multiplier` times."""
        if x.repeat != 1:
            return "channels already flattened with their positions"
        out = x.multiplied(multiplier)
        self._per_channel(op, x, per_input)
        self._per_channel(op, out, per_output)
        self.layer_calls.append((op, node, (x,), out))
        return [out]

    def _grouped(self, op, node, x):
        """A grouped conv: input channels (kernel rows) and filters are cut into `groups` blocks that
        keep the same in-block indices, so every group stays as wide as the others."""
        if len(x.segments) != 1 or x.repeat != 1 or x.segments[0].multiplier != 1:
            return "grouped convolution over concatenated, flattened or depthwise-multiplied channels"
        out = self._output_dim(op, node.output_tensors[0])
        self._dims.cut(x.segments[0].dim, op.groups)
        self._dims.cut(out.segments[0].dim, op.groups)
        for name in ("kernel", "mask"):
            self._slot(op, name, -2, x, divisor=op.groups)
            self._slot(op, name, -1, out)
        self._slot(op, "bias", 0, out)
        self.layer_calls.append((op, node, (x,), out))
        return [out]

    def _separable(self, op, node, x):
        """Depthwise part tied to the input (index c*m+j in the pointwise input), pointwise writes."""
        m = op.depth_multiplier
        out = self._output_dim(op, node.output_tensors[0])
        self._slot(op, "depthwise_kernel", -2, x)
        self._slot(op, "pointwise_kernel", -2, x, multiplier=m)
        self._slot(op, "pointwise_kernel", -1, out)
        self._slot(op, "bias", 0, out)
        self.layer_calls.append((op, node, (x,), out))
        return [out]

    def _merge(self, op, ins):
        """Elementwise merge: inputs' channels coincide (an input broadcast over channels is free)."""
        full = [layout for layout in ins if layout.width > 1] or ins
        first = full[0]
        for other in full[1:]:
            sizes = [(s.size, s.multiplier) for s in first.segments]
            if [(s.size, s.multiplier) for s in other.segments] != sizes or other.repeat != first.repeat:
                return "merges tensors whose channels are laid out differently"
        for other in full[1:]:
            for a, b in zip(first.segments, other.segments):
                self._dims.union(a.dim, b.dim)
        return [first]

    def _concatenate(self, op, node, ins):
        rank = len(node.output_tensors[0].shape)
        axis = getattr(op, "axis", -1)
        if axis % rank != rank - 1:
            return self._merge(op, ins)
        if any(layout.repeat != 1 for layout in ins):
            return "concatenation of flattened channels"
        return [_Layout(tuple(s for layout in ins for s in layout.segments))]

    def _flatten(self, node, x):
        shape = node.input_tensors[0].shape
        positions = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
        return [_Layout(x.segments, positions)]

    def _reshape(self, node, x):
        """A Reshape that keeps the last axis and only adds or drops unit axes (squeeze-excitation)."""
        before, after = node.input_tensors[0].shape[1:], node.output_tensors[0].shape[1:]
        if before[-1] == after[-1] and [d for d in before[:-1] if d != 1] == [d for d in after[:-1] if d != 1]:
            return [x]
        return "Reshape that moves channels"

    # ---- results ---------------------------------------------------------------------------------
    def _collect(self):
        by_root = {}
        for slot in self._slots:
            by_root.setdefault(self._dims.find(slot.dim), []).append(slot)
        producers = {}
        for dim, op in self._producers.items():
            producers.setdefault(self._dims.find(dim), []).append(op)
        groups, names = {}, set()
        inputs = {self._dims.find(d): name for d, name in self._input_names.items()}
        for root in sorted(set(by_root) | set(producers) | set(inputs)):
            writers = producers.get(root, [])
            name = inputs.get(root) or self._name(writers, root, names)
            names.add(name)
            blocks = self._dims.blocks[root]
            units = self._dims.size[root] // blocks
            slots = [
                dataclasses.replace(s, dim=root, blocks=blocks // s.divisor, units=units) for s in by_root.get(root, [])
            ]
            kept_by = list(self._dims.kept[root])
            groups[name] = Group(name, root, units, slots, kept_by, writers, blocks)
        self._root_name = {g.dim: n for n, g in groups.items()}
        return groups

    @staticmethod
    def _name(writers, root, taken):
        tags = sorted({t for op in writers if (t := getattr(op, "channel_group", None))})
        name = tags[0] if len(tags) == 1 else (writers[0].name if writers else f"dim{root}")
        return name if name not in taken else f"{name}_{root}"

    def group_of(self, dim):
        """The group name of a (possibly non-root) dimension id, None for a dimension no slot holds."""
        return self._root_name.get(self._dims.find(dim))

    def groups_of(self, variable):
        """{axis: [group names along it]} of `variable` (empty for a variable no group touches)."""
        by_axis = self.slots_by_axis().get(id(variable), {})
        return {axis: [self.group_of(s.dim) for s in slots] for axis, slots in by_axis.items()}

    def prunable(self):
        """{name: Group} of the groups that can lose channels."""
        return {n: g for n, g in self.groups.items() if g.prunable}

    def widths(self, keep=None):
        """{group: channel count} of every group, with `keep`'s groups narrowed to their kept sets."""
        keep = keep or {}
        return {n: len(keep[n]) if n in keep else g.channels for n, g in self.groups.items()}

    def layout_width(self, layout, widths):
        """Channels of a tensor laid out as `layout` in the model narrowed to `widths`."""
        channels = (widths[self.group_of(s.dim)] * self.groups[self.group_of(s.dim)].blocks for s in layout.segments)
        return sum(c * s.multiplier for c, s in zip(channels, layout.segments)) * layout.repeat

    def narrow_groups(self, op, node, widths):
        """`op`'s `groups` in the model narrowed to `widths`: a per-channel grouped conv (groups ==
        input channels) keeps one group per kept channel, a grouped conv keeps its groups."""
        x = self.layouts[id(node.input_tensors[0])]
        return self.layout_width(x, widths) if op.groups == x.width else op.groups

    def macs(self, widths):
        """MACs (paper convention, as `ke_tf.surgery.flops`) of the model narrowed to `widths`."""
        total = 0
        for op, node, (x,), out in self.layer_calls:
            positions = int(np.prod(node.output_tensors[0].shape[1:-1]))
            c_in, c_out = self.layout_width(x, widths), self.layout_width(out, widths)
            kernel = int(np.prod(getattr(op, "kernel_size", ())))
            if isinstance(op, (_L.DepthwiseConv1D, _L.DepthwiseConv2D)):
                total += positions * kernel * c_out
            elif isinstance(op, (_L.SeparableConv1D, _L.SeparableConv2D)):
                total += positions * c_in * op.depth_multiplier * (kernel + c_out)
            elif isinstance(op, _CONVS):
                total += positions * kernel * c_in * c_out // self.narrow_groups(op, node, widths)
            else:
                total += positions * c_in * c_out
        return total

    def params(self, widths):
        """Learnable parameters (as `ke_tf.surgery.flops.count_params`) of the model narrowed to `widths`."""
        from ke_tf.surgery.flops import NON_PARAMETER_NAMES

        shapes = [self.variable_shape(v, widths) for v in self.model.weights if v.name not in NON_PARAMETER_NAMES]
        return sum(int(np.prod(shape)) for shape in shapes)

    def variable_shape(self, variable, widths):
        """Shape `variable` takes in the model narrowed to `widths`."""
        shape = list(variable.shape)
        for axis, slots in self.slots_by_axis().get(id(variable), {}).items():
            shape[axis] = sum(s.repeat * s.multiplier * s.blocks * widths[self.group_of(s.dim)] for s in slots)
        return tuple(int(d) for d in shape)

    def slots_by_axis(self):
        """{id(variable): {axis: [Slot]}} over every group."""
        if not hasattr(self, "_by_axis"):
            self._by_axis = {}
            for g in self.groups.values():
                for s in g.slots:
                    self._by_axis.setdefault(id(s.variable), {}).setdefault(s.axis, []).append(s)
        return self._by_axis

    def report(self):
        """Plain-data summary: groups (channels, slots, prunable, why kept) and boundaries."""
        return {
            "groups": [
                {
                    "name": g.name,
                    "channels": g.channels,
                    "blocks": g.blocks,
                    "prunable": g.prunable,
                    "kept_by": g.kept_by,
                    "writers": [op.name for op in g.producers],
                    "slots": len(g.slots),
                }
                for g in self.groups.values()
            ],
            "boundaries": [{"layer": name, "reason": reason} for name, reason in self.boundaries],
            "inexact": [{"layer": name, "reason": reason} for name, reason in self.inexact],
        }
