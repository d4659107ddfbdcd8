"""Structural re-parameterisation: multi-branch conv units that train with several branches and
deploy as one Conv2D with bias (RepVGG's BN fold + 1x1 -> 3x3 padding, ReduceNet's branches).

Kernel arithmetic is NumPy on HWIO kernels; BN is y = gamma * (x - mean) / sqrt(var + eps) + beta
per output channel, folded with the layer's own epsilon and moving statistics (inference mode).
"""

import keras
import numpy as np

from ke_tf.layers.activations import AnnealedReLU
from ke_tf.layers.batchnorm import batch_norm
from ke_tf.layers.factory import PADDINGS, conv_initializer


def _np(value):
    """A Keras variable or array as float64 NumPy."""
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value, np.float64)


def fold_bn(kernel, bias, bn, depthwise=False):
    """Fold inference-mode `bn` into the layer before it (kernel [..., in, out], bias or None):
    W*s, beta + (b - mean)*s with s = gamma / sqrt(var + eps). A `depthwise` kernel is
    [..., in, multiplier]: output channel c*multiplier + j is [..., c, j]. Returns float64 (kernel, bias)."""
    mean, var = _np(bn.moving_mean), _np(bn.moving_variance)
    gamma = _np(bn.gamma) if bn.gamma is not None else 1.0  # BN(scale=False) / BN(center=False)
    beta = _np(bn.beta) if bn.beta is not None else 0.0
    scale = gamma / np.sqrt(var + bn.epsilon)
    bias = np.zeros_like(mean) if bias is None else _np(bias)
    kernel = _np(kernel)
    return kernel * scale.reshape(kernel.shape[-2:] if depthwise else kernel.shape[-1:]), beta + (bias - mean) * scale


def pad_kernel(kernel, size):
    """Zero-pad a 1x1 (or smaller odd) HWIO kernel to `size` x `size` around the centre tap; with
    'same' padding and equal strides both kernels sample the same centres."""
    ph, pw = (size - kernel.shape[0]) // 2, (size - kernel.shape[1]) // 2
    return np.pad(kernel, [(ph, ph), (pw, pw), (0, 0), (0, 0)])


def same_centre_offset(size, strides, kernel_size=3):
    """Input index of the first output's window centre for a 'same' conv. Keras pads stride-2
    'same' convs on the bottom/right only, so a 3x3/s2 conv on an even size centres at 1 while
    a 1x1/s2 conv samples 0; a parallel 1x1 branch must use this offset to be fusable."""
    out = -(-size // strides)
    pad_before = max((out - 1) * strides + kernel_size - size, 0) // 2
    return kernel_size // 2 - pad_before


def _conv(filters, kernel_size, strides, name, padding="same"):
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_initializer=conv_initializer(),
        name=name,
    )


@keras.saving.register_keras_serializable(package="ke_tf")
class ReduceConv(keras.layers.Layer):
    """ReduceNet's unit before a block's first ReLU: BN(conv3x3(x) [+ bottleneck(x)] [+ lora(x)]).

    - `conv` (3x3, no BN of its own) is always present and kept by the student ("branch2");
    - `bottleneck=True` adds the teacher's non-linear branch ("branch1"):
      3x3 conv (filters*expansion) -> BN -> ReLU -> 1x1 conv -> BN;
    - `lora=True` adds the student's linear branch: 1x1 conv -> BN [-> AnnealedReLU when
      `lora_act="annealed"`]; its BN starts with gamma 0 so the inherited function is unchanged
      at the start of stage 2 (our choice; the original never enabled the branch);
    - `bn` is the shared BN that normalises the sum (the first layer of ReduceNet's `fuse`).
    Without the bottleneck (and with the annealed activation at l = 1) `fuse()` gives one
    equivalent 3x3 kernel and bias. `padding="torch"` pads strided 3x3 convs by one pixel on
    every side as PyTorch does (converted checkpoints); "same" is Keras' bottom/right padding.
    """

    channel_boundary = "ReduceNet unit: its channels are kept (deploy it first with ke_tf.deploy_model to prune)"

    def __init__(
        self,
        filters,
        strides=1,
        expansion=1.0,
        bottleneck=False,
        lora=False,
        lora_act="linear",
        padding="same",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if lora_act not in ("linear", "annealed"):
            raise ValueError(f"lora_act must be 'linear' or 'annealed', got {lora_act!r}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        self.padding = padding
        # PyTorch's symmetric padding only differs from "same" for strided convs.
        self._pad = padding == "torch" and int(strides) > 1
        conv_padding = "valid" if self._pad else "same"
        self.filters = int(filters)
        self.strides = int(strides)
        self.expansion = float(expansion)
        self.bottleneck = bool(bottleneck)
        self.lora = bool(lora)
        self.lora_act = lora_act
        self.conv = _conv(self.filters, 3, self.strides, "conv", conv_padding)
        self.bn = batch_norm("bn")
        if self.bottleneck:
            self.mid = max(1, int(round(self.filters * self.expansion)))
            self.b1_conv1 = _conv(self.mid, 3, self.strides, "b1_conv1", conv_padding)
            self.b1_bn1 = batch_norm("b1_bn1")
            self.b1_conv2 = _conv(self.filters, 1, 1, "b1_conv2")
            self.b1_bn2 = batch_norm("b1_bn2")
        if self.lora:
            # Stride 1 on the input subsampled at the 3x3 conv's window centres (see call()).
            self.lora_conv = _conv(self.filters, 1, 1, "lora_conv")
            self.lora_bn = batch_norm("lora_bn", zero_gamma=True)
            self.lora_activation = AnnealedReLU(name="lora_act") if lora_act == "annealed" else None
        for layer in self._flatten_layers(include_self=False, recursive=False):
            layer.dtype_policy = self.dtype_policy  # a float16 ReduceConv computes in float16 throughout

    def _padded_shape(self, input_shape):
        if not self._pad:
            return tuple(input_shape)
        return (input_shape[0], *(None if d is None else int(d) + 2 for d in input_shape[1:3]), input_shape[3])

    def build(self, input_shape):
        padded = self._padded_shape(input_shape)
        out = self.conv.compute_output_shape(padded)
        self.conv.build(padded)
        self.bn.build(out)
        if self.bottleneck:
            self.b1_conv1.build(padded)
            mid = self.b1_conv1.compute_output_shape(padded)
            self.b1_bn1.build(mid)
            self.b1_conv2.build(mid)
            self.b1_bn2.build(out)
        if self.lora:
            if self.strides > 1 and None in tuple(input_shape[1:3]):
                raise ValueError(f"{self.name}: a strided lora branch needs a static input size")
            self.lora_conv.build(input_shape)
            self.lora_bn.build(out)
            if self.lora_activation is not None:
                self.lora_activation.build(out)

    def call(self, x, training=None):
        xp = keras.ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]) if self._pad else x
        u = self.conv(xp)
        if self.bottleneck:
            h = keras.ops.relu(self.b1_bn1(self.b1_conv1(xp), training=training))
            u = u + self.b1_bn2(self.b1_conv2(h), training=training)
        if self.lora:
            v = self.lora_bn(self.lora_conv(self._centres(x)), training=training)
            u = u + (self.lora_activation(v) if self.lora_activation is not None else v)
        return self.bn(u, training=training)

    def _centres(self, x):
        """`x` at the centres of the 3x3 conv's output windows (1x1/stride-s sampling aligned with it)."""
        if self.strides == 1:
            return x
        s = self.strides
        if self.padding == "torch":  # a 3x3 window padded by 1 is centred on input 0
            return x[:, ::s, ::s, :]
        oh, ow = (same_centre_offset(int(d), s) for d in x.shape[1:3])
        return x[:, oh::s, ow::s, :]

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(self._padded_shape(input_shape))

    def count_macs(self, input_shape, output_shape):
        """Conv MACs of the branches this unit executes (the counting convention of ke_tf.surgery.flops)."""
        c_in = int(input_shape[-1])
        pixels = int(np.prod(output_shape[1:3]))
        macs = pixels * self.filters * 9 * c_in
        if self.bottleneck:
            macs += pixels * self.mid * 9 * c_in + pixels * self.filters * self.mid
        if self.lora:
            macs += pixels * self.filters * c_in
        return macs

    def fuse(self):
        """(kernel 3x3 HWIO, bias) of the single conv equal to this unit in inference mode."""
        if self.bottleneck:
            raise ValueError(
                f"{self.name}: the non-linear bottleneck branch cannot be fused; deploy the student variant"
            )
        kernel = _np(self.conv.kernel)
        bias = np.zeros(self.filters)
        if self.lora:
            lam = 1.0 if self.lora_activation is None else float(_np(self.lora_activation.lam))
            if abs(lam - 1.0) > 1e-6:
                raise ValueError(
                    f"{self.name}: annealed activation is at l={lam:.3f}, not linear (l=1) yet; cannot fuse"
                )
            k1, b1 = fold_bn(self.lora_conv.kernel, None, self.lora_bn)
            kernel = kernel + pad_kernel(k1, 3)
            bias = bias + b1
        return fold_bn(kernel, bias, self.bn)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "strides": self.strides,
            "expansion": self.expansion,
            "bottleneck": self.bottleneck,
            "lora": self.lora,
            "lora_act": self.lora_act,
            "padding": self.padding,
        }
