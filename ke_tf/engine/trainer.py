"""The training engine every method loop runs on.

A loop supplies `loss_fn(batch, training) -> {"loss": per-example loss [B], "logits": [B, K]}`
and a per-epoch dataset function; the Trainer runs it under the strategy: per-replica loss +
gradients (XLA-compiled when jit is on), gradient accumulation over micro-batches, coupled L2,
then `apply_gradients` outside XLA (jit-compiling the apply fails with >1 replica, DESIGN.md),
checkpoints, resume, tqdm, TensorBoard and a metrics dict per epoch.
"""
import json
import math
import os
import shutil
import signal
import tempfile
import time

import tensorflow as tf
from tqdm.auto import tqdm

from ke_tf.engine.optim import make_optimizer
from ke_tf.engine.strategy import is_chief, resolve_jit
from ke_tf.params import atomic_write_bytes


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss is NaN/Inf and `on_nan` is `stop`."""


class StopRequested(RuntimeError):
    """Raised after SIGINT/SIGTERM once a checkpoint has been written."""


def distribute_options(ds):
    """Shard by data, not files: in-memory/tfds pipelines have fewer files than workers."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _split(batch, k, i):
    """Micro-batch `i` of `k` of every tensor in `batch`."""
    def cut(t):
        size = tf.shape(t)[0] // k
        return t[i * size:(i + 1) * size]
    return tf.nest.map_structure(cut, batch)


def _labels(batch):
    return batch[1]


def _correct(logits, labels, k=1):
    return tf.reduce_sum(tf.cast(tf.math.in_top_k(tf.cast(labels, tf.int32), tf.cast(logits, tf.float32), k),
                                 tf.float32))


class Trainer:
    """Runs `loss_fn` over `variables` of `model` for a loop. Build models inside
    `strategy.scope()` before constructing the Trainer."""

    def __init__(self, cfg, strategy, model, loss_fn, steps_per_epoch, run_dir, variables=None,
                 decay_variables=None, extra_checkpoint=None, name="train"):
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
        self.jit = resolve_jit(cfg.jit_compile, strategy)
        self.history = []
        with strategy.scope():
            self.variables = list(variables if variables is not None else model.trainable_variables)
            self.decay_variables = {id(v) for v in (decay_variables if decay_variables is not None
                                                   else self.variables)}
            self.optimizer = make_optimizer(cfg, self.steps_per_epoch)
            # Built eagerly in scope: lazy building inside strategy.run fails with >1 replica.
            self.optimizer.build(self.variables)
            self.checkpoint = tf.train.Checkpoint(model=model, optimizer=self.optimizer,
                                                  **(extra_checkpoint or {}))
        self.ckpt_dir = os.path.join(run_dir, "checkpoints", name)
        write_dir = self.ckpt_dir if self.chief else tempfile.mkdtemp(prefix="ke_tf_ckpt_")
        self.manager = tf.train.CheckpointManager(self.checkpoint, write_dir, max_to_keep=cfg.keep_checkpoints)
        self._grads_fn = (tf.function(self._loss_and_grads, jit_compile=True) if self.jit
                          else self._loss_and_grads)
        self._compute = tf.function(self._distributed_compute)
        self._apply = tf.function(self._distributed_apply)
        self._stop_signal = None

    # ---- one step ------------------------------------------------------------------------
    def _loss_and_grads(self, batch):
        """Loss + gradients of one replica's batch, accumulated over `accum_steps` micro-batches;
        the loss is scaled by the global batch so replica gradients sum to the global mean."""
        k = self.cfg.accum_steps
        global_batch = self.cfg.batch_size
        grads = [tf.zeros_like(v) for v in self.variables]
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0.0)
        for i in range(k):
            # Order the micro-batches: without the dependency the executor may start the next
            # forward pass while this one's activations are alive, and accumulation saves no memory.
            with tf.control_dependencies(grads if i else []):
                micro = tf.nest.map_structure(tf.identity, _split(batch, k, i)) if k > 1 else batch
            with tf.GradientTape() as tape:
                out = self.loss_fn(micro, training=True)
                loss = tf.nn.compute_average_loss(tf.cast(out["loss"], tf.float32), global_batch_size=global_batch)
                scaled = self.optimizer.scale_loss(loss) if hasattr(self.optimizer, "scale_loss") else loss
            micro_grads = tape.gradient(scaled, self.variables)
            grads = [g if mg is None else g + tf.cast(mg, g.dtype) for g, mg in zip(grads, micro_grads)]
            loss_sum += loss
            if "logits" in out:
                correct += _correct(out["logits"], _labels(micro))
        return loss_sum, correct, grads

    def _distributed_compute(self, batch):
        loss, correct, grads = self.strategy.run(self._grads_fn, args=(batch,))
        return (self.strategy.reduce("SUM", loss, axis=None),
                self.strategy.reduce("SUM", correct, axis=None), grads)

    def _apply_replica(self, grads):
        wd = self.cfg.weight_decay if self.cfg.weight_decay_mode == "coupled" else 0.0
        if wd:
            # Coupled L2 (PyTorch SGD weight_decay, EKG's g + wd*v): gradients are summed over
            # replicas, so each replica adds its share.
            n = self.strategy.num_replicas_in_sync
            grads = [g + (wd / n) * tf.cast(v, g.dtype) if id(v) in self.decay_variables else g
                     for g, v in zip(grads, self.variables)]
        self.optimizer.apply_gradients(zip(grads, self.variables))

    def _distributed_apply(self, grads):
        self.strategy.run(self._apply_replica, args=(grads,))

    # ---- loop ----------------------------------------------------------------------------
    @property
    def step(self):
        return int(self.optimizer.iterations.numpy())

    def restore(self):
        """Resume from the newest checkpoint of this stage; returns True if one was found."""
        latest = tf.train.latest_checkpoint(self.ckpt_dir)
        if latest is None:
            return False
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        history = os.path.join(self.run_dir, f"{self.name}_history.json")
        if os.path.exists(history):
            with open(history) as f:
                self.history = [h for h in json.load(f) if h["epoch"] < self.step // self.steps_per_epoch]
        return True

    def save_checkpoint(self):
        self.manager.save(checkpoint_number=self.step)

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

    def fit(self, train_data, epochs=None, eval_fn=None, resume=True, on_epoch_begin=None):
        """Train until `epochs` (default cfg.epochs). `train_data(epoch)` returns that epoch's
        dataset of global batches (deterministic per epoch, so resuming mid-epoch skips exactly the
        finished steps). `eval_fn(epoch)` returns a metrics dict; `on_epoch_begin(epoch)` sets
        per-epoch state such as annealing factors (also when resuming mid-epoch). Returns the
        epoch history."""
        epochs = epochs or self.cfg.epochs
        if resume:
            self.restore()
        previous = self._install_signal_handlers()
        writer = tf.summary.create_file_writer(os.path.join(self.run_dir, "tensorboard", self.name)) \
            if self.chief else None
        try:
            while self.step < epochs * self.steps_per_epoch:
                epoch, offset = divmod(self.step, self.steps_per_epoch)
                if on_epoch_begin is not None:
                    on_epoch_begin(epoch)
                metrics = self._run_epoch(train_data(epoch).skip(offset), epoch, offset)
                if eval_fn is not None and ((epoch + 1) % self.cfg.eval_every_epochs == 0 or epoch + 1 == epochs):
                    metrics.update(eval_fn(epoch))
                self.history.append(metrics)
                self._write_history(writer, metrics)
                if self.cfg.checkpoint_every_epochs and ((epoch + 1) % self.cfg.checkpoint_every_epochs == 0
                                                         or epoch + 1 == epochs):
                    self.save_checkpoint()
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)
            if not self.chief:
                shutil.rmtree(self.manager.directory, ignore_errors=True)
        return self.history

    def _run_epoch(self, dataset, epoch, offset):
        dist = self.strategy.experimental_distribute_dataset(distribute_options(dataset))
        total = self.steps_per_epoch
        bar = tqdm(total=total, initial=offset, desc=f"{self.name} epoch {epoch + 1}/{self.cfg.epochs}",
                   disable=not (self.cfg.progress and self.chief), leave=False, dynamic_ncols=True)
        loss_sum = correct = 0.0
        steps = 0
        start = time.time()
        for batch in dist:
            if self.step >= (epoch + 1) * total:
                break
            loss, n_correct, grads = self._compute(batch)
            loss = float(loss)
            if not math.isfinite(loss):
                if self.cfg.on_nan == "stop":
                    raise NonFiniteLossError(
                        f"{self.name}: non-finite loss ({loss}) at epoch {epoch + 1}, step {self.step}; "
                        f"stopped before applying it. Last good checkpoint: "
                        f"{tf.train.latest_checkpoint(self.ckpt_dir) or 'none yet'}")
                bar.write(f"{self.name}: skipped a step with non-finite loss at step {self.step}")
                # Count it so the epoch/schedule position stays aligned with the data.
                self.optimizer.iterations.assign_add(1)
                bar.update(1)
                continue
            self._apply(grads)
            loss_sum += loss
            correct += float(n_correct)
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / steps:.4f}")
            if self.cfg.checkpoint_every_steps and self.step % self.cfg.checkpoint_every_steps == 0:
                self.save_checkpoint()
            if self._stop_signal is not None:
                self.save_checkpoint()
                bar.close()
                raise StopRequested(f"{self.name}: stopped by signal {self._stop_signal} at step "
                                    f"{self.step}; checkpoint saved in {self.ckpt_dir}")
        bar.close()
        seconds = time.time() - start
        return {"epoch": epoch, "lr": float(self.optimizer.learning_rate), "train_loss": loss_sum / max(steps, 1),
                "train_top1": correct / max(steps * self.cfg.batch_size, 1), "seconds": seconds,
                "images_per_sec": steps * self.cfg.batch_size / max(seconds, 1e-9)}

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
