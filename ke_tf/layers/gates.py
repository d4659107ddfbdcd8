"""Channel gates for filter pruning (EKG): a per-channel 0/1 mask on the output of each channel
group's activation.

One `ChannelGate` layer exists per channel group and is *called at every site* of that group
(the stem and every block output of a residual stage, or a block's inner activation), so its
single non-trainable `gate` variable masks the whole group at once and masking is exactly
equivalent to slicing the group's channels out (residual streams included). The mask is a
variable, so changing it never retraces a compiled forward pass.
"""

import keras
import tensorflow as tf

from ke_tf.layers.factory import LayerFactory


@keras.saving.register_keras_serializable(package="ke_tf")
class ChannelGate(keras.layers.Layer):
    """y = x * gate (gate: [C] non-trainable, ones = unpruned). Shared by all sites of `group`.

    `channels` (default: the input's last axis) is C when the input holds each gate channel more than
    once: in each of the equal blocks a grouped convolution cuts it into (the gate is tiled), and
    `multiplier` times in place after a depthwise multiplier (a call argument: sites differ)."""

    def __init__(self, group, channels=None, **kwargs):
        super().__init__(**kwargs)
        self.group, self.channels = group, channels

    def build(self, input_shape):
        channels = self.channels or int(input_shape[-1])
        self.gate = self.add_weight(name="gate", shape=(channels,), initializer="ones", trainable=False)

    def call(self, x, multiplier=1):
        gate = keras.ops.cast(self.gate, x.dtype)
        blocks = x.shape[-1] // (gate.shape[0] * multiplier)
        if blocks > 1:
            gate = keras.ops.tile(gate, [blocks])
        if multiplier > 1:
            gate = keras.ops.repeat(gate, multiplier)
        return x * gate

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {**super().get_config(), "group": self.group}
        return {**config, "channels": self.channels} if self.channels else config


class GatedLayerFactory(LayerFactory):
    """Plain layers plus one shared `ChannelGate` per channel group. Use a fresh factory per
    model: it remembers the gate layer of each group it has handed out."""

    def __init__(self):
        self.gates = {}

    def gate(self, x, group, name=None):
        if group not in self.gates:
            self.gates[group] = ChannelGate(group, name=f"{group}_gate")
        return self.gates[group](x)


def model_gates(model):
    """{group: ChannelGate} of a gated model."""
    return {layer.group: layer for layer in model.layers if isinstance(layer, ChannelGate)}


def gate_sites(model):
    """{group: number of places the group's gate is applied} (steps are split between sites)."""
    return {g: len(layer._inbound_nodes) for g, layer in model_gates(model).items()}


def set_masks(gates, keep):
    """Assign 0/1 masks: channel c of group g stays on iff c is in `keep[g]` (groups absent from
    `keep` are fully on)."""
    for group, layer in gates.items():
        channels = int(layer.gate.shape[0])
        if group in keep:
            layer.gate.assign(
                tf.scatter_nd(
                    tf.reshape(tf.constant(list(keep[group]), tf.int32), [-1, 1]),
                    tf.ones([len(keep[group])]),
                    [channels],
                )
            )
        else:
            layer.gate.assign(tf.ones([channels]))
