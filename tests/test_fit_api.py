"""The methods inside Keras's own training API (`ke_tf.keras`): Hinton KD in
`keras.distillation.Distiller` trains exactly as `ke_tf.hinton_loss` in a plain GradientTape SGD
loop (float64, tests/numerics.py), also over 2 logical CPU replicas; the memory-bank loss over a
TeacherBank likewise; LwM through `fit` == the incremental loop's objective; Born-Again generations
and their ensemble; ReLU annealing and deploy; KE generations; prune-finetune schedules and the
memory bank of interim sub-networks."""

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import ke_tf
from ke_tf.keras import AnnealReLU, HintonKD, KnowledgeEvolution, LabelDistiller, TeacherBank, born_again
from ke_tf.layers.activations import annealed_layers
from ke_tf.layers.split import reinitialize_reset_hypothesis, split_layers
from ke_tf.methods.evolution.loop import generation_seed
from tests.numerics import assert_all_identical, assert_identical, float64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHA, T, LR, BATCH = 0.7, 4.0, 0.1, 16


@contextlib.contextmanager
def float64_keras():
    """float64 policy and floatx: Keras' losses and loss trackers follow floatx, not the policy."""
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    try:
        with float64():
            yield
    finally:
        keras.config.set_floatx(previous)


def convnet(width, seed, bn=True, classes=10):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(width, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x) if bn else x
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    return keras.Model(inputs, keras.layers.Dense(classes)(x))


def batches(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 1)), rng.integers(0, 10, n)


class StepLosses(keras.callbacks.Callback):
    """Per-step losses recovered from the running epoch mean `fit` logs."""

    def __init__(self):
        super().__init__()
        self.means = []

    def on_train_batch_end(self, batch, logs=None):
        self.means.append(float(logs["loss"]))

    def steps(self):
        m = np.array(self.means)
        k = np.arange(len(m))
        return m * (k + 1) - np.concatenate([[0.0], m[:-1]]) * k


def tape_sgd(student, teacher, objective, x, y):
    """The reference: mean per-example `objective(s, t, y)`, plain SGD; returns the step losses."""
    losses = []
    for i in range(0, len(x), BATCH):
        xb, yb = tf.constant(x[i : i + BATCH]), tf.constant(y[i : i + BATCH])
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(objective(student(xb, training=True), teacher(xb, training=False), yb))
        for v, g in zip(student.trainable_variables, tape.gradient(loss, student.trainable_variables)):
            v.assign_sub(LR * g)
        losses.append(float(loss))
    return np.array(losses)


def fit_steps(model, x, y):
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    record = StepLosses()
    model.fit(x, y, batch_size=BATCH, shuffle=False, epochs=1, verbose=0, callbacks=[record])
    return record.steps()


def test_distiller_with_hinton_kd_equals_hinton_loss_in_a_tape_loop():
    with float64_keras():
        teacher, student, reference = convnet(8, 1, bn=False), convnet(4, 2), convnet(4, 2)
        x, y = batches()
        distiller = keras.distillation.Distiller(teacher, student, HintonKD(T), student_loss_weight=1 - ALPHA)
        losses = fit_steps(distiller, x, y)
        expected = tape_sgd(reference, teacher, lambda s, t, yb: ke_tf.hinton_loss(s, t, yb, ALPHA, T), x, y)
    assert_identical(losses, expected)
    assert_all_identical([w.numpy() for w in student.weights], [w.numpy() for w in reference.weights])
    config = keras.saving.serialize_keras_object(HintonKD(3.0))
    assert keras.saving.deserialize_keras_object(config).temperature == 3.0


def test_bank_distillation_over_a_teacher_bank_equals_the_tape_loop(tmp_path):
    with float64_keras():
        members = [convnet(6, seed, bn=False) for seed in (3, 4, 5)]
        student, reference = convnet(4, 2), convnet(4, 2)
        x, y = batches()
        bank = TeacherBank(members)
        objective = lambda s, b, labels: ke_tf.bank_distillation(s, labels, b, T)  # noqa: E731
        losses = fit_steps(LabelDistiller(student, bank, objective), x, y)
        expected = tape_sgd(reference, bank, objective, x, y)
        bank.save(tmp_path / "bank.keras")
        loaded = keras.models.load_model(tmp_path / "bank.keras")
        assert_identical(loaded(x).numpy(), bank(x).numpy())
    assert_identical(losses, expected)
    assert_all_identical([w.numpy() for w in student.weights], [w.numpy() for w in reference.weights])


REPLICAS_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from tests.test_fit_api import HintonKD, StepLosses, batches, convnet, float64_keras, T, ALPHA, LR, BATCH
def run(strategy):
    with float64_keras(), strategy.scope():
        teacher, student = convnet(8, 1, bn=False), convnet(4, 2, bn=False)
        d = keras.distillation.Distiller(teacher, student, HintonKD(T), student_loss_weight=1 - ALPHA)
        d.compile(optimizer=keras.optimizers.SGD(LR), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        record = StepLosses()
        x, y = batches()
        d.fit(x, y, batch_size=BATCH, shuffle=False, epochs=1, verbose=0, callbacks=[record])
        return record.steps(), [w.numpy() for w in student.weights]
cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
one, two = run(tf.distribute.OneDeviceStrategy(cpus[0])), run(tf.distribute.MirroredStrategy(cpus))
np.savez(sys.argv[1], one_loss=one[0], two_loss=two[0], *one[1], *two[1])
"""


@pytest.mark.slow  # a fresh process (the CPU split precedes TensorFlow's start): ~40 s on 2 cores
def test_distiller_on_two_cpu_replicas_equals_one_device(tmp_path):
    """The KD term is averaged over the global batch under MirroredStrategy (replica_mean)."""
    out = str(tmp_path / "r.npz")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", REPLICAS_SCRIPT.format(root=ROOT), out], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r = np.load(out)
    weights = [r[f"arr_{i}"] for i in range(len(r.files) - 2)]
    half = len(weights) // 2
    assert_identical(r["two_loss"], r["one_loss"])
    assert_all_identical(weights[half:], weights[:half])


def test_distiller_with_hinton_kd_under_mixed_float16(tmp_path):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        teacher, student = convnet(8, 1, bn=False), convnet(4, 2)
        x, y = batches(32)
        distiller = keras.distillation.Distiller(teacher, student, HintonKD(T), student_loss_weight=1 - ALPHA)
        losses = fit_steps(distiller, x.astype("float32"), y)
    finally:
        keras.config.set_dtype_policy(previous)
    assert np.all(np.isfinite(losses))
    student.save(tmp_path / "student.keras")
    loaded = keras.models.load_model(tmp_path / "student.keras")
    np.testing.assert_array_equal(loaded.predict(x[:4], verbose=0), student.predict(x[:4], verbose=0))


def lwm_pair(seed=3, old=5, new=8):
    """A teacher on `old` classes and its student with the head extended to `new` outputs (old
    columns copied, as the incremental loop's extend_head)."""
    teacher, student = convnet(4, seed, classes=old), convnet(4, seed + 1, classes=new)
    for t, s in zip(teacher.weights, student.weights):
        value = s.numpy()
        value[..., : t.shape[-1]] = t.numpy()
        s.assign(value)
    return teacher, student


def incremental_tape_steps(student, teacher, x, y):
    """The reference: the incremental loop's own LwM objective (`incremental_loss`), plain SGD."""
    from ke_tf.methods.incremental.loop import IncrementalConfig, incremental_loss

    loss_fn = incremental_loss("lwm", IncrementalConfig(beta=1.0, gamma=1.0, temperature=2.0), student, teacher, 5)
    losses = []
    for i in range(0, len(x), BATCH):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn((tf.constant(x[i : i + BATCH]), tf.constant(y[i : i + BATCH])), True)["loss"])
        for v, g in zip(student.trainable_variables, tape.gradient(loss, student.trainable_variables)):
            v.assign_sub(LR * g)
        losses.append(float(loss))
    return np.array(losses)


def test_lwm_with_fit_trains_as_the_incremental_loop(tmp_path):
    """LwM (CE + LwF KD + Grad-CAM attention distillation) through `fit` == the incremental loop's
    objective in a tape loop, step by step, BN statistics included (float64); `predict` is the
    student's, the student saves as `.keras`; a head that does not grow is refused."""
    with float64_keras():
        teacher, student = lwm_pair()
        _, reference = lwm_pair()
        x, y = batches(48, seed=4)
        y = 5 + y % 3  # new-class data only
        losses = fit_steps(ke_tf.keras.LwM(student, teacher), x, y)
        expected = incremental_tape_steps(reference, teacher, x, y)
    assert_identical(losses, expected)
    assert_all_identical([w.numpy() for w in student.weights], [w.numpy() for w in reference.weights])
    lwm = ke_tf.keras.LwM(student, teacher)
    np.testing.assert_array_equal(lwm.predict(x[:4], verbose=0), student.predict(x[:4], verbose=0))
    student.save(tmp_path / "student.keras")
    np.testing.assert_array_equal(
        keras.models.load_model(tmp_path / "student.keras").predict(x[:4], verbose=0), student.predict(x[:4], verbose=0)
    )
    with pytest.raises(ValueError, match="not more than the teacher's 5"):
        ke_tf.keras.LwM(teacher, teacher)


def test_lwm_with_fit_under_mixed_float16():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        teacher, student = lwm_pair()
        x, y = batches(32)
        lwm = ke_tf.keras.LwM(student, teacher)
        lwm.compile(optimizer=keras.optimizers.SGD(LR), metrics=["accuracy"])
        history = lwm.fit(x.astype("float32"), 5 + y % 3, batch_size=BATCH, epochs=2, verbose=0)
        evaluated = lwm.evaluate(x.astype("float32"), 5 + y % 3, verbose=0, return_dict=True)
    finally:
        keras.config.set_dtype_policy(previous)
    assert np.all(np.isfinite(history.history["loss"])) and np.isfinite(evaluated["loss"])
    assert 0.0 <= evaluated["accuracy"] <= 1.0


def test_born_again_generations_and_their_ensemble(tmp_path):
    data = ke_tf.load_data("digits", image_size=8)
    x, y = next(iter(data.train(batch_size=128, epoch=0, seed=0, augment=False)))
    x, y = x.numpy()[..., :1], y.numpy()
    fitted = []

    def fit_fn(model):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(True))
        fitted.append((type(model).__name__, model.fit(x, y, batch_size=32, epochs=2, verbose=0).history["loss"]))

    with float64_keras():  # the ensemble == mean of the generations is an identity
        generations, ensemble = born_again(lambda g: convnet(8, 10 + g), fit_fn, generations=2, lam=0.5, tau=2.0)
        mean = np.mean([g.predict(x, verbose=0) for g in generations], axis=0)
        assert_identical(ensemble.predict(x, verbose=0), mean)
    assert [name for name, _ in fitted] == ["Functional", "LabelDistiller"]
    assert all(np.isfinite(losses).all() for _, losses in fitted)
    assert all(g.trainable for g in generations)
    ensemble.save(tmp_path / "ensemble.keras")
    loaded = keras.models.load_model(tmp_path / "ensemble.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), ensemble.predict(x, verbose=0))


class LambdaLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.values = []

    def on_epoch_begin(self, epoch, logs=None):
        self.values.append([float(layer.lam.numpy()) for layer in annealed_layers(self.model)])


def test_anneal_relu_follows_the_schedule_and_deploys():
    with float64_keras():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 4))
        x = ke_tf.ReduceConv(4, lora=True, lora_act="annealed")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(ke_tf.AnnealedReLU()(x))
        model = keras.Model(inputs, keras.layers.Dense(3)(x))
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.SparseCategoricalCrossentropy(True))
        rng = np.random.default_rng(0)
        images, labels = rng.normal(size=(32, 8, 8, 4)), rng.integers(0, 3, 32)
        anneal, log = AnnealReLU(), LambdaLog()
        model.fit(images, labels, batch_size=16, epochs=3, verbose=0, callbacks=[anneal, log])
        assert log.values == [[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]
        deployed = anneal.deploy()
        assert not any(isinstance(layer, ke_tf.ReduceConv) for layer in deployed.layers)  # fused
        assert_identical(deployed(images, training=False).numpy(), model(images, training=False).numpy())


def test_knowledge_evolution_generations_with_fit():
    keras.utils.set_random_seed(0)
    model = ke_tf.split_model(convnet(8, 0), split_rate=0.5)
    model.compile(
        optimizer=keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, 4), momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(True),
    )
    x, y = batches()
    ke = KnowledgeEvolution(model, seed=3)
    rows = ke.fit(x, y, generations=1, batch_size=16, epochs=1, verbose=0, validation_data=(x, y))
    before = [layer.kernel.numpy() for layer in split_layers(model)]
    expected = keras.models.clone_model(model)
    expected.set_weights(model.get_weights())
    reinitialize_reset_hypothesis(expected, generation_seed(3, 2))  # what the evolution loop does
    ke.next_generation()
    assert int(model.optimizer.iterations.numpy()) == 0
    assert all(not np.any(v.numpy()) for v in model.optimizer.variables if "momentum" in v.path)
    for layer, old, new in zip(split_layers(model), before, split_layers(expected)):
        mask = layer.mask.numpy().astype(bool)
        np.testing.assert_array_equal(layer.kernel.numpy(), new.kernel.numpy())
        np.testing.assert_array_equal(layer.kernel.numpy()[mask], old[mask])
        assert np.all(layer.kernel.numpy()[~mask] != old[~mask])
    rows = ke.fit(x, y, generations=1, batch_size=16, epochs=1, verbose=0, validation_data=(x, y))
    assert [r["generation"] for r in rows] == [1, 2]
    assert all({"dense_accuracy", "slim_accuracy", "loss"} <= set(r) for r in rows)
    slim = ke.slim()
    assert not split_layers(slim) and ke_tf.count_params(slim) < ke_tf.count_params(model)


@pytest.mark.parametrize("reinit", ["bogus"])
def test_knowledge_evolution_refuses_what_it_cannot_drive(reinit):
    with pytest.raises(ValueError, match="no split layers"):
        KnowledgeEvolution(convnet(4, 0))
    with pytest.raises(ValueError, match="reinit"):
        KnowledgeEvolution(ke_tf.split_model(convnet(4, 0)), reinit=reinit)


def test_readme_fit_example_runs(tmp_path, monkeypatch, capsys):
    from tests.test_readme import _section_code

    monkeypatch.chdir(tmp_path)
    exec(compile(_section_code("Using the methods with model.fit"), "README.md", "exec"), {})
    assert (tmp_path / "student.keras").is_file()
    rows = capsys.readouterr().out.strip().splitlines()[-2]
    assert "slim_accuracy" in rows and "'generation': 2" in rows


def digits_cnn(seed=0):
    """A small residual CNN (two prunable groups) for digits at 16x16, outputting logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))  # ke_tf's digits are RGB
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Conv2D(16, 3, padding="same")(inputs)))
    y = keras.layers.BatchNormalization()(keras.layers.Conv2D(24, 3, padding="same")(x))
    y = keras.layers.BatchNormalization()(keras.layers.Conv2D(16, 3, padding="same")(keras.layers.ReLU()(y)))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x + y))
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def digits_arrays():
    from ke_tf.data import load_data

    train, held = load_data("digits", image_size=16).split_holdout(8, 0)
    as_arrays = lambda batches: [np.concatenate(a) for a in zip(*[(x.numpy(), y.numpy()) for x, y in batches])]  # noqa: E731
    return as_arrays(train.train_eval(256)), [tuple(as_arrays(held.test(256)))], as_arrays(train.test(512))


def top1(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def test_prune_finetune_schedule_with_fit_recovers_accuracy():
    """A schedule of two EKG prunings inside `fit`: each reaches its MACs target from the previous
    sub-network; the sliced model equals the fine-tuned gated model (float64) at the predicted MACs;
    fine-tuning recovers top-1 lost at the last pruning (digits); the user's model is untouched."""
    from ke_tf.keras import PruneFinetune
    from ke_tf.surgery.flops import complexity

    (x, y), holdout, (x_test, y_test) = digits_arrays()
    with float64_keras():
        model = digits_cnn()
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(True))
        model.fit(x, y, batch_size=32, epochs=4, verbose=0)
        before = [w.numpy() for w in model.weights]
        prune = PruneFinetune(model, holdout, {0: 0.7, 2: 0.4}, step=0.3)
        after_pruning = {}
        snapshot = keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: after_pruning.setdefault(epoch, top1(prune.pruned(), x_test, y_test))
        )
        prune.gated.compile(keras.optimizers.SGD(0.02, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(True))
        prune.gated.fit(x, y, batch_size=32, epochs=4, verbose=0, callbacks=[prune, snapshot])
        pruned = prune.pruned()
        assert_identical(pruned(x_test[:64], training=False).numpy(), prune.gated(x_test[:64], training=False).numpy())
    assert [(e["epoch"], e["target_macs"]) for e in prune.log] == [(0, 0.7), (2, 0.4)]
    assert all(e["macs_rate"] <= e["target_macs"] for e in prune.log)
    macs = complexity(pruned)["macs"]
    assert macs <= 0.4 * complexity(model)["macs"] and macs == prune.graph.macs(prune.graph.widths(prune.keep))
    assert top1(pruned, x_test, y_test) > after_pruning[2] + 0.05, (top1(pruned, x_test, y_test), after_pruning)
    assert_all_identical([w.numpy() for w in model.weights], before)


def test_prune_finetune_memory_bank_teaches_the_pruned_net():
    """`teachers()` are the search's interim sub-networks sliced out (== the gated model masked to
    each, float64); `LabelDistiller` + `bank_distillation` fine-tunes the pruned sub-network on them."""
    from ke_tf.keras import PruneFinetune
    from ke_tf.layers.gates import set_masks
    from ke_tf.methods.ekg.search import pick_teachers

    (x, y), holdout, _ = digits_arrays()
    with float64_keras():
        model = digits_cnn(1)
        prune = PruneFinetune(model, holdout, criterion="l1", step=0.2)
        keep = prune.prune_to(0.5)
        bank = prune.teachers(3)
        chosen = pick_teachers(prune.history, 3)
        for member, t in zip(bank.members, chosen):
            set_masks(prune.gates, prune.history[t][0])
            assert_identical(member(x[:32]).numpy(), prune.gated(x[:32], training=False).numpy())
        set_masks(prune.gates, keep)
        trainer = LabelDistiller(prune.gated, bank, lambda s, b, labels: ke_tf.bank_distillation(s, labels, b, T))
        trainer.compile(keras.optimizers.SGD(0.02, momentum=0.9))
        losses = trainer.fit(x, y, batch_size=32, epochs=2, verbose=0).history["loss"]
    assert len(bank.members) == 3 and np.all(np.isfinite(losses)) and losses[1] < losses[0]
    assert not any(w.trainable for m in bank.members for w in m.weights)
