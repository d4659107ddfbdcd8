"""One deploy path for any functional Keras 3 model: a clone of its graph (nested functional models
and non-layer operations such as `x + y` included) where every `ReduceConv` is fused into one conv,
every BatchNormalization that only reads a linear conv / depthwise conv / dense is folded into it,
all-ones `ChannelGate`s are dropped and KE's split layers become plain Conv2D/Dense. Inference
outputs are unchanged; the layers keep their names.

A BN stays where folding would change the function: after a merge or an activation, after a layer
whose output is also read elsewhere or is a model output, across a nested model's boundary, or
normalising another axis than the channels (the last).
"""

import keras
from keras.src.models.functional import Functional

from ke_tf.layers.gates import ChannelGate
from ke_tf.layers.reparam import ReduceConv, fold_bn
from ke_tf.layers.split import SplitConv2D, SplitDense

DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense, *DEPTHWISE)
PLAIN_OF_SPLIT = ((SplitConv2D, keras.layers.Conv2D), (SplitDense, keras.layers.Dense))


def deploy_model(model):
    """The inference network of the functional (or Sequential) `model`: a new model with the same
    outputs in inference mode, reparameterized branches fused, BN folded, gates and masks dropped."""
    deployer = _Deployer()
    deployed = deployer.deploy(model)
    deployer.assign_weights()
    return deployed


def transfer_weights(source, target, source_name=None):
    """Set each `target` layer's weights to those of the `source` layer of the same name (or of
    `source_name(name)`): moves a deployed model's weights into an equal model built from a spec."""
    for layer in target.layers:
        if layer.weights:
            name = source_name(layer.name) if source_name else layer.name
            layer.set_weights(source.get_layer(name).get_weights())


def foldable_pairs(model):
    """(BN, layer) pairs of `model`'s own graph (not its nested models') whose BN can be folded
    into the layer before it."""
    outputs = {id(tensor) for tensor in model.outputs}
    pairs = []
    for bn in model.operations:
        if not isinstance(bn, keras.layers.BatchNormalization) or len(bn._inbound_nodes) != 1:
            continue
        tensor = bn._inbound_nodes[0].input_tensors[0]
        layer = tensor._keras_history.operation
        if id(tensor) not in outputs and _folds_into(bn, layer, len(tensor.shape)):
            pairs.append((bn, layer))
    return pairs


def _folds_into(bn, layer, rank):
    """Whether `bn` (over the last of `rank` axes) folds into `layer`: a linear conv/depthwise/dense
    called once whose only reader is `bn`."""
    return (
        isinstance(layer, FOLDABLE)
        and layer.activation is keras.activations.linear
        and len(layer._inbound_nodes) == 1
        and len(layer._outbound_nodes) == 1
        and bn.axis in (-1, rank - 1)
    )


def _functional(model):
    """`model` as a functional model; a Sequential is wrapped, a subclassed model refused."""
    if isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, model.outputs, name=model.name)
    if not isinstance(model, Functional):
        raise TypeError(
            f"{model.name}: deploy_model needs a functional model (keras.Model(inputs, outputs)); "
            f"a subclassed {type(model).__name__} has no graph to rewrite: build it functionally"
        )
    return model


def _inputs_like(model):
    """Fresh inputs of `model`'s shapes, dtypes and names (Keras' clone would name them after tensors)."""
    return keras.tree.map_structure(
        lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x._keras_history.operation.name), model.input
    )


def _passthrough(x, *args, **kwargs):
    """The operation a folded BN or an all-ones gate becomes: its input unchanged."""
    return x


def _open_gate(gate):
    """`_passthrough` for an all-ones gate; a gate that masks channels must be sliced away first."""
    if not bool(keras.ops.all(gate.gate == 1)):
        raise ValueError(
            f"{gate.name}: the gate masks channels of group {gate.group!r}; slice the model first "
            "(ke_tf.slice_model), then deploy"
        )
    return _passthrough


def _plain(layer):
    """(class, config) of `layer` as a stock Keras layer: KE's split layers lose their mask."""
    config = layer.get_config()
    for split, plain in PLAIN_OF_SPLIT:
        if isinstance(layer, split):
            return plain, {key: value for key, value in config.items() if key not in layer._split_config()}
    return type(layer), config


def _own_weights(layer):
    """`layer`'s weights as arrays, less a split layer's mask (no part of the forward pass)."""
    mask = layer.mask if isinstance(layer, (SplitConv2D, SplitDense)) else None
    return [keras.ops.convert_to_numpy(v) for v in layer.weights if v is not mask]


class _Deployer:
    """Clones graphs operation by operation; the clones' weights are set once all are built."""

    def __init__(self):
        self.pending = []  # (clone, weight arrays)
        self.folds = {}  # id(layer) -> the BN folded into it
        self.absorbed = set()  # id() of folded BNs

    def deploy(self, model):
        """The deployed clone of `model` (recursively for nested models)."""
        model = _functional(model)
        for bn, layer in foldable_pairs(model):
            self.folds[id(layer)] = bn
            self.absorbed.add(id(bn))
        return keras.models.clone_model(model, input_tensors=_inputs_like(model), clone_function=self.clone)

    def assign_weights(self):
        for clone, weights in self.pending:
            clone.set_weights(weights)

    def clone(self, op):
        """What `op` becomes in the deployed graph."""
        if not isinstance(op, keras.layers.Layer):
            return op  # a stateless operation (x + y on KerasTensors)
        if isinstance(op, keras.Model):
            return self.deploy(op)
        if id(op) in self.absorbed:
            return _passthrough
        if isinstance(op, ChannelGate):
            return _open_gate(op)
        if isinstance(op, ReduceConv):
            return self._fused(op)
        if id(op) in self.folds:
            bias = op.bias if op.use_bias else None
            return self._copy(op, fold_bn(op.kernel, bias, self.folds[id(op)], isinstance(op, DEPTHWISE)), True)
        return self._copy(op, _own_weights(op))

    def _copy(self, layer, weights, use_bias=None):
        """A stock-Keras clone of `layer` (with a bias when `use_bias`) that gets `weights`."""
        cls, config = _plain(layer)
        if use_bias:
            config["use_bias"] = True
        clone = cls.from_config(config)
        self.pending.append((clone, list(weights)))
        return clone

    def _fused(self, unit):
        """The 3x3 conv with bias equal to `unit`; PyTorch-padded strided units pad explicitly."""
        padding = "valid" if unit._pad else "same"
        conv = keras.layers.Conv2D(
            unit.filters, 3, strides=unit.strides, padding=padding, name=unit.name, dtype=unit.dtype_policy
        )
        self.pending.append((conv, list(unit.fuse())))
        if not unit._pad:
            return conv
        pad = keras.layers.ZeroPadding2D(1, name=f"{unit.name}_pad", dtype=unit.dtype_policy)
        return lambda x, *args, **kwargs: conv(pad(x))
