"""The one entry point of a training run, `ke_tf.run`, shared by `ke-tf-train`: strategy first
(MultiWorkerMirroredStrategy must exist before any TensorFlow op), then the precision policy and
the seed, then the method's loop."""

import keras

from ke_tf.engine import make_strategy, set_precision
from ke_tf.methods import get_loop


def run(cfg, strategy=None):
    """Run the loop `cfg.method` names and return its summary dict. `cfg` is a
    `ke_tf.config.Config` (see `load_config`). Python, NumPy, TensorFlow and Keras are seeded with
    `cfg.seed`, so two runs of one config start from the same weights; the config's
    `train.mixed_precision` policy is in force while it runs and the caller's is restored after."""
    loop = get_loop(cfg.method)
    strategy = strategy or make_strategy(cfg.distribute.strategy, cfg.distribute.cpu_replicas)
    previous = keras.mixed_precision.global_policy()
    set_precision(cfg.train.mixed_precision)
    keras.utils.set_random_seed(cfg.seed)
    try:
        return loop.run(cfg, strategy)
    finally:
        keras.mixed_precision.set_global_policy(previous)


run_method = run  # the entry point's earlier name, kept as an alias
