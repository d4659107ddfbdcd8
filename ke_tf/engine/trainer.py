"""The epoch driver every method loop runs on: one stage of training under the strategy.

A loop supplies `loss_fn(batch, training) -> {"loss": per-example loss [B], "logits": [B, K]}` and
a data source with `stream(batch_size, seed, first_epoch, last_epoch, skip_steps, shard)` (see
`ke_tf.data.stream`); the Trainer builds ONE distributed dataset for the stage (each input pipeline
decoding only its replicas' rows, from the resume point to the last epoch) and runs it epoch by
epoch: loops of steps, evaluation, reporting hooks, checkpoints, and SIGINT/SIGTERM stops agreed by
every worker. Between loops (at epoch ends and step checkpoints) is where the host acts.

The replica step (gradients, accumulation, all-reduce, NaN/overflow decisions, BN statistics) is
`step.py`, the loop of steps and its length `loop.py`, checkpoints `checkpoints.py`, signals
`signals.py`, the set-up line and the reporting hooks `reporting.py`.
"""

import os
import shutil
import time

import tensorflow as tf

from ke_tf.config import ConfigError
from ke_tf.data.stream import InputShard
from ke_tf.engine.bn_statistics import batch_norm_layers, synchronise_bn
from ke_tf.engine.checkpoints import CheckpointError, StageCheckpoints, made_from, settle
from ke_tf.engine.iterators import release_in_background
from ke_tf.engine.loop import RESULTS, StepLoop
from ke_tf.engine.loss_scale import LossScale
from ke_tf.engine.optim import make_optimizer
from ke_tf.engine.reporting import read_history, setup_line, stage_hooks
from ke_tf.engine.signals import StopSignals
from ke_tf.engine.step import ReplicaStep
from ke_tf.engine.strategy import is_chief, is_multi_worker, jit_scope, uses_gpu
from ke_tf.engine.xla_choice import choose
from ke_tf.io.progress import log_line, progress_bar


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss is NaN/Inf and `on_nan` is `stop`. The weights and optimizer
    state are those before the bad step; BN moving statistics have seen its batch (keeping a copy
    would slow every step), so continue from the last checkpoint."""


class StopRequested(RuntimeError):
    """Raised after SIGINT/SIGTERM once a checkpoint has been written."""


class Trainer:
    """Runs `loss_fn` over `variables` of `model` for one stage of a loop, as `train_cfg` (the
    config's `train` section, a TrainConfig) says. Build models inside `strategy.scope()` before
    constructing the Trainer."""

    def __init__(
        self,
        train_cfg,
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
        self.train_cfg = train_cfg
        self.strategy = strategy
        self.model = model
        self.loss_fn = loss_fn
        self.steps_per_epoch = int(steps_per_epoch)
        if self.steps_per_epoch <= 0:
            raise ValueError(f"{name}: batch size {train_cfg.batch_size} leaves no full training batch")
        self.run_dir = run_dir
        self.name = name
        self.chief = is_chief(strategy)
        self.multi_worker = is_multi_worker(strategy)
        self.replicas = strategy.num_replicas_in_sync
        if train_cfg.batch_size % (self.replicas * train_cfg.accum_steps):
            raise ConfigError(
                f"train.batch_size {train_cfg.batch_size} is not divisible by {self.replicas} replica(s) x "
                f"train.accum_steps {train_cfg.accum_steps}: every replica needs equal micro-batches"
            )
        self.sync_bn = synchronise_bn(train_cfg, self.replicas)
        batch_norms = batch_norm_layers(model)
        for layer in batch_norms:
            layer.synchronized = self.sync_bn
        self.moving_stats = [v for layer in batch_norms for v in (layer.moving_mean, layer.moving_variance)]
        self.jit = jit_scope(train_cfg.jit_compile, strategy, self.sync_bn)
        # What `auto` would compile on a CPU if measured faster (decided once, by the first `fit`).
        auto_cpu = train_cfg.jit_compile == "auto" and not uses_gpu(strategy)
        self.xla_candidate = jit_scope("on", strategy, self.sync_bn) if auto_cpu else "off"
        self.xla_note = None  # why auto chose as it did, for the set-up line
        self.history = []
        with strategy.scope():
            self.variables = list(variables if variables is not None else model.trainable_variables)
            self.decay_variables = {id(v) for v in (decay_variables if decay_variables is not None else self.variables)}
            self.optimizer = make_optimizer(train_cfg, self.steps_per_epoch)
            # Built eagerly in scope: lazy building inside strategy.run fails with >1 replica.
            self.optimizer.build(self.variables)
            self.loss_scale = LossScale() if train_cfg.mixed_precision == "fp16" else None
            scaling = {"loss_scale": self.loss_scale} if self.loss_scale is not None else {}
            self.checkpoint = tf.train.Checkpoint(
                model=model, optimizer=self.optimizer, **scaling, **(extra_checkpoint or {})
            )
        self.ckpt_dir = os.path.join(run_dir, "checkpoints", name)
        self.checkpoints = StageCheckpoints(
            self.ckpt_dir, self.chief, made_from(model, train_cfg, self.steps_per_epoch), train_cfg.resume
        )
        self.manager = self.checkpoints.open_manager(self.checkpoint, train_cfg.keep_checkpoints)
        self.loop = self._make_loop(self.jit)
        self.replica_step = self.loop.replica_step
        self.signals = StopSignals()
        self.step = 0

    def _make_loop(self, jit):
        """The StepLoop of this stage's replica step with XLA scope `jit`."""
        replica_step = ReplicaStep(
            self.train_cfg,
            self.loss_fn,
            self.variables,
            self.decay_variables,
            self.optimizer,
            self.loss_scale,
            self.moving_stats,
            self.replicas,
            self.sync_bn,
            jit,
        )
        return StepLoop(self.train_cfg, self.strategy, replica_step, self.optimizer, self.loss_scale)

    def _choose_xla(self, data, seed, epochs, remaining_steps):
        """`jit_compile: auto` on a CPU: keep XLA off or switch the stage to `xla_candidate`, as
        measured or cached (`xla_choice.choose`); the trial leaves every variable as it was."""
        use, xla_loop, self.xla_note = choose(
            self.xla_candidate,
            (self.model, self.variables, self.loss_fn, self.train_cfg, self.replicas, self.sync_bn),
            self.loop,
            lambda: self._make_loop(self.xla_candidate),
            lambda: self._input(data, seed, epochs, trial=True),
            remaining_steps,
            self.chief,
            self.loop.cluster_mean if self.multi_worker else None,
        )
        if use:
            self.jit = self.xla_candidate
            self.loop = xla_loop or self._make_loop(self.jit)
            self.replica_step = self.loop.replica_step

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
        settle(self.name, failure, self.step, latest, self.loop.cluster_mean if self.multi_worker else None)
        if latest is not None:
            self.history = read_history(self.run_dir, self.name, self.step // self.steps_per_epoch)
        return latest is not None

    def save_checkpoint(self):
        self.checkpoints.save(self.manager, self.step)

    # ---- the stage --------------------------------------------------------------------------
    def fit(self, data, seed, epochs=None, eval_fn=None, resume=True, on_epoch_begin=None, hooks=()):
        """Train until `epochs` (default train_cfg.epochs) on `data.stream(...)` seeded by `seed`
        (order and augmentation depend only on (seed, epoch), so resuming mid-epoch skips exactly
        the finished steps). `eval_fn(epoch)` returns a metrics dict; `on_epoch_begin(epoch)` sets
        per-epoch state such as annealing factors (also when resuming mid-epoch); `hooks`
        (`reporting.Hook`s) run after the stage's own reporting. Returns the epoch history."""
        epochs = epochs or self.train_cfg.epochs
        if resume:
            self.restore()
        else:
            self.step = int(self.optimizer.iterations.numpy())
        total = epochs * self.steps_per_epoch
        if self.step >= total:
            return self.history
        if self.xla_candidate != "off" and self.xla_note is None:
            self._choose_xla(data, seed, epochs, total - self.step)
        stage_input = [self._input(data, seed, epochs)]  # released in the background at the end
        setup = setup_line(
            self.replicas,
            self.strategy,
            self.sync_bn,
            self.jit,
            self.loop.steps_per_loop,
            self.train_cfg.mixed_precision,
            self.xla_note,
        )
        self._log(f"{self.name}: {setup}" + (f", resumed at step {self.step}" if self.step else ""))
        hooks = stage_hooks(self.run_dir, self.name, epochs, self.chief, self.train_cfg.progress) + list(hooks)
        try:
            with self.signals:
                self._run_epochs(stage_input[0], epochs, total, eval_fn, on_epoch_begin, hooks)
            for hook in hooks:
                hook.on_train_end(self.history)
        finally:
            release_in_background(stage_input)
            if not self.chief:
                shutil.rmtree(self.manager.directory, ignore_errors=True)
        return self.history

    def _run_epochs(self, iterator, epochs, total, eval_fn, on_epoch_begin, hooks):
        """Epochs until step `total`: train, evaluate, report, checkpoint."""
        while self.step < total:
            epoch = self.step // self.steps_per_epoch
            if on_epoch_begin is not None:
                on_epoch_begin(epoch)
            metrics = self._run_epoch(iterator, epoch, epochs)
            if eval_fn is not None and ((epoch + 1) % self.train_cfg.eval_every_epochs == 0 or epoch + 1 == epochs):
                metrics.update(eval_fn(epoch))
            self.history.append(metrics)
            for hook in hooks:
                hook.on_epoch_end(epoch, metrics, self.history)
            if self.train_cfg.checkpoint_every_epochs and (
                (epoch + 1) % self.train_cfg.checkpoint_every_epochs == 0 or epoch + 1 == epochs
            ):
                self.save_checkpoint()

    def _input(self, data, seed, epochs, trial=False):
        """The stage's distributed iterator, from the current step to the last epoch (`trial`: its
        first batch, repeated without end)."""
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        batch = self.train_cfg.batch_size

        def pipeline(context):
            stream = data.stream(batch, seed, epoch, epochs, offset, InputShard.from_context(context))
            return stream.take(1).cache().repeat() if trial else stream

        return iter(self.strategy.distribute_datasets_from_function(pipeline))

    def _run_epoch(self, iterator, epoch, epochs):
        """Loops until the end of `epoch` (of `epochs`); returns its training metrics."""
        end = (epoch + 1) * self.steps_per_epoch
        sums = dict.fromkeys(RESULTS, 0.0)
        bar = progress_bar(
            total=self.steps_per_epoch,
            initial=self.step - epoch * self.steps_per_epoch,
            desc=f"{self.name} epoch {epoch + 1}/{epochs}",
            unit="step",
            disable=not (self.train_cfg.progress and self.chief),
        )
        start = time.time()
        with bar:
            while self.step < end:
                stop_requested = self.signals.received is not None
                result = self.loop.run(iterator, self.loop.length(self.step, self.steps_per_epoch), stop_requested)
                for key in sums:
                    sums[key] += result[key]
                self.step += int(result["steps"])
                bar.update(int(result["steps"]))
                if sums["applied"]:
                    bar.set_postfix(loss=f"{sums['loss'] / sums['applied']:.4f}")
                self._after_loop(result, epoch)
        seconds = time.time() - start
        images = sums["steps"] * self.train_cfg.batch_size
        return {
            "epoch": epoch,
            "lr": float(self.optimizer.learning_rate),
            "train_loss": sums["loss"] / max(sums["applied"], 1.0),
            "train_top1": sums["correct"] / max(sums["applied"] * self.train_cfg.batch_size, 1.0),
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
        received = self.signals.received
        if result["stopped"] or (received is not None and not self.multi_worker):
            self.save_checkpoint()
            cause = f"signal {received}" if received is not None else "another worker's signal"
            raise StopRequested(
                f"{self.name}: stopped by {cause} at step {self.step}; checkpoint saved in {self.ckpt_dir}"
            )
        if self.train_cfg.checkpoint_every_steps and self.step % self.train_cfg.checkpoint_every_steps == 0:
            self.save_checkpoint()

    # ---- reporting --------------------------------------------------------------------------
    def _log(self, message):
        if self.chief and self.train_cfg.progress:
            log_line(message)
