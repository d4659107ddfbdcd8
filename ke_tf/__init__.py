"""ke_tf: Knowledge Evolution, distillation (KD, Born-Again, ReduceNet), incremental learning
without memorizing, EKG filter pruning and knowledge consistency for TensorFlow 2 / Keras 3.

The public API, by what you would use it for:

- Layers (all registered serializable under "ke_tf"): `SplitConv2D`, `SplitDense` (KE split
  masks), `ChannelGate` (pruning gates), `ReduceConv` (reparameterizable branch block, fused by
  `get_deploy_model`), `AnnealedReLU` (VanillaNet-style (1-l)*ReLU(x)+l*x), `TransNet`,
  `SyncBatchNormalization` (Keras BN with numerically stable cross-replica statistics).
- Layer factories for the model builders: `LayerFactory`, `SplitLayerFactory`, `GatedLayerFactory`.
- Models: `build_model`, `build_from_spec`, `model_spec`, `default_widths`, `register_arch`,
  `slice_model` (physically narrower network), `split_model` / `slim_model` (KE's split and slim
  networks of any functional Keras model), `get_deploy_model` (fused ReduceNet),
  `fold_batchnorm` (BN folded into convs for deployment).
- Any functional Keras model: `ChannelGraph` (its channel dependency groups and boundaries),
  `slice_channels` (keep given channels of each group: a physically narrower model), `prune`
  (EKG search, L1 or random, then slicing), `deploy_model` (reparameterized branches fused, BN
  folded, gates and split masks dropped).
- `ke_tf.keras`: the methods inside Keras's `fit` (`HintonKD` for `keras.distillation`,
  `born_again`, the `AnnealReLU` callback, `KnowledgeEvolution`).
- Losses (`ke_tf/losses.py`, each with its formula and temperature power): `cross_entropy`,
  `soft_cross_entropy`, `kd_loss`, `hinton_loss`, `ban_loss`, `lwf_distillation`,
  `attention_distillation`, `search_objective`, `bank_distillation`, `transnet_loss`;
  `grad_cam` (differentiable Grad-CAM).
- Measuring: `complexity`, `count_macs`, `count_params` (MACs, paper convention).
- Params files: `save_params`, `load_params` (restricted unpickler), `apply_params`, `ParamsError`.
- Training: `Trainer`, `Evaluator`, `make_strategy`; `load_data`; `load_config`, `run` (the entry
  point of every loop: supervised, evolution, distillation, incremental, ekg, consistency;
  `run_method` is its alias).
"""

from ke_tf.tf_startup import import_tensorflow

import_tensorflow()  # before anything else loads TensorFlow: its start-up log lines are filtered

from ke_tf.engine.host_memory import keep_freed_host_memory

keep_freed_host_memory()  # before TensorFlow's thread pools first allocate (see the module)

import ke_tf.keras  # noqa: E402,F401  the methods with model.fit, as the ke_tf.keras namespace
from ke_tf.config import ConfigError, load_config
from ke_tf.data import load_data
from ke_tf.engine import Evaluator, Trainer, make_strategy
from ke_tf.io.params import ParamsError, apply_params, load_params, save_params
from ke_tf.layers.activations import AnnealedReLU
from ke_tf.layers.batchnorm import SyncBatchNormalization
from ke_tf.layers.factory import LayerFactory
from ke_tf.layers.gates import ChannelGate, GatedLayerFactory
from ke_tf.layers.reparam import ReduceConv
from ke_tf.layers.split import SplitConv2D, SplitDense, SplitLayerFactory
from ke_tf.losses import (
    attention_distillation,
    ban_loss,
    bank_distillation,
    cross_entropy,
    hinton_loss,
    kd_loss,
    lwf_distillation,
    search_objective,
    soft_cross_entropy,
    transnet_loss,
)
from ke_tf.methods.consistency.transnet import TransNet
from ke_tf.methods.ekg.prune import prune
from ke_tf.methods.incremental.gradcam import grad_cam
from ke_tf.models import build_from_spec, build_model, default_widths, model_spec, register_arch
from ke_tf.models.reducenet import get_deploy_model
from ke_tf.runner import run, run_method
from ke_tf.surgery.deploy import deploy_model
from ke_tf.surgery.flops import complexity, count_macs, count_params
from ke_tf.surgery.folding import fold_batchnorm
from ke_tf.surgery.graph import ChannelGraph
from ke_tf.surgery.slicing import slice_channels, slice_model
from ke_tf.surgery.split_model import slim_model, split_model

__version__ = "0.1.0"


__all__ = [
    "AnnealedReLU",
    "ChannelGraph",
    "ChannelGate",
    "ConfigError",
    "Evaluator",
    "GatedLayerFactory",
    "LayerFactory",
    "ParamsError",
    "ReduceConv",
    "SplitConv2D",
    "SplitDense",
    "SplitLayerFactory",
    "SyncBatchNormalization",
    "Trainer",
    "TransNet",
    "apply_params",
    "attention_distillation",
    "build_from_spec",
    "build_model",
    "complexity",
    "count_macs",
    "count_params",
    "cross_entropy",
    "default_widths",
    "deploy_model",
    "fold_batchnorm",
    "get_deploy_model",
    "grad_cam",
    "kd_loss",
    "hinton_loss",
    "ban_loss",
    "lwf_distillation",
    "search_objective",
    "bank_distillation",
    "transnet_loss",
    "load_config",
    "load_data",
    "load_params",
    "make_strategy",
    "model_spec",
    "prune",
    "register_arch",
    "run",
    "run_method",
    "save_params",
    "slice_channels",
    "slice_model",
    "slim_model",
    "split_model",
    "soft_cross_entropy",
]
