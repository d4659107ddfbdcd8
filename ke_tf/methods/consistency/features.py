"""Intermediate-feature capture for Knowledge Consistency: load trained nets, tap a named layer,
and cache (x_A, x_B, label) for a whole split on disk in .npy shards.

A cache is reused only when its fingerprint (params files' SHA-256, dataset, split, layer, image
size) matches; otherwise it is rebuilt. Shards are written atomically and the manifest last, so an
interrupted build is never mistaken for a complete cache.
"""

import io
import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from ke_tf.data.stream import InputShard
from ke_tf.io.params import atomic_write_bytes, file_sha256
from ke_tf.io.progress import progress_bar
from ke_tf.models.from_params import load_deployable

MANIFEST = "manifest.json"


def load_trained(path):
    """(model, spec) of a ke_tf params file, rebuilt from its metadata["model"] spec."""
    model, metadata = load_deployable(path)
    return model, metadata["model"]


def tap_model(model, layer):
    """Functional model image -> output of `model`'s layer `layer`."""
    try:
        out = model.get_layer(layer).output
    except ValueError:
        raise ValueError(f"layer {layer!r} not found in model {model.name!r}") from None
    return keras.Model(model.inputs[0], out, name=f"{model.name}_{layer}")


def tail_model(model, layer):
    """Functional sub-model of `model` from the output of `layer` to the logits (it shares the
    layers, hence the weights, of `model`)."""
    return keras.Model(model.get_layer(layer).output, model.outputs[0], name=f"{model.name}_tail")


def fingerprint(params_paths, dataset, split, layer, image_size):
    """Plain-data identity of a feature cache."""
    return {
        "params_sha256": [file_sha256(p) for p in params_paths],
        "dataset": dataset,
        "split": split,
        "layer": layer,
        "image_size": image_size,
    }


def _npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class FeatureCache:
    """(x_A, x_B, labels) of one split as .npy shards under `folder`."""

    def __init__(self, folder, manifest):
        self.folder = folder
        self.manifest = manifest
        self.shards = manifest["shards"]

    @property
    def count(self):
        return sum(s["count"] for s in self.shards)

    @property
    def feature_shape(self):
        return tuple(self.manifest["feature_shape"])

    def shard(self, i, mmap=True):
        """(x_A, x_B, labels) arrays of shard `i` (memory-mapped by default)."""
        mode = "r" if mmap else None
        return tuple(
            np.load(os.path.join(self.folder, self.shards[i][k]), mmap_mode=mode) for k in ("a", "b", "labels")
        )

    def arrays(self):
        """The whole split in memory: (x_A, x_B, labels)."""
        parts = [self.shard(i, mmap=False) for i in range(len(self.shards))]
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))

    def _signature(self):
        shape = self.feature_shape
        return (
            tf.TensorSpec((None,) + shape, tf.float32),
            tf.TensorSpec((None,) + shape, tf.float32),
            tf.TensorSpec((None,), tf.int32),
        )

    def _batches(self, chunks, batch_size, drop_remainder):
        ds = tf.data.Dataset.from_generator(chunks, output_signature=self._signature()).unbatch()
        ds = ds.map(lambda a, b, y: ((a, b), y))
        return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)

    def dataset(self, batch_size):
        """tf.data of ((x_A, x_B), labels) batches in the stored order, last partial batch kept."""
        return self._batches(
            lambda: (self.shard(i, mmap=False) for i in range(len(self.shards))), batch_size, drop_remainder=False
        )

    def test(self, batch_size, shard):
        """Evaluation input of one pipeline: its rows in whole per-replica batches of ((x_A, x_B),
        label), padded with label -1 rows (see `InputShard.eval_rows`)."""
        a, b, y = (tf.constant(t) for t in self.arrays())
        rows = shard.eval_rows(self.count, batch_size)
        ds = rows.map(lambda i, valid: ((tf.gather(a, i), tf.gather(b, i)), tf.where(valid, tf.gather(y, i), -1)))
        return ds.batch(shard.eval_batch(batch_size)).prefetch(tf.data.AUTOTUNE)

    def stream(self, batch_size, seed, first_epoch, last_epoch, skip_steps=0, shard=None):
        """Training input of one pipeline (see `ke_tf.data.stream`): each epoch visits the shard
        files in a (seed, epoch)-seeded order and their rows shuffled (reads stay local), and
        this pipeline keeps only its replicas' positions of that order."""
        shard = shard or InputShard()
        steps = self.count // batch_size
        if steps < 1:
            raise ValueError(f"{self.count} cached examples leave no full batch of {batch_size}")
        first = shard.positions(batch_size, steps, skip_steps)
        full = shard.positions(batch_size, steps)

        def chunks():
            for epoch in range(first_epoch, last_epoch):
                keep = np.zeros(self.count, bool)
                keep[first if epoch == first_epoch else full] = True
                rng = np.random.default_rng([seed, epoch])
                start = 0
                for i in rng.permutation(len(self.shards)):
                    a, b, y = self.shard(int(i))
                    rows = rng.permutation(len(y))[keep[start : start + len(y)]]
                    start += len(y)
                    if len(rows):
                        yield a[rows], b[rows], y[rows]

        return self._batches(chunks, shard.replica_batch(batch_size), drop_remainder=True)


def _read_manifest(folder):
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _complete(folder, manifest):
    return all(os.path.isfile(os.path.join(folder, s[k])) for s in manifest["shards"] for k in ("a", "b", "labels"))


def cache_features(folder, tap_a, tap_b, dataset, identity, shard_size=4096, desc="features", write=True):
    """The FeatureCache of `dataset` (batches of (images, labels, ...), fixed order) through
    `tap_a` and `tap_b` (image -> feature models) in `folder`: reused when its manifest's
    fingerprint equals `identity`, rebuilt otherwise. With `write=False` (a non-chief worker:
    `folder` is the chief's) a valid cache there is read, and a missing one is built in a private
    temporary folder instead. Returns (cache, reused)."""
    manifest = _read_manifest(folder)
    if manifest is not None and manifest.get("fingerprint") == identity and _complete(folder, manifest):
        return FeatureCache(folder, manifest), True
    if not write:
        folder, manifest = tempfile.mkdtemp(prefix="ke_tf_features_"), None
    os.makedirs(folder, exist_ok=True)
    if manifest is not None:  # invalidate first: a crash mid-rebuild must not look complete
        os.remove(os.path.join(folder, MANIFEST))
    step = tf.function(lambda x: (tap_a(x, training=False), tap_b(x, training=False)))
    shards, buffer = [], {"a": [], "b": [], "labels": []}
    feature_shape = None

    def flush():
        if not buffer["labels"]:
            return
        i = len(shards)
        entry = {"count": int(sum(len(y) for y in buffer["labels"]))}
        for key in ("a", "b", "labels"):
            name = f"{key}_{i:05d}.npy"
            atomic_write_bytes(os.path.join(folder, name), _npy_bytes(np.concatenate(buffer[key])))
            entry[key] = name
            buffer[key] = []
        shards.append(entry)

    with progress_bar(desc=desc, unit="img") as bar:
        for batch in dataset:
            fa, fb = step(batch[0])
            if fa.shape[1:] != fb.shape[1:]:
                raise ValueError(f"feature shapes differ between nets A {fa.shape[1:]} and B {fb.shape[1:]}")
            feature_shape = [int(d) for d in fa.shape[1:]]
            buffer["a"].append(fa.numpy().astype(np.float32))
            buffer["b"].append(fb.numpy().astype(np.float32))
            buffer["labels"].append(np.asarray(batch[1], np.int32))
            bar.update(len(buffer["labels"][-1]))
            if sum(len(y) for y in buffer["labels"]) >= shard_size:
                flush()
        flush()
    for stale in set(os.listdir(folder)) - {s[k] for s in shards for k in ("a", "b", "labels")}:
        if stale.endswith(".npy"):
            os.remove(os.path.join(folder, stale))
    manifest = {"fingerprint": identity, "feature_shape": feature_shape, "shards": shards}
    atomic_write_bytes(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1).encode())
    return FeatureCache(folder, manifest), False
