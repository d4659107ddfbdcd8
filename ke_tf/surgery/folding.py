"""Fold BatchNorm into the preceding convolution for deployment.

Inference-mode BN is an affine map per channel, so conv -> BN equals one conv with kernel
k * gamma / sqrt(var + eps) and bias beta - mean * gamma / sqrt(var + eps). Pruned (EKG) and slim
(KE) ResNets keep their BN layers; on CPUs those memory-bound ops are a large share of latency,
so the exported network folds them. The arithmetic is `ke_tf.surgery.deploy.deploy_model`'s; this
puts its weights into the spec-built network, whose names params files and exports rely on.
"""

import keras

from ke_tf.layers.factory import LayerFactory, tag_group
from ke_tf.models import build_from_spec
from ke_tf.surgery.deploy import deploy_model, transfer_weights


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


def fold_batchnorm(model, spec):
    """The BN-free equivalent (inference mode) of a ke_tf model built from `spec`: `deploy_model`'s
    weights in the model `spec` builds without BN (its layer names and variable paths, so params
    files reload through `build_from_spec`). Models without BN are returned unchanged."""
    if not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers):
        return model
    deployed = deploy_model(model)
    kept = [layer.name for layer in deployed.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if kept:
        raise ValueError(f"{', '.join(kept)} cannot be folded: the layer before reads or feeds more than the BN")
    folded = build_from_spec(spec, FoldedLayerFactory())
    transfer_weights(deployed, folded)
    return folded
