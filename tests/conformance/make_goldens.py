"""Run the reference implementations on seeded inputs and write small `.npz` goldens for
tests/test_conformance.py. Runs in side environments OUTSIDE this repository, never in the tests.
torch goldens compute in float64 (the tests run ke_tf under the "float64" dtype policy), so a
comparison is limited by float64 round-off, not by float32 summation order, which varies by CPU.

Side environments (any location): a torch one for ke, reducenet, consistency and lwm, and a
tf-keras one for ekg (EKG is TF2 code):

    python3 -m venv "$TORCH_ENV" && "$TORCH_ENV/bin/pip" install torch==2.13.0 numpy pyyaml
    python3 -m venv "$TF_ENV" && "$TF_ENV/bin/pip" install tensorflow tf-keras numpy

The script re-runs itself with the side environment's interpreter given by --python, else by the
environment variable GOLDENS_TORCH_PYTHON (GOLDENS_TF_PYTHON for ekg), else runs where started.
Each golden takes the unpacked source tree of its original at the commit it records, e.g.

    git clone https://github.com/ahmdtaha/knowledge_evolution "$SRC/ke"
    git -C "$SRC/ke" checkout a3f2eb2eed7accb86ad1af2a15c13e4a9654fe16
    export GOLDENS_TORCH_PYTHON="$TORCH_ENV/bin/python" GOLDENS_TF_PYTHON="$TF_ENV/bin/python"
    python3 tests/conformance/make_goldens.py ke "$SRC/ke" --commit <sha>
    python3 tests/conformance/make_goldens.py reducenet "$SRC/reducenet" --commit <sha>
    python3 tests/conformance/make_goldens.py ekg "$SRC/ekg" --commit <sha>
    python3 tests/conformance/make_goldens.py consistency "$SRC/kc" --commit <sha>
    python3 tests/conformance/make_goldens.py lwm "$SRC/lwm" --commit <sha> --ke_repo "$SRC/ke" --ke_commit <sha>

Weights are not stored: both sides build them with `seeded.seeded_state` from the key names and
shapes the golden records. Every golden records the source repository and commit.
"""

import argparse
import logging
import os
import sys
import tempfile
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seeded import golden_images, seeded_state  # noqa: E402

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
SEED = 0
CLASSES = 10
# lr and momentum dyadic: exact in float32, as Keras's SGD holds its learning rate and casts its
# momentum (a float32 constant on the way to float64: 0.9 would become 0.89999998).
STEP_LR, STEP_MOMENTUM, STEP_WD = 0.125, 0.875, 0.05
SIDE_PYTHON = {"ekg": "GOLDENS_TF_PYTHON"}  # the other goldens: GOLDENS_TORCH_PYTHON


def _torch64():
    """torch with float64 as the default dtype: the originals' modules and the tensors they
    create internally compute in float64 (the seeded float32 weights convert exactly)."""
    import torch

    torch.set_default_dtype(torch.float64)
    return torch


def _tensor(array):
    """A float64 torch tensor of `array` (the goldens' float32 images and features, exactly)."""
    import torch

    return torch.from_numpy(np.asarray(array, np.float64))


def _torch_state(model, seed, keep_suffixes):
    import torch

    reference = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    shapes = {k: v.shape for k, v in reference.items()}
    keep = {k: v for k, v in reference.items() if k.endswith(keep_suffixes)}
    state = seeded_state(shapes, seed, keep)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return shapes


def _shape_record(shapes):
    """Key names and shapes in the npz (keys in order; shapes padded to rank 4 with -1)."""
    keys = np.array(list(shapes))
    dims = np.full((len(keys), 4), -1, np.int64)
    for i, s in enumerate(shapes.values()):
        dims[i, : len(s)] = s
    return {"state_keys": keys, "state_shapes": dims}


def ke(repo, commit):
    """KE (ahmdtaha/knowledge_evolution): kels masks of every Split_ResNet18 layer (sr 0.5), the
    dense and slim logits from seeded weights, two SGD steps (label smoothing 0.1, coupled L2,
    momentum) of the dense net."""
    torch = _torch64()
    sys.path.insert(0, repo)
    from models.split_resnet import Split_ResNet18
    from utils.net_utils import LabelSmoothing, extract_slim

    torch.manual_seed(SEED)

    def cfg(split_rate, slim_factor):
        return types.SimpleNamespace(
            slim_factor=slim_factor,
            split_rate=split_rate,
            split_mode="kels",
            bias_split_rate=split_rate,
            num_cls=CLASSES,
            pretrained=None,
            logger=logging.getLogger("ke"),
            conv_type="SplitConv",
            bn_type="SplitBatchNorm",
            linear_type="SplitLinear",
            init="kaiming_normal",
            mode="fan_in",
            nonlinearity="relu",
            scale_fan=False,
        )

    dense = Split_ResNet18(cfg(0.5, 1.0))
    shapes = _torch_state(dense, SEED, ("mask", "num_batches_tracked"))
    masks = {
        k: np.packbits(v.detach().numpy().astype(bool).reshape(-1))
        for k, v in dense.state_dict().items()
        if k.endswith("mask")
    }
    x, x_nhwc = golden_images(2, 64, SEED)
    dense.eval()
    with torch.no_grad():
        dense_logits = dense(_tensor(x)).numpy()
    slim = Split_ResNet18(cfg(1.0, 0.5))
    extract_slim(slim, dense)
    slim.eval()
    with torch.no_grad():
        slim_logits = slim(_tensor(x)).numpy()
    # Training steps as KE_model.ke_cls_train: SGD(lr, momentum, weight_decay), LabelSmoothing(0.1).
    # Two steps (the second uses the momentum buffer) and a large weight decay, so that coupled vs
    # decoupled decay differs by far more than the tolerance (KE's 1e-4 would hide it at 1e-4).
    labels = np.array([3, 7])
    dense.train()
    opt = torch.optim.SGD(dense.parameters(), lr=STEP_LR, momentum=STEP_MOMENTUM, weight_decay=STEP_WD)
    losses = []
    for _ in range(2):
        loss = LabelSmoothing(0.1)(dense(_tensor(x)), torch.from_numpy(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = {
        k: v.detach().numpy()
        for k, v in dense.state_dict().items()
        if not k.endswith(("mask", "num_batches_tracked", "running_var"))
    }
    full = ("conv1.weight", "bn1.weight", "bn1.bias", "layer4.1.bn2.weight", "fc.weight", "fc.bias")
    np.savez_compressed(
        os.path.join(GOLDEN_DIR, "ke_resnet18.npz"),
        repo="ahmdtaha/knowledge_evolution",
        commit=commit,
        seed=SEED,
        images=x_nhwc,
        labels=labels,
        dense_logits=dense_logits,
        slim_logits=slim_logits,
        step_losses=np.array(losses),
        step_lr=STEP_LR,
        step_momentum=STEP_MOMENTUM,
        step_weight_decay=STEP_WD,
        **_shape_record(shapes),
        **{f"mask/{k}": v for k, v in masks.items()},
        **{f"step/{k}": after[k] for k in full},
        step_sum_keys=np.array(list(after)),
        step_sums=np.array([after[k].sum() for k in after]),
        step_sq_sums=np.array([np.square(after[k]).sum() for k in after]),
    )


def reducenet(repo, commit):
    """ReduceNet (ohmydroid/reducenet): reducenet20 teacher (scaler 1), student (scaler 0) and
    student with the lora branch on (lora 1) logits from the same seeded weights, and main.py's
    KD loss (alpha 0.7, T 5)."""
    torch = _torch64()
    import torch.nn.functional as F

    sys.path.insert(0, repo)
    from models.reducenet import reducenet20

    torch.manual_seed(SEED)
    net = reducenet20(CLASSES, 1)
    shapes = _torch_state(net, SEED, ("num_batches_tracked", "scaler", "lora"))
    x, x_nhwc = golden_images(2, 32, SEED)
    net.eval()
    with torch.no_grad():
        teacher = net(_tensor(x)).numpy()
        net.scaler.data = torch.tensor(0.0)
        student = net(_tensor(x)).numpy()
        net.lora.data = torch.tensor(1.0)  # the linear branch (never enabled in the original's runs)
        student_lora = net(_tensor(x)).numpy()
        net.lora.data = torch.tensor(0.0)
    labels = np.array([1, 4])
    alpha, temperature = 0.7, 5.0
    # main.py's loss_fn_kd: nn.KLDivLoss() (reduction 'mean': over batch x classes) * alpha * T^2 + (1-alpha) * CE
    s, t = torch.from_numpy(student), torch.from_numpy(teacher)
    kd = torch.nn.KLDivLoss()(F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)) * (
        alpha * temperature * temperature
    ) + F.cross_entropy(s, torch.from_numpy(labels)) * (1.0 - alpha)
    np.savez_compressed(
        os.path.join(GOLDEN_DIR, "reducenet20.npz"),
        repo="ohmydroid/reducenet",
        commit=commit,
        seed=SEED,
        images=x_nhwc,
        labels=labels,
        teacher_logits=teacher,
        student_logits=student,
        student_lora_logits=student_lora,
        kd_loss=kd.item(),
        alpha=alpha,
        temperature=temperature,
        **_shape_record(shapes),
    )


def ekg(repo, commit, steps=3):
    """EKG (sseung0703/EKG, TF2 with tf-keras): per-filter importance (`EKG.get_score`) of a
    seeded ResNet-20 on a 16-image holdout batch against the ensemble K0 (the dense net's own
    holdout logits), the score of every candidate EKG evaluates in each of `steps` greedy search
    steps (NaN: not evaluated) with the channels it keeps, and the widths/masks after the steps."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    sys.path.insert(0, repo)
    os.chdir(repo)
    import prune_utils
    import tensorflow as tf
    from nets import ResNet

    tf.random.set_seed(SEED)
    args = types.SimpleNamespace(
        arch="ResNet-20",
        input_size=[32, 32, 3],
        num_classes=CLASSES,
        val_batch_size=16,
        search_batch_size=16,
        cardinality={"val": 16},
        compile=False,
        accum=1,
        gpu_id=[0],
        search_step=0.2,
        search_target_rate=0.1,
        train_path=tempfile.mkdtemp(prefix="ekg_golden_"),
    )
    model = ResNet.Model(args, num_layers=20, num_class=CLASSES, name="ResNet")
    model(np.zeros([1, 32, 32, 3], np.float32), training=False)
    names = {v.name[len("ResNet/") :]: v for v in model.variables}
    shapes = {k: tuple(v.shape) for k, v in names.items()}
    state = seeded_state(shapes, SEED)
    for k, v in names.items():
        v.assign(state[k])
    _, x = golden_images(16, 32, SEED)
    labels = np.arange(16) % CLASSES
    val = tf.data.Dataset.from_tensor_slices((x, labels))
    search = prune_utils.EKG(args, model, tf.distribute.get_strategy(), {"val": val})
    ensemble = search.Knowledge.copy()
    search.get_score()
    importance = [s.numpy().reshape(-1) for s in search.score_var]
    chosen, widths, candidates = [], [], np.full((steps, search.num_gate), np.nan)
    candidate_masks = {}
    check_next_step, evaluate = search.check_next_step, search.Eval

    def recording_eval():  # the channels each candidate keeps, in every gate
        candidate_masks[len(chosen), recording_check.gate] = np.concatenate(
            [g.get_mask().numpy().reshape(-1) for g in search.Gates]
        )
        return evaluate()

    def recording_check(i):  # the score (CE + CE to the ensemble) of every candidate EKG evaluates
        recording_check.gate = i
        result = check_next_step(i)
        candidates[len(chosen), i] = result[3]
        return result

    search.Eval = recording_eval
    search.check_next_step = recording_check
    for _ in range(steps):
        search.update_Knowledge(search.search_step())
        chosen.append(int(np.argmax(np.array(search.width_list) != np.array(widths[-1] if widths else 1.0))))
        widths.append(list(search.width_list))
    masks = [g.get_mask().numpy().reshape(-1) for g in search.Gates]
    np.savez_compressed(
        os.path.join(GOLDEN_DIR, "ekg_resnet20.npz"),
        repo="sseung0703/EKG",
        commit=commit,
        seed=SEED,
        images=x,
        labels=labels,
        ensemble=ensemble,
        gate_names=np.array([g.name for g in search.Gates]),
        num_calls=np.array([g.num_call for g in search.Gates]),
        **{f"importance/{i}": v for i, v in enumerate(importance)},
        steps=steps,
        chosen=np.array(chosen),
        widths=np.array(widths),
        candidate_scores=candidates,
        **{f"candidate_mask/{step}/{i}": np.packbits(m.astype(bool)) for (step, i), m in candidate_masks.items()},
        **{f"mask/{i}": m for i, m in enumerate(masks)},
        **_shape_record(shapes),
    )


def consistency(repo, commit):
    """Knowledge consistency (nexuslrf/knowledge_consistency): the Trans-Net `LinearTester`
    (3 layers, instance std scaling, learnable p) on seeded 4-channel 8x8 features: g(x_A), its
    per-order components (`val_batch`) and the training loss MSE + sum alpha_k p_k^2."""
    torch = _torch64()
    sys.path.insert(0, repo)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the constructor calls .cuda(); CPU here
    from Model_zoo.linearTest_sigmoidP_instance import LinearTester

    torch.manual_seed(SEED)
    size = (4, 8, 8)
    net = LinearTester(size, size, layers=3, fix_p=False, bn=False, instance_bn=True)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    state = seeded_state(shapes, SEED, {"nonLinearLayers_p_pre": np.array([0.3, -0.7], np.float32)})
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    rng = np.random.default_rng(SEED + 1)
    x_a = rng.standard_normal((2, *size)).astype(np.float32) + 0.5
    x_b = rng.standard_normal((2, *size)).astype(np.float32)
    alphas = np.array([0.1, 0.1], np.float32)
    net.eval()
    output = net(_tensor(x_a))
    # Training_TransNet.py: nn.MSELoss()(g(x_A), x_B) + sum(p^2 * alphas)
    loss = torch.nn.MSELoss()(output, _tensor(x_b)) + torch.sum(net.get_p() ** 2 * _tensor(alphas))
    total, orders = net.val_batch(_tensor(x_a))
    nhwc = (0, 2, 3, 1)
    np.savez_compressed(
        os.path.join(GOLDEN_DIR, "consistency_transnet.npz"),
        repo="nexuslrf/knowledge_consistency",
        commit=commit,
        seed=SEED,
        x_a=x_a.transpose(nhwc),
        x_b=x_b.transpose(nhwc),
        alphas=alphas,
        output=output.detach().numpy().transpose(nhwc),
        orders=orders.numpy().transpose(0, 1, 3, 4, 2),
        orders_sum=total.numpy().transpose(nhwc),
        loss=loss.item(),
        p_pre=state["nonLinearLayers_p_pre"],
        **_shape_record(shapes),
    )


def _ke_resnet18(ke_repo, slim_factor, seed):
    """KE's (torchvision-layout) ResNet-18 at `slim_factor` width with seeded weights."""
    torch = _torch64()
    if ke_repo not in sys.path:
        sys.path.insert(0, ke_repo)
    from models.split_resnet import Split_ResNet18

    cfg = types.SimpleNamespace(
        slim_factor=slim_factor,
        split_rate=1.0,
        split_mode="kels",
        bias_split_rate=1.0,
        num_cls=CLASSES,
        pretrained=None,
        logger=logging.getLogger("ke"),
        conv_type="SplitConv",
        bn_type="SplitBatchNorm",
        linear_type="SplitLinear",
        init="kaiming_normal",
        mode="fan_in",
        nonlinearity="relu",
        scale_fan=False,
    )
    torch.manual_seed(seed)
    net = Split_ResNet18(cfg)
    shapes = _torch_state(net, seed, ("mask", "num_batches_tracked"))
    return net.eval(), shapes


def lwm(repo, commit, ke_repo, ke_commit):
    """LwM: Grad-CAM maps of a teacher and a student (KE's ResNet-18 code at width 1/4, seeds 0
    and 1, eval mode) at the last block (the paper's "final conv layer"), for the teacher's top
    class (the paper's b), by the paper's formula ReLU(sum_k alpha_k A^k) and its L_AD; plus
    satya15july's `grad_cam_loss` on the same tensors, which differs from the paper (its map sums
    alpha_k * dy/dA^k, its class is the student's top old class)."""
    import importlib.util

    torch = _torch64()
    import torch.nn.functional as F

    sys.path.insert(0, repo)
    spec = importlib.util.spec_from_file_location("lwm_reference_utils", os.path.join(repo, "utils.py"))
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    x, x_nhwc = golden_images(2, 128, SEED)
    nets, records = {}, {}
    for role, seed in (("teacher", 0), ("student", 1)):
        net, shapes = _ke_resnet18(ke_repo, 0.25, seed)
        features = {}
        net.layer4.register_forward_hook(lambda module, inputs, output, f=features: f.update(A=output))
        net.layer3.register_forward_hook(lambda module, inputs, output, f=features: f.update(A3=output))
        logits = net(_tensor(x))
        nets[role], records[role] = net, (features["A"], logits, shapes)
        records[role + "_layer3_hook"] = features  # the hooks refresh it on every forward pass
    t_feat, t_logits, t_shapes = records["teacher"]
    s_feat, s_logits, s_shapes = records["student"]
    top = t_logits.argmax(dim=-1)

    def paper_map(feat, logits):
        grads = torch.autograd.grad(logits.gather(1, top.view(-1, 1)).sum(), feat, retain_graph=True)[0]
        return F.relu((grads.mean(dim=(2, 3), keepdim=True) * feat).sum(dim=1))

    maps = {"teacher": paper_map(t_feat, t_logits), "student": paper_map(s_feat, s_logits)}
    q = {k: F.normalize(m.reshape(2, -1), p=2, dim=-1) for k, m in maps.items()}
    paper_loss = (q["teacher"] - q["student"]).norm(p=1, dim=1).mean()
    repo_loss = reference.grad_cam_loss(t_feat, t_logits, s_feat, s_logits)
    # At the last block (avg-pool -> fc after it) dy/dA is constant over space, so the repo's map
    # is flat and its L_AD is 0 there; the repo itself taps layer3:
    # (a fresh forward pass: grad_cam_loss frees the graph it differentiates)
    fresh = {}
    for role in ("teacher", "student"):
        logits = nets[role](_tensor(x))
        fresh[role] = (records[role + "_layer3_hook"]["A3"], logits)
    repo_loss_layer3 = reference.grad_cam_loss(*fresh["teacher"], *fresh["student"])
    np.savez_compressed(
        os.path.join(GOLDEN_DIR, "lwm_gradcam.npz"),
        repo="satya15july/incremental_system_using_knowledge_distillation",
        commit=commit,
        net_repo="ahmdtaha/knowledge_evolution",
        net_commit=ke_commit,
        seeds=np.array([0, 1]),
        image_seed=SEED,
        image_size=128,
        slim_factor=0.25,
        teacher_logits=t_logits.detach().numpy(),
        student_logits=s_logits.detach().numpy(),
        classes=top.numpy(),
        teacher_map=maps["teacher"].detach().numpy(),
        student_map=maps["student"].detach().numpy(),
        paper_loss=paper_loss.item(),
        repo_loss=repo_loss.item(),
        repo_loss_layer3=repo_loss_layer3.item(),
        **{f"teacher_{k}": v for k, v in _shape_record(t_shapes).items()},
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("ke", "reducenet", "ekg", "consistency", "lwm"))
    parser.add_argument("repo", help="unpacked source tree of the reference repository")
    parser.add_argument("--commit", required=True, help="the source tree's commit (recorded in the golden)")
    parser.add_argument("--ke_repo", help="lwm: KE's source tree (its ResNet-18 is the network)")
    parser.add_argument("--ke_commit", help="lwm: the KE tree's commit")
    parser.add_argument(
        "--python",
        help="the side environment's interpreter to run with (default: "
        "$GOLDENS_TORCH_PYTHON, $GOLDENS_TF_PYTHON for ekg; neither: this interpreter)",
    )
    args = parser.parse_args()
    python = args.python or os.environ.get(SIDE_PYTHON.get(args.which, "GOLDENS_TORCH_PYTHON"))
    if python and not os.environ.get("GOLDENS_IN_SIDE_ENV"):  # the marker: re-run once, never again
        os.execve(
            python, [python, os.path.abspath(__file__), *sys.argv[1:]], {**os.environ, "GOLDENS_IN_SIDE_ENV": "1"}
        )
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    repo = os.path.abspath(args.repo)
    if args.which == "lwm":
        lwm(repo, args.commit, os.path.abspath(args.ke_repo), args.ke_commit)
    else:
        {"ke": ke, "reducenet": reducenet, "ekg": ekg, "consistency": consistency}[args.which](repo, args.commit)
