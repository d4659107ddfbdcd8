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


DATASETS = ("digits", "fashion_mnist")
FASHION_PER_CLASS = 50


def claims_dataset():
    """The dataset the claims run on: `python -m benchmarks.claims --data` sets KE_TF_CLAIMS_DATA
    (digits by default)."""
    name = os.environ.get("KE_TF_CLAIMS_DATA", "digits")
    if name not in DATASETS:
        raise ValueError(f"KE_TF_CLAIMS_DATA={name!r}: the claims run on {' or '.join(DATASETS)}")
    return name


# Fashion-MNIST training images per class in the claims that run a shipped config (their digits
# versions train on digits' 1,437 training images); tested on all 10,000 test images.
FASHION_CONFIG_PER_CLASS = 150


def dataset_config(method):
    """The shipped quickstart config of `method` (e.g. "resnet20_ke") on the claims dataset."""
    return f"{claims_dataset()}_{method}"


def data_overrides():
    """What a claim adds to its `dataset_config`: Fashion-MNIST at the claims' 16x16 (the digits
    configs' size) on a class-balanced subset; nothing for digits."""
    if claims_dataset() == "fashion_mnist":
        return ("data.image_size=16", f"data.train_per_class={FASHION_CONFIG_PER_CLASS}")
    return ()


def data_setting():
    """The words for the data of `dataset_config` + `data_overrides` in a claim's setting."""
    if claims_dataset() == "fashion_mnist":
        return f"Fashion-MNIST 16x16 ({FASHION_CONFIG_PER_CLASS} training images per class, all 10,000 test images)"
    return "Digits 16x16"


def data_poor(image_size=16):
    """The data-poor regime of the claims dataset: `data_poor_digits` or `data_poor_fashion`."""
    return data_poor_fashion(image_size) if claims_dataset() == "fashion_mnist" else data_poor_digits(image_size)


def data_poor_setting():
    """The words for `data_poor()` in a claim's setting."""
    if claims_dataset() == "fashion_mnist":
        return (
            f"Data-poor Fashion-MNIST ({10 * FASHION_PER_CLASS} training images, {FASHION_PER_CLASS} per class, "
            "16x16, all 10,000 test images)"
        )
    return "Data-poor digits (237 training images, 16x16, 1,560 test images)"


def data_poor_fashion(image_size=16, per_class=FASHION_PER_CLASS):
    """Fashion-MNIST (Debian's dataset-fashion-mnist or a prepared tfds copy) with `per_class`
    training images of every class (class-balanced, split seed 0), tested on all 10,000 test images:
    a test set large enough that paired differences measure the methods, not the test draw."""
    from ke_tf.data import load_data

    return load_data("fashion_mnist", image_size=image_size, train_per_class=per_class)


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
