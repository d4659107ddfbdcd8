"""Benchmark 5: images/s of the CIFAR and Flower102 training input pipelines
(`ke_tf.data.load_data` under `tfds.testing.mock_data`), to compare with the training step rate.

tfds' default mock Flowers images are tiny (tens of pixels), which would flatter the JPEG decode +
resized-crop cost; the Flowers mock here serves real-sized (500x667) JPEGs instead."""

import contextlib
import tempfile
import time

import numpy as np
import tensorflow as tf

from benchmarks.common import entry

SECTION = "pipeline"
FLOWER_SHAPE = (500, 667)


def _flower_jpegs(count, shape, seed=0):
    """Smooth random images with a little noise, JPEG-encoded (so decoding does real work)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    jpegs = []
    for _ in range(count):
        a = rng.uniform(0, 6, size=(3, 3))
        img = np.stack([np.sin(a[c, 0] * yy + a[c, 1] * xx + a[c, 2]) for c in range(3)], -1) * 100 + 128
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        jpegs.append(tf.io.encode_jpeg(img, quality=90).numpy())
    return jpegs


def _flowers_as_dataset(num_examples, shape):
    jpegs = _flower_jpegs(min(num_examples, 32), shape)

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        images = [jpegs[i % len(jpegs)] for i in range(num_examples)]
        labels = np.arange(num_examples, dtype=np.int64) % 102
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})

    return as_dataset


def _load(name, num_examples, data_dir):
    import tensorflow_datasets as tfds

    from ke_tf.data import load_data

    kwargs = {"as_dataset_fn": _flowers_as_dataset(num_examples, FLOWER_SHAPE)} if name != "cifar10" else {}
    with tfds.testing.mock_data(
        num_examples=num_examples, policy=tfds.testing.MockPolicy.AUTO, data_dir=data_dir, **kwargs
    ):
        return load_data(name, data_dir=data_dir)


def images_per_second(data, batch_size, epochs):
    """Median over `epochs` full epochs (after one warm-up epoch) of the augmented train stream."""
    rates = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        n = 0
        for x, _ in data.train(batch_size, epoch=epoch, seed=0):
            n += int(x.shape[0])
        if epoch:
            rates.append(n / (time.perf_counter() - start))
    return float(np.median(rates))


def run(quick=False, repeats=5, train_rates=None, **_):
    """`train_rates` {dataset: engine images/s} from the throughput benchmark, if it ran."""
    train_rates = train_rates or {}
    rows = []
    for name, examples, batch in (
        ("cifar10", 512 if quick else 4096, 128),
        ("oxford_flowers102", 64 if quick else 512, 32),
    ):
        with contextlib.ExitStack() as stack:
            data = _load(name, examples, stack.enter_context(tempfile.TemporaryDirectory()))
        rate = images_per_second(data, batch, 1 if quick else min(repeats, 3))
        train = train_rates.get(name)
        ratio = rate / train if train else None
        rows.append(
            entry(
                f"input pipeline {name} {data.info.image_shape[0]}px b{batch}",
                SECTION,
                rate,
                "images/s",
                ratio=ratio,
                target="> training step rate" if train else None,
                met=bool(ratio > 1.0) if train else None,
                notes=(
                    f"ratio = pipeline / engine training rate ({train:.1f} img/s); "
                    if train
                    else "no training rate in this run (run with the throughput benchmark); "
                )
                + "measured alone: on a CPU the pipeline shares cores with the step",
                pipeline_images_per_s=rate,
                train_images_per_s=train,
            )
        )
    return rows
