"""Knowledge Evolution split layers: conv/dense layers carrying a fixed fit-hypothesis mask.

The mask (a non-trainable variable named `mask`, same shape as the kernel; 1 = fit hypothesis
H_F, 0 = reset hypothesis H_R) never enters the forward pass: as in KE's code the dense network
trains every weight. It is used only to re-initialise H_R between generations
(`reinitialize_reset_hypothesis`) and to slice out the slim network (kels). Being a variable, it
is saved in params pickles, checkpoints and `.keras` files (mandatory for the random wels masks).
"""

import math
import zlib

import keras
import numpy as np

from ke_tf.layers.factory import LayerFactory, tag_group

SPLIT_MODES = ("kels", "wels")
ROLES = ("body", "stem", "classifier")


def fit_count(channels, split_rate):
    """Fit-hypothesis width of a `channels`-wide dimension: ceil(sr*C), as KE's code."""
    return int(math.ceil(split_rate * channels))


def kels_mask(kernel_shape, split_rate, role, groups=1):
    """Kernel-level split of a kernel whose last two dims are (in, out): the first ceil(sr*in)
    inputs x the first ceil(sr*out) outputs; the stem keeps every input channel (the image) and
    the classifier keeps every output row (all classes). A grouped conv's kernel reads one group's
    inputs: the first ceil(sr*in) of them x the first ceil(sr*out/groups) filters of every group,
    so every group keeps the same width (the channel graph's blocks)."""
    mask = np.zeros(kernel_shape, np.float32)
    c_in, c_out = kernel_shape[-2:]
    per_group = c_out // groups
    keep_in = c_in if role == "stem" else fit_count(c_in, split_rate)
    keep_out = per_group if role == "classifier" else fit_count(per_group, split_rate)
    mask[..., :keep_in, :] = (np.arange(c_out) % per_group < keep_out).astype(np.float32)
    return mask


def wels_mask(kernel_shape, split_rate, seed):
    """Weight-level split: each weight is fit with probability sr (KE: U(0,1) >= 1-sr); seeded,
    unlike KE's unseeded np.random, so a run is reproducible."""
    u = np.random.default_rng(seed).random(kernel_shape)
    return (u >= 1.0 - split_rate).astype(np.float32)


REINIT_RULES = ("kaiming_uniform", "kaiming_normal")


def reset_initializer(rule="kaiming_uniform", seed=None):
    """Distribution the reset hypothesis is re-drawn from. "kaiming_uniform" is KE's code:
    torch `kaiming_uniform_(a=sqrt(5))` = U(+-1/sqrt(fan_in)), fan_in = kh*kw*C_in, ~0.41x the
    std of the initial He-normal init (ahmdtaha/knowledge_evolution@a3f2eb2, `utils/net_utils.py` `split_reinitialize`
    and the split layers' `split_reinitialize`; the paper only says "randomly
    re-initialised"). "kaiming_normal" re-draws from the initial distribution instead."""
    if rule == "kaiming_uniform":
        return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed)
    if rule == "kaiming_normal":
        return ke_initializer(seed)
    raise ValueError(f"reset rule must be one of {REINIT_RULES}, got {rule!r}")


def ke_initializer(seed=None):
    """KE's initial init of conv and linear kernels (`kaiming_normal`, fan_in, relu), untruncated."""
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_in", distribution="untruncated_normal", seed=seed)


class _SplitMixin:
    """Mask creation, re-initialisation and config shared by SplitConv2D and SplitDense."""

    def _init_split(self, split_rate, split_mode, role, seed):
        if split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {SPLIT_MODES}, got {split_mode!r}")
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not 0.0 < float(split_rate) <= 1.0:
            raise ValueError(f"split_rate must be in (0, 1], got {split_rate}")
        self.split_rate = float(split_rate)
        self.split_mode = split_mode
        self.role = role
        self.seed = int(seed)

    def _build_mask(self):
        shape = tuple(self.kernel.shape)
        if self.split_mode == "kels":
            value = kels_mask(shape, self.split_rate, self.role, getattr(self, "groups", 1))
        else:
            value = wels_mask(shape, self.split_rate, self.seed)
        self.mask = self.add_weight(
            name="mask", shape=shape, dtype="float32", trainable=False, initializer=lambda shape, dtype=None: value
        )

    def reinitialize(self, seed, rule="kaiming_uniform"):
        """Replace the reset-hypothesis kernel weights (mask == 0) by fresh samples of `rule`;
        fit weights, biases and everything else stay untouched."""
        fresh = reset_initializer(rule, seed)(tuple(self.kernel.shape), dtype=self.kernel.dtype)
        keep = keras.ops.cast(self.mask, "bool")
        self.kernel.assign(keras.ops.where(keep, self.kernel, fresh))

    # Keras' Conv/Dense serialise only kernel and bias by position; add the mask by name so a
    # `.keras` file keeps it (a wels mask cannot be regenerated if it was ever changed).
    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.built:
            store["mask"] = self.mask

    def load_own_variables(self, store):
        super().load_own_variables(store)
        if self.built:
            self.mask.assign(store["mask"])

    def _split_config(self):
        return {"split_rate": self.split_rate, "split_mode": self.split_mode, "role": self.role, "seed": self.seed}


@keras.saving.register_keras_serializable(package="ke_tf")
class SplitConv2D(_SplitMixin, keras.layers.Conv2D):
    """Conv2D with a KE fit-hypothesis `mask` (forward pass unchanged)."""

    def __init__(self, filters, kernel_size, split_rate=0.5, split_mode="kels", role="body", seed=0, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._init_split(split_rate, split_mode, role, seed)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_mask()

    def get_config(self):
        return {**super().get_config(), **self._split_config()}


@keras.saving.register_keras_serializable(package="ke_tf")
class SplitDense(_SplitMixin, keras.layers.Dense):
    """Dense with a KE fit-hypothesis `mask` (forward pass unchanged)."""

    def __init__(self, units, split_rate=0.5, split_mode="kels", role="classifier", seed=0, **kwargs):
        super().__init__(units, **kwargs)
        self._init_split(split_rate, split_mode, role, seed)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_mask()

    def get_config(self):
        return {**super().get_config(), **self._split_config()}


def split_layers(model):
    """Every split layer of `model` (nested models included), in graph order."""
    found = []
    for layer in model.layers:
        if isinstance(layer, _SplitMixin):
            found.append(layer)
        elif hasattr(layer, "layers"):
            found.extend(split_layers(layer))
    return found


def reinitialize_reset_hypothesis(model, seed, rule="kaiming_uniform"):
    """KE's between-generation step: re-draw every split layer's reset weights (seeded per layer
    from `seed`); BN parameters/statistics and biases (the classifier bias) are kept, as in KE."""
    for layer in split_layers(model):
        layer.reinitialize(layer_seed(seed, layer.name), rule)


def layer_seed(seed, name):
    """A stable per-layer seed (same layers get different, reproducible streams)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


class SplitLayerFactory(LayerFactory):
    """Yields SplitConv2D/SplitDense (KE initial init: He-normal fan_in, untruncated) so any
    ke_tf builder produces the split network; BN layers are plain (BN is split by slicing)."""

    def __init__(self, split_rate=0.5, split_mode="kels", seed=0):
        self.split_rate = float(split_rate)
        self.split_mode = split_mode
        self.seed = int(seed)
        self._count = 0

    def _layer_seed(self, name):
        self._count += 1
        return layer_seed(self.seed, name or f"layer{self._count}")

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
        return tag_group(
            SplitConv2D(
                filters,
                kernel_size,
                split_rate=self.split_rate,
                split_mode=self.split_mode,
                role=role,
                seed=self._layer_seed(name),
                strides=strides,
                padding=padding,
                use_bias=use_bias,
                groups=groups,
                kernel_initializer=ke_initializer(),
                name=name,
            ),
            group,
        )

    def dense(self, units, name=None, role="classifier"):
        # Bias starts at 0 (KE: torch default U(+-1/sqrt(fan_in))); a deliberate simplification,
        # the bias is never re-initialised either way.
        return SplitDense(
            units,
            split_rate=self.split_rate,
            split_mode=self.split_mode,
            role=role,
            seed=self._layer_seed(name),
            kernel_initializer=ke_initializer(),
            name=name,
        )

    def metadata(self):
        """Plain-data description stored in params metadata to rebuild the split network."""
        return {"split_rate": self.split_rate, "split_mode": self.split_mode, "seed": self.seed}
