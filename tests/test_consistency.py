"""Knowledge Consistency: Trans-Net orders and loss, std scaling, feature cache, variance report,
the consistency loop end to end, and (slow) the kc claim: trained nets are more consistent
with each other than with an untrained net.

Trans-Nets and feature taps are built under the float64 policy, so their identities (clone ==
original, sum of orders == output, orders == their hand derivation, tail(tap) == model) hold at
float64 round-off on any CPU (tests/numerics.py); the feature cache stores float32 by design, so
cached features are compared within float32 rounding."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from ke_tf.config import ConfigError, from_dict
from ke_tf.io.params import load_params, save_params
from ke_tf.losses import transnet_loss
from ke_tf.methods.consistency.features import cache_features, fingerprint, load_trained, tail_model, tap_model
from ke_tf.methods.consistency.loop import variance_report
from ke_tf.methods.consistency.transnet import TransNet, std_scale, transnet_model
from ke_tf.models import build_model, model_spec
from tests.numerics import assert_identical, assert_within_measured_bound, float64

# The cache rounds each float64 feature to float32 (round to nearest: at most 2^-24 = 6.0e-8 of its
# magnitude; measured 4.5e-8 of the tensor's scale on these taps, AVX2 EPYC); 10x that rounding bound.
CACHE_ROUNDING = 10 * 2.0**-24
CACHE_MEASURED = "float32 storage of float64 taps: <= 2^-24 = 6.0e-8 of the scale, measured 4.5e-8; x10"


def _np_scale(x):
    return x / (x.std(axis=(1, 2), ddof=1, keepdims=True) + 1e-5)


def _transnet(depth=3, channels=4, beta=(0.7, -0.4, 1.1), seed=0):
    keras.utils.set_random_seed(seed)
    layer = TransNet(channels, depth=depth)
    layer.build((None, 6, 5, channels))
    layer.beta.assign(np.asarray(beta[: depth - 1], np.float32))
    return layer


def _x(shape=(3, 6, 5, 4), seed=1):
    return np.random.default_rng(seed).normal(size=shape) * 2.0 + 0.5


def test_shapes_and_config_round_trip():
    with float64():
        layer = _transnet()
    x = _x()
    y = layer(x)
    assert y.shape == x.shape
    parts = layer.orders(x)
    assert len(parts) == 3 and all(p.shape == x.shape for p in parts)
    assert sorted(tuple(v.shape) for v in layer.weights) == [(2,)] + [(3, 3, 4, 4)] * 3
    with float64():
        clone = TransNet.from_config(layer.get_config())
        clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    assert_identical(clone(x).numpy(), y.numpy())
    assert keras.saving.get_registered_object("ke_tf>TransNet") is TransNet
    with pytest.raises(ValueError, match="same tap width"):
        TransNet(8).build((None, 6, 5, 4))


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_orders_sum_to_full_output_with_frozen_gates(depth):
    with float64():
        layer = _transnet(depth=depth)
    x = _x()
    parts = layer.orders(x)
    assert len(parts) == depth
    assert_identical(tf.add_n(parts).numpy(), layer(x).numpy())
    # every order carries signal (no trivially-zero component)
    assert all(float(tf.reduce_max(tf.abs(p))) > 1e-3 for p in parts)


def test_orders_match_hand_derivation():
    """Y0 = W2 n(x); Y1 = W2 (p1 G1 W1 n(x) / s1); Y2 = W2 (p1 G1 W1 (p0 G0 W0 n(x) / s0) / s1)."""
    with float64():
        layer = _transnet()
    x = _x()
    p = layer.p.numpy()
    w0, w1, w2 = layer.convs
    nx = _np_scale(x)
    h0 = w0(nx).numpy()
    s0 = h0.std(axis=(1, 2), ddof=1, keepdims=True) + 1e-5
    h1 = w1(nx + p[0] * np.maximum(h0 / s0, 0)).numpy()
    s1 = h1.std(axis=(1, 2), ddof=1, keepdims=True) + 1e-5
    g0, g1 = (h0 > 0) * p[0] / s0, (h1 > 0) * p[1] / s1
    expected = [w2(nx), w2(g1 * w1(nx).numpy()), w2(g1 * w1(g0 * h0).numpy())]
    for got, want in zip(layer.orders(x), expected):
        assert_identical(got.numpy(), want.numpy())
    assert_identical(layer(x).numpy(), w2(nx + p[1] * np.maximum(h1 / s1, 0)).numpy())


def test_orders_share_weights():
    layer = _transnet()
    assert len(layer.trainable_weights) == 4  # 3 convs + beta, shared by all orders
    x = _x()
    with tf.GradientTape() as tape:
        y0 = tf.reduce_sum(layer.orders(x)[0])
    grads = tape.gradient(y0, [c.trainable_variables[0] for c in layer.convs] + [layer.beta])
    # order 0 = W2 n(x): only W2 (and not the gates) shapes it
    assert grads[0] is None and grads[1] is None and grads[2] is not None and grads[3] is None


def test_std_scale_values_and_stopped_gradient():
    x = tf.constant(_x())
    y, scale = std_scale(x)
    np.testing.assert_allclose(y, _np_scale(x.numpy()), rtol=1e-5)
    v = tf.constant(_x(seed=2))
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = tf.reduce_sum(std_scale(x)[0] * v)
    # std is a constant for the gradient: d/dx sum(v * x / s) = v / s
    np.testing.assert_allclose(tape.gradient(out, x), v / scale, rtol=1e-5)
    with tf.GradientTape() as tape:
        tape.watch(x)
        s = tf.math.reduce_std(x, axis=[1, 2], keepdims=True) * np.sqrt(30 / 29) + 1e-5
        full = tf.reduce_sum(x / s * v)
    assert np.abs(tape.gradient(full, x) - v / scale).max() > 1e-3  # it would differ otherwise
    one = tf.constant(_x((2, 1, 1, 3)))
    np.testing.assert_array_equal(std_scale(one)[0], one)  # FC taps: identity


def test_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 3, 3, 2)), rng.normal(size=(2, 3, 3, 2))
    p = np.array([0.3, 0.8])
    per_example = transnet_loss(
        tf.constant(pred, tf.float32), tf.constant(target, tf.float32), tf.constant(p, tf.float32), [0.1, 2.0]
    ).numpy()
    penalty = 0.1 * 0.09 + 2.0 * 0.64
    want = [np.mean((pred[i] - target[i]) ** 2) + penalty for i in range(2)]
    np.testing.assert_allclose(per_example, want, rtol=1e-5)
    assert per_example.shape == (2,)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Two tiny random ResNet-20s (different seeds) saved as params files, and their s2b2_add taps
    (rebuilt in float64)."""
    folder = tmp_path_factory.mktemp("nets")
    paths, taps = [], []
    for s in (0, 1):
        keras.utils.set_random_seed(s)
        spec = model_spec("resnet20", 3, (8, 8, 3), width_mult=0.25)
        model = build_model(spec["arch"], 3, spec["input_shape"], **spec["options"])
        paths.append(str(folder / f"net{s}.pkl"))
        save_params(paths[-1], model, {"model": spec})
        with float64():
            taps.append(tap_model(load_trained(paths[-1])[0], "s2b2_add"))
    return paths, taps


def _images(n=10):
    rng = np.random.default_rng(3)
    images = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices((images, np.arange(n, dtype=np.int32) % 3)).batch(4), images


def test_tail_model_composes_with_tap(nets):
    with float64():
        model, _ = load_trained(nets[0][0])
    _, images = _images()
    tap, tail = tap_model(model, "s2b2_add"), tail_model(model, "s2b2_add")
    assert_identical(tail(tap(images)).numpy(), model(images).numpy())
    with pytest.raises(ValueError, match="not found"):
        tap_model(model, "nope")


def test_feature_cache_reuse_and_invalidation(tmp_path, nets):
    pa, pb = (str(tmp_path / f"net{i}.pkl") for i in "ab")
    for src, dst in zip(nets[0], (pa, pb)):
        shutil.copy(src, dst)
    taps = nets[1]
    ds, images = _images()
    folder = str(tmp_path / "cache")
    ident = fingerprint([pa, pb], "digits", "train", "s2b2_add", [8, 8, 3])
    cache, reused = cache_features(folder, *taps, ds, ident, shard_size=4)
    assert not reused and cache.count == 10 and len(cache.shards) == 3  # 4 + 4 + 2 (one batch each)
    xa, xb, labels = cache.arrays()
    assert_within_measured_bound(xa, taps[0](images), CACHE_ROUNDING, CACHE_MEASURED)
    assert_within_measured_bound(xb, taps[1](images), CACHE_ROUNDING, CACHE_MEASURED)
    np.testing.assert_array_equal(labels, np.arange(10) % 3)
    stamp = os.path.getmtime(os.path.join(folder, "a_00000.npy"))

    again, reused = cache_features(folder, *taps, ds, ident, shard_size=4)
    assert reused and os.path.getmtime(os.path.join(folder, "a_00000.npy")) == stamp

    # A non-chief worker reads the chief's valid cache, and never writes into the shared folder.
    worker, reused = cache_features(folder, *taps, ds, ident, shard_size=4, write=False)
    assert reused and worker.folder == folder
    private = str(tmp_path / "chief_has_none")
    worker, reused = cache_features(private, *taps, ds, ident, shard_size=4, write=False)
    assert not reused and not os.path.exists(private) and worker.count == 10
    assert_within_measured_bound(worker.arrays()[0], xa, CACHE_ROUNDING, CACHE_MEASURED)

    # a retrained net B (different params bytes) changes the fingerprint -> rebuild with B's features
    save_params(pb, load_trained(pa)[0], load_params(pb)[1])
    ident2 = fingerprint([pa, pb], "digits", "train", "s2b2_add", [8, 8, 3])
    assert ident2 != ident
    rebuilt, reused = cache_features(folder, taps[0], taps[0], ds, ident2, shard_size=8)
    assert not reused and len(rebuilt.shards) == 2
    assert_within_measured_bound(rebuilt.arrays()[1], xa, CACHE_ROUNDING, CACHE_MEASURED)
    assert sorted(f for f in os.listdir(folder) if f.endswith(".npy")) == [
        "a_00000.npy",
        "a_00001.npy",
        "b_00000.npy",
        "b_00001.npy",
        "labels_00000.npy",
        "labels_00001.npy",
    ]
    for other in ({**ident2, "layer": "s3b2_add"}, {**ident2, "image_size": [16, 16, 3]}):
        assert not cache_features(folder, taps[0], taps[0], ds, other, shard_size=8)[1]

    # a missing shard (interrupted copy) is not reused
    os.remove(os.path.join(folder, "b_00001.npy"))
    assert not cache_features(folder, taps[0], taps[0], ds, other, shard_size=8)[1]


def test_feature_stream_is_deterministic_per_epoch_and_sharded(tmp_path, nets):
    from ke_tf.data.stream import InputShard

    taps = nets[1]
    ds, _ = _images()
    cache, _ = cache_features(str(tmp_path / "c"), *taps, ds, {"k": 1}, shard_size=4)

    def rows(epoch, shard=None, skip=0):
        return [(a.numpy(), y.numpy()) for (a, _), y in cache.stream(2, 7, epoch, epoch + 1, skip, shard)]

    stored = np.concatenate([y.numpy() for _, y in cache.dataset(3)])
    np.testing.assert_array_equal(stored, np.arange(10) % 3)
    first = rows(0)
    assert len(first) == 5 and all(len(y) == 2 for _, y in first)
    np.testing.assert_array_equal(np.concatenate([a for a, _ in first]), np.concatenate([a for a, _ in rows(0)]))
    assert sorted(np.concatenate([y for _, y in first])) == sorted(stored)
    assert not np.allclose(np.concatenate([a for a, _ in first]), np.concatenate([a for a, _ in rows(1)]))
    # Two pipelines x one replica each: their batches interleave into the one-pipeline batches.
    halves = [rows(0, InputShard(2, p, 2)) for p in (0, 1)]
    for step, (a, _) in enumerate(first):
        np.testing.assert_array_equal(np.concatenate([halves[0][step][0], halves[1][step][0]]), a)
    resumed = rows(0, skip=3)
    np.testing.assert_array_equal(np.concatenate([a for a, _ in resumed]), np.concatenate([a for a, _ in first[3:]]))


def test_variance_report_matches_numpy(tmp_path, nets):
    taps = nets[1]
    ds, _ = _images()
    cache, _ = cache_features(str(tmp_path / "c"), *taps, ds, {"k": 1}, shard_size=4)
    with float64():
        trans = _transnet(channels=cache.feature_shape[-1])
        rows = variance_report(trans.orders, cache, batch_size=3)  # partial last batch: exact weighting
        xa, xb, _ = cache.arrays()
        parts = [p.numpy() for p in trans.orders(xa)]
    xb = xb.astype(np.float64)  # the float32 cache, summed in float64 as the report does

    def var(t):  # pooled over channels around each channel's mean (reference Variance.py)
        t = t.reshape(-1, t.shape[-1])
        return np.mean((t - t.mean(0)) ** 2)

    want = [var(p) for p in parts] + [var(xb - sum(parts)), var(xb)]
    assert_identical(np.array([r["variance"] for r in rows]), np.array(want))
    assert_identical(np.array([r["relative"] for r in rows]), np.array(want) / want[-1])
    np.testing.assert_allclose(sum(r["share"] for r in rows[:-1]), 1.0, rtol=1e-6)
    assert rows[-1]["component"] == "target x_B" and rows[3]["component"].startswith("residual")


def test_config_validation():
    base = {"method": "consistency"}
    cfg = from_dict({**base, "consistency": {"transnet": {"epochs": 3}}})
    kc = cfg.section("consistency")
    assert kc.transnet.epochs == 3 and kc.transnet.optimizer == "adam" and kc.transnet.final_lr == 1e-6
    assert kc.refine.lr == 1e-5 and kc.alphas == [0.1, 0.1]
    for bad, match in (
        ({"alphas": [0.1]}, "consistency.alphas"),
        ({"net_a": "a.pkl"}, "net_b"),
        ({"seeds": [3, 3]}, "seeds"),
        ({"in_modes": [[1, 0]]}, r"in_modes\[0\]"),
        ({"transnet": {"schedule": "bogus"}}, "consistency.transnet.schedule"),
    ):
        with pytest.raises(ConfigError, match=match):
            from_dict({**base, "consistency": bad})


def _cli(run_dir, *extra):
    from train_cifar import main

    return main(
        [
            "--config",
            "configs/digits_resnet20_consistency.yaml",
            "--set",
            f"run_dir={run_dir}",
            "--set",
            "data.image_size=16",
            "--set",
            "model.options.width_mult=0.5",
            "--set",
            "train.progress=false",
            "--set",
            "consistency.transnet.progress=false",
            "--set",
            "consistency.refine.progress=false",
            *extra,
        ]
    )


def test_end_to_end_tiny_run(tmp_path, capsys):
    run_dir = tmp_path / "kc"
    args = (
        "--set",
        "data.classes=[0,1,2]",
        "--set",
        "train.epochs=1",
        "--set",
        "consistency.transnet.epochs=2",
        "--set",
        "consistency.refine.epochs=1",
        "--set",
        "consistency.in_modes=[[1,0,0]]",
    )
    summary = _cli(run_dir, *args)
    assert summary["method"] == "consistency" and not summary["features_reused"]
    assert 0.0 <= summary["refine_100_top1"] <= 1.0
    net_a, net_b = (load_params(run_dir / f"net_{t}" / "trained_params.pkl") for t in "ab")
    assert [net_a[1]["config"]["seed"], net_b[1]["config"]["seed"]] == [0, 5]  # the config's seeds
    assert not np.allclose(net_a[0]["stem_conv/kernel"], net_b[0]["stem_conv/kernel"])
    rel = [summary[f"var_order{k}_rel"] for k in range(3)]
    assert all(r > 0 for r in rel) and summary["var_residual_rel"] > 0
    assert "| order 0 |" in capsys.readouterr().out
    arrays, meta = load_params(summary["transnet_params"])
    model = transnet_model(meta["transnet"]["feature_shape"], meta["transnet"]["depth"])
    assert set(arrays) == {v.path for v in model.weights}
    variance = json.loads((run_dir / "variance.json").read_text())
    assert [r["component"] for r in variance["rows"]][:3] == ["order 0", "order 1", "order 2"]
    assert (run_dir / "refine_100_tail.pkl").exists()
    # a rerun with other Trans-Net settings reuses the trained nets and the feature caches and
    # resumes the Trans-Net for its extra epoch
    stamp = os.path.getmtime(run_dir / "net_a" / "trained_params.pkl")
    again = _cli(run_dir, *args, "--set", "consistency.transnet.epochs=3")
    assert again["features_reused"] and again["net_a_top1"] == summary["net_a_top1"]
    assert os.path.getmtime(run_dir / "net_a" / "trained_params.pkl") == stamp
    history = json.loads((run_dir / "transnet_history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]


def test_given_nets_must_fit_the_data(nets, capsys, tmp_path):
    """consistency.net_a/net_b are used as given; nets for another input size fail with one line."""
    with pytest.raises(SystemExit) as exit_info:
        _cli(tmp_path / "kc", "--set", f"consistency.net_a={nets[0][0]}", "--set", f"consistency.net_b={nets[0][1]}")
    assert exit_info.value.code == 2
    assert "net expects input (8, 8, 3) / 3 classes but data gives (16, 16, 3) / 10" in capsys.readouterr().err


# The kc claim's comparisons that hold on digits (benchmarks/claims/kc.py), with default oneDNN and
# with TF_ENABLE_ONEDNN_OPTS=0. Order 0 from a trained A does not explain clearly more of Var(x_B)
# than from an untrained A (paired diffs +0.09, -0.04, +0.00; 95% lower bounds -0.099 / -0.165),
# so the claims runner reports that one and this test leaves it out.
HOLDING_KC_COMPARISONS = ("trained_a vs untrained_a (residual_rel)",)


@pytest.mark.slow
def test_trained_nets_are_more_consistent_than_with_an_untrained_net(tmp_path):
    """3 seeds: a Trans-Net from another trained net leaves less of a trained net B's feature
    unexplained than one from an untrained net (paired over seeds, 95% lower bound of the mean
    difference above 0), with A and B trained."""
    from benchmarks.claims import failed_verdicts, run_claim

    result = run_claim("kc", str(tmp_path))
    print(result["per_seed"])
    asserted = [v for v in result["verdicts"] if v["comparison"] in HOLDING_KC_COMPARISONS]
    assert len(asserted) == len(HOLDING_KC_COMPARISONS)
    assert all(v["holds"] for v in asserted) and all(c["holds"] for c in result["checks"]), failed_verdicts(
        {**result, "verdicts": asserted}
    )
