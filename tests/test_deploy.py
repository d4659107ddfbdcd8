"""`deploy_model` on any functional model: deployed == original in inference mode is an identity,
built and run under the float64 policy and compared at float64 round-off (tests/numerics.py), with
BN statistics and affine parameters randomised so that folding changes every weight it touches.
The exported artifacts (SavedModel, TFLite) are float32 by design and compared within a measured bound."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from ke_tf.layers.activations import set_annealing
from ke_tf.layers.gates import ChannelGate
from ke_tf.layers.reparam import ReduceConv
from ke_tf.layers.split import SplitConv2D, SplitDense
from ke_tf.models import build_model
from ke_tf.models.reducenet import get_deploy_model
from ke_tf.surgery.deploy import deploy_model
from tests.numerics import assert_identical, assert_within_measured_bound, float64, randomise_statistics
from tests.test_graph import grouped_model

# Largest difference measured from the float32 Keras deployed model (random BN statistics, 3 seeds;
# AVX2 EPYC, oneDNN on): SavedModel 0 (own model and MobileNetV2), LiteRT (XNNPACK) 7.5e-7 of the
# logits' scale (MobileNetV2 alpha 0.35, 32x32). 10x the largest, as tests/test_export.py.
EXPORT_BOUND = 7.5e-6
EXPORT_MEASURED = "exported vs float32 Keras deployed model: max 7.5e-7 of the scale (LiteRT), x10"


def all_layers(model):
    """Every layer of `model`, nested models' layers included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def count(model, cls):
    return sum(isinstance(layer, cls) for layer in all_layers(model))


def own_model():
    """A user's functional CNN: a nested block (depthwise x2 -> BN -> ReLU6 -> 1x1 -> BN), `x + y`
    ops, a BN after a merge and a BN whose conv also feeds a merge (both stay), a split conv, a gate
    and a nested Sequential dense -> BN (folded)."""
    inner = keras.Input((8, 8, 6))
    h = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, use_bias=False, name="dw")(inner)
    h = keras.layers.BatchNormalization(name="dw_bn")(h)
    h = keras.layers.ReLU(6.0, name="dw_relu")(h)
    h = keras.layers.Conv2D(6, 1, use_bias=False, name="pw")(h)
    block = keras.Model(inner, keras.layers.BatchNormalization(name="pw_bn")(h), name="block")

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="stem")(inputs)
    x = keras.layers.ReLU(name="stem_relu")(keras.layers.BatchNormalization(name="stem_bn")(x))
    x = keras.layers.BatchNormalization(name="add_bn")(x + block(x))
    c = keras.layers.Conv2D(6, 3, padding="same", name="shared")(x)
    x = keras.layers.ReLU(name="shared_relu")(keras.layers.BatchNormalization(name="shared_bn")(c)) + c
    x = SplitConv2D(8, 3, padding="same", split_mode="wels", name="split")(x)
    x = ChannelGate("g", name="gate")(keras.layers.BatchNormalization(name="split_bn")(x))
    fc = keras.Sequential(
        [keras.layers.Dense(5, name="fc"), keras.layers.BatchNormalization(name="fc_bn")], name="fc_seq"
    )
    outputs = SplitDense(4, name="head")(fc(keras.layers.GlobalAveragePooling2D(name="pool")(x)))
    return keras.Model(inputs, outputs, name="own")


def assert_deploys_exactly(model, seed=0):
    """Deploy `model` (a float64 model) after randomising its BNs; deployed == original. Returns it."""
    randomise_statistics(model, seed)
    deployed = deploy_model(model)
    x = np.random.default_rng(seed + 1).normal(size=(2, *model.input_shape[1:]))
    assert_identical(deployed(x).numpy(), model(x, training=False).numpy())
    return deployed


def test_mobilenet_v2_folds_every_bn_including_depthwise():
    with float64():
        model = keras.applications.MobileNetV2(
            weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10, classifier_activation=None
        )
        deployed = assert_deploys_exactly(model)
    assert count(model, keras.layers.BatchNormalization) == 52
    assert count(deployed, keras.layers.BatchNormalization) == 0
    assert all(layer.use_bias for layer in deployed.layers if isinstance(layer, keras.layers.DepthwiseConv2D))


def test_resnet50_folds_into_convs_with_bias():
    with float64():
        model = keras.applications.ResNet50(
            weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None
        )
        deployed = assert_deploys_exactly(model, seed=2)
    assert (count(model, keras.layers.BatchNormalization), count(deployed, keras.layers.BatchNormalization)) == (53, 0)
    assert [layer.name for layer in deployed.layers] == [
        layer.name for layer in model.layers if not isinstance(layer, keras.layers.BatchNormalization)
    ]


def test_own_model_with_nested_block_and_ops():
    with float64():
        model = own_model()
        deployed = assert_deploys_exactly(model, seed=4)
    kept = {layer.name for layer in all_layers(deployed) if isinstance(layer, keras.layers.BatchNormalization)}
    assert kept == {"add_bn", "shared_bn"}  # after a merge; a conv that also feeds the add
    assert count(model, keras.layers.BatchNormalization) == 7
    assert not any(isinstance(layer, (ChannelGate, SplitConv2D, SplitDense)) for layer in all_layers(deployed))
    assert [layer.name for layer in deployed.get_layer("fc_seq").layers[1:]] == ["fc"]
    assert deployed.get_layer("block").get_layer("dw").kernel.shape == (3, 3, 6, 2)


def test_grouped_convolutions_fold_their_bn():
    """BN after grouped convs (and a per-channel one) folds into the filters of each group."""
    with float64():
        model = grouped_model()
        deployed = assert_deploys_exactly(model, seed=6)
    assert count(deployed, keras.layers.BatchNormalization) == 0 and deployed.get_layer("grouped").groups == 4


def test_resnet20_b_and_reduce20():
    with float64():
        resnet = build_model("resnet20", 10, (16, 16, 3), shortcut="B", width_mult=0.5)
        assert count(assert_deploys_exactly(resnet, seed=6), keras.layers.BatchNormalization) == 0
        student = build_model(
            "reduce20",
            10,
            (16, 16, 3),
            variant="student",
            width_mult=0.5,
            lora=True,
            lora_act="annealed",
            padding="torch",
        )
        set_annealing(student, 1.0)
        deployed = assert_deploys_exactly(student, seed=8)
        spec_built = get_deploy_model(student)  # the same arithmetic in the spec-built deploy net
        x = np.random.default_rng(9).normal(size=(2, 16, 16, 3))
        assert_identical(spec_built(x).numpy(), deployed(x).numpy())
    assert count(deployed, ReduceConv) == 0 and count(deployed, keras.layers.BatchNormalization) == 0


def test_gate_with_zeros_refuses_naming_the_layer():
    model = own_model()
    model.get_layer("gate").gate.assign(np.array([1, 0, 1, 1, 1, 1, 1, 1], "float32"))
    with pytest.raises(ValueError, match="^gate: .*slice the model first"):
        deploy_model(model)


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="build it functionally"):
        deploy_model(Net())


def test_deployed_model_round_trips_through_keras_file(tmp_path):
    with float64():
        deployed = assert_deploys_exactly(own_model(), seed=10)
        deployed.save(tmp_path / "deployed.keras")
        loaded = keras.models.load_model(tmp_path / "deployed.keras")
        x = np.random.default_rng(11).normal(size=(2, 8, 8, 3))
        assert_identical(loaded(x).numpy(), deployed(x).numpy())


def test_deployed_model_exports_to_savedmodel(tmp_path):
    model = own_model()
    randomise_statistics(model, seed=12)
    deployed = deploy_model(model)
    deployed.export(str(tmp_path / "saved"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "saved"))  # keep a reference: it owns the variables
    x = np.random.default_rng(13).normal(size=(3, 8, 8, 3)).astype("float32")
    assert_within_measured_bound(
        loaded.serve(tf.constant(x)).numpy(), deployed(x).numpy(), EXPORT_BOUND, EXPORT_MEASURED
    )


def test_deployed_mobilenet_v2_runs_in_litert():
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10, classifier_activation=None
    )
    randomise_statistics(model, seed=14)
    deployed = deploy_model(model)
    interpreter = Interpreter(model_content=tf.lite.TFLiteConverter.from_keras_model(deployed).convert())
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    x = np.random.default_rng(15).normal(size=(3, 32, 32, 3)).astype("float32")
    rows = []
    for row in x:
        interpreter.set_tensor(inp["index"], row[None])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out["index"])[0])
    assert_within_measured_bound(np.stack(rows), deployed(x).numpy(), EXPORT_BOUND, EXPORT_MEASURED)
