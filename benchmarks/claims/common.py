"""What the claim modules share: configs from a shipped quickstart plus overrides, and one run of
a method loop in its own folder with a quiet engine."""

import os

from ke_tf.shipped_configs import resolve_config

QUIET = ("train.progress=false", "train.checkpoint_every_epochs=0", "train.eval_every_epochs=1000")


def config(name, run_dir, seed, *overrides):
    """The shipped config `name` with `overrides` (`key=value`), run in `run_dir` with `seed`."""
    from ke_tf.config import load_config

    return load_config(resolve_config(name), [*QUIET, f"run_dir={run_dir}", f"seed={seed}", *overrides])


def run(name, run_dir, seed, *overrides):
    """Run the loop of shipped config `name` with `overrides`; returns its summary."""
    import ke_tf

    os.makedirs(run_dir, exist_ok=True)
    return ke_tf.run(config(name, run_dir, seed, *overrides))


class MoreTestImages:
    """`data` whose test split also holds `extra`'s test images: a larger test set, so the
    paired differences measure the methods rather than which few images happen to be tested."""

    def __init__(self, data, extra):
        self.data, self.extra, self.info = data, extra, data.info

    def stream(self, *args, **kwargs):
        return self.data.stream(*args, **kwargs)

    def test(self, batch_size, shard=None):
        return self.data.test(batch_size, shard).concatenate(self.extra.test(batch_size, shard))


def data_poor_digits(image_size=16, holdout_per_class=120):
    """Digits with only ~24 training images per class, the data-poor regime where a teacher's
    soft targets carry information the labels do not; the held-out train images join the test
    split (1,560 test images instead of 360)."""
    from ke_tf.data import load_data

    train, held = load_data("digits", image_size=image_size).split_holdout(per_class=holdout_per_class, seed=0)
    return MoreTestImages(train, held)


def plain_config(run_dir, seed, epochs, batch_size=32, lr=0.05, model=None, distillation=None, **train):
    """A distillation Config for loops driven directly (nesterov SGD, cosine, L2 5e-4)."""
    from ke_tf.config import from_dict

    return from_dict(
        {
            "method": "distillation",
            "seed": seed,
            "run_dir": run_dir,
            "model": model or {},
            "distillation": distillation or {},
            "train": {
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "nesterov": True,
                "schedule": "cosine",
                "weight_decay": 5e-4,
                "progress": False,
                "checkpoint_every_epochs": 0,
                "eval_every_epochs": 1000,
                **train,
            },
        }
    )
