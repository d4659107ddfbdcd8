"""A model's BatchNormalization layers and moving statistics, and whether several replicas
synchronise BN batch statistics: what the Trainer, the Evaluator and EKG's search share."""

import keras

SYNC_BN_BELOW = 32  # sync_bn auto: synchronise BN below this many images per replica micro-batch


def batch_norm_layers(model):
    """Every BatchNormalization layer inside `model` (nested models included)."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def moving_statistics(model):
    """The moving mean and variance variables of every BN layer of `model`, layer by layer."""
    return [v for layer in batch_norm_layers(model) for v in (layer.moving_mean, layer.moving_variance)]


def synchronise_bn(cfg, replicas):
    """Whether BN uses global batch statistics: `sync_bn` on, or auto with fewer than
    SYNC_BN_BELOW images per replica micro-batch (where per-replica statistics get noisy: Wu & He,
    Group Normalization, ECCV'18, Fig. 1); never with one replica (nothing to synchronise)."""
    if replicas == 1 or cfg.sync_bn == "off":
        return False
    return cfg.sync_bn == "on" or cfg.batch_size // (replicas * cfg.accum_steps) < SYNC_BN_BELOW
