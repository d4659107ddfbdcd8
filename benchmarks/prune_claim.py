"""Comparative claim of `ke_tf.prune` on a user's Keras model (issue 24): a MobileNetV2 (alpha 0.35,
digits at 32x32) briefly trained with plain `model.fit`, pruned to the same MACs target by EKG and
by random pruning; EKG's sub-network should have the lower holdout cross-entropy, seed by seed.
Minutes on 2 CPU cores (too slow for the test suite): `python -m benchmarks.prune_claim`."""

import argparse
import json
import time

import keras
import numpy as np

import ke_tf


def as_arrays(dataset):
    """(images, labels) numpy arrays of a batched (images, labels) dataset."""
    batches = list(dataset)
    return np.concatenate([x.numpy() for x, _ in batches]), np.concatenate([y.numpy() for _, y in batches])


def trained_mobilenet(train, seed, epochs):
    """MobileNetV2 (logits out) trained `epochs` epochs with Adam on `train` (images, labels)."""
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10, classifier_activation=None
    )
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*train, batch_size=64, epochs=epochs, verbose=0)
    return model


def one_seed(train, holdout, seed, epochs, target, step):
    """{criterion: final holdout CE and MACs rate of its sub-network} for one trained model."""
    start = time.time()
    model = trained_mobilenet(train, seed, epochs)
    row = {"seed": seed, "train_s": round(time.time() - start, 1)}
    for criterion in ("ekg", "random"):
        start = time.time()
        _, report = ke_tf.prune(model, holdout, target, criterion, step=step, seed=seed, progress=False)
        last = report["trajectory"][-1]
        row[criterion] = {
            "holdout_ce": last["holdout_ce"],
            "dense_holdout_ce": report["trajectory"][0]["holdout_ce"],
            "macs_rate": last["macs_rate"],
            "search_s": round(time.time() - start, 1),
        }
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.5, help="fraction of the MACs kept")
    parser.add_argument("--step", type=float, default=0.5, help="GreedySearch step")
    args = parser.parse_args(argv)
    data = ke_tf.load_data("digits", image_size=32)
    rest, held = data.split_holdout(2, 0)
    train, holdout = as_arrays(rest.train_eval(256)), list(held.test(256))
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(train, holdout, seed, args.epochs, args.target, args.step))
        print(json.dumps(rows[-1]), flush=True)
    wins = sum(row["ekg"]["holdout_ce"] < row["random"]["holdout_ce"] for row in rows)
    print(f"EKG's holdout CE below random's in {wins}/{len(rows)} seeds")
    return rows


if __name__ == "__main__":
    main()
