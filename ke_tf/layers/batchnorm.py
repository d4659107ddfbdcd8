"""Batch normalisation whose synchronised (cross-replica) statistics are numerically stable.

Keras's `BatchNormalization(synchronized=True)` all-reduces sum(x) and sum(x^2) and takes
E[x^2] - E[x]^2, which loses all precision on channels whose variance is tiny next to their mean
(measured on digits: 2 replicas drifted from one device by 2.6% of a weight after two steps).
Here each replica's mean and centred sum of squares are combined exactly (Chan et al.'s parallel
variance), so N replicas compute what `tf.nn.moments` computes on one device over the global batch.
"""

import functools

import keras
import tensorflow as tf

# PyTorch-compatible defaults: the published recipes (ResNet, KE, EKG) were tuned with torch BN
# (momentum 0.1 on the running stats == Keras momentum 0.9, eps 1e-5).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def synchronized_moments(x, axes):
    """Mean and (biased) variance of `x` over `axes` and over every replica's batch."""
    context = tf.distribute.get_replica_context()
    count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
    local_mean = tf.reduce_mean(x, axis=axes)
    local_m2 = tf.reduce_sum(
        tf.square(x - tf.reshape(local_mean, [-1 if a == len(x.shape) - 1 else 1 for a in range(len(x.shape))])),
        axis=axes,
    )
    total, total_sum = context.all_reduce(tf.distribute.ReduceOp.SUM, [count, count * local_mean])
    mean = total_sum / total
    m2 = context.all_reduce(tf.distribute.ReduceOp.SUM, local_m2 + count * tf.square(local_mean - mean))
    return mean, m2 / total


def in_xla_function():
    """Whether the graph being traced is compiled by XLA (`jit_compile`): XLA fuses the unfused
    ops itself and its lowering of the fused kernel measured slower (README, BN on the fused kernel)."""
    from tensorflow.python.ops import control_flow_util  # TF's own test; no public equivalent

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def fused_batch_norm(x, gamma, beta, epsilon):
    """Training-mode BN of a float32 NHWC batch on TF's fused kernel: (y, batch mean, biased batch
    variance). The kernel's backward gives dx; dgamma and dbeta are summed by `tf.reduce_sum`, whose
    tree reductions are more accurate than the kernel's (measured against float64: see README)."""
    return _fused_kernel(float(epsilon))(x, gamma, beta)


@functools.cache
def _fused_kernel(epsilon):
    """`fused_batch_norm` at one epsilon (an attribute of the kernel, not a tensor)."""

    @tf.custom_gradient
    def kernel(x, gamma, beta):
        y, mean, variance, *reserve = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=gamma,
            offset=beta,
            mean=tf.zeros([0], tf.float32),
            variance=tf.zeros([0], tf.float32),
            epsilon=epsilon,
            data_format="NHWC",
            is_training=True,
        )
        count = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
        biased = variance * tf.maximum(count - 1.0, 0.0) / count  # the kernel returns the Bessel-corrected one

        def grad(dy, dmean, dvariance):
            dx, *_ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy,
                x=x,
                scale=gamma,
                reserve_space_1=reserve[0],
                reserve_space_2=reserve[1],
                reserve_space_3=reserve[2],
                epsilon=epsilon,
                data_format="NHWC",
                is_training=True,
            )
            normalised = (x - mean) * tf.math.rsqrt(biased + epsilon)
            return dx, tf.reduce_sum(dy * normalised, axis=[0, 1, 2]), tf.reduce_sum(dy, axis=[0, 1, 2])

        return (y, tf.stop_gradient(mean), tf.stop_gradient(biased)), grad

    return kernel


@keras.saving.register_keras_serializable(package="ke_tf")
class SyncBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` whose `synchronized=True` statistics are computed stably
    (see the module docstring); identical to Keras's layer otherwise. The Trainer switches
    `synchronized` on when `train.sync_bn` asks for it and there is more than one replica.

    `fused=True` (ke_tf's models) trains float32 4-D channels-last batches on TF's fused kernel
    (`fused_batch_norm`: faster without XLA, as accurate as the unfused path against float64);
    other dtypes, masks, renorm, synchronised statistics over several replicas, XLA-compiled steps
    and inference take Keras's path."""

    def __init__(self, fused=False, **kwargs):
        super().__init__(**kwargs)
        self.fused = fused

    def call(self, inputs, training=None, mask=None):
        if training and self.trainable and self._fusable(inputs, mask):
            gamma, beta = (tf.convert_to_tensor(v) for v in (self.gamma, self.beta))
            y, mean, variance = fused_batch_norm(inputs, gamma, beta, self.epsilon)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            return y
        return super().call(inputs, training=training, mask=mask)

    def _fusable(self, inputs, mask):
        context = tf.distribute.get_replica_context()
        synchronized = self.synchronized and context is not None and context.num_replicas_in_sync > 1
        return (
            self.fused
            and not in_xla_function()
            and mask is None
            and not self.renorm
            and not synchronized
            and self.scale
            and self.center
            and inputs.dtype == "float32"
            and self.variable_dtype == "float32"
            and len(inputs.shape) == 4
            and self.axis % 4 == 3
        )

    def get_config(self):
        return {**super().get_config(), "fused": self.fused}

    def _moments(self, inputs, mask):
        context = tf.distribute.get_replica_context()
        if (
            not self.synchronized
            or mask is not None
            or context is None
            or context.num_replicas_in_sync == 1
            or self.axis % len(inputs.shape) != len(inputs.shape) - 1
        ):
            return super()._moments(inputs, mask)
        return synchronized_moments(inputs, self._reduction_axes)


def batch_norm(name=None, zero_gamma=False):
    """The BN layer of every ke_tf model (torch momentum/epsilon; gamma 0 for a block's last BN
    when `zero_gamma`)."""
    return SyncBatchNormalization(
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        name=name,
        gamma_initializer="zeros" if zero_gamma else "ones",
        fused=True,
    )
