"""The loop of steps: one `tf.function` call runs up to N replica steps over the distributed
iterator and returns their sums in one host read, and the loop's automatic length (about
`AUTO_LOOP_SECONDS` of work per call: the latency of signals and progress)."""

import time

import numpy as np
import tensorflow as tf

from ke_tf.engine.strategy import instance_function, is_multi_worker

AUTO_LOOP_SECONDS = 2.0
MAX_STEPS_PER_LOOP = 100
RESULTS = ("loss", "correct", "applied", "skipped", "overflows", "steps", "nan_stop", "stopped")


class StepLoop:
    """Loops of `replica_step` under `strategy` for the Trainer: `run` one loop, `length` of the
    next one (`train_cfg.steps_per_loop`, or calibrated on the second loop when 0), and
    `cluster_mean`, the collective the workers agree through."""

    def __init__(self, train_cfg, strategy, replica_step, optimizer, loss_scale):
        self.train_cfg = train_cfg
        self.strategy = strategy
        self.replica_step = replica_step
        self.optimizer = optimizer
        self.loss_scale = loss_scale
        self.multi_worker = is_multi_worker(strategy)
        self.steps_per_loop = train_cfg.steps_per_loop or None  # None: calibrated on the second loop
        self.calls = 0
        self._loop_fn = instance_function(self._loop)
        self._mean_fn = instance_function(self._replica_mean)

    def run(self, iterator, num_steps, stop_requested):
        """One loop of up to `num_steps` steps; returns the `RESULTS` sums as a dict of floats."""
        began = time.time()
        sums = self._loop_fn(iterator, tf.constant(num_steps, tf.int32), tf.constant(stop_requested))
        result = dict(zip(RESULTS, sums.numpy().tolist()))
        self.calls += 1
        if self.calls == 2 and self.steps_per_loop is None:
            self._calibrate((time.time() - began) / max(result["steps"], 1.0))
        return result

    def call(self, iterator, num_steps):
        """One loop of `num_steps` steps outside the stage's accounting (the XLA trial's timing)."""
        self._loop_fn(iterator, tf.constant(num_steps, tf.int32), tf.constant(False)).numpy()

    def variables(self, iterator):
        """Every variable a loop over `iterator` reads or writes (traced here if not yet)."""
        return self._loop_fn.get_concrete_function(iterator, tf.constant(1, tf.int32), tf.constant(False)).variables

    def length(self, step, steps_per_epoch):
        """Steps of the loop starting at `step`: the calibrated (or configured) length, never past
        an epoch end or a step checkpoint."""
        limit = steps_per_epoch - step % steps_per_epoch
        every = self.train_cfg.checkpoint_every_steps
        if every:
            limit = min(limit, every - step % every)
        return min(limit, self.steps_per_loop or 1)

    def cluster_mean(self, value):
        """Mean of a host value over every replica of the cluster (a collective: all workers call it)."""
        return float(self._mean_fn(tf.constant(float(value), tf.float64)))

    def _replica_mean(self, value):
        return self.strategy.reduce(
            tf.distribute.ReduceOp.MEAN, self.strategy.run(tf.identity, args=(value,)), axis=None
        )

    def _calibrate(self, seconds_per_step):
        """Fix the automatic loop length from a timed loop; workers agree on the mean time (the
        loop length must be the same everywhere: its steps contain collectives)."""
        if self.multi_worker:
            seconds_per_step = self.cluster_mean(seconds_per_step)
        self.steps_per_loop = int(
            np.clip(round(AUTO_LOOP_SECONDS / max(seconds_per_step, 1e-6)), 1, MAX_STEPS_PER_LOOP)
        )

    def _loop(self, iterator, num_steps, stop_requested):
        """Up to `num_steps` steps in cross-replica context; returns the `RESULTS` sums as one
        float64 vector. Ends early before applying a non-finite step (`on_nan: stop`); under
        MultiWorkerMirroredStrategy a stop requested on any worker makes every worker run zero
        steps (agreed by an all-reduce). The stop is the loop's condition and the sums one
        loop-carried vector: an autograph `break` would wrap the rest of every step in a conditional."""
        stopped = tf.constant(False)
        if self.multi_worker:
            votes = self.strategy.run(lambda: tf.cast(stop_requested, tf.float32))
            stopped = self.strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None) > 0
            num_steps = tf.where(stopped, 0, num_steps)
        fp16 = self.loss_scale is not None
        i = tf.constant(0)
        nan_stop = tf.constant(False)
        sums = tf.zeros([6], tf.float64)  # loss, correct, applied, skipped, overflows, steps
        while tf.logical_and(i < num_steps, tf.logical_not(nan_stop)):
            out = self.strategy.run(self.replica_step.step, args=(next(iterator),))
            loss, n_correct, loss_ok, grads_ok = [self.strategy.experimental_local_results(o)[0] for o in out]
            ok = loss_ok & grads_ok
            bad = ~loss_ok if fp16 else ~ok  # fp16: non-finite gradients alone are an overflow
            nan_stop = bad & (self.train_cfg.on_nan == "stop")  # this step was not applied: leave it uncounted
            counted = ~nan_stop
            # Skipped steps count: epochs stay aligned with the data.
            self.optimizer.iterations.assign_add(tf.cast(counted, self.optimizer.iterations.dtype))
            if fp16:
                self.loss_scale.update(grads_ok | ~loss_ok, active=counted)
            kept = tf.where(ok, tf.cast(tf.stack([loss, n_correct]), tf.float64), tf.zeros([2], tf.float64))
            flags = tf.cast(tf.stack([ok, bad & counted, ~bad & ~ok, counted]), tf.float64)
            sums += tf.concat([kept, flags], 0)
            i += 1
        return tf.concat([sums, tf.cast(tf.stack([nan_stop, stopped]), tf.float64)], 0)
