"""EKG filter pruning: gates, importance, search, MACs, slicing equivalence, bank distillation,
end-to-end CLI run; slow: EKG beats random filter pruning on digits.

The gated network of these tests is built under the float64 policy, so its identities (open gates ==
plain, clone == original, pruned == masked, rescaled == factor * masked, reverse- == forward-mode
derivative) are compared at float64 round-off (tests/numerics.py) and hold on any CPU."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from ke_tf.data import load_data  # noqa: E402
from ke_tf.engine.bn_statistics import moving_statistics  # noqa: E402
from ke_tf.layers.gates import ChannelGate, GatedLayerFactory, gate_sites, model_gates, set_masks  # noqa: E402
from ke_tf.losses import cross_entropy, search_objective  # noqa: E402
from ke_tf.methods.ekg.search import (  # noqa: E402
    GreedySearch,
    MaskedMacs,
    batch_stat_forward,
    filter_l1,
    importance_fn,
    pick_teachers,
    trimmed_otsu,
)
from ke_tf.models import build_from_spec, model_spec  # noqa: E402
from ke_tf.surgery.flops import complexity  # noqa: E402
from ke_tf.surgery.graph import ChannelGraph  # noqa: E402
from ke_tf.surgery.slicing import slice_model  # noqa: E402
from tests.numerics import assert_identical, float64  # noqa: E402

SPEC = model_spec("resnet20", 10, (16, 16, 3), shortcut="B")


def _randomise(model, seed=0):
    """Non-trivial BN statistics and affine terms so masking/slicing bugs cannot hide."""
    rng = np.random.RandomState(seed)
    for v in model.weights:
        if v.name in ("gamma", "moving_variance"):
            v.assign(rng.uniform(0.5, 1.5, v.shape))
        elif v.name in ("beta", "moving_mean"):
            v.assign(rng.normal(0, 0.2, v.shape))


@pytest.fixture(scope="module")
def gated():
    """A randomised gated ResNet-20 in float64 (its layers keep the policy they were built with)."""
    keras.utils.set_random_seed(0)
    with float64():
        model = build_from_spec(SPEC, GatedLayerFactory())
    _randomise(model)
    return model


@pytest.fixture(scope="module")
def images():
    return tf.random.stateless_normal([8, 16, 16, 3], seed=[1, 2], dtype=tf.float64)


def test_gate_is_shared_per_group_and_masks_every_site():
    inputs = keras.Input((4, 4, 3))
    gate = ChannelGate("g", name="g_gate")
    a = gate(inputs)
    b = gate(a * 2.0 + 1.0)
    model = keras.Model(inputs, [a, b])
    assert [v.path for v in model.weights] == ["g_gate/gate"]
    gate.gate.assign([1.0, 0.0, 1.0])
    x = np.ones((1, 4, 4, 3), np.float32)
    a, b = model(x)
    np.testing.assert_array_equal(a.numpy()[..., 1], 0)
    np.testing.assert_array_equal(b.numpy()[..., 1], 0)
    np.testing.assert_array_equal(b.numpy()[..., 0], 3)


def test_gated_resnet_groups_sites_and_open_gates_equal_plain(gated, images):
    assert gate_sites(gated) == {
        "stage1": 4,
        "stage2": 3,
        "stage3": 3,
        **{f"s{s}b{j}": 1 for s in (1, 2, 3) for j in range(3)},
    }
    with float64():
        plain = build_from_spec(SPEC)
    set_masks(model_gates(gated), {})
    arrays = {v.path: v.numpy() for v in gated.weights}
    for v in plain.weights:
        v.assign(arrays[v.path])
    assert_identical(plain(images, training=False).numpy(), gated(images, training=False).numpy())
    assert complexity(plain) == complexity(gated)  # gates are neither params nor MACs


def test_mask_change_does_not_retrace_and_config_roundtrips(gated, images):
    forward = tf.function(lambda x: gated(x, training=False))
    set_masks(model_gates(gated), {})
    full = forward(images).numpy()
    set_masks(model_gates(gated), {"stage2": [0, 5, 7]})
    masked = forward(images).numpy()
    assert forward.experimental_get_tracing_count() == 1
    assert np.abs(full - masked).max() > 1e-3
    clone = keras.Model.from_config(gated.get_config())
    clone.set_weights(gated.get_weights())
    assert len(model_gates(clone)) == len(model_gates(gated))
    assert_identical(clone(images, training=False).numpy(), masked)
    set_masks(model_gates(gated), {})


def test_batch_stat_forward_keeps_moving_statistics(gated, images):
    before = [v.numpy().copy() for v in moving_statistics(gated)]
    out = batch_stat_forward(gated)(images)
    for a, v in zip(before, moving_statistics(gated)):
        np.testing.assert_array_equal(a, v.numpy())
    # batch statistics really were used (moving statistics are randomised)
    assert np.abs(out.numpy() - gated(images, training=False).numpy()).max() > 1e-3


def test_importance_is_abs_derivative_of_loss_wrt_shared_gate(gated, images):
    """|dL/dgate_c| (= |sum over sites of a*dL/da|), checked against forward-mode AD (exact) and
    central finite differences on the most important channels."""
    gates = model_gates(gated)
    set_masks(gates, {})
    forward = batch_stat_forward(gated)
    labels = tf.constant(np.arange(8) % 10, tf.int32)
    ensemble = tf.random.stateless_normal([8, 10], seed=[3, 4])
    scores = dict(zip(gates, importance_fn(gates, forward)(images, labels, ensemble)))
    assert {g: tuple(s.shape) for g, s in scores.items()} == {
        g: (int(gate.gate.shape[0]),) for g, gate in gates.items()
    }
    assert all(float(tf.reduce_min(s)) >= 0 for s in scores.values())

    def loss():
        return tf.reduce_mean(search_objective(forward(images), labels, ensemble))

    for group in ("stage2", "s1b1", "stage3"):
        var = gates[group].gate
        channel = int(np.argmax(scores[group]))
        tangent = tf.one_hot(channel, int(var.shape[0]), dtype=var.dtype)
        if group == "stage2":  # forward-mode AD retraces the forward pass: once is enough
            with tf.autodiff.ForwardAccumulator(var.value, tangent) as acc:
                value = loss()
            assert_identical(scores[group][channel].numpy(), np.abs(acc.jvp(value).numpy()))
        eps = 1e-3
        ones = np.ones(var.shape)
        var.assign(ones + eps * tangent.numpy())
        l_up = float(loss())
        var.assign(ones - eps * tangent.numpy())
        l_down = float(loss())
        var.assign(ones)
        np.testing.assert_allclose(float(scores[group][channel]), abs(l_up - l_down) / (2 * eps), rtol=0.1)


def test_trimmed_otsu_hand_computed():
    # no trim: splits of [1, 2, 10, 11] give between-class variance 8.33, 20.25, 8.33 -> (2+10)/2
    assert trimmed_otsu([10, 1, 11, 2], trim=0.0) == pytest.approx(6.0)
    # trim 0.2 of 6 values drops ceil(1.2)=2 at each end: core [2, 10] -> 6; the outliers do not matter
    assert trimmed_otsu([1000, 2, 10, -5, 11, 1], trim=0.2) == pytest.approx(6.0)


def test_masked_macs_and_pruned_equals_masked(gated, images):
    rng = np.random.RandomState(3)
    gates = model_gates(gated)
    keep = {
        g: sorted(rng.choice(int(gate.gate.shape[0]), rng.randint(1, int(gate.gate.shape[0]) + 1), replace=False))
        for g, gate in gates.items()
    }
    set_masks(gates, keep)
    with float64():
        narrow, spec = slice_model(gated, SPEC, keep)
    counter = MaskedMacs(ChannelGraph(gated), gates)
    assert counter.full == complexity(build_from_spec(SPEC))["macs"]
    assert complexity(narrow)["macs"] == counter({g: len(k) for g, k in keep.items()})
    assert spec["widths"] == {g: len(k) for g, k in keep.items()}
    assert_identical(narrow(images, training=False).numpy(), gated(images, training=False).numpy())
    set_masks(gates, {})


@pytest.fixture(scope="module")
def holdout():
    data = load_data("digits", image_size=16)
    _, hold = data.split_holdout(2, 0)
    return list(hold.test(256))


@pytest.mark.parametrize("criterion", ["ekg", "l1", "random"])
def test_search_stops_at_first_step_under_target(gated, holdout, criterion):
    search = GreedySearch(gated, holdout, 0.6, criterion=criterion, progress=False)
    keep = search.run()
    rates = [search.rate(k) for k, _ in search.history]
    assert rates[0] == 1.0 and rates[-1] <= 0.6 < rates[-2]
    assert all(a > b for a, b in zip(rates, rates[1:]))  # every step removes filters
    for before, after in zip(search.history, search.history[1:]):  # pruning is monotone, one group per step
        changed = [g for g in before[0] if len(before[0][g]) != len(after[0][g])]
        assert len(changed) == 1 and set(after[0][changed[0]]) < set(before[0][changed[0]])
    narrow, _ = slice_model(gated, SPEC, keep)
    assert complexity(narrow)["macs"] / search.macs.full == pytest.approx(rates[-1])
    set_masks(model_gates(gated), {})


def test_l1_criterion_cuts_least_l1_filters_uniformly(gated, holdout):
    """Li et al.'s baseline: each group loses its smallest-L1 filters (summed over the convs that
    write the group) and all groups keep about the same fraction."""
    norms = filter_l1(ChannelGraph(gated), model_gates(gated))
    stage3 = sum(
        np.abs(gated.get_layer(n).kernel.numpy()).sum(axis=(0, 1, 2))
        for n in ("s3b0_conv2", "s3b0_short_conv", "s3b1_conv2", "s3b2_conv2")
    )
    np.testing.assert_allclose(norms["stage3"], stage3, rtol=1e-5)
    search = GreedySearch(gated, holdout, 0.6, criterion="l1", progress=False)
    keep = search.run()
    fractions = {g: len(k) / search.macs.full_widths[g] for g, k in keep.items()}
    for g, k in keep.items():
        dropped = sorted(set(range(search.macs.full_widths[g])) - set(k))
        if dropped:
            assert norms[g][dropped].max() <= norms[g][list(k)].min(), g
        step = search.steps[g] / search.macs.full_widths[g]
        assert fractions[g] >= min(fractions.values()) and fractions[g] <= max(fractions.values())
        assert max(fractions.values()) - fractions[g] <= step + 1e-9 or len(k) == 1, (g, fractions)
    set_masks(model_gates(gated), {})


def test_classifier_rescale_is_norm_preserving_and_slices_exactly(gated, images):
    """W' = normalize(W*M)*||W|| on the classifier: logits scale by ||W||/||W_kept|| around the
    bias; the physically pruned net with the rescaled kernel computes the rescaled masked net."""
    keep = {"stage3": list(range(0, 64, 3)), "s2b1": [0, 1, 2, 5]}
    search = GreedySearch(gated, [], 0.6, progress=False)
    w = gated.get_layer("classifier").kernel.numpy()
    factor = np.linalg.norm(w) / np.linalg.norm(w[keep["stage3"]])
    assert search.rescale.factor(keep) == pytest.approx(factor, rel=1e-6)
    assert search.rescale.factor({"s2b1": [0]}) == 1.0
    search.mask(keep)
    rescaled = search.forward(images).numpy()
    plain = GreedySearch(gated, [], 0.6, progress=False, rescale=False)
    plain.mask(keep)
    masked = plain.forward(images).numpy()
    bias = gated.get_layer("classifier").bias.numpy()
    assert_identical(rescaled - bias, factor * (masked - bias))
    with float64():
        narrow, _ = slice_model(gated, SPEC, keep)
    search.rescale.rescale_kernel(narrow, keep)
    assert_identical(narrow(images, training=True).numpy(), rescaled)
    set_masks(model_gates(gated), {})


def test_pick_teachers_evenly_spaced_losses():
    history = [(None, loss) for loss in (0.1, 0.12, 0.2, 0.3, 0.35, 0.5, 0.52, 0.9, 1.0)]
    # final 1.0 (excluded), dense 0.1; k=1..3 targets 0.7, 0.4, 0.1 -> 0.52 (idx 6), 0.35 (4), 0.1 (0)
    assert pick_teachers(history, 3) == [0, 4, 6]


def test_bank_data_pairs_batches_and_distillation_loss():
    from ke_tf.methods.ekg.loop import BankData, bank_distillation_loss

    data = load_data("digits", image_size=8)
    bank = np.eye(10, dtype=np.float32)[data.train_labels][:, :, None] * np.array([5.0, 4.0], np.float32)
    paired = BankData(data, bank)
    plain = data.stream(64, 7, 0, 4)
    batches = 0
    for (x, y, b), (px, _) in zip(paired.stream(64, 7, 0, 4), plain):  # epochs 0..3
        np.testing.assert_array_equal(np.argmax(b.numpy()[:, :, 0], -1), y.numpy())
        np.testing.assert_array_equal(x.numpy(), px.numpy())  # the images of the plain stream
        batches += 1
    assert batches == 4 * (data.info.train_size // 64)
    with pytest.raises(ValueError, match="memory bank has 3 rows"):
        BankData(data, bank[:3])

    # member 1 is closer to member 0 than the student is, member 2 farther: teacher = mean(0, 1)
    student = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, use_bias=False)])
    student.layers[0].kernel.assign(np.eye(3, dtype=np.float32))
    x = np.array([[0.0, 1.0, 0.0]], np.float32)  # student logits [0, 1, 0]
    members = np.stack([[3.0, 0.0, 0.0], [2.6, 0.0, 0.0], [-3.0, 0.0, 0.0]], axis=-1)[None].astype(
        np.float32
    )  # [1, K, M]
    labels = np.array([1], np.int32)
    out = bank_distillation_loss(student, 4.0)((x, labels, members), training=False)
    teacher = members[0, :, :2].mean(-1)
    p = tf.nn.softmax(teacher / 4.0)
    kl = float(tf.reduce_sum(p * (tf.nn.log_softmax(teacher / 4.0) - tf.nn.log_softmax(x[0] / 4.0))))
    expected = float(cross_entropy(x, labels)[0]) + 4.0 * kl
    assert float(out["loss"][0]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # minutes on 2 cores: CI runs it with the slow suite
def test_end_to_end_cli_then_test_py(tmp_path):
    from test import evaluate_params_file
    from train_cifar import main

    run_dir = str(tmp_path / "run")
    args = [
        "--config",
        "configs/digits_resnet20_ekg.yaml",
        "--set",
        f"run_dir={run_dir}",
        "--set",
        "train.epochs=1",
        "--set",
        "ekg.pretrain_epochs=1",
        "--set",
        "ekg.holdout_per_class=2",
        "--set",
        "ekg.num_teacher=2",
        "--set",
        "train.progress=false",
        "--set",
        "data.image_size=8",
        "--set",
        "train.batch_size=128",
    ]
    summary = main(args + ["--set", "ekg.reduction_rate=0.25"])
    assert summary["macs_reduction"] >= 0.25
    for png in ("pretrain_curve.png", "search.png", "finetune_curve.png"):
        assert os.path.getsize(os.path.join(run_dir, png)) > 1000
    # The search result is a cache: reused for the same setting, searched again for another.
    slimmed = os.path.join(run_dir, "slimmed_params.pkl")
    before = os.path.getmtime(slimmed)
    assert main(args + ["--set", "ekg.reduction_rate=0.25"])["search_steps"] == summary["search_steps"]
    assert os.path.getmtime(slimmed) == before
    deeper = main(args + ["--set", "ekg.reduction_rate=0.4", "--set", f"run_dir={run_dir}"])
    assert deeper["macs_reduction"] >= 0.4 and os.path.getmtime(slimmed) > before
    bank = np.load(os.path.join(run_dir, "memory_bank.npy"))
    assert bank.shape == (1437, 10, 2)
    result = evaluate_params_file(os.path.join(run_dir, "trained_params.pkl"))
    assert result["test_top1"] == pytest.approx(deeper["test_top1"], abs=1e-6)
    assert result["macs"] == deeper["macs"] and result["macs_reduction"] == pytest.approx(deeper["macs_reduction"])
    assert result["params_reduction"] > 0


@pytest.mark.slow  # minutes on 2 cores: CI runs it with the slow suite
def test_end_to_end_on_two_replicas(tmp_path):
    """The whole EKG loop (pre-training, search, memory bank, bank-distilled fine-tuning over the
    sharded stream) on 2 logical CPU replicas, then test.py on its output."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_dir = str(tmp_path / "run")
    proc = subprocess.run(
        [
            sys.executable,
            "train_cifar.py",
            "--config",
            "configs/digits_resnet20_ekg.yaml",
            "--set",
            f"run_dir={run_dir}",
            "--set",
            "distribute.cpu_replicas=2",
            "--set",
            "train.epochs=2",
            "--set",
            "ekg.pretrain_epochs=2",
            "--set",
            "ekg.holdout_per_class=2",
            "--set",
            "ekg.num_teacher=2",
            "--set",
            "ekg.reduction_rate=0.25",
            "--set",
            "data.image_size=8",
            "--set",
            "train.batch_size=64",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 replica(s) (MirroredStrategy" in proc.stdout + proc.stderr
    with open(os.path.join(run_dir, "results.json")) as f:
        summary = json.load(f)["summary"]
    assert summary["macs_reduction"] >= 0.25 and summary["test_top1"] > 0.3  # learnt beyond chance (0.1)
    from test import evaluate_params_file

    result = evaluate_params_file(os.path.join(run_dir, "trained_params.pkl"))
    assert result["test_top1"] == pytest.approx(summary["test_top1"], abs=1e-6)


def test_configs_validate_and_reduction_rate_sets_target():
    from ke_tf.config import ConfigError, load_config

    for name in ("cifar10", "cifar100"):
        cfg = load_config(f"configs/{name}_resnet56_ekg.yaml")
        assert cfg.method == "ekg" and cfg.model.options["shortcut"] == "B"
        assert cfg.section("ekg").target_rate == pytest.approx(0.45)
    cfg = load_config("configs/digits_resnet20_ekg.yaml", ["ekg.reduction_rate=0.3"])
    assert cfg.section("ekg").target_rate == pytest.approx(0.7)
    with pytest.raises(ConfigError, match="ekg.reduction_rate"):
        load_config("configs/digits_resnet20_ekg.yaml", ["ekg.reduction_rate=1.5"])
