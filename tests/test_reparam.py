"""Re-parameterisation layers and ReduceNet: exact fusion, published sizes, serialisation.

Fused == multi-branch, deploy == student and loaded == saved are identities: they are built and run
under the float64 policy and compared at float64 round-off (tests/numerics.py)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ke_tf.layers.activations import AnnealedReLU, linear_anneal, set_annealing  # noqa: E402
from ke_tf.layers.reparam import ReduceConv, fold_bn, pad_kernel  # noqa: E402
from ke_tf.models import build_from_spec, build_model, model_spec  # noqa: E402
from ke_tf.models.reducenet import deploy_spec, get_deploy_model, variant_spec  # noqa: E402
from ke_tf.surgery.flops import complexity  # noqa: E402
from tests.numerics import assert_identical, float64, randomise_statistics  # noqa: E402


def test_annealed_relu_blends_relu_into_identity():
    x = np.array([[-2.0, -0.5, 0.0, 3.0]], "float32")
    layer = AnnealedReLU()
    np.testing.assert_allclose(layer(x), [[0, 0, 0, 3]])
    layer.lam.assign(0.25)
    np.testing.assert_allclose(layer(x), [[-0.5, -0.125, 0, 3]])
    layer.lam.assign(1.0)
    np.testing.assert_allclose(layer(x), x)
    assert [linear_anneal(e, 4) for e in range(6)] == [0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert linear_anneal(0, 0) == 1.0
    assert not layer.trainable_weights


def test_fold_bn_and_pad_match_keras():
    x = np.random.default_rng(1).normal(size=(2, 7, 7, 3))
    with float64():
        conv = keras.layers.Conv2D(4, 1, strides=2, padding="same", use_bias=False)
        bn = keras.layers.BatchNormalization(epsilon=1e-5)
        bn(conv(x), training=False)  # builds both layers
        randomise_statistics(keras.Sequential([conv, bn]), seed=2, spread=0.2)
        ref = bn(conv(x), training=False).numpy()
        k, b = fold_bn(conv.kernel, None, bn)
        fused = keras.layers.Conv2D(4, 3, strides=2, padding="same")
        fused.build(x.shape)
        fused.set_weights([pad_kernel(k, 3), b])
        assert_identical(fused(x).numpy(), ref)


@pytest.mark.parametrize(
    "size,strides,lora,lora_act",
    [(8, 1, False, "linear"), (8, 2, True, "linear"), (7, 2, True, "linear"), (8, 2, True, "annealed")],
)
def test_reduce_conv_fuses_exactly(size, strides, lora, lora_act):
    """Even sizes matter: Keras' stride-2 'same' padding centres a 3x3 window at 1, a 1x1 at 0."""
    x = np.random.default_rng(3).normal(size=(2, size, size, 6))
    with float64():
        unit = ReduceConv(5, strides, lora=lora, lora_act=lora_act)
        unit(x)
        randomise_statistics(keras.Sequential([unit]), seed=4, spread=0.2)
        set_annealing(keras.Sequential([unit]), 1.0)
        kernel, bias = unit.fuse()
        fused = keras.layers.Conv2D(5, 3, strides=strides, padding="same")
        fused.build(x.shape)
        fused.set_weights([kernel, bias])
        assert_identical(fused(x).numpy(), unit(x, training=False).numpy())


def test_reduce_conv_refuses_nonlinear_fusion():
    unit = ReduceConv(4, bottleneck=True)
    unit(np.zeros((1, 4, 4, 3), "float32"))
    with pytest.raises(ValueError, match="bottleneck"):
        unit.fuse()
    unit = ReduceConv(4, lora=True, lora_act="annealed")
    unit(np.zeros((1, 4, 4, 3), "float32"))
    with pytest.raises(ValueError, match="not linear"):
        unit.fuse()


def test_reducenet20_sizes_match_the_paper():
    """ReduceNet README (CIFAR-10, 32x32): teacher 412.1K / 62.0M, student 272.5K / 40.8M."""
    spec = model_spec("reduce20", 10, (32, 32, 3), variant="teacher")
    teacher = complexity(build_from_spec(spec))
    student_model = build_from_spec(variant_spec(spec, "student"))
    student = complexity(student_model)
    deploy = complexity(build_from_spec(deploy_spec(spec)))
    assert teacher == {"params": 412058, "macs": 62046848}
    assert student == {"params": 272474, "macs": 40813184}
    assert round(teacher["params"] / 1e3, 1) == 412.1 and round(teacher["macs"] / 1e6, 1) == 62.0
    assert round(student["params"] / 1e3, 1) == 272.5 and round(student["macs"] / 1e6, 1) == 40.8
    # Student == ResNet-20 with 1x1-projection shortcuts; deploy has its MACs, no BN.
    assert student == complexity(build_model("resnet20", 10, (32, 32, 3), shortcut="B"))
    assert deploy["macs"] == student["macs"]
    lora = complexity(build_from_spec(variant_spec(spec, "student", lora=True)))
    assert round(lora["params"] / 1e3, 1) == 286.7 and round(lora["macs"] / 1e6, 1) == 42.9
    # Student weights are a subset of the teacher's, by path (stage 2 inherits them).
    teacher_paths = {v.path for v in build_from_spec(spec).weights}
    assert {v.path for v in student_model.weights} < teacher_paths


@pytest.mark.parametrize("lora_act", ["linear", "annealed"])
def test_deploy_model_equals_student(lora_act):
    spec = model_spec("reduce20", 10, (16, 16, 3), variant="student", width_mult=0.5, lora=True, lora_act=lora_act)
    with float64():
        student = build_from_spec(spec)
        randomise_statistics(student, seed=5, spread=0.2)
        set_annealing(student, 1.0)
        deploy = get_deploy_model(student)  # spec read from the layers
    assert deploy.count_params() == build_from_spec(deploy_spec(spec)).count_params()
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in deploy.layers)
    assert all(layer.use_bias for layer in deploy.layers if isinstance(layer, keras.layers.Conv2D))
    x = np.random.default_rng(6).normal(size=(4, 16, 16, 3))
    assert_identical(deploy(x, training=False).numpy(), student(x, training=False).numpy())
    plain = build_from_spec(variant_spec(spec, "student", lora=False))
    assert complexity(deploy)["macs"] == complexity(plain)["macs"]


def test_keras_round_trip(tmp_path):
    x = np.random.default_rng(8).normal(size=(2, 8, 8, 3))
    path = str(tmp_path / "m.keras")
    with float64():
        inputs = keras.Input((8, 8, 3))
        y = ReduceConv(4, 2, expansion=2, bottleneck=True, name="rep_t")(inputs)
        z = ReduceConv(4, 1, lora=True, lora_act="annealed", name="rep_s")(y)
        z = AnnealedReLU(initial_lambda=0.5, name="act")(z)
        model = keras.Model(inputs, z)
        randomise_statistics(model, seed=7, spread=0.2)
        set_annealing(model, 0.3)
        model.save(path)
        loaded = keras.models.load_model(path)
        assert_identical(loaded(x, training=False).numpy(), model(x, training=False).numpy())
    assert loaded.get_layer("rep_t").get_config() == model.get_layer("rep_t").get_config()
    assert loaded.get_layer("act").get_config()["initial_lambda"] == 0.5
    assert float(loaded.get_layer("act").lam) == pytest.approx(0.3)
