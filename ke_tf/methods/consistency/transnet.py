"""Trans-Net g of Knowledge Consistency (Liang et al., ICLR'20): reconstructs net B's feature x_B
from net A's feature x_A so that g(x_A) splits exactly into components of increasing "fuzziness"
(order k = number of gated ReLUs the component passed through); x_B - g(x_A) is the inconsistent
part.

With x = n(x_A) (per-sample, per-channel std scaling):
    h_0 = W_0 * x,   h_i = W_i * (x + p_{i-1} ReLU(n(h_{i-1}))),   g(x_A) = h_{L-1}
All convs are bias-free 3x3, p = sigmoid(beta). Freezing the ReLU gates and the std scalings
makes g linear, and h_{L-1} = sum_k Y_k exactly where Y_k has k gated ReLUs; the orders share the
weights W_i (W_{L-1} is used by every order).
"""

import keras
import tensorflow as tf

STD_EPS = 1e-5  # added to the std, as in the reference n(.)


def std_scale(x):
    """n(x): divide each (sample, channel) map by its unbiased spatial std (+1e-5) with the std's
    gradient stopped (the reference computes it on `.data`); the mean is not subtracted. Identity
    for 1x1 maps (FC taps). Returns (scaled x, scale)."""
    h, w = x.shape[1], x.shape[2]
    if h is not None and w is not None and h * w == 1:
        return x, tf.ones_like(x[:, :1, :1, :])
    n = tf.cast(tf.shape(x)[1] * tf.shape(x)[2], x.dtype)
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    var = tf.reduce_sum(tf.square(x - mean), axis=[1, 2], keepdims=True) / (n - 1.0)  # ddof=1 == torch
    scale = tf.stop_gradient(tf.sqrt(var) + STD_EPS)
    return x / scale, scale


@keras.saving.register_keras_serializable(package="ke_tf")
class TransNet(keras.layers.Layer):
    """The fuzzy-order disentangler; `call` returns g(x_A), `orders` its L order components.

    `depth` convs give `depth` orders and `depth - 1` gates p = sigmoid(beta), beta initialised to
    0 (p = 0.5); `learn_p=False` freezes them (reference `--fix_p`)."""

    def __init__(self, channels, depth=3, kernel_size=3, learn_p=True, **kwargs):
        super().__init__(**kwargs)
        if depth < 1:
            raise ValueError(f"TransNet depth must be >= 1, got {depth}")
        self.channels = int(channels)
        self.depth = int(depth)
        self.kernel_size = int(kernel_size)
        self.learn_p = bool(learn_p)
        # Reference init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
        self.convs = [
            keras.layers.Conv2D(
                self.channels,
                self.kernel_size,
                padding="same",
                use_bias=False,
                kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal"),
                name=f"conv{i}",
                dtype=self.dtype_policy,
            )
            for i in range(self.depth)
        ]

    def build(self, input_shape):
        if input_shape[-1] != self.channels:
            raise ValueError(
                f"TransNet maps {self.channels} channels to {self.channels}; got an input "
                f"with {input_shape[-1]} (nets A and B must have the same tap width)"
            )
        for conv in self.convs:
            conv.build(tuple(input_shape[:-1]) + (self.channels,))
        self.beta = self.add_weight(name="beta", shape=(self.depth - 1,), initializer="zeros", trainable=self.learn_p)

    @property
    def p(self):
        """Gate strengths p_k = sigmoid(beta_k) of the `depth - 1` nonlinear stages."""
        return keras.ops.sigmoid(self.beta)

    def call(self, x):
        x, _ = std_scale(x)
        p = keras.ops.cast(self.p, x.dtype)  # beta is float32 under a mixed policy
        h = self.convs[0](x)
        for i in range(1, self.depth):
            h = self.convs[i](x + p[i - 1] * tf.nn.relu(std_scale(h)[0]))
        return h

    def orders(self, x):
        """[Y_0, ..., Y_{depth-1}]: g(x) decomposed with the forward pass's ReLU gates and std
        scalings frozen, so the list sums to `call(x)`. Y_k passes through k gated ReLUs."""
        x, _ = std_scale(keras.ops.cast(x, self.compute_dtype))
        p = keras.ops.cast(self.p, x.dtype)  # beta is float32 under a mixed policy
        h = self.convs[0](x)
        parts = [h]  # order components of h_i
        for i in range(1, self.depth):
            _, scale = std_scale(h)
            gate = tf.cast(h > 0, h.dtype) * p[i - 1] / scale  # ReLU(h/s) = 1[h>0] h/s
            parts = [self.convs[i](x)] + [self.convs[i](gate * c) for c in parts]
            h = tf.add_n(parts)
        return parts

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "depth": self.depth,
            "kernel_size": self.kernel_size,
            "learn_p": self.learn_p,
        }


def transnet_model(feature_shape, depth=3, learn_p=True, name="transnet"):
    """Functional wrapper x_A -> g(x_A) (for the Trainer, checkpoints and pickled params)."""
    inputs = keras.Input(shape=tuple(feature_shape), name="x_a")
    layer = TransNet(feature_shape[-1], depth=depth, learn_p=learn_p, name="transnet")
    return keras.Model(inputs, layer(inputs), name=name)
