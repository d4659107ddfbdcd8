"""The training engine every method loop runs on.

A loop supplies `loss_fn(batch, training) -> {"loss": per-example loss [B], "logits": [B, K]}` and
a data source with `stream(batch_size, seed, first_epoch, last_epoch, skip_steps, shard)` (see
`ke_tf.data.stream`). The Trainer runs one stage of it under the strategy:

- input: ONE distributed dataset per stage (`distribute_datasets_from_function`), each input
  pipeline decoding only its replicas' rows, from the resume point to the last epoch;
- steps: one `tf.function` call runs a loop of up to `steps_per_loop` steps over the distributed
  iterator (forward, gradients, micro-batch accumulation, all-reduce, update) and returns the
  loop's loss/accuracy sums as one tensor, read once per loop; loops stop at epoch ends and step
  checkpoints, where evaluation, checkpoints, signals and progress happen;
- per replica: loss + gradients over `accum_steps` micro-batches, ONE all-reduce of gradients and
  metrics, then decisions every replica takes identically on the reduced values: a non-finite loss
  (`on_nan`: stop before applying, or skip), an fp16 overflow (skip, halve the loss scale), coupled
  L2 added to the unscaled global gradients, the optimizer update in replica context; BN moving
  statistics are averaged across replicas after every step, or BN uses global batch statistics
  (`sync_bn`), so every replica holds the same model;
- checkpoints, exact resume, SIGINT/SIGTERM stops agreed by every worker, tqdm, TensorBoard, a
  metrics dict and one log line per epoch.
"""

import functools
import json
import os
import shutil
import signal
import time

import keras
import numpy as np
import tensorflow as tf

from ke_tf.config import ConfigError
from ke_tf.data.stream import InputShard
from ke_tf.engine.checkpoints import CheckpointError, StageCheckpoints, made_from, settle
from ke_tf.engine.iterators import release_in_background
from ke_tf.engine.loss_scale import LossScale
from ke_tf.engine.optim import make_optimizer
from ke_tf.engine.strategy import is_chief, is_multi_worker, jit_scope
from ke_tf.losses import at_least_float32
from ke_tf.params import atomic_write_bytes
from ke_tf.progress import log_line, progress_bar

# Automatic loop length: about this many seconds of work per call (the latency of signals and
# progress), at most MAX_STEPS_PER_LOOP steps.
AUTO_LOOP_SECONDS = 2.0
MAX_STEPS_PER_LOOP = 100
SYNC_BN_BELOW = 32  # sync_bn auto: synchronise BN below this many images per replica micro-batch
_RESULTS = ("loss", "correct", "applied", "skipped", "overflows", "steps", "nan_stop", "stopped")


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss is NaN/Inf and `on_nan` is `stop`. The weights and optimizer
    state are those before the bad step; BN moving statistics have seen its batch (keeping a copy
    would cost every step ~4% at the dispatch floor), so continue from the last checkpoint."""


class StopRequested(RuntimeError):
    """Raised after SIGINT/SIGTERM once a checkpoint has been written."""


def synchronise_bn(cfg, replicas):
    """Whether BN uses global batch statistics: `sync_bn` on, or auto with fewer than
    SYNC_BN_BELOW images per replica micro-batch (where per-replica statistics get noisy: Wu & He,
    Group Normalization, ECCV'18, Fig. 1); never with one replica (nothing to synchronise)."""
    if replicas == 1 or cfg.sync_bn == "off":
        return False
    return cfg.sync_bn == "on" or cfg.batch_size // (replicas * cfg.accum_steps) < SYNC_BN_BELOW


def instance_function(method):
    """tf.function of a bound method whose retracing statistics belong to this instance: TF keys
    them by the method's code, so one trace in each of several Trainers/Evaluators (a KE
    generation, an LwM task) would be reported as "frequent retracing"."""
    return tf.function(functools.partial(method.__func__, method.__self__))


def batch_norm_layers(model):
    """Every BatchNormalization layer inside `model` (nested models included)."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


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


class Trainer:
    """Runs `loss_fn` over `variables` of `model` for one stage of a loop. Build models inside
    `strategy.scope()` before constructing the Trainer."""

    def __init__(
        self,
        cfg,
        strategy,
        model,
        loss_fn,
        steps_per_epoch,
        run_dir,
        variables=None,
        decay_variables=None,
        extra_checkpoint=None,
        name="train",
    ):
        self.cfg = cfg
        self.strategy = strategy
        self.model = model
        self.loss_fn = loss_fn
        self.steps_per_epoch = int(steps_per_epoch)
        if self.steps_per_epoch <= 0:
            raise ValueError(f"{name}: batch size {cfg.batch_size} leaves no full training batch")
        self.run_dir = run_dir
        self.name = name
        self.chief = is_chief(strategy)
        self.multi_worker = is_multi_worker(strategy)
        self.replicas = strategy.num_replicas_in_sync
        if cfg.batch_size % (self.replicas * cfg.accum_steps):
            raise ConfigError(
                f"train.batch_size {cfg.batch_size} is not divisible by {self.replicas} replica(s) x "
                f"train.accum_steps {cfg.accum_steps}: every replica needs equal micro-batches"
            )
        self.sync_bn = synchronise_bn(cfg, self.replicas)
        batch_norms = batch_norm_layers(model)
        for layer in batch_norms:
            layer.synchronized = self.sync_bn
        self.moving_stats = [v for layer in batch_norms for v in (layer.moving_mean, layer.moving_variance)]
        self.jit = jit_scope(cfg.jit_compile, strategy, self.sync_bn)
        self.history = []
        with strategy.scope():
            self.variables = list(variables if variables is not None else model.trainable_variables)
            self.decay_variables = {id(v) for v in (decay_variables if decay_variables is not None else self.variables)}
            self.optimizer = make_optimizer(cfg, self.steps_per_epoch)
            # Built eagerly in scope: lazy building inside strategy.run fails with >1 replica.
            self.optimizer.build(self.variables)
            self.loss_scale = LossScale() if cfg.mixed_precision == "fp16" else None
            scaling = {"loss_scale": self.loss_scale} if self.loss_scale is not None else {}
            self.checkpoint = tf.train.Checkpoint(
                model=model, optimizer=self.optimizer, **scaling, **(extra_checkpoint or {})
            )
        self.ckpt_dir = os.path.join(run_dir, "checkpoints", name)
        self.checkpoints = StageCheckpoints(
            self.ckpt_dir, self.chief, made_from(model, cfg, self.steps_per_epoch), cfg.resume
        )
        self.manager = self.checkpoints.open_manager(self.checkpoint, cfg.keep_checkpoints)
        self._grads_fn = tf.function(self._gradients, jit_compile=True) if self.jit == "gradients" else self._gradients
        self._step_fn = tf.function(self._replica_step, jit_compile=True) if self.jit == "step" else self._replica_step
        self._loop_fn = instance_function(self._loop)
        self._mean_fn = instance_function(self._replica_mean)
        self._steps_per_loop = cfg.steps_per_loop or None  # None: calibrated on the second loop
        self._loops = 0
        self._stop_signal = None
        self.step = 0

    # ---- one step (replica context) ------------------------------------------------------
    def _gradients(self, batch):
        """Loss, correct count and gradients of one replica's batch over `accum_steps`
        micro-batches; the loss is scaled by the global batch so replica gradients sum to the
        global mean (and by the fp16 loss scale)."""
        k = self.cfg.accum_steps
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
                loss = tf.nn.compute_average_loss(at_least_float32(out["loss"]), global_batch_size=self.cfg.batch_size)
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

    def _replica_step(self, batch):
        """One training step on this replica; every decision is taken on all-reduced values, so
        all replicas agree. Returns (global loss, correct, loss finite, gradients finite)."""
        skippable = self.cfg.on_nan == "skip" or self.loss_scale is not None
        saved = [tf.identity(v.value) for v in self.moving_stats] if skippable else None
        loss, correct, grads = self._grads_fn(batch)
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
        wd = self.cfg.weight_decay
        coupled = self.cfg.weight_decay_mode == "coupled"
        for g, v in zip(grads, self.variables):
            if wd and id(v) in self.decay_variables:
                if coupled:  # PyTorch SGD weight_decay / EKG's g + wd*v, on the global gradient
                    g = g + wd * tf.cast(v, g.dtype)
                else:  # Keras/AdamW decoupled decay, applied before the update as Keras does
                    v.assign_sub(v * tf.cast(wd * lr, v.dtype))
            self.optimizer.update_step(g, v, tf.cast(lr, v.dtype))
        return tf.constant(True)

    # ---- a loop of steps (cross-replica context, one tf.function call) ----------------------
    def _loop(self, iterator, num_steps, stop_requested):
        """Up to `num_steps` steps; returns the `_RESULTS` sums as one float64 vector. Ends early
        before applying a non-finite step (`on_nan: stop`); under MultiWorkerMirroredStrategy a
        stop requested on any worker makes every worker run zero steps (agreed by an all-reduce).
        The stop is the loop's condition and the sums one loop-carried vector: an autograph
        `break` would wrap the rest of every step in a conditional (measured ~2% of a dispatch-bound
        step on a CPU)."""
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
            out = self.strategy.run(self._step_fn, args=(next(iterator),))
            loss, n_correct, loss_ok, grads_ok = [self.strategy.experimental_local_results(o)[0] for o in out]
            ok = loss_ok & grads_ok
            bad = ~loss_ok if fp16 else ~ok  # fp16: non-finite gradients alone are an overflow
            nan_stop = bad & (self.cfg.on_nan == "stop")  # this step was not applied: leave it uncounted
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

    def _loop_length(self):
        """Steps of the next loop: calibrated (or configured) length, never past an epoch end
        or a step checkpoint."""
        limit = self.steps_per_epoch - self.step % self.steps_per_epoch
        every = self.cfg.checkpoint_every_steps
        if every:
            limit = min(limit, every - self.step % every)
        return min(limit, self._steps_per_loop or 1)

    def _calibrate(self, seconds_per_step):
        """Fix the automatic loop length from a timed loop; workers agree on the mean time (the
        loop length must be the same everywhere: its steps contain collectives)."""
        if self.multi_worker:
            seconds_per_step = self._cluster_mean(seconds_per_step)
        self._steps_per_loop = int(
            np.clip(round(AUTO_LOOP_SECONDS / max(seconds_per_step, 1e-6)), 1, MAX_STEPS_PER_LOOP)
        )

    def _cluster_mean(self, value):
        """Mean of a host value over every replica of the cluster (a collective: all workers call it)."""
        return float(self._mean_fn(tf.constant(float(value), tf.float64)))

    def _replica_mean(self, value):
        return self.strategy.reduce(
            tf.distribute.ReduceOp.MEAN, self.strategy.run(tf.identity, args=(value,)), axis=None
        )

    # ---- checkpoints and signals ------------------------------------------------------------
    def restore(self):
        """Resume from the newest checkpoint of this stage that restores (`StageCheckpoints`);
        returns True if one was found. Every worker takes the same outcome: a refusal, or
        different restored steps, raises on every worker."""
        try:
            latest, failure = self.checkpoints.restore(self.checkpoint), None
        except CheckpointError as e:
            latest, failure = None, e
        self.step = int(self.optimizer.iterations.numpy())
        settle(self.name, failure, self.step, latest, self._cluster_mean if self.multi_worker else None)
        if latest is not None:
            history = os.path.join(self.run_dir, f"{self.name}_history.json")
            if os.path.exists(history):
                with open(history) as f:
                    self.history = [h for h in json.load(f) if h["epoch"] < self.step // self.steps_per_epoch]
        return latest is not None

    def save_checkpoint(self):
        self.checkpoints.save(self.manager, self.step)

    def _install_signal_handlers(self):
        def handler(signum, frame):
            self._stop_signal = signum

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    # ---- the stage --------------------------------------------------------------------------
    def fit(self, data, seed, epochs=None, eval_fn=None, resume=True, on_epoch_begin=None):
        """Train until `epochs` (default cfg.epochs) on `data.stream(...)` seeded by `seed`
        (order and augmentation depend only on (seed, epoch), so resuming mid-epoch skips exactly
        the finished steps). `eval_fn(epoch)` returns a metrics dict; `on_epoch_begin(epoch)` sets
        per-epoch state such as annealing factors (also when resuming mid-epoch). Returns the
        epoch history."""
        epochs = epochs or self.cfg.epochs
        if resume:
            self.restore()
        else:
            self.step = int(self.optimizer.iterations.numpy())
        total = epochs * self.steps_per_epoch
        if self.step >= total:
            return self.history
        stage_input = [self._input(data, seed, epochs)]  # released in the background at the end
        self._log(f"{self.name}: {self._setup_summary()}" + (f", resumed at step {self.step}" if self.step else ""))
        previous = self._install_signal_handlers()
        writer = (
            tf.summary.create_file_writer(os.path.join(self.run_dir, "tensorboard", self.name)) if self.chief else None
        )
        try:
            while self.step < total:
                epoch = self.step // self.steps_per_epoch
                if on_epoch_begin is not None:
                    on_epoch_begin(epoch)
                metrics = self._run_epoch(stage_input[0], epoch, epochs)
                if eval_fn is not None and ((epoch + 1) % self.cfg.eval_every_epochs == 0 or epoch + 1 == epochs):
                    metrics.update(eval_fn(epoch))
                self.history.append(metrics)
                self._write_history(writer, metrics)
                self._log(self._epoch_line(metrics, epochs))
                if self.cfg.checkpoint_every_epochs and (
                    (epoch + 1) % self.cfg.checkpoint_every_epochs == 0 or epoch + 1 == epochs
                ):
                    self.save_checkpoint()
        finally:
            release_in_background(stage_input)
            for sig, h in previous.items():
                signal.signal(sig, h)
            if not self.chief:
                shutil.rmtree(self.manager.directory, ignore_errors=True)
        return self.history

    def _input(self, data, seed, epochs):
        """The stage's distributed iterator, from the current step to the last epoch."""
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        batch = self.cfg.batch_size

        def pipeline(context):
            return data.stream(batch, seed, epoch, epochs, offset, InputShard.from_context(context))

        return iter(self.strategy.distribute_datasets_from_function(pipeline))

    def _run_epoch(self, iterator, epoch, epochs):
        """Loops until the end of `epoch` (of `epochs`); returns its training metrics."""
        end = (epoch + 1) * self.steps_per_epoch
        sums = dict.fromkeys(_RESULTS, 0.0)
        bar = progress_bar(
            total=self.steps_per_epoch,
            initial=self.step - epoch * self.steps_per_epoch,
            desc=f"{self.name} epoch {epoch + 1}/{epochs}",
            unit="step",
            disable=not (self.cfg.progress and self.chief),
        )
        start = time.time()
        with bar:
            while self.step < end:
                n = self._loop_length()
                began = time.time()
                result = dict(
                    zip(
                        _RESULTS,
                        self._loop_fn(iterator, tf.constant(n, tf.int32), tf.constant(self._stop_signal is not None))
                        .numpy()
                        .tolist(),
                    )
                )
                self._loops += 1
                if self._loops == 2 and self._steps_per_loop is None:
                    self._calibrate((time.time() - began) / max(result["steps"], 1.0))
                for key in sums:
                    sums[key] += result[key]
                self.step += int(result["steps"])
                bar.update(int(result["steps"]))
                if sums["applied"]:
                    bar.set_postfix(loss=f"{sums['loss'] / sums['applied']:.4f}")
                self._after_loop(result, epoch)
        seconds = time.time() - start
        images = sums["steps"] * self.cfg.batch_size
        return {
            "epoch": epoch,
            "lr": float(self.optimizer.learning_rate),
            "train_loss": sums["loss"] / max(sums["applied"], 1.0),
            "train_top1": sums["correct"] / max(sums["applied"] * self.cfg.batch_size, 1.0),
            "skipped_steps": int(sums["skipped"]),
            "overflow_steps": int(sums["overflows"]),
            "seconds": seconds,
            "images_per_sec": images / max(seconds, 1e-9),
        }

    def _after_loop(self, result, epoch):
        """Host-side consequences of a loop: NaN stop, skipped steps, signals, step checkpoints."""
        if result["nan_stop"]:
            raise NonFiniteLossError(
                f"{self.name}: non-finite loss at epoch {epoch + 1}, step {self.step}; stopped before "
                f"applying it (BN moving statistics did see the batch). Last good checkpoint: "
                f"{tf.train.latest_checkpoint(self.ckpt_dir) or 'none yet'}"
            )
        if result["skipped"]:
            self._log(
                f"{self.name}: skipped {int(result['skipped'])} step(s) with a non-finite loss before step {self.step}"
            )
        if result["stopped"] or (self._stop_signal is not None and not self.multi_worker):
            self.save_checkpoint()
            cause = f"signal {self._stop_signal}" if self._stop_signal is not None else "another worker's signal"
            raise StopRequested(
                f"{self.name}: stopped by {cause} at step {self.step}; checkpoint saved in {self.ckpt_dir}"
            )
        if self.cfg.checkpoint_every_steps and self.step % self.cfg.checkpoint_every_steps == 0:
            self.save_checkpoint()

    # ---- reporting --------------------------------------------------------------------------
    def _setup_summary(self):
        bn = ("synchronised BN" if self.sync_bn else "BN statistics averaged") if self.replicas > 1 else "one replica"
        loop = self._steps_per_loop or "auto"
        xla = {"off": "off", "gradients": "loss+gradients", "step": "whole step"}[self.jit]
        return (
            f"{self.replicas} replica(s) ({type(self.strategy).__name__}, {bn}), XLA {xla}, "
            f"steps per loop {loop}, precision {self.cfg.mixed_precision}"
        )

    def _epoch_line(self, m, epochs):
        parts = [
            f"{self.name} epoch {m['epoch'] + 1}/{epochs}",
            f"loss {m['train_loss']:.4f}",
            f"top-1 {100 * m['train_top1']:.2f}%",
        ]
        if "test_top1" in m:
            parts.append(f"test top-1 {100 * m['test_top1']:.2f}%")
        parts += [f"lr {m['lr']:.3g}", f"{m['images_per_sec']:.0f} img/s", f"{m['seconds']:.1f}s"]
        if m["skipped_steps"] or m["overflow_steps"]:
            parts.append(f"skipped {m['skipped_steps']} / fp16 overflows {m['overflow_steps']}")
        return " | ".join(parts)

    def _log(self, message):
        if self.chief and self.cfg.progress:
            log_line(message)

    def _write_history(self, writer, metrics):
        if not self.chief:
            return
        with writer.as_default():
            for key, value in metrics.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    tf.summary.scalar(f"{self.name}/{key}", value, step=metrics["epoch"] + 1)
        writer.flush()
        data = json.dumps(self.history, indent=1, default=float).encode()
        atomic_write_bytes(os.path.join(self.run_dir, f"{self.name}_history.json"), data)
