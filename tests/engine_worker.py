"""Subprocess body for the distributed engine tests (strategies must be created before any other
TF op, hence a fresh process per strategy). Trains a BN network under the requested strategy and
writes the final weights, every replica's BN moving statistics, the step and what it measured.

    python tests/engine_worker.py OUT.npz --replicas R [--multi-worker] [--model tiny|resnet20]
        [--sync-bn 0|1] [--epochs E] [--steps-per-loop N] [--kill-at STEP] [--fp16-overflow]
        [--run-dir DIR] [--float64]

The chief writes OUT; another worker writes OUT.worker<i>.npz. A stop by signal exits 130.
"""

import argparse
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ke_tf.engine import make_strategy  # noqa: E402


class CountingTransform:
    """Wraps an ImageData transform and counts the images this process decodes for training."""

    def __init__(self, inner, counter):
        self.inner, self.counter = inner, counter

    def train(self, item, seed):
        import tensorflow as tf

        def tick():
            self.counter[0] += 1
            return np.int32(0)

        done = tf.numpy_function(tick, [], tf.int32)
        with tf.control_dependencies([done]):
            return self.inner.train(item, seed)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def build(keras, kind):
    import ke_tf

    if kind == "resnet20":
        return ke_tf.build_model("resnet20", 10, (16, 16, 3), width_mult=0.25)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="fc")(x))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--multi-worker", action="store_true")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--sync-bn", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-loop", type=int, default=0)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--fp16-overflow", action="store_true")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--data", default="digits", help="digits (ImageData) | noise (TensorData)")
    parser.add_argument("--float64", action="store_true", help="the float64 dtype policy (identity tests)")
    args = parser.parse_args()

    strategy = make_strategy(
        "multi_worker" if args.multi_worker else "auto", cpu_replicas=0 if args.multi_worker else args.replicas
    )
    import keras
    import tensorflow as tf

    from ke_tf.config import TrainConfig
    from ke_tf.data import load_data
    from ke_tf.data.stream import TensorData
    from ke_tf.engine import StopRequested, Trainer, is_chief
    from ke_tf.losses import classifier_loss

    if args.fp16_overflow:
        keras.mixed_precision.set_global_policy("mixed_float16")
    if args.float64:
        keras.config.set_dtype_policy("float64")
    keras.utils.set_random_seed(0)
    counter = [0]
    batch = 32
    if args.data == "digits":
        data = load_data("digits", image_size=16, classes=[0, 1])  # 291 images: 9 steps of 32
        data._transform = CountingTransform(data._transform, counter)
        steps = data.info.train_size // batch
    else:  # BN statistics differ between the halves of every global batch (replica 0 vs 1)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2 * batch, 16, 16, 3)).astype("float32")
        x.reshape(2, 2, batch // 2, 16, 16, 3)[:, 1] += 1.5
        data = TensorData(x, rng.integers(0, 10, size=2 * batch).astype("int32"))
        steps = 2
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=batch,
        lr=0.02,
        momentum=0.9,
        schedule="cosine",
        weight_decay=1e-3,
        progress=False,
        jit_compile="off",
        sync_bn="on" if args.sync_bn else "off",
        steps_per_loop=args.steps_per_loop,
        mixed_precision="fp16" if args.fp16_overflow else "none",
    )
    with strategy.scope():
        model = build(keras, args.model)
    base = classifier_loss(model)
    progress = [0]

    @tf.custom_gradient
    def overflow_on_replica_1(logits):
        def grad(dy):
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            return dy * tf.cast(tf.where(tf.equal(replica, 1), 6e4, 1.0), dy.dtype)

        return tf.identity(logits), grad

    def signal_at_step():
        progress[0] += 1
        if progress[0] == args.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return np.int32(0)

    def loss_fn(batch, training):
        if args.kill_at:
            with tf.control_dependencies([tf.numpy_function(signal_at_step, [], tf.int32)]):
                batch = tf.nest.map_structure(tf.identity, batch)
        if not args.fp16_overflow:
            return base(batch, training)
        logits = overflow_on_replica_1(model(batch[0], training=training))
        return {
            "loss": tf.keras.losses.sparse_categorical_crossentropy(batch[1], logits, from_logits=True),
            "logits": logits,
        }

    run_dir = args.run_dir or os.path.join(os.path.dirname(args.out), f"run_{os.getpid()}")
    initial = {v.path: v.numpy() for v in model.weights}
    from ke_tf.methods.stage import evaluate_model

    test_data = data if args.data == "digits" else load_data("digits", image_size=16)
    evaluation = evaluate_model(strategy, model, test_data, 64)  # uneven: 72 or 360 images, batch 64
    trainer = Trainer(cfg, strategy, model, loss_fn, steps, run_dir)
    code = 0
    try:
        trainer.fit(data, seed=5)
    except StopRequested as e:
        print(str(e), file=sys.stderr)
        code = 130
    arrays = {f"w__{v.path}": v.numpy() for v in model.weights}
    for v in model.weights:
        for r, value in enumerate(strategy.experimental_local_results(v.value)):
            arrays[f"replica{r}__{v.path}"] = value.numpy()
    arrays.update({f"init__{k}": v for k, v in initial.items()})
    arrays.update({f"eval_{k}": v for k, v in evaluation.items()})
    arrays.update(
        replicas=strategy.num_replicas_in_sync,
        step=trainer.step,
        input_count=counter[0],
        iterations=int(trainer.optimizer.iterations.numpy()),
    )
    if trainer.loss_scale is not None:
        arrays["loss_scale"] = float(trainer.loss_scale.scale.numpy())
    task = strategy.cluster_resolver.task_id if args.multi_worker else 0
    np.savez(args.out if is_chief(strategy) else f"{args.out}.worker{task}.npz", **arrays)
    sys.exit(code)


if __name__ == "__main__":
    main()
