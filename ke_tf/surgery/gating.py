"""Channel gates on any functional model: one `ChannelGate` per prunable group of its
`ChannelGraph`, applied where the group's channels are read (the input of every convolution or
dense layer, before a Flatten that feeds one), so a 0/1 gate is exactly the model sliced to the
gate's ones. EKG's search scores channels by the gradient of these gates."""

import keras

from ke_tf.layers.gates import ChannelGate
from ke_tf.surgery.graph import ChannelGraph
from ke_tf.surgery.slicing import GraphRebuilder, copy_weights

_L = keras.layers
_READERS = (_L.Conv1D, _L.Conv2D, _L.Conv3D, _L.Dense, _L.SeparableConv1D, _L.SeparableConv2D)


def _reads(layer):
    return isinstance(layer, _READERS) and not isinstance(layer, (_L.DepthwiseConv1D, _L.DepthwiseConv2D))


class _GateInserter:
    def __init__(self, graph):
        self.graph, self.gates, self.gated = graph, {}, {}

    def gate(self, name, tensor, multiplier):
        """`tensor` (one segment's channels) times the gate of group `name`."""
        if name not in self.gates:
            group = self.graph.groups[name]
            channels = group.channels if group.blocks > 1 or multiplier > 1 else None
            self.gates[name] = ChannelGate(name, channels, name=f"{name}_gate")
        return self.gates[name](tensor, multiplier=multiplier) if multiplier > 1 else self.gates[name](tensor)

    def apply(self, original_tensor, tensor):
        """`tensor` (the rebuilt `original_tensor`) with every prunable segment of its channels gated."""
        key = id(tensor)
        if key not in self.gated:
            layout = self.graph.layouts[id(original_tensor)]
            names = [self.graph.group_of(s.dim) for s in layout.segments]
            prunable = [self.graph.groups[n].prunable for n in names]
            if not any(prunable):
                self.gated[key] = tensor
            elif len(names) == 1:
                self.gated[key] = self.gate(names[0], tensor, layout.segments[0].multiplier)
            else:
                pieces, offset = [], 0
                for segment, name, cut in zip(layout.segments, names, prunable):
                    piece = tensor[..., offset : offset + segment.width]
                    pieces.append(self.gate(name, piece, segment.multiplier) if cut else piece)
                    offset += segment.width
                self.gated[key] = keras.ops.concatenate(pieces, axis=-1)
        return self.gated[key]

    def __call__(self, original, clone, node, args, kwargs):
        if _reads(original) and not self._flattened(node):
            source = node.input_tensors[0]
            args = (self.apply(source, args[0]), *args[1:])
        elif isinstance(original, _L.Flatten):
            args = (self.apply(node.input_tensors[0], args[0]), *args[1:])
        return clone(*args, **kwargs)

    def _flattened(self, node):
        return self.graph.layouts[id(node.input_tensors[0])].repeat != 1


def insert_gates(model, graph=None):
    """(gated copy of `model` with the same weights, {group: ChannelGate}); gates start open."""
    graph = graph or ChannelGraph(model)
    inserter = _GateInserter(graph)
    rebuild = GraphRebuilder(lambda layer, node: type(layer).from_config(layer.get_config()), call=inserter)
    gated = rebuild.model(model)
    copy_weights(rebuild.layer_pairs(), lambda v: v.numpy())
    return gated, inserter.gates
