"""ke_tf.convert: reference checkpoints (KE / ReduceNet PyTorch state_dicts, EKG TF2 pickles) map
onto ke_tf models key by key, refuse what does not fit by name, load without running code, and
give params files that test.py evaluates. Synthetic numpy state_dicts: no torch needed."""

import os
import pickle

import numpy as np
import pytest
import tensorflow as tf

from ke_tf.cli import evaluate_params_file
from ke_tf.convert import convert_checkpoint
from ke_tf.convert.__main__ import main as convert_main
from ke_tf.io.params import ParamsError, load_params
from ke_tf.layers.factory import PLAIN, padded_conv
from tests.conformance.seeded import seeded_state


def _bn(shapes, prefix, c):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.{leaf}"] = (c,)
    shapes[f"{prefix}.num_batches_tracked"] = ()


def ke_resnet18_shapes(widths=(8, 16, 32, 64), classes=10, masks=True):
    """Key -> shape of KE's Split_ResNet18 (torchvision names; masks beside conv/fc weights)."""
    shapes = {}

    def conv(prefix, o, i, k):
        shapes[f"{prefix}.weight"] = (o, i, k, k)
        if masks:
            shapes[f"{prefix}.mask"] = (o, i, k, k)

    conv("conv1", widths[0], 3, 7)
    _bn(shapes, "bn1", widths[0])
    c_in = widths[0]
    for s, w in enumerate(widths, start=1):
        for j in range(2):
            p = f"layer{s}.{j}"
            conv(f"{p}.conv1", w, c_in, 3), _bn(shapes, f"{p}.bn1", w)
            conv(f"{p}.conv2", w, w, 3), _bn(shapes, f"{p}.bn2", w)
            if c_in != w:
                conv(f"{p}.downsample.0", w, c_in, 1), _bn(shapes, f"{p}.downsample.1", w)
            c_in = w
    shapes["fc.weight"], shapes["fc.bias"] = (classes, c_in), (classes,)
    if masks:
        shapes["fc.mask"] = (classes, c_in)
    return shapes


def reducenet20_shapes(classes=10, scaler=1.0):
    """Key -> shape of ohmydroid/reducenet's reducenet20 (every branch stored, as in its files)."""
    shapes = {"scaler": (), "lora": ()}
    shapes["conv1.0.weight"] = (16, 3, 3, 3)
    _bn(shapes, "conv1.1", 16)
    c_in = 16
    for s, w in enumerate((16, 32, 64), start=1):
        for j in range(3):
            p = f"layer{s}.{j}"
            shapes[f"{p}.scaler"] = shapes[f"{p}.lora"] = ()
            shapes[f"{p}.branch1.0.weight"] = (w, c_in, 3, 3)
            _bn(shapes, f"{p}.branch1.1", w)
            shapes[f"{p}.branch1.3.weight"] = (w, w, 1, 1)
            _bn(shapes, f"{p}.branch1.4", w)
            shapes[f"{p}.branch2.0.weight"] = (w, c_in, 3, 3)
            shapes[f"{p}.lora_branch.0.weight"] = (w, c_in, 1, 1)
            _bn(shapes, f"{p}.lora_branch.1", w)
            _bn(shapes, f"{p}.fuse.0", w)
            shapes[f"{p}.fuse.2.weight"] = (w, w, 3, 3)
            _bn(shapes, f"{p}.fuse.3", w)
            if c_in != w:
                shapes[f"{p}.shortcut.0.weight"] = (w, c_in, 1, 1)
                _bn(shapes, f"{p}.shortcut.1", w)
            c_in = w
    shapes["linear.weight"], shapes["linear.bias"] = (classes, 64), (classes,)
    return shapes, {
        k: np.array(scaler if k.endswith("scaler") else 0.0, np.float32)
        for k in shapes
        if k.endswith(("scaler", "lora"))
    }


def _state(shapes, keep=None):
    keep = dict(keep or {})
    keep.update({k: np.array(7) for k in shapes if k.endswith("num_batches_tracked")})
    return seeded_state(shapes, 0, keep)


def _var(model, path):
    return next(v for v in model.weights if v.path == path).numpy()


def test_padded_conv_torch_is_symmetric_and_same_is_keras():
    x = tf.random.stateless_normal([1, 8, 8, 2], seed=[1, 2])
    inputs = tf.keras.Input((8, 8, 2))
    for padding, explicit in (("torch", [[0, 0], [1, 1], [1, 1], [0, 0]]), ("same", "SAME")):
        model = tf.keras.Model(inputs, padded_conv(PLAIN, inputs, 3, 3, 2, f"c_{padding}", padding))
        kernel = model.get_layer(f"c_{padding}").kernel
        expected = tf.nn.conv2d(x, kernel, 2, explicit)
        np.testing.assert_allclose(model(x).numpy(), expected.numpy(), atol=1e-6)
    assert not np.allclose(
        tf.nn.conv2d(x, kernel, 2, "SAME"), tf.nn.conv2d(x, kernel, 2, [[0, 0], [1, 1], [1, 1], [0, 0]])
    )


def test_ke_checkpoint_maps_every_key_and_test_py_evaluates_it(tmp_path):
    shapes = ke_resnet18_shapes()
    masks = {
        k: (np.arange(np.prod(s)).reshape(s) % 2).astype(np.float32) for k, s in shapes.items() if k.endswith("mask")
    }
    state = _state(shapes, masks)
    out = tmp_path / "ke.pkl"
    model, arrays, meta = convert_checkpoint("ke_pytorch", state, "resnet18", out, dataset="digits", image_size=32)
    np.testing.assert_array_equal(
        _var(model, "s2b0_conv1/kernel"), state["layer2.0.conv1.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(_var(model, "s2b0_conv1/mask"), masks["layer2.0.conv1.mask"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        _var(model, "s3b0_short_bn/moving_variance"), state["layer3.0.downsample.1.running_var"]
    )
    np.testing.assert_array_equal(_var(model, "classifier/kernel"), state["fc.weight"].T)
    assert meta["model"]["options"] == {"padding": "torch"}
    assert meta["model"]["widths"]["stage4"] == 64 and meta["layers"]["kind"] == "split"
    assert meta["layers"]["split_rate"] == masks["fc.mask"].mean() == 0.5  # read from the classifier mask
    assert len(arrays) == len(model.weights)
    result, loaded, _ = evaluate_params_file(str(out), with_model=True)
    assert result["examples"] == 360 and result["arch"] == "resnet18"
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))
    assert loaded.get_layer("stem_conv").padding == "valid"  # rebuilt with PyTorch's padding


def test_ke_errors_name_the_first_key_or_shape_that_does_not_fit():
    state = _state(ke_resnet18_shapes(masks=False))
    with pytest.raises(ParamsError, match=r"key 'layer9\.0\.conv1\.weight' .*matches no variable"):
        convert_checkpoint("ke_pytorch", {**state, "layer9.0.conv1.weight": np.zeros((1, 1, 3, 3))}, "resnet18")
    bad = {**state, "layer2.0.bn1.running_var": np.ones(5, np.float32)}
    with pytest.raises(
        ParamsError,
        match=r"shape mismatch for key 'layer2\.0\.bn1\.running_var': \(5,\).*"
        r"'s2b0_bn1/moving_variance' expects \(16,\)",
    ):
        convert_checkpoint("ke_pytorch", bad, "resnet18")
    del state["layer4.1.bn2.running_mean"]
    with pytest.raises(ParamsError, match=r"no key gives model variable 's4b1_bn2/moving_mean'"):
        convert_checkpoint("ke_pytorch", state, "resnet18")
    with pytest.raises(ParamsError, match=r"missing key 'layer1\.2\.conv1\.weight'"):
        convert_checkpoint("ke_pytorch", _state(ke_resnet18_shapes(masks=False)), "resnet34")
    with pytest.raises(ValueError, match="reduce20"):
        convert_checkpoint("ke_pytorch", state, "reduce20")


def test_reducenet_teacher_and_student_follow_the_scaler():
    shapes, flags = reducenet20_shapes(scaler=1.0)
    state = _state(shapes, flags)
    teacher, _, meta = convert_checkpoint("reducenet_pytorch", state, "reduce20")
    assert meta["model"]["options"] == {"variant": "teacher", "padding": "torch", "expansion": 1.0}
    np.testing.assert_array_equal(
        _var(teacher, "s2b0_rep/b1_conv2/kernel"), state["layer2.0.branch1.3.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(_var(teacher, "s2b0_rep/bn/gamma"), state["layer2.0.fuse.0.weight"])
    np.testing.assert_array_equal(
        _var(teacher, "s3b2_conv2/kernel"), state["layer3.2.fuse.2.weight"].transpose(2, 3, 1, 0)
    )
    _, flags = reducenet20_shapes(scaler=0.0)
    student, arrays, meta = convert_checkpoint("reducenet_pytorch", {**state, **flags}, "reduce20")
    assert meta["model"]["options"]["variant"] == "student"
    assert not any("/b1_" in p or "lora" in p for p in arrays)  # inherited, unused branches dropped
    assert student.count_params() < teacher.count_params()


def test_ekg_pickle_loads_restricted_and_infers_pruned_widths(tmp_path):
    shapes = {"conv/kernel:0": (3, 3, 3, 16)}
    for leaf in ("moving_mean", "moving_variance", "gamma", "beta"):
        shapes[f"bn/{leaf}:0"] = (1, 1, 1, 16)
    c_in = 16
    for i, w in enumerate((16, 32, 64)):
        for j in range(3):
            p = f"BasicBlock{i}.{j}/"
            inner = 5 if (i, j) == (1, 2) else w  # a pruned block
            shapes[p + "conv1/kernel:0"], shapes[p + "conv2/kernel:0"] = (3, 3, c_in, inner), (3, 3, inner, w)
            names = ["bn1", "bn2"] + (["bn3"] if c_in != w else [])
            if c_in != w:
                shapes[p + "conv3/kernel:0"] = (1, 1, c_in, w)
            for bn in names:
                for leaf in ("moving_mean", "moving_variance", "gamma", "beta"):
                    shapes[f"{p}{bn}/{leaf}:0"] = (1, 1, 1, inner if bn == "bn1" else w)
            c_in = w
    shapes["fc/kernel:0"], shapes["fc/biases:0"] = (64, 10), (10,)
    params = seeded_state(shapes, 1)
    path = tmp_path / "slimmed_params.pkl"
    path.write_bytes(pickle.dumps(params))
    model, _, meta = convert_checkpoint("ekg_tf2", path, "resnet20")
    assert meta["model"]["widths"] == {"s2b2": 5} and meta["model"]["options"] == {"shortcut": "B"}
    np.testing.assert_array_equal(
        _var(model, "s2b2_bn1/moving_mean"), params["BasicBlock1.2/bn1/moving_mean:0"].reshape(-1)
    )
    np.testing.assert_array_equal(_var(model, "classifier/bias"), params["fc/biases:0"])

    class Evil:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "pwned"),)

    path.write_bytes(pickle.dumps({"conv/kernel:0": Evil()}))
    with pytest.raises(ParamsError, match=r"refusing to load global (posix|os|nt)\.system"):
        convert_checkpoint("ekg_tf2", path, "resnet20")
    assert not (tmp_path / "pwned").exists()


def test_cli_converts_an_npz_and_fails_with_one_error_line(tmp_path, capsys):
    src, out = tmp_path / "teacher.npz", tmp_path / "t.pkl"
    shapes, flags = reducenet20_shapes()
    np.savez(src, **_state(shapes, flags))
    assert convert_main(
        ["--from", "reducenet_pytorch", str(src), "--arch", "reduce20", "--out", str(out), "--dataset", "digits"]
    ) == str(out)
    _, meta = load_params(out)
    assert (
        meta["data"] == {"name": "digits", "image_size": 32} and meta["converted_from"]["format"] == "reducenet_pytorch"
    )
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--from", "ke_pytorch", str(src), "--arch", "resnet18", "--out", str(tmp_path / "x.pkl")])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "x.pkl").exists()


def test_torch_checkpoints_load_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    state = _state(ke_resnet18_shapes(masks=False))
    path = tmp_path / "ke.pth"
    torch.save({"state_dict": {"module." + k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}}, path)
    model, _, _ = convert_checkpoint("ke_pytorch", path, "resnet18", image_size=32)
    np.testing.assert_array_equal(_var(model, "stem_bn/gamma"), state["bn1.weight"])

    class Evil:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "pwned"),)

    torch.save({"conv1.weight": Evil()}, path, _use_new_zipfile_serialization=True)
    with pytest.raises(ParamsError, match="weights-only"):
        convert_checkpoint("ke_pytorch", path, "resnet18")
    assert not (tmp_path / "pwned").exists()


def test_pytorch_files_without_torch_name_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    path = tmp_path / "epoch_199.state"
    path.write_bytes(b"never read")
    with pytest.raises(
        ParamsError,
        match=r"epoch_199.state: reading PyTorch checkpoints needs torch: "
        r"pip install 'ke_tf\[convert\]'",
    ):
        convert_checkpoint("ke_pytorch", path, "resnet18")
