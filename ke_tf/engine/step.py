"""One training step on one replica: loss and gradients over `accum_steps` micro-batches, ONE
all-reduce of gradients and metrics, then the decisions every replica takes alike on the reduced
values (a non-finite loss or fp16 overflow skips the update, coupled L2 or decoupled decay, the
optimizer update), and BN moving statistics kept equal across replicas."""

import tensorflow as tf

from ke_tf.losses import at_least_float32


def _split(batch, k, i):
    """Micro-batch `i` of `k` of every tensor in `batch`."""

    def cut(t):
        size = tf.shape(t)[0] // k
        return t[i * size : (i + 1) * size]

    return tf.nest.map_structure(cut, batch)


def _all_reduce_sum(context, values):
    """Sum `values` over the replicas in one all-reduce per dtype (a float64 model's gradients
    cannot be packed with the float32 loss), keeping their order."""
    by_dtype = {}
    for i, v in enumerate(values):
        by_dtype.setdefault(v.dtype, []).append(i)
    out = list(values)
    for indices in by_dtype.values():
        for i, r in zip(indices, context.all_reduce(tf.distribute.ReduceOp.SUM, [values[i] for i in indices])):
            out[i] = r
    return out


def _correct(logits, labels):
    return tf.reduce_sum(
        tf.cast(tf.math.in_top_k(tf.cast(labels, tf.int32), tf.cast(logits, tf.float32), 1), tf.float32)
    )


class ReplicaStep:
    """`step(batch) -> (global loss, correct, loss finite, gradients finite)` in replica context.
    `jit` ("off", "gradients", "step": see `jit_scope`) is what XLA compiles."""

    def __init__(
        self,
        train_cfg,
        loss_fn,
        variables,
        decay_variables,
        optimizer,
        loss_scale,
        moving_stats,
        replicas,
        sync_bn,
        jit,
    ):
        self.train_cfg = train_cfg
        self.loss_fn = loss_fn
        self.variables = variables
        self.decay_variables = decay_variables  # ids of the variables that get weight decay
        self.optimizer = optimizer
        self.loss_scale = loss_scale
        self.moving_stats = moving_stats
        self.replicas = replicas
        self.sync_bn = sync_bn
        self.jit = jit
        self._gradients_fn = tf.function(self.gradients, jit_compile=True) if jit == "gradients" else self.gradients
        self.step = tf.function(self._step, jit_compile=True) if jit == "step" else self._step

    def gradients(self, batch):
        """Loss, correct count and gradients of one replica's batch over `accum_steps`
        micro-batches; the loss is scaled by the global batch so replica gradients sum to the
        global mean (and by the fp16 loss scale)."""
        k = self.train_cfg.accum_steps
        grads = None
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0.0)
        for i in range(k):
            # Order the micro-batches: without the dependency the executor may start the next
            # forward pass while this one's activations are alive, and accumulation saves no memory.
            with tf.control_dependencies(grads if i else []):
                micro = tf.nest.map_structure(tf.identity, _split(batch, k, i)) if k > 1 else batch
            with tf.GradientTape() as tape:
                out = self.loss_fn(micro, training=True)
                loss = tf.nn.compute_average_loss(
                    at_least_float32(out["loss"]), global_batch_size=self.train_cfg.batch_size
                )
                scaled = loss * self.loss_scale.scale if self.loss_scale is not None else loss
            micro_grads = [
                tf.zeros_like(v) if g is None else tf.cast(g, v.dtype)  # None: v unused by the loss
                for g, v in zip(tape.gradient(scaled, self.variables), self.variables)
            ]
            grads = micro_grads if grads is None else [g + mg for g, mg in zip(grads, micro_grads)]
            loss_sum += tf.cast(loss, tf.float32)
            if "logits" in out:
                correct += _correct(out["logits"], micro[1])
        return loss_sum, correct, grads

    def _step(self, batch):
        """One training step on this replica; every decision is taken on all-reduced values, so
        all replicas agree."""
        skippable = self.train_cfg.on_nan == "skip" or self.loss_scale is not None
        saved = [tf.identity(v.value) for v in self.moving_stats] if skippable else None
        loss, correct, grads = self._gradients_fn(batch)
        context = tf.distribute.get_replica_context()
        if self.replicas > 1:
            loss, correct, *grads = _all_reduce_sum(context, [loss, correct, *grads])
        loss_ok = tf.math.is_finite(loss)
        # One sum over every gradient element is non-finite iff an element is (Inf - Inf = NaN),
        # short of the sum itself passing 3e38, which only a run already diverging reaches: one
        # reduction per tensor instead of IsFinite + All (~60 fewer ops per ResNet-20 step).
        grads_ok = tf.math.is_finite(tf.add_n([tf.cast(tf.reduce_sum(g), tf.float32) for g in grads] or [0.0]))
        apply = loss_ok & grads_ok
        tf.cond(apply, lambda: self._apply(grads), lambda: tf.constant(False))
        if saved is not None:  # a skipped step leaves the BN statistics as they were too
            for v, s in zip(self.moving_stats, saved):
                v.assign(tf.where(apply, v.value, s))
        if self.replicas > 1 and not self.sync_bn and self.moving_stats:
            means = context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in self.moving_stats])
            for v, m in zip(self.moving_stats, means):
                v.assign(m)
        return loss, correct, loss_ok, grads_ok

    def _apply(self, grads):
        """Update every variable from the global gradients, in replica context (identical on
        every replica): unscale (fp16), weight decay, then the optimizer's update rule."""
        if self.loss_scale is not None:
            grads = [g / self.loss_scale.scale for g in grads]
        lr = self.optimizer.learning_rate
        wd = self.train_cfg.weight_decay
        coupled = self.train_cfg.weight_decay_mode == "coupled"
        for g, v in zip(grads, self.variables):
            if wd and id(v) in self.decay_variables:
                if coupled:  # PyTorch SGD weight_decay / EKG's g + wd*v, on the global gradient
                    g = g + wd * tf.cast(v, g.dtype)
                else:  # Keras/AdamW decoupled decay, applied before the update as Keras does
                    v.assign_sub(v * tf.cast(wd * lr, v.dtype))
            self.optimizer.update_step(g, v, tf.cast(lr, v.dtype))
        return tf.constant(True)
