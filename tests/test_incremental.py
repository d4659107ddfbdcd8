"""LwM class-incremental learning: Grad-CAM, attention gradients, head growth, metrics, runs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from ke_tf.config import ConfigError, from_dict  # noqa: E402
from ke_tf.io.params import load_params  # noqa: E402
from ke_tf.losses import attention_distillation, lwf_distillation  # noqa: E402
from ke_tf.methods.incremental import loop as inc  # noqa: E402
from ke_tf.methods.incremental.gradcam import feature_model, grad_cam, last_block_layer  # noqa: E402
from ke_tf.models import build_model, model_spec  # noqa: E402
from tests.numerics import assert_identical, float64  # noqa: E402


def tiny_model(dtype="float32", seed=0):
    """x -> ReLU(1x1 conv) -> GAP -> dense: Grad-CAM has a closed form on it."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3, 4, 2), dtype=dtype)
    a = keras.layers.Conv2D(3, 1, use_bias=False, activation="relu", name="feat", dtype=dtype)(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool", dtype=dtype)(a)
    out = keras.layers.Dense(4, name="classifier", dtype=dtype)(x)
    return keras.Model(inputs, out)


def hand_grad_cam(model, x, c):
    """numpy Grad-CAM: y_c = sum_k W_kc mean_ij A_kij + b_c, so alpha_k = W_kc / (H W)."""
    conv = model.get_layer("feat").kernel.numpy()[0, 0]  # [Cin, K]
    w = model.get_layer("classifier").kernel.numpy()  # [K, classes]
    a = np.maximum(x @ conv, 0.0)  # [B, H, W, K]
    alpha = w[:, c].T / (x.shape[1] * x.shape[2])  # [B, K]
    return np.maximum(np.einsum("bhwk,bk->bhw", a, alpha), 0.0)


def test_grad_cam_matches_hand_computation():
    """In float64, so the feature model's logits equal the model's (an identity) at float64
    round-off; the maps then match the closed form at that tolerance too."""
    model = tiny_model("float64")
    x = np.random.RandomState(0).randn(5, 3, 4, 2)
    fm = feature_model(model)
    assert last_block_layer(model) == "feat"
    classes = np.array([0, 3, 1, 2, 3])
    maps, logits, ids = grad_cam(fm, x, classes)
    assert_identical(maps.numpy(), hand_grad_cam(model, x, classes))
    assert_identical(logits.numpy(), model(x).numpy())
    # Default class: each sample's argmax.
    maps, logits, ids = grad_cam(fm, x)
    top = np.argmax(model(x).numpy(), axis=-1)
    np.testing.assert_array_equal(ids.numpy(), top)
    assert_identical(maps.numpy(), hand_grad_cam(model, x, top))
    assert maps.numpy().max() > 0


def test_attention_gradient_is_second_order_and_matches_finite_differences():
    """On the tiny net the classifier kernel reaches the map only through alpha = dy/dA, so a
    correct non-zero gradient there proves the nested tape back-propagates (float64 model; the
    L_AD itself is float32, hence the step 1e-3)."""
    teacher, student = tiny_model("float64", seed=0), tiny_model("float64", seed=1)
    x = tf.constant(np.random.RandomState(1).randn(6, 3, 4, 2))
    t_maps, _, top = grad_cam(feature_model(teacher), x)
    s_fm = feature_model(student)
    kernel = student.get_layer("classifier").kernel

    def loss():
        s_maps, _, _ = grad_cam(s_fm, x, top)
        return tf.reduce_mean(attention_distillation(s_maps, t_maps))

    with tf.GradientTape() as tape:
        value = loss()
    grads = tape.gradient(value, [kernel, student.get_layer("feat").kernel])
    assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 1e-6 for g in grads)
    direction = np.random.RandomState(2).randn(*kernel.shape)
    base = kernel.numpy()
    eps = 1e-3
    kernel.assign(base + eps * direction)
    up = float(loss())
    kernel.assign(base - eps * direction)
    down = float(loss())
    kernel.assign(base)
    np.testing.assert_allclose((up - down) / (2 * eps), float(tf.reduce_sum(grads[0] * direction)), rtol=5e-3)


def small_resnet(num_classes, seed=0):
    keras.utils.set_random_seed(seed)
    return build_model("resnet20", num_classes, (16, 16, 3), width_mult=0.5)


def test_extend_head_keeps_old_outputs():
    """Old outputs == the teacher's is an identity: both nets in float64, compared at its round-off."""
    x = np.random.RandomState(0).randn(4, 16, 16, 3)
    with float64():
        teacher = small_resnet(3)
        student = inc.extend_head(teacher, model_spec("resnet20", 5, (16, 16, 3), width_mult=0.5))
    out = student(x, training=False).numpy()
    assert out.shape == (4, 5)
    assert_identical(out[:, :3], teacher(x, training=False).numpy())
    assert np.abs(student.get_layer("classifier").kernel.numpy()[:, 3:]).max() > 0  # fresh, not zero
    with pytest.raises(ValueError, match="only the classifier may grow"):
        inc.extend_head(teacher, model_spec("resnet20", 5, (16, 16, 3), width_mult=1.0))


def test_lwm_loss_sends_attention_gradient_into_student_convs_in_graph_mode():
    """Inside a tf.function (as in the Trainer), LwM's loss differs from LwF's only by gamma*L_AD,
    and that term moves the student's conv weights (first and last block)."""
    teacher = small_resnet(3)
    student = inc.extend_head(teacher, model_spec("resnet20", 5, (16, 16, 3), width_mult=0.5))
    rng = np.random.RandomState(0)
    for v in student.trainable_variables:  # a drifted student, so the maps differ from the teacher's
        v.assign(v.numpy() + 0.05 * rng.randn(*v.shape).astype(np.float32))
    teacher.trainable = False
    batch = (tf.constant(rng.randn(8, 16, 16, 3).astype(np.float32)), tf.constant([3, 4, 3, 4, 3, 4, 3, 4]))
    icfg = inc.IncrementalConfig(gamma=1.0, beta=1.0)
    convs = [v for v in student.trainable_variables if v.path in ("s1b0_conv1/kernel", "s3b2_conv2/kernel")]

    def grads_of(variant):
        loss_fn = inc.incremental_loss(variant, icfg, student, teacher, n_old=3)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_fn(batch, training=False)["loss"])
            return loss, tape.gradient(loss, convs)

        return step()

    (l_lwm, g_lwm), (l_lwf, g_lwf) = grads_of("lwm"), grads_of("lwf")
    assert float(l_lwm) > float(l_lwf)
    for a, b in zip(g_lwm, g_lwf):
        assert float(tf.reduce_max(tf.abs(a - b))) > 1e-7
        assert np.isfinite(a.numpy()).all()


def test_lwf_distillation_has_no_t_squared_factor():
    """T = 2, teacher logits (2 ln 3, 0) -> p = (3/4, 1/4); student (0, 0) -> q = (1/2, 1/2).
    L_D = KL(p || q) = 3/4 ln(3/2) + 1/4 ln(1/2) and dL_D/ds = (q - p) / T, as in LwF/FACIL
    (Hinton's kd_loss is T^2 = 4 times both)."""
    s = tf.Variable([[0.0, 0.0]])
    t = tf.constant([[2 * np.log(3.0), 0.0]])
    with tf.GradientTape() as tape:
        value = lwf_distillation(s, t, 2.0)
    want = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    np.testing.assert_allclose(value.numpy(), [want], rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(value, s).numpy(), [[-0.125, 0.125]], rtol=1e-5)
    assert float(lwf_distillation(t, t, 2.0)[0]) == pytest.approx(0.0, abs=1e-6)


def test_metrics_against_hand_computation():
    preds = np.array([0, 1, 1, 2, 3, 3, 0, 4])
    labels = np.array([0, 0, 1, 2, 2, 3, 4, 4])
    assert inc.task_accuracies(preds, labels, [2, 2, 1]) == [2 / 3, 2 / 3, 1 / 2]
    matrix = [[0.9], [0.6, 0.8], [0.5, 0.7, 0.9]]
    assert inc.forgetting(matrix[:1]) == 0.0
    assert inc.forgetting(matrix[:2]) == pytest.approx(0.3)
    assert inc.forgetting(matrix) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert inc.forgetting([[0.5], [0.7, 0.9], [0.6, 0.2, 0.9]]) == pytest.approx(((0.7 - 0.6) + 0.7) / 2)
    assert inc.average_incremental_accuracy([0.9, 0.7, 0.65]) == pytest.approx(0.75)


def test_task_split_and_config_validation():
    icfg = inc.IncrementalConfig(order_seed=None, first=2, increment=2)
    assert inc.task_split(icfg, 10) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    cifar = inc.task_split(inc.IncrementalConfig(first=50, increment=10), 100)
    assert [len(t) for t in cifar] == [50] + [10] * 5 and cifar[0][:3] == [68, 56, 78]
    assert inc.task_split(inc.IncrementalConfig(first=2, increment=2, num_tasks=2), 100) == [[68, 56], [78, 8]]
    with pytest.raises(ConfigError, match="not a multiple"):
        inc.task_split(inc.IncrementalConfig(first=3, increment=2), 10)
    with pytest.raises(ConfigError, match="need 12 classes"):
        inc.task_split(inc.IncrementalConfig(first=4, increment=4, num_tasks=3), 10)
    from ke_tf.config import load_config

    cfg = load_config("configs/cifar100_resnet32_lwm.yaml")
    assert [len(t) for t in inc.task_split(cfg.section("incremental"), 100)] == [50] + [10] * 5
    with pytest.raises(ConfigError, match="incremental.compare"):
        from_dict({"method": "incremental", "incremental": {"compare": ["lwm", "icarl"]}})
    with pytest.raises(ConfigError, match="incremental.base_train.epoch"):
        from_dict({"method": "incremental", "incremental": {"base_train": {"epoch": 3}}})


def test_incremental_variant_key_and_its_old_name(capsys):
    assert (
        from_dict({"method": "incremental", "incremental": {"variant": "lwf"}}).section("incremental").variant == "lwf"
    )
    old = from_dict({"method": "incremental", "incremental": {"method": "finetune"}})
    assert old.section("incremental").variant == "finetune"
    assert "config key incremental.method is now incremental.variant" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="incremental.variant must be one of lwm, lwf, finetune; got 'icarl'"):
        from_dict({"method": "incremental", "incremental": {"variant": "icarl"}})


def test_end_to_end_digits_writes_pickles_tables_plot_and_test_py_evaluates(tmp_path):
    from test import evaluate_params_file
    from train_cifar import main

    run_dir = str(tmp_path / "run")
    summary = main(
        [
            "--config",
            "configs/digits_resnet20_lwm.yaml",
            "--set",
            f"run_dir={run_dir}",
            "--set",
            "data.image_size=16",
            "--set",
            "train.epochs=1",
            "--set",
            "train.batch_size=64",
            "--set",
            "train.progress=false",
            "--set",
            "incremental.base_train={epochs: 1}",
            "--set",
            "incremental.first=6",
            "--set",
            "incremental.increment=4",
            "--set",
            "incremental.compare=[finetune, lwm]",
            "--set",
            "incremental.gradcam_images=3",
        ]
    )
    assert summary["tasks"] == 2 and summary["variants"] == "finetune,lwm"
    comparison = json.load(open(os.path.join(run_dir, "comparison.json")))
    assert [(r["variant"], r["task"], r["classes"]) for r in comparison["rows"]] == [
        ("finetune", 0, 6),
        ("finetune", 1, 10),
        ("lwm", 0, 6),
        ("lwm", 1, 10),
    ]
    for name in ("comparison.md", "comparison.csv", "accuracy.png", "lwm/gradcam.png", "lwm/incremental.csv"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    results = json.load(open(os.path.join(run_dir, "lwm", "results.json")))
    tasks = results["tasks"]
    matrix = results["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2]
    assert results["summary"]["avg_incremental_acc"] == pytest.approx(np.mean([r["acc_seen"] for r in results["rows"]]))
    assert results["summary"]["forgetting"] == pytest.approx(matrix[0][0] - matrix[1][0])
    assert summary["lwm_final_acc"] == results["rows"][1]["acc_seen"]

    path = os.path.join(run_dir, "lwm", "task_1", "trained_params.pkl")
    _, meta = load_params(path)
    assert meta["data"]["classes"] == tasks[0] + tasks[1]
    assert meta["model"]["num_classes"] == 10 and meta["incremental"]["task"] == 1
    evaluated = evaluate_params_file(path)
    assert evaluated["test_top1"] == pytest.approx(results["rows"][1]["acc_seen"], abs=1e-6)
    base = evaluate_params_file(os.path.join(run_dir, "finetune", "task_0", "trained_params.pkl"))
    assert base["examples"] < evaluated["examples"]
    assert base["test_top1"] == pytest.approx(results["rows"][0]["acc_seen"], abs=1e-6)


# The lwm claim's comparisons that hold on digits (benchmarks/claims/lwm.py) with default oneDNN and
# with TF_ENABLE_ONEDNN_OPTS=0. The final-accuracy ones flip between the two (95% lower bounds:
# LwM vs LwF +0.003 / -0.031, LwM vs fine-tuning -0.094 / +0.012: LwM trades new-class accuracy for
# old), and LwF vs fine-tuning on forgetting holds in neither (-0.032 / -0.067): the runner reports them.
HOLDING_LWM_COMPARISONS = ("lwm vs finetune (forgetting)", "lwm vs lwf (forgetting)")


@pytest.mark.slow
def test_lwm_forgets_less_than_lwf_and_finetuning_over_seeds(tmp_path):
    """Digits 5+5 without exemplars, 3 seeds: LwM forgets less of the base task than fine-tuning
    and than LwF (paired over seeds, 95% lower bound of the mean difference above 0)."""
    from benchmarks.claims import failed_verdicts, run_claim

    result = run_claim("lwm", str(tmp_path))
    print(result["per_seed"])
    asserted = [v for v in result["verdicts"] if v["comparison"] in HOLDING_LWM_COMPARISONS]
    assert len(asserted) == len(HOLDING_LWM_COMPARISONS)
    assert all(v["holds"] for v in asserted), failed_verdicts({**result, "verdicts": asserted, "checks": []})
