"""Distillation loop: hand-computed KD/BAN losses, schedules, and tiny KD / BAN / ReduceNet runs
through the CLI (plus a slow learning test: KD beats plain training on real digits)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from ke_tf.config import ConfigError  # noqa: E402
from ke_tf.io.params import load_params  # noqa: E402
from ke_tf.losses import ban_loss, hinton_loss, kd_loss  # noqa: E402
from ke_tf.methods.distillation.loop import DistillationConfig, ban_lambdas, inherit_weights  # noqa: E402
from ke_tf.models import build_model  # noqa: E402

TEACHER = [[2.0, 0.5, -1.0]]
STUDENT = [[0.1, 0.2, 0.3]]
# By hand, T = 4: p_t = softmax([0.5, 0.125, -0.25]) = [0.4519, 0.3106, 0.2135],
# p_s = softmax([0.025, 0.05, 0.075]) = [0.3250, 0.3333, 0.3417];
# KL = sum p_t log(p_t/p_s) = 0.051597, T^2 KL = 0.825555.
KD_T4 = 0.825555
# CE(s, y=0) = log(e^.1 + e^.2 + e^.3) - 0.1 = 1.201943.
CE_Y0 = 1.201943


def test_hinton_kd_matches_hand_computation():
    np.testing.assert_allclose(kd_loss(STUDENT, TEACHER, 4.0), [KD_T4], atol=1e-5)
    labels = tf.constant([0])
    got = hinton_loss(tf.constant(STUDENT), tf.constant(TEACHER), labels, alpha=0.9, temperature=4.0)
    np.testing.assert_allclose(got, [0.1 * CE_Y0 + 0.9 * KD_T4], atol=1e-5)  # 0.863194
    got = hinton_loss(tf.constant(STUDENT), tf.constant(TEACHER), labels, alpha=0.7, temperature=4.0, class_mean=True)
    np.testing.assert_allclose(got, [0.3 * CE_Y0 + 0.7 * KD_T4 / 3], atol=1e-5)
    # alpha 0 is plain CE; identical logits give no KD term.
    np.testing.assert_allclose(
        hinton_loss(tf.constant(STUDENT), tf.constant(STUDENT), labels, 0.5, 4.0), [0.5 * CE_Y0], atol=1e-6
    )


def test_ban_loss_matches_hand_computation():
    # tau = 4: soft CE = -sum p_t log p_s = 1.104928 (= KL 0.051597 + H(p_t) 1.053331);
    # CE + 0.5 * 16 * 1.104928 = 10.041371.
    got = ban_loss(tf.constant(STUDENT), tf.constant(TEACHER), tf.constant([0]), lam=0.5, tau=4.0)
    np.testing.assert_allclose(got, [10.041371], atol=1e-4)
    cfg = DistillationConfig(ban_lambda=1.0, ban_lambda_end=0.01)
    np.testing.assert_allclose(ban_lambdas(cfg, 3), [1.0, 0.1, 0.01])
    cfg.ban_schedule = "linear"
    np.testing.assert_allclose(ban_lambdas(cfg, 3), [1.0, 0.505, 0.01])
    with pytest.raises(ConfigError, match="distillation.ban_lambda"):
        DistillationConfig(ban_lambda=0.0).validate("distillation")
    with pytest.raises(ConfigError, match="distillation.mode"):
        DistillationConfig(mode="fitnet").validate("distillation")


def test_weight_inheritance():
    teacher = build_model("reduce20", 10, (16, 16, 3), variant="teacher", width_mult=0.25)
    student = build_model("reduce20", 10, (16, 16, 3), variant="student", width_mult=0.25, lora=True)
    missing = inherit_weights(student, teacher)
    assert missing and all("/lora_" in p for p in missing)
    t = {v.path: v.numpy() for v in teacher.weights}
    for v in student.weights:
        if v.path not in missing:
            np.testing.assert_array_equal(v.numpy(), t[v.path])


def _train(tmp, *sets):
    from train_cifar import main

    args = [
        "--config",
        "configs/digits_resnet20_kd.yaml",
        "--set",
        f"run_dir={tmp}",
        "--set",
        "train.epochs=1",
        "--set",
        "data.image_size=16",
        "--set",
        "train.progress=false",
        "--set",
        "model.options={width_mult: 0.25}",
    ]
    for s in sets:
        args += ["--set", s]
    return main(args)


@pytest.fixture(scope="module")
def reducenet_run(tmp_path_factory):
    """Both ReduceNet stages (the teacher is trained by the same config) + deploy, 1 epoch each."""
    tmp = tmp_path_factory.mktemp("reducenet")
    return tmp, _train(
        tmp,
        "distillation.mode=reducenet",
        "model.arch=reduce20",
        "model.options={width_mult: 0.25, lora: true, lora_act: annealed}",
    )


def test_tiny_reducenet_run_and_deploy_evaluation(reducenet_run):
    from test import main as test_main

    tmp, summary = reducenet_run
    assert summary["deploy_macs"] < summary["student_macs"]  # the lora branch is folded away
    assert summary["inherited_variables"] > 0
    rows = json.loads((tmp / "results.json").read_text())["rows"]
    assert [(r["stage"], r["variant"]) for r in rows] == [
        ("teacher", "teacher"),
        ("student", "student"),
        ("deploy", "deploy"),
    ]
    assert rows[0]["macs"] > rows[1]["macs"] > rows[2]["macs"]
    student = test_main(["--trained_param", str(tmp / "student_params.pkl")])
    deploy = test_main(["--trained_param", str(tmp / "deploy_params.pkl")])
    # The saved deploy net evaluates as the run did (same weights, same computation) ...
    assert deploy["test_top1"] == summary["deploy_top1"]
    # ... and as the student up to float32 round-off of the fused kernels (fused == unfused is a
    # float64 identity in test_reparam): one near-tie prediction of the test split may flip.
    assert abs(deploy["test_top1"] - student["test_top1"]) <= 1.0 / deploy["examples"]
    assert deploy["test_loss"] == pytest.approx(student["test_loss"], abs=1e-4)
    assert load_params(str(tmp / "deploy_params.pkl"))[1]["model"]["options"]["variant"] == "deploy"


def test_tiny_kd_run_from_teacher_params(reducenet_run, tmp_path):
    """Any two models: the pickled ReduceNet teacher teaches a plain quarter-width ResNet-20."""
    teacher = str(reducenet_run[0] / "teacher_params.pkl")
    summary = _train(tmp_path, f"distillation.teacher_params={teacher}")
    assert summary["mode"] == "kd" and summary["teacher_arch"] == "reduce20"
    assert summary["teacher_top1"] == pytest.approx(reducenet_run[1]["teacher_top1"])
    _, meta = load_params(str(tmp_path / "student_params.pkl"))
    assert meta["model"]["arch"] == "resnet20" and meta["teacher_params"] == teacher
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["stage"] for r in rows] == ["teacher", "student"]
    assert not (tmp_path / "teacher_params.pkl").exists()


def test_tiny_ban_run_two_generations(reducenet_run, tmp_path, monkeypatch):
    from ke_tf.methods.distillation import loop as distillation

    seeds, original = [], distillation.train_stage

    def recording_train_stage(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return original(*args, **kwargs)

    monkeypatch.setattr(distillation, "train_stage", recording_train_stage)
    teacher = str(reducenet_run[0] / "teacher_params.pkl")
    summary = _train(
        tmp_path, "distillation.mode=ban", "distillation.generations=2", f"distillation.teacher_params={teacher}"
    )
    rows = json.loads((tmp_path / "ban.json").read_text())["rows"]
    assert [r["generation"] for r in rows] == [0, 1]
    assert summary["ensemble_top1"] == rows[-1]["ensemble_top1"]
    assert rows[0]["ensemble_top1"] == rows[0]["test_top1"]  # an ensemble of one is the model
    for g in (0, 1):
        assert load_params(str(tmp_path / f"gen_{g}" / "trained_params.pkl"))[1]["generation"] == g
    # Fresh initialisation per generation (seed + 10 g): the generations are different networks.
    a0, _ = load_params(str(tmp_path / "gen_0" / "trained_params.pkl"))
    a1, _ = load_params(str(tmp_path / "gen_1" / "trained_params.pkl"))
    assert not np.allclose(a0["stem_conv/kernel"], a1["stem_conv/kernel"])
    assert seeds[1] == seeds[0] + 10  # ... trained on their own data order
