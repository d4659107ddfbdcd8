"""The `fashion_mnist` data source: IDX files the tests write (shapes, labels, errors naming the
file, the install hint), class-balanced `train_per_class` subsets, the tfds fallback, and the real
files of Debian's dataset-fashion-mnist when installed."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gzip
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ke_tf.config import ConfigError, from_dict, load_config
from ke_tf.data import fashion_mnist, load_data
from ke_tf.shipped_configs import resolve_config

TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 2
IMAGES, LABELS = fashion_mnist.IDX_FILES["train"]


def _idx_bytes(array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _write(path, raw):
    with gzip.open(path, "wb") as f:
        f.write(raw)


def _split(per_class, offset):
    """Images whose every pixel encodes (label, index), labels cycling through the classes."""
    labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
    images = np.broadcast_to((offset + np.arange(len(labels)))[:, None, None], (len(labels), 28, 28))
    return images.astype(np.uint8), labels


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion")
    for split, (per_class, offset) in {"train": (TRAIN_PER_CLASS, 0), "test": (TEST_PER_CLASS, 100)}.items():
        images, labels = _split(per_class, offset)
        images_file, labels_file = fashion_mnist.IDX_FILES[split]
        _write(folder / images_file, _idx_bytes(images))
        _write(folder / labels_file, _idx_bytes(labels))
    return folder


@pytest.fixture
def broken_dir(idx_dir, tmp_path):
    """A writable copy of the IDX folder, for corrupting one file."""
    return shutil.copytree(idx_dir, tmp_path / "copy")


def test_idx_files_load_with_shapes_labels_and_classes(idx_dir):
    data = load_data("fashion_mnist", data_dir=str(idx_dir))
    info = data.info
    assert (info.num_classes, info.image_shape) == (10, (28, 28, 3))
    assert (info.train_size, info.test_size) == (10 * TRAIN_PER_CLASS, 10 * TEST_PER_CLASS)
    assert info.class_names == fashion_mnist.CLASS_NAMES and info.class_names[9] == "Ankle boot"
    np.testing.assert_array_equal(data.train_labels, _split(TRAIN_PER_CLASS, 0)[1])
    x, y = next(iter(data.test(info.test_size)))
    assert x.shape == (20, 28, 28, 3)
    pixels = x.numpy() * np.array(info.std) + np.array(info.mean)  # back to 0..255, grey -> RGB
    np.testing.assert_allclose(pixels, np.broadcast_to((100 + np.arange(20))[:, None, None, None], x.shape), atol=1e-3)
    np.testing.assert_array_equal(y.numpy(), _split(TEST_PER_CLASS, 100)[1])
    batch, _ = next(iter(data.train(8, epoch=0, seed=0)))
    assert batch.shape == (8, 28, 28, 3)


def test_wrong_magic_number_names_the_file(broken_dir):
    images, _ = _split(TRAIN_PER_CLASS, 0)
    raw = bytearray(_idx_bytes(images))
    raw[3] = 1  # a labels-file magic number on the images file
    _write(broken_dir / IMAGES, bytes(raw))
    with pytest.raises(ValueError, match=f"{broken_dir / IMAGES}: wrong IDX magic number 0x00000801"):
        load_data("fashion_mnist", data_dir=str(broken_dir))


def test_truncated_files_name_the_file(broken_dir):
    _, labels = _split(TRAIN_PER_CLASS, 0)
    _write(broken_dir / LABELS, _idx_bytes(labels)[:-3])  # a complete gzip of a short IDX file
    with pytest.raises(ValueError, match=f"{broken_dir / LABELS}: IDX header says shape \\(40,\\)"):
        load_data("fashion_mnist", data_dir=str(broken_dir))
    gz = (broken_dir / IMAGES).read_bytes()
    (broken_dir / IMAGES).write_bytes(gz[: len(gz) // 2])  # a cut download
    with pytest.raises(ValueError, match=f"{broken_dir / IMAGES}: not a complete gzip file"):
        load_data("fashion_mnist", data_dir=str(broken_dir))


def test_missing_files_give_the_install_hint(broken_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        load_data("fashion_mnist", data_dir=str(empty))
    assert "\n" not in str(err.value) and str(empty) in str(err.value)
    (broken_dir / LABELS).unlink()
    with pytest.raises(FileNotFoundError, match=f"{broken_dir} lacks {LABELS}"):
        load_data("fashion_mnist", data_dir=str(broken_dir))


def test_train_per_class_is_balanced_and_seeded(idx_dir):
    def subset(seed, **kwargs):
        return load_data("fashion_mnist", data_dir=str(idx_dir), train_per_class=2, split_seed=seed, **kwargs)

    def images(data):
        return np.concatenate([x.numpy() for x, _ in data.train_eval(64)])

    a, b, c = subset(0), subset(0), subset(1)
    assert a.info.train_size == 20 and a.info.test_size == 10 * TEST_PER_CLASS
    assert np.all(np.bincount(a.train_labels, minlength=10) == 2)
    np.testing.assert_array_equal(images(a), images(b))
    assert not np.array_equal(images(a), images(c))
    two = subset(0, classes=[7, 3])  # per class of the chosen classes, relabelled 7 -> 0, 3 -> 1
    assert two.info.train_size == 4 and np.all(np.bincount(two.train_labels) == 2)
    remain, holdout = a.split_holdout(per_class=1, seed=0)  # the methods' held-out split
    assert (remain.info.train_size, holdout.info.train_size) == (10, 10)
    with pytest.raises(ValueError, match="fashion_mnist train_per_class=5: class 0 has only 4 training images"):
        load_data("fashion_mnist", data_dir=str(idx_dir), train_per_class=5)


def test_config_key_and_shipped_config():
    cfg = load_config(resolve_config("fashion_mnist_resnet20_supervised"))
    assert cfg.data.name == "fashion_mnist" and cfg.data.train_per_class == 500
    with pytest.raises(ConfigError, match="data.train_per_class must be > 0"):
        from_dict({"data": {"train_per_class": 0}})


def test_every_method_gets_the_configured_subset(idx_dir):
    """`data.train_per_class` reaches the data the method loops load (load_configured_data)."""
    from ke_tf.methods.stage import load_configured_data

    cfg = from_dict({"data": {"name": "fashion_mnist", "data_dir": str(idx_dir), "train_per_class": 2}})
    assert load_configured_data(cfg).info.train_size == 2 * 10


def test_tfds_prepared_copy_is_used_without_idx_files(tmp_path):
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.AUTO, data_dir=str(tmp_path)):
        data = load_data("fashion_mnist", data_dir=str(tmp_path))
    info = data.info
    assert (info.num_classes, info.image_shape, info.train_size, info.test_size) == (10, (28, 28, 3), 12, 12)
    assert info.class_names[0] == "T-shirt/top"
    x, y = next(iter(data.train(4, epoch=0, seed=0)))
    assert x.shape == (4, 28, 28, 3) and y.numpy().max() < 10


def test_real_debian_files():
    folder = fashion_mnist.DEBIAN_DIR
    if not os.path.isfile(os.path.join(folder, IMAGES)):
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed (no {folder}/{IMAGES}): apt-get install it")
    data = load_data("fashion_mnist")
    assert (data.info.train_size, data.info.test_size) == (60000, 10000)
    assert np.all(np.bincount(data.train_labels, minlength=10) == 6000)
    assert np.all(np.bincount(data.test_labels, minlength=10) == 1000)
    assert abs(data.info.mean[0] - 72.94) < 0.01 and abs(data.info.std[0] - 90.02) < 0.01
