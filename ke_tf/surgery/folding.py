"""Fold BatchNorm into the preceding convolution for deployment.

Inference-mode BN is an affine map per channel, so conv -> BN equals one conv with kernel
k * gamma / sqrt(var + eps) and bias beta - mean * gamma / sqrt(var + eps). Pruned (EKG) and slim
(KE) ResNets keep their BN layers; on CPUs those memory-bound ops are a large share of latency,
so the exported network folds them (`layers.reparam.fold_bn`, as `get_deploy_model` for ReduceNet).
"""

import keras

from ke_tf.layers.factory import LayerFactory, tag_group
from ke_tf.layers.reparam import fold_bn
from ke_tf.models import build_from_spec


class FoldedLayerFactory(LayerFactory):
    """Convs with a bias and no BN: the layers of a BN-folded network."""

    def conv(
        self,
        filters,
        kernel_size,
        strides=1,
        name=None,
        role="body",
        group=None,
        use_bias=False,
        groups=1,
        padding="same",
    ):
        return super().conv(filters, kernel_size, strides, name, role, group, True, groups, padding)

    def bn(self, name=None, zero_gamma=False):
        return tag_group(keras.layers.Identity(name=name), None)


def _producer(layer):
    history = getattr(layer._inbound_nodes[0].input_tensors[0], "_keras_history", None)
    return history[0] if history else None


def conv_bn_pairs(model):
    """{conv layer name: the BN layer that directly follows it} of a functional model."""
    pairs = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            conv = _producer(layer)
            if isinstance(conv, keras.layers.Conv2D) and not isinstance(conv, keras.layers.DepthwiseConv2D):
                if len(conv._outbound_nodes) != 1:
                    raise ValueError(f"{conv.name} feeds more than its BN {layer.name}; cannot fold")
                pairs[conv.name] = layer
    return pairs


def fold_batchnorm(model, spec):
    """The BN-free equivalent (inference mode) of a ke_tf model built from `spec`; models without
    BN after their convs are returned unchanged."""
    pairs = conv_bn_pairs(model)
    if not pairs:
        return model
    folded = build_from_spec(spec, FoldedLayerFactory())
    for layer in folded.layers:
        if not layer.weights:
            continue
        source = model.get_layer(layer.name)
        if layer.name not in pairs:
            for target, value in zip(layer.weights, source.weights):
                target.assign(value)
            continue
        kernel, bias = fold_bn(source.kernel, source.bias if source.use_bias else None, pairs[layer.name])
        layer.kernel.assign(kernel.astype(layer.kernel.dtype))
        layer.bias.assign(bias.astype(layer.bias.dtype))
    return folded
