"""MAC and parameter counter for Keras models, in the convention pruning/KE papers report.

FLOPs are multiply-accumulates of conv and dense layers (ResNet-56: 125.5M, ResNet-18 at 224:
1.82G); BN, activations, pooling and adds are not counted. Parameters are learnable numbers
(kernels, biases, BN gamma/beta), not BN moving statistics or masks. A custom layer that is not a
Conv/Dense subclass can define `count_macs(input_shape, output_shape) -> int` to be counted.
"""

import math

import keras

# Variable names that are state, not parameters (BN statistics, split masks, pruning gates,
# the annealed activation's blend factor).
NON_PARAMETER_NAMES = frozenset({"moving_mean", "moving_variance", "mask", "gate", "lam"})


def _prod(values):
    return math.prod(int(v) for v in values)


def layer_macs(layer, input_shape, output_shape):
    """MACs of one call of `layer` (batch dimension excluded)."""
    if hasattr(layer, "count_macs"):
        return int(layer.count_macs(input_shape, output_shape))
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        depthwise = input_shape[-1] * layer.depth_multiplier
        return _prod(output_shape[1:-1]) * depthwise * (_prod(layer.kernel_size) + output_shape[-1])
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return _prod(output_shape[1:]) * kh * kw
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        c_in = input_shape[-1] // layer.groups
        return _prod(output_shape[1:]) * kh * kw * c_in
    if isinstance(layer, keras.layers.Dense):
        return _prod(output_shape[1:]) * input_shape[-1]
    return 0


def _calls(layer):
    """(input_shape, output_shape) of every call of `layer` recorded in the functional graph."""
    for node in getattr(layer, "_inbound_nodes", []):
        if not node.input_tensors or not node.output_tensors:
            continue
        yield tuple(node.input_tensors[0].shape), tuple(node.output_tensors[0].shape)


def count_macs(model):
    """Total MACs for one example through a functional `model` (nested models included)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model) and not hasattr(layer, "count_macs"):
            total += count_macs(layer) * max(1, len(list(_calls(layer))))
            continue
        for in_shape, out_shape in _calls(layer):
            total += layer_macs(layer, in_shape, out_shape)
    return total


def count_params(model):
    """Learnable parameters (BN statistics and masks excluded), whether or not frozen."""
    return sum(_prod(v.shape) for v in model.weights if v.name not in NON_PARAMETER_NAMES)


def complexity(model):
    """{"params": int, "macs": int} for reports and params metadata."""
    return {"params": int(count_params(model)), "macs": int(count_macs(model))}
