"""ke_tf against the reference implementations' own numbers: goldens in tests/golden/ written by
tests/conformance/make_goldens.py running the original code (side environment, torch) on seeded
weights and images. No torch here: weights are rebuilt with `seeded_state` from the key names and
shapes each golden records and imported with ke_tf.convert. The torch goldens are float64 and
ke_tf runs them under the Keras "float64" dtype policy, so the identities hold to float64
round-off on every CPU (in float32 the summation order, which follows the CPU's vector width,
moved the KE training step by 8e-4)."""

import os

import numpy as np
import pytest
import tensorflow as tf

from ke_tf.config import TrainConfig
from ke_tf.convert import convert_checkpoint
from ke_tf.convert.common import torch_leaf
from ke_tf.convert.ke_pytorch import layer_of as ke_layer_of
from ke_tf.data.stream import TensorData
from ke_tf.engine import Trainer
from ke_tf.layers.split import SplitLayerFactory
from ke_tf.losses import classifier_loss, cross_entropy, kd_loss
from ke_tf.methods.evolution.loop import extract_slim
from ke_tf.models import build_model
from tests.conformance.seeded import seeded_state
from tests.numerics import assert_identical, assert_within_measured_bound, float64

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
# Identities compare float64 at tests.numerics.IDENTITY_TOL (1e-9 of the scale): BN on a 2-image
# batch amplifies round-off ~1e4 (float32: conv1 off by 8e-4 after the KE steps), ~1e-12 in
# float64; measured against these goldens: at most 1e-13.
# The Trainer reports its epoch loss in float32 (the loss it trains on stays float64): the value
# rounds once or twice. 8 unit round-offs (2^-24).
LOSS_BOUND = 8 * 2.0**-24
LOSS_MEASURED = "the Trainer's float32 loss report against float64 torch: up to 7.4e-8 relative"
# EKG's golden is its own float32 (tf-keras) run.
EKG_BOUND, EKG_MEASURED = 1e-5, "EKG's float32 run agrees with float64 to 5e-6"
EKG_CANDIDATE_RTOL = 1e-4


def load_golden(name):
    return dict(np.load(os.path.join(GOLDEN, name), allow_pickle=False))


def golden_state(golden, keep=None):
    """The seeded state_dict the golden was computed with (`keep`: arrays stored in the golden)."""
    shapes = {str(k): tuple(d for d in dims if d >= 0) for k, dims in zip(golden["state_keys"], golden["state_shapes"])}
    keep = dict(keep or {})
    keep.update({k: np.array(0) for k in shapes if k.endswith("num_batches_tracked")})
    return seeded_state(shapes, int(golden["seed"]), keep), shapes


def convert64(*args, **kwargs):
    """`convert_checkpoint` under the float64 policy; checks every trainable weight is float64."""
    with float64():
        model, spec, meta = convert_checkpoint(*args, **kwargs)
    assert {w.dtype for w in model.trainable_weights} == {"float64"}
    return model, spec, meta


@pytest.fixture(scope="module")
def ke():
    golden = load_golden("ke_resnet18.npz")
    masks = {k[len("mask/") :]: v for k, v in golden.items() if k.startswith("mask/")}
    _, shapes = golden_state(golden)
    masks = {
        k: np.unpackbits(bits, count=int(np.prod(shapes[k]))).reshape(shapes[k]).astype(np.float32)
        for k, bits in masks.items()
    }
    state, _ = golden_state(golden, masks)
    model, _, meta = convert64("ke_pytorch", state, "resnet18", image_size=64)
    return golden, masks, model, meta


def test_ke_kels_masks_of_every_resnet18_layer(ke):
    golden, masks, _, _ = ke
    fresh = build_model("resnet18", 10, (64, 64, 3), layers=SplitLayerFactory(0.5, "kels"), padding="torch")
    ours = {v.path: v.numpy() for v in fresh.weights if v.path.endswith("/mask")}
    assert len(masks) == len(ours) == 21  # 17 convs + 3 downsample convs + fc
    for key, mask in masks.items():
        layer, leaf = ke_layer_of(key)
        name, theirs = torch_leaf(leaf, mask, False)
        np.testing.assert_array_equal(ours[f"{layer}/{name}"], theirs, err_msg=key)
    # kels keeps every RGB input of the first conv and every class row of the classifier
    assert masks["conv1.mask"].sum() == 32 * 3 * 49 and masks["fc.mask"].sum() == 10 * 256


def test_ke_dense_and_slim_logits_from_converted_weights(ke):
    golden, _, model, meta = ke
    images = golden["images"].astype(np.float64)
    assert_identical(model(images, training=False), golden["dense_logits"])
    with float64():
        slim, _ = extract_slim(tf.distribute.get_strategy(), model, meta["model"], 0.5)
    classifier = slim.get_layer("classifier").kernel
    assert classifier.shape == (256, 10) and classifier.dtype == "float64"
    assert_identical(slim(images, training=False), golden["slim_logits"])


def test_ke_sgd_steps_with_label_smoothing_and_coupled_l2(ke, tmp_path):
    golden, masks, _, _ = ke
    state, _ = golden_state(golden, masks)
    images = golden["images"].astype(np.float64)
    # ke_tf's label-smoothed CE of the first step's (training-mode) logits is KE's LabelSmoothing(0.1).
    fresh, _, _ = convert64("ke_pytorch", state, "resnet18", image_size=64)
    first = tf.reduce_mean(cross_entropy(fresh(images, training=True), golden["labels"], 0.1))
    assert_identical(first.numpy(), golden["step_losses"][0])
    model, _, _ = convert64("ke_pytorch", state, "resnet18", image_size=64)
    # lr 0.125 and momentum 0.875 are exact in float32, where Keras's SGD holds them (see make_goldens).
    cfg = TrainConfig(
        epochs=2,
        batch_size=2,
        lr=float(golden["step_lr"]),
        momentum=float(golden["step_momentum"]),
        schedule="constant",
        weight_decay=float(golden["step_weight_decay"]),
        weight_decay_mode="coupled",
        label_smoothing=0.1,
        jit_compile="off",
        progress=False,
        checkpoint_every_epochs=0,
    )
    # One step per epoch on the golden's 2 images: two SGD steps, the second with momentum.
    trainer = Trainer(cfg, tf.distribute.get_strategy(), model, classifier_loss(model, 0.1), 1, str(tmp_path))
    history = trainer.fit(TensorData(images, golden["labels"]), seed=0, resume=False)
    # The Trainer reports the loss in float32 (the loss it differentiates is float64).
    losses = [h["train_loss"] for h in history]
    assert_within_measured_bound(losses, golden["step_losses"], LOSS_BOUND, LOSS_MEASURED)
    variables = {v.path: v.numpy() for v in model.weights}

    def ours(key):
        """Our updated variable for torch `key`, in torch layout."""
        layer, leaf = ke_layer_of(key)
        is_bn = f"{layer}/moving_mean" in variables
        name, _ = torch_leaf(leaf, state[key], is_bn)
        value = variables[f"{layer}/{name}"]
        return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value

    for key in ("conv1.weight", "bn1.weight", "bn1.bias", "layer4.1.bn2.weight", "fc.weight", "fc.bias"):
        assert_identical(ours(key), golden[f"step/{key}"])
    for key, total, squares in zip(golden["step_sum_keys"], golden["step_sums"], golden["step_sq_sums"]):
        value = ours(str(key))  # every updated weight and running mean, by its moments
        assert_identical(np.square(value).sum(), squares, err_msg=str(key))
        scale = np.sqrt(squares)  # a sum's scale: its terms' root sum of squares, not the sum itself
        assert_identical(value.sum() / scale, total / scale, err_msg=str(key))


@pytest.fixture(scope="module")
def reducenet():
    golden = load_golden("reducenet20.npz")
    keys = [str(k) for k in golden["state_keys"]]
    # The network's switches as in the reference's teacher: scaler 1, lora 0 (not drawn from the seed).
    flags = {
        k: np.array(1.0 if k.endswith("scaler") else 0.0, np.float32) for k in keys if k.endswith(("scaler", "lora"))
    }
    state, _ = golden_state(golden, flags)
    return golden, state, golden["images"].astype(np.float64)


def test_reducenet_teacher_and_student_logits_from_converted_weights(reducenet):
    golden, state, images = reducenet
    teacher, _, _ = convert64("reducenet_pytorch", state, "reduce20")
    student, _, _ = convert64("reducenet_pytorch", state, "reduce20", variant="student")
    assert_identical(teacher(images, training=False), golden["teacher_logits"])
    assert_identical(student(images, training=False), golden["student_logits"])
    with_lora = {**state, **{k: np.array(1.0, np.float32) for k in state if k.endswith("lora")}}
    lora, _, meta = convert64("reducenet_pytorch", with_lora, "reduce20", variant="student")
    assert meta["model"]["options"]["lora"] is True
    assert_identical(lora(images, training=False), golden["student_lora_logits"])


def test_reducenet_kd_loss_value(reducenet):
    golden, _, _ = reducenet
    student, teacher = golden["student_logits"], golden["teacher_logits"]
    alpha, t, classes = float(golden["alpha"]), float(golden["temperature"]), student.shape[1]
    # ReduceNet's nn.KLDivLoss() averages over batch x classes: ke_tf's per-example KD / C.
    loss = alpha * tf.reduce_mean(kd_loss(student, teacher, t)) / classes + (1 - alpha) * tf.reduce_mean(
        cross_entropy(student, golden["labels"])
    )
    assert_identical(loss.numpy(), golden["kd_loss"])


def _ekg_group(gate_name):
    """ke_tf channel group of an EKG gate (named after the conv that opens it)."""
    if gate_name == "conv":
        return "stage1"
    block, conv = gate_name.split("/")
    i, j = (int(v) for v in block[len("BasicBlock") :].split("."))
    return f"stage{i + 1}" if conv == "conv3" else f"s{i + 1}b{j}"


@pytest.fixture(scope="module")
def ekg():
    """EKG's golden and a ke_tf GreedySearch on the converted net, in float64: the Taylor
    importance sums a*dL/da over a batch of BN-normalised activations, where float32 round-off
    in our graph reaches 4e-4 of the largest value (EKG's float32 run agrees with float64 to 5e-6)."""
    from ke_tf.methods.ekg.loop import gated_copy
    from ke_tf.methods.ekg.search import GreedySearch

    golden = load_golden("ekg_resnet20.npz")
    state, _ = golden_state(golden)
    dense, _, meta = convert64("ekg_tf2", state, "resnet20")
    with float64():
        gated = gated_copy(tf.distribute.get_strategy(), dense, meta["model"])
    assert gated.get_layer("s1b0_conv1").kernel.dtype == "float64"
    search = GreedySearch(
        gated, [(golden["images"].astype(np.float64), golden["labels"])], target_rate=0.1, progress=False
    )
    groups = [_ekg_group(str(n)) for n in golden["gate_names"]]
    return golden, search, groups


def test_ekg_filter_importance_for_a_net_batch_and_ensemble(ekg):
    golden, search, groups = ekg
    logits, _, _ = search.evaluate(search.keep, None)  # the dense net's holdout logits = EKG's K0
    assert_within_measured_bound(logits, golden["ensemble"], EKG_BOUND, EKG_MEASURED)
    ours = search.importance(golden["ensemble"].astype(np.float64))
    sites = dict(zip(groups, golden["num_calls"]))
    for i, group in enumerate(groups):
        theirs = golden[f"importance/{i}"]
        if sites[group] == 1:  # a block's inner gate: one site, the same Taylor importance
            assert_within_measured_bound(ours[group], theirs, EKG_BOUND, EKG_MEASURED)
        else:  # residual stage gates: |sum over sites| (ours) <= sum over sites of |.| (EKG's)
            assert np.all(ours[group] <= theirs + EKG_BOUND * theirs.max()), group
            assert not np.allclose(ours[group], theirs, rtol=1e-3), group


def test_ekg_candidate_scores_and_choice_over_three_search_steps(ekg):
    """Each candidate EKG evaluated (its channels as EKG chose them) scores the same with ke_tf
    against the same running-mean ensemble, so ke_tf picks the same sub-network at every step."""
    golden, search, groups = ekg
    widths = [search.macs.full_widths[g] for g in groups]
    ensemble, _, _ = search.evaluate(search.keep, None)
    for step, row in enumerate(golden["candidate_scores"]):
        results = {}
        for i in np.flatnonzero(~np.isnan(row)):
            bits = np.unpackbits(golden[f"candidate_mask/{step}/{i}"], count=sum(widths)).astype(bool)
            keep = {g: np.flatnonzero(m) for g, m in zip(groups, np.split(bits, np.cumsum(widths)[:-1]))}
            results[i] = search.evaluate(keep, ensemble)
            # EKG rescales a masked kernel to its full norm; the BN after it cancels that up to its
            # epsilon, which moves a candidate's score by up to 4e-5 (relative).
            np.testing.assert_allclose(
                results[i][2], row[i], rtol=EKG_CANDIDATE_RTOL, err_msg=f"step {step}, {groups[i]}"
            )
        best = min(results, key=lambda i: results[i][2])
        assert best == golden["chosen"][step]
        ensemble = (ensemble * (step + 1) + results[best][0]) / (step + 2)  # EKG's running mean of members


def test_consistency_transnet_outputs_per_order_and_loss():
    from ke_tf.losses import transnet_loss
    from ke_tf.methods.consistency.transnet import transnet_model

    golden = load_golden("consistency_transnet.npz")
    state, _ = golden_state(golden, {"nonLinearLayers_p_pre": golden["p_pre"]})
    with float64():
        model = transnet_model(golden["x_a"].shape[1:])
    layer = model.get_layer("transnet")
    assert {w.dtype for w in model.trainable_weights} == {"float64"}
    for i, conv in enumerate(layer.convs):
        conv.kernel.assign(state[f"linearLayers_conv.{i}.weight"].transpose(2, 3, 1, 0))
    layer.beta.assign(golden["p_pre"])
    x_a = tf.constant(golden["x_a"], tf.float64)
    assert_identical(model(x_a), golden["output"])
    orders = layer.orders(x_a)
    assert len(orders) == 3
    for k, order in enumerate(orders):  # order k: k gated ReLUs (the reference's Yn[k])
        assert_identical(order, golden["orders"][k])
    assert_identical(tf.add_n(orders), golden["orders_sum"])
    loss = tf.reduce_mean(transnet_loss(model(x_a), golden["x_b"], layer.p, golden["alphas"].tolist()))
    assert_identical(loss.numpy(), golden["loss"])


def test_lwm_gradcam_maps_and_attention_distillation_loss():
    """Paper formula (ReLU(sum_k alpha_k A^k) at the last block, class b = the teacher's top class);
    the seed repository's `grad_cam_loss` differs (README), its value is recorded for reference."""
    from ke_tf.losses import attention_distillation
    from ke_tf.methods.incremental.gradcam import feature_model, grad_cam
    from tests.conformance.seeded import golden_images

    golden = load_golden("lwm_gradcam.npz")
    _, images = golden_images(2, int(golden["image_size"]), int(golden["image_seed"]))
    shapes = {
        str(k): tuple(d for d in dims if d >= 0)
        for k, dims in zip(golden["teacher_state_keys"], golden["teacher_state_shapes"])
    }
    keep = {k: np.ones(s, np.float32) for k, s in shapes.items() if k.endswith("mask")}
    keep.update({k: np.array(0) for k in shapes if k.endswith("num_batches_tracked")})
    nets = [
        convert64(
            "ke_pytorch", seeded_state(shapes, int(seed), keep), "resnet18", image_size=int(golden["image_size"])
        )[0]
        for seed in golden["seeds"]
    ]
    images = images.astype(np.float64)
    t_maps, t_logits, classes = grad_cam(feature_model(nets[0]), images)
    s_maps, s_logits, _ = grad_cam(feature_model(nets[1]), images, classes)
    assert_identical(t_logits, golden["teacher_logits"])
    assert_identical(s_logits, golden["student_logits"])
    np.testing.assert_array_equal(classes, golden["classes"])
    assert_identical(t_maps, golden["teacher_map"])
    assert_identical(s_maps, golden["student_map"])
    loss = tf.reduce_mean(attention_distillation(s_maps, t_maps))
    assert_identical(loss.numpy(), golden["paper_loss"])
    assert abs(float(loss) - float(golden["repo_loss"])) > 0.1  # the repository's map is not the paper's
