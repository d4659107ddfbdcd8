"""Subprocess body for distributed-equivalence tests: trains a tiny BN-free model for a few steps
under the requested strategy and writes the final weights (chief) to an .npz file.

    python tests/engine_worker.py OUT.npz REPLICAS [multi_worker]

Strategies must be created before any other TF op, hence a fresh process per strategy.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ke_tf.engine import make_strategy  # noqa: E402


def tiny_model(keras):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="fc")(x))


def main(out, replicas, kind="auto"):
    strategy = make_strategy(kind, cpu_replicas=replicas if kind != "multi_worker" else 0)
    import keras
    import tensorflow as tf

    from ke_tf.config import TrainConfig
    from ke_tf.engine import Trainer, is_chief
    from ke_tf.losses import classifier_loss

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 5, size=64).astype("int32")
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, momentum=0.9, schedule="cosine",
                      weight_decay=1e-3, progress=False, jit_compile="off")
    with strategy.scope():
        model = tiny_model(keras)
    trainer = Trainer(cfg, strategy, model, classifier_loss(model), 4,
                      os.path.join(os.path.dirname(out), f"run_{os.getpid()}"))
    trainer.fit(lambda epoch: tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True))
    if is_chief(strategy):
        np.savez(out, **{v.path.replace("/", "__"): v.numpy() for v in model.weights},
                 replicas=strategy.num_replicas_in_sync)
    else:
        np.savez(out + ".worker.npz", **{v.path.replace("/", "__"): v.numpy() for v in model.weights})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *(sys.argv[3:4]))
