import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ke_tf.data import DatasetInfo, ImageData, class_order, incremental_tasks, load_data  # noqa: E402


def _batches(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


def _collect(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def sk_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    idx = np.arange(len(raw.target))
    tr, te = train_test_split(idx, test_size=0.2, stratify=raw.target, random_state=0)
    return raw, tr, te


# ----------------------------------------------------------------------------- digits
def test_digits_info_shapes_and_labels(digits):
    info = digits.info
    assert isinstance(info, DatasetInfo) and isinstance(digits, ImageData)
    assert (info.name, info.num_classes, info.image_shape) == ("digits", 10, (32, 32, 3))
    assert (info.train_size, info.test_size) == (1437, 360)
    x, y = next(iter(digits.train(64, epoch=0, seed=0)))
    assert x.shape == (64, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    xt, yt = _collect(digits.test(100))
    assert xt.shape == (360, 32, 32, 3)  # partial last batch kept
    assert set(yt.tolist()) == set(range(10))  # every class in the test set
    assert yt.min() >= 0 and yt.max() < 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_classes = 3


def test_digits_match_sklearn_split(digits, sk_digits):
    raw, tr, te = sk_digits
    np.testing.assert_array_equal(digits.train_labels, raw.target[tr])
    np.testing.assert_array_equal(digits.test_labels, raw.target[te])
    _, y = _collect(digits.train_eval(512))
    np.testing.assert_array_equal(y, raw.target[tr])  # fixed order
    # Image content really is the upsampled sklearn digit: un-normalise, downsample, compare.
    x, _ = _collect(digits.test(360))
    mean, std = np.array(digits.info.mean), np.array(digits.info.std)
    img = x * std + mean
    assert np.allclose(img[..., 0], img[..., 2], atol=1e-3)  # grey replicated to RGB
    small = tf.image.resize(img[..., :1], [8, 8], method="area").numpy()[..., 0]
    corr = np.corrcoef(small.reshape(-1), raw.images[te].reshape(-1))[0, 1]
    assert corr > 0.9


def test_digits_normalised_statistics(digits):
    x, _ = _collect(digits.train_eval(512))
    x = x.astype(np.float64)
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-3)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=1e-3)


def test_train_is_deterministic_per_seed_and_epoch(digits):
    a_x, a_y = _collect(digits.train(128, epoch=3, seed=1))
    b_x, b_y = _collect(digits.train(128, epoch=3, seed=1))
    np.testing.assert_array_equal(a_x, b_x)
    np.testing.assert_array_equal(a_y, b_y)
    assert len(a_y) == (1437 // 128) * 128  # drop_remainder
    c_x, c_y = _collect(digits.train(128, epoch=4, seed=1))
    assert not np.array_equal(a_y, c_y)
    d_x, d_y = _collect(digits.train(128, epoch=3, seed=2))
    assert not np.array_equal(a_y, d_y)
    # All examples of the epoch come from the training set, each at most once.
    full = digits.train(128, epoch=3, seed=1, drop_remainder=False)
    _, y_full = _collect(full)
    np.testing.assert_array_equal(np.bincount(y_full, minlength=10), np.bincount(digits.train_labels, minlength=10))


def test_stream_shards_rebuild_the_global_batches(digits):
    """Per-replica batches of every input pipeline concatenate, step by step, into the global
    batches `train` yields for the same epochs; resuming skips exactly the finished steps."""
    from ke_tf.data.stream import InputShard

    batch, steps = 64, digits.info.train_size // 64
    full = [x for e in (2, 3) for x, _ in _batches(digits.train(batch, epoch=e, seed=1))][: 2 * steps]
    one = [x for x, _ in _batches(digits.stream(batch, 1, 2, 4))]
    assert len(one) == 2 * steps
    for a, b in zip(full, one):
        np.testing.assert_array_equal(a, b)
    for replicas, pipelines in ((2, 1), (2, 2), (4, 2)):
        parts = [
            [x for x, _ in _batches(digits.stream(batch, 1, 2, 4, shard=InputShard(replicas, p, pipelines)))]
            for p in range(pipelines)
        ]
        local = replicas // pipelines
        for step, expected in enumerate(full):
            got = np.concatenate([parts[p][step * local + r] for p in range(pipelines) for r in range(local)])
            np.testing.assert_array_equal(got, expected)
    resumed = [x for x, _ in _batches(digits.stream(batch, 1, 2, 4, skip_steps=5))]
    for a, b in zip(one[5:], resumed):
        np.testing.assert_array_equal(a, b)
    assert len(resumed) == 2 * steps - 5
    with pytest.raises(ValueError, match="not divisible by 3 replicas"):
        digits.stream(batch, 1, 0, 1, shard=InputShard(3))


def test_stream_carries_example_indices(digits):
    x, y, index = next(iter(digits.stream(32, 4, 0, 1, with_index=True)))
    np.testing.assert_array_equal(y.numpy(), digits.train_labels[index.numpy()])


def test_digits_augmentation_changes_images_keeps_size(digits):
    aug_x, aug_y = _collect(digits.train(256, epoch=0, seed=5, drop_remainder=False))
    plain_x, plain_y = _collect(digits.train(256, epoch=0, seed=5, augment=False, drop_remainder=False))
    np.testing.assert_array_equal(aug_y, plain_y)  # same order with / without augmentation
    assert aug_x.shape == plain_x.shape == (1437, 32, 32, 3)
    changed = np.mean([not np.array_equal(a, p) for a, p in zip(aug_x, plain_x)])
    assert changed > 0.5
    # Pad-crop shifts content, it does not mirror it: no augmented image is an exact mirror.
    assert not any(
        np.array_equal(a, p[:, ::-1]) for a, p in zip(aug_x[:200], plain_x[:200]) if not np.array_equal(p, p[:, ::-1])
    )
    # Each augmented image equals its plain image shifted by at most pad=4 pixels (zero fill).
    bg = (0.0 - np.array(digits.info.mean)) / np.array(digits.info.std)
    for a, p in zip(aug_x[:20], plain_x[:20]):
        pad = np.full((40, 40, 3), bg, np.float32)
        pad[4:36, 4:36] = p
        assert any(np.allclose(a, pad[i : i + 32, j : j + 32], atol=1e-5) for i in range(9) for j in range(9))


# ----------------------------------------------------------------------------- subsets / tasks
def test_digits_class_subset(digits, sk_digits):
    raw, tr, te = sk_digits
    sub = load_data("digits", classes=[7, 3])
    assert sub.info.num_classes == 2 and sub.info.class_names == ("7", "3")
    assert sub.info.mean == digits.info.mean  # shared normalisation across tasks
    x, y = _collect(sub.train_eval(512))
    assert set(y.tolist()) == {0, 1}
    keep = np.isin(raw.target[tr], [7, 3])
    np.testing.assert_array_equal(y, np.where(raw.target[tr][keep] == 7, 0, 1))
    full_x, _ = _collect(digits.train_eval(512))
    np.testing.assert_array_equal(x, full_x[keep])
    assert sub.info.train_size == keep.sum()
    assert sub.info.test_size == np.isin(raw.target[te], [7, 3]).sum()
    _, yt = _collect(sub.test(64))
    np.testing.assert_array_equal(yt, np.where(raw.target[te][np.isin(raw.target[te], [7, 3])] == 7, 0, 1))


@pytest.mark.parametrize("bad, match", [([], "empty"), ([3, 12], r"\[12\]"), ([1, 1], "duplicate")])
def test_bad_class_subsets(bad, match):
    with pytest.raises(ValueError, match=match):
        load_data("digits", classes=bad)


def test_unknown_dataset_lists_known():
    with pytest.raises(ValueError, match="cifar100.*image_folder"):
        load_data("mnist")


def test_class_order_and_tasks():
    order = class_order(100, 1993)
    assert order[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert sorted(order) == list(range(100))
    assert class_order(100, 1993) == order and class_order(100, 1) != order
    tasks = incremental_tasks(order, 50, 10)
    assert [len(t) for t in tasks] == [50, 10, 10, 10, 10, 10]
    assert sum(tasks, []) == order
    assert len(incremental_tasks(order, 10, 10)) == 10
    assert [len(t) for t in incremental_tasks(list(range(10)), 2, 2)] == [2] * 5
    with pytest.raises(ValueError, match="50.*7"):
        incremental_tasks(order, 50, 7)
    with pytest.raises(ValueError, match="120"):
        incremental_tasks(order, 120, 10)


def test_split_holdout(digits):
    remain, hold = digits.split_holdout(per_class=5, seed=0)
    assert hold.info.train_size == hold.info.test_size == 50
    assert remain.info.train_size == 1437 - 50
    assert remain.info.test_size == digits.info.test_size
    hx, hy = _collect(hold.test(16))
    assert len(hy) == 50 and np.all(np.bincount(hy, minlength=10) == 5)
    rx, _ = _collect(remain.train_eval(512))
    full_x, _ = _collect(digits.train_eval(512))
    key = lambda a: a.tobytes()  # noqa: E731
    full = [key(a) for a in full_x]
    assert sorted(full) == sorted([key(a) for a in rx] + [key(a) for a in hx])  # partition
    # Same seed -> same holdout; different seed -> different holdout.
    _, hold2 = digits.split_holdout(per_class=5, seed=0)
    np.testing.assert_array_equal(_collect(hold2.test(64))[0], hx)
    _, hold3 = digits.split_holdout(per_class=5, seed=1)
    assert not np.array_equal(_collect(hold3.test(64))[0], hx)
    with pytest.raises(ValueError, match="class"):
        digits.split_holdout(per_class=1000, seed=0)


# ----------------------------------------------------------------------------- tfds (mocked)
@pytest.mark.parametrize("name, classes, mean0", [("cifar10", 10, 125.3), ("cifar100", 100, 129.3)])
def test_cifar_mock(tmp_path, name, classes, mean0):
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.AUTO, data_dir=str(tmp_path)):
        data = load_data(name, data_dir=str(tmp_path))
    info = data.info
    assert (info.num_classes, info.image_shape, info.train_size, info.test_size) == (classes, (32, 32, 3), 24, 24)
    assert info.mean[0] == mean0
    x, y = next(iter(data.train(8, epoch=0, seed=0)))
    assert x.shape == (8, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    ax, _ = _collect(data.train(8, epoch=1, seed=0))
    px, _ = _collect(data.train(8, epoch=1, seed=0, augment=False))
    assert ax.shape == px.shape == (24, 32, 32, 3) and not np.array_equal(ax, px)
    np.testing.assert_array_equal(ax, _collect(data.train(8, epoch=1, seed=0))[0])
    tx, ty = _collect(data.test(10))
    assert tx.shape == (24, 32, 32, 3) and ty.max() < classes


def test_cifar_mock_class_subset(tmp_path):
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.AUTO, data_dir=str(tmp_path)):
        full = load_data("cifar10", data_dir=str(tmp_path))
        present = [int(c) for c in np.unique(full.train_labels)[:2]]
        sub = load_data("cifar10", data_dir=str(tmp_path), classes=present[::-1])
    expect = np.sum(np.isin(full.train_labels, present))
    assert sub.info.train_size == expect and sub.info.num_classes == 2
    _, y = _collect(sub.train_eval(64))
    assert len(y) == expect and set(y.tolist()) <= {0, 1}


def test_flowers_mock(tmp_path):
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.AUTO, data_dir=str(tmp_path)):
        data = load_data("oxford_flowers102", data_dir=str(tmp_path), image_size=64)
    assert data.info.num_classes == 102 and data.info.image_shape == (64, 64, 3)
    assert data.info.mean == (123.675, 116.28, 103.53)
    x, y = next(iter(data.train(3, epoch=0, seed=0)))
    assert x.shape == (3, 64, 64, 3) and y.dtype == tf.int32
    a = _collect(data.train(3, epoch=2, seed=4))[0]
    np.testing.assert_array_equal(a, _collect(data.train(3, epoch=2, seed=4))[0])
    tx, _ = _collect(data.test(4))
    assert tx.shape == (6, 64, 64, 3) and np.isfinite(tx).all()


def test_missing_tfds_dataset_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar10.*" + str(tmp_path).replace("/", ".")):
        load_data("cifar10", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- image folder
LABELS = ("10", "2", "33")  # numeric sort -> 2, 10, 33 (string sort would give 10, 2, 33)


def _write_jpeg(path, h, w, rng, color=None):
    if color is None:
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    else:
        img = np.broadcast_to(np.array(color, np.uint8), (h, w, 3)).copy()
    tf.io.write_file(str(path), tf.io.encode_jpeg(img, quality=95))


def _write_csv(path, rows, header="file_name,label"):
    path.write_text(header + "\n" + "".join(f"{a},{b}\n" for a, b in rows))


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "jpg").mkdir()
    (tmp_path / "lists").mkdir()
    splits = {"trn": [], "val": [], "tst": []}
    for lab in LABELS:
        for i, split in enumerate(["trn", "trn", "trn", "val", "tst"]):
            name = f"c{lab}_{i}.jpg"
            _write_jpeg(tmp_path / "jpg" / name, int(rng.integers(20, 60)), int(rng.integers(20, 60)), rng)
            splits[split].append((name, lab))
    for split, rows in splits.items():
        _write_csv(tmp_path / "lists" / f"{split}.csv", rows)
    return tmp_path, splits


def _remap(lab):
    return {"2": 0, "10": 1, "33": 2}[lab]


def test_image_folder_loads_and_remaps(folder):
    root, splits = folder
    data = load_data("image_folder", data_dir=str(root), image_size=32)
    info = data.info
    assert (info.num_classes, info.train_size, info.test_size) == (3, 9, 3)
    assert info.class_names == ("2", "10", "33") and info.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(data.train_labels, [_remap(lab) for _, lab in splits["trn"]])
    x, y = next(iter(data.train(4, epoch=0, seed=0)))
    assert x.shape == (4, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    tx, ty = _collect(data.test(2))
    assert tx.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ty, [_remap(lab) for _, lab in splits["tst"]])
    val = load_data("image_folder", data_dir=str(root), image_size=32, test_split="val")
    assert val.info.test_size == 3
    assert not np.array_equal(_collect(val.test(3))[0], tx)
    sub = load_data("image_folder", data_dir=str(root), image_size=32, classes=[2])
    assert sub.info.class_names == ("33",) and sub.info.train_size == 3


def test_image_folder_center_crop(tmp_path):
    (tmp_path / "jpg").mkdir()
    (tmp_path / "lists").mkdir()
    img = np.zeros((60, 120, 3), np.uint8)
    img[...] = (0, 0, 255)
    img[:, 25:95] = (255, 0, 0)  # only the centre region survives resize-256/224 + centre crop
    tf.io.write_file(str(tmp_path / "jpg" / "a.jpg"), tf.io.encode_jpeg(img, quality=100))
    for split in ("trn", "tst"):
        _write_csv(tmp_path / "lists" / f"{split}.csv", [("a.jpg", 1)])
    data = load_data("image_folder", data_dir=str(tmp_path), image_size=32)
    x, _ = _collect(data.test(1))
    rgb = x[0] * np.array(data.info.std) + np.array(data.info.mean)
    assert rgb.shape == (32, 32, 3)
    assert rgb[..., 0].min() > 200 and rgb[..., 2].max() < 60  # all red: crop is centred
    tr, _ = _collect(data.train(1, epoch=0, seed=0))
    assert tr.shape == (1, 32, 32, 3)


def test_image_folder_corrupt_image_named(folder):
    root, splits = folder
    bad = splits["trn"][4][0]
    (root / "jpg" / bad).write_bytes(np.random.default_rng(1).bytes(500))
    with pytest.raises(ValueError, match=rf"corrupt image .*{bad}.*line 6 of .*trn\.csv"):
        load_data("image_folder", data_dir=str(root))
    # JPEG header but truncated body: passes the magic check, fails decoding.
    good = (root / "jpg" / splits["trn"][0][0]).read_bytes()
    (root / "jpg" / bad).write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match=rf"corrupt image .*{bad}"):
        load_data("image_folder", data_dir=str(root))


def test_image_folder_missing_file_and_skip(folder):
    root, splits = folder
    _write_csv(root / "lists" / "trn.csv", splits["trn"] + [("nope.jpg", "2")])
    with pytest.raises(ValueError, match=r"nope\.jpg.*line 11 of .*trn\.csv"):
        load_data("image_folder", data_dir=str(root))
    _write_csv(root / "lists" / "trn.csv", splits["trn"] + [("", "10")])
    with pytest.raises(ValueError, match=r"missing field.*line 11 of .*trn\.csv"):
        load_data("image_folder", data_dir=str(root))
    _write_csv(root / "lists" / "trn.csv", splits["trn"] + [("nope.jpg", "2"), ("", "10")])
    _write_csv(root / "lists" / "tst.csv", splits["tst"] + [(splits["tst"][0][0], "99")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data("image_folder", data_dir=str(root), on_bad_file="skip")
    msgs = sorted(str(w.message) for w in caught if "skipped" in str(w.message))
    assert len(msgs) == 2
    assert "skipped 1 bad rows" in msgs[0] and "tst.csv" in msgs[0]
    assert "skipped 2 bad rows" in msgs[1] and "trn.csv" in msgs[1]
    assert data.info.train_size == 9 and data.info.test_size == 3
    _write_csv(root / "lists" / "trn.csv", splits["trn"])
    with pytest.raises(ValueError, match=r"unknown label '99'.*line 5 of .*tst\.csv"):
        load_data("image_folder", data_dir=str(root), on_bad_file="fail")


def test_image_folder_layout_errors(folder, tmp_path_factory):
    root, _ = folder
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match=str(empty / "lists")):
        load_data("image_folder", data_dir=str(empty))
    with pytest.raises(ValueError, match="data_dir"):
        load_data("image_folder")
    (root / "lists" / "tst.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(ValueError, match=r"tst\.csv.*file_name"):
        load_data("image_folder", data_dir=str(root))
    (root / "lists" / "tst.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"tst\.csv"):
        load_data("image_folder", data_dir=str(root))
