"""Knowledge Consistency (Liang et al., ICLR'20): how much of net B's feature at a layer can be
reconstructed from net A's, split by fuzziness order, and whether the consistent components
refine B's upper layers.

Steps: (1) nets A and B: given params files, or trained here from two seeds with the supervised
loop; (2) cache (x_A, x_B) at `consistency.layer` for the train and test splits; (3) train the
Trans-Net on train features; (4) variance report on test features (the reference Variance.py uses
the val loader); (5) for each `in_modes` order selection, fine-tune B's layers above the tap on
the selected components and report test accuracy.
"""

import dataclasses
import shutil
import typing

import keras
import numpy as np
import tensorflow as tf

from ke_tf.config import ConfigError, TrainConfig, register_section
from ke_tf.engine.evaluate import Evaluator
from ke_tf.engine.strategy import is_chief
from ke_tf.engine.trainer import Trainer
from ke_tf.io.params import load_params, model_arrays, save_params
from ke_tf.io.report import write_json, write_table
from ke_tf.losses import cross_entropy, transnet_loss
from ke_tf.methods.consistency.features import cache_features, fingerprint, load_trained, tail_model, tap_model
from ke_tf.methods.consistency.transnet import transnet_model
from ke_tf.methods.stage import check_spec_matches_data, evaluate_model, load_configured_data, run_path


@dataclasses.dataclass
class TransNetTrainConfig(TrainConfig):
    """Reference Training_TransNet.py: Adam lr 1e-4 log-decayed to 1e-6, coupled L2 1e-4 (torch
    Adam weight_decay, also on beta), batch 64. The reference runs 800-1000 epochs."""

    epochs: int = 100
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-4
    schedule: str = "logspace"
    final_lr: float = 1e-6
    weight_decay: float = 1e-4


@dataclasses.dataclass
class RefineTrainConfig(TrainConfig):
    """Reference transClassifier.py: Adam lr 1e-5 log-decayed to 1e-7, coupled L2 1e-4, batch 64;
    its README says ~100 epochs suffice."""

    epochs: int = 100
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-5
    schedule: str = "logspace"
    final_lr: float = 1e-7
    weight_decay: float = 1e-4


@dataclasses.dataclass
class ConsistencyConfig:
    net_a: typing.Optional[str] = None  # params files; both null -> train A and B here
    net_b: typing.Optional[str] = None
    seeds: typing.List[int] = dataclasses.field(default_factory=lambda: [0, 5])  # README seeds (CUB)
    layer: str = "s2b2_add"  # CIFAR ResNet: last block of the middle stage, pre-ReLU
    depth: int = 3  # Trans-Net convs = fuzziness orders
    alphas: typing.List[float] = dataclasses.field(default_factory=lambda: [0.1, 0.1])  # README
    learn_p: bool = True
    transnet: TransNetTrainConfig = dataclasses.field(default_factory=TransNetTrainConfig)
    refine: RefineTrainConfig = dataclasses.field(default_factory=RefineTrainConfig)
    in_modes: typing.List[typing.List[int]] = dataclasses.field(default_factory=lambda: [[1, 1, 1], [1, 0, 0]])
    feature_batch_size: int = 256
    shard_size: int = 2048  # images per .npy shard

    def validate(self, key):
        if (self.net_a is None) != (self.net_b is None):
            raise ConfigError(
                f"{key}.net_a and {key}.net_b must be given together (or both null to train both nets from {key}.seeds)"
            )
        if len(self.seeds) != 2 or self.seeds[0] == self.seeds[1]:
            raise ConfigError(f"{key}.seeds must be two different seeds, got {self.seeds}")
        if self.depth < 1:
            raise ConfigError(f"{key}.depth must be >= 1, got {self.depth}")
        if len(self.alphas) != self.depth - 1:
            raise ConfigError(f"{key}.alphas needs depth-1 = {self.depth - 1} values, got {self.alphas}")
        for i, mode in enumerate(self.in_modes):
            if len(mode) != self.depth or any(m not in (0, 1) for m in mode) or not any(mode):
                raise ConfigError(f"{key}.in_modes[{i}] must be {self.depth} 0/1 flags (not all 0), got {mode}")
        for name in ("feature_batch_size", "shard_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name} must be > 0")


register_section("consistency", ConsistencyConfig)


def _net_recipe(config_dict):
    """What determines a trained net (not the consistency settings nor progress bars)."""
    train = {k: v for k, v in config_dict["train"].items() if k != "progress"}
    return {"seed": config_dict["seed"], "data": config_dict["data"], "model": config_dict["model"], "train": train}


def _trained_nets(cfg, kc, strategy):
    """Params files of nets A and B: the configured ones, or two supervised runs under
    run_dir/net_a, net_b differing only in seed (skipped when a run with that recipe exists)."""
    if kc.net_a is not None:
        return kc.net_a, kc.net_b
    from ke_tf.methods.supervised import loop as supervised

    paths = []
    for tag, seed in zip("ab", kc.seeds):
        sub = dataclasses.replace(cfg, method="supervised", seed=seed, run_dir=run_path(cfg, f"net_{tag}"))
        path = run_path(sub, "trained_params.pkl")
        try:
            done = _net_recipe(load_params(path)[1]["config"]) == _net_recipe(sub.to_dict())
        except (ValueError, KeyError):
            done = False
        if not done:
            keras.utils.set_random_seed(seed)  # different init and data order per net
            supervised.run(sub, strategy)
        paths.append(path)
    return paths


def variance_report(orders_fn, cache, batch_size):
    """Rows of the variance of each order component Y_k, of the residual x_B - g(x_A) and of x_B,
    each pooled over channels around its per-channel mean (reference Variance.py, exact weighting),
    plus `relative` = var / Var(x_B) (the paper's measure) and `share` = var / sum of the
    components' and residual's variances."""
    names = None
    sums = sqs = None
    count = 0
    for (xa, xb), _ in cache.dataset(batch_size):
        parts = orders_fn(xa)
        xb = tf.cast(xb, parts[0].dtype)  # the cache is float32; a float64 Trans-Net's orders are not
        tensors = list(parts) + [xb - tf.add_n(list(parts)), xb]
        flat = [t.numpy().astype(np.float64).reshape(-1, t.shape[-1]) for t in tensors]
        if sums is None:
            names = [f"order {k}" for k in range(len(parts))] + ["residual x_B - g(x_A)", "target x_B"]
            sums = [np.zeros(f.shape[1]) for f in flat]
            sqs = [np.zeros(f.shape[1]) for f in flat]
        for i, f in enumerate(flat):
            sums[i] += f.sum(0)
            sqs[i] += np.square(f).sum(0)
        count += flat[0].shape[0]
    var = [float(np.mean(q / count - np.square(s / count))) for s, q in zip(sums, sqs)]
    target = var[-1]
    explained_total = sum(var[:-1])
    return [
        {
            "component": n,
            "variance": v,
            "relative": v / target,
            "share": v / explained_total if i < len(var) - 1 else 1.0,
        }
        for i, (n, v) in enumerate(zip(names, var))
    ]


def _train_transnet(cfg, kc, strategy, train_cache):
    """Fit g: x_A -> x_B on the training features; returns the wrapper model and its layer."""
    tc = kc.transnet
    with strategy.scope():
        model = transnet_model(train_cache.feature_shape, kc.depth, kc.learn_p)
    trans = model.get_layer("transnet")

    def loss_fn(batch, training):
        (xa, xb), _ = batch
        return {"loss": transnet_loss(model(xa, training=training), xb, trans.p, kc.alphas)}

    def eval_fn(epoch):
        return {f"p{k}": float(v) for k, v in enumerate(trans.p.numpy())}

    trainer = Trainer(tc, strategy, model, loss_fn, train_cache.count // tc.batch_size, cfg.run_dir, name="transnet")
    history = trainer.fit(train_cache, cfg.seed, eval_fn=eval_fn)
    return model, trans, history


def _refine(cfg, kc, strategy, path_b, orders_fn, mode, train_cache, test_cache):
    """Fine-tune a copy of net B above the tap on sum_k mode[k] Y_k of the frozen Trans-Net;
    returns (test metrics before, test metrics after, tail model)."""
    tc = kc.refine
    with strategy.scope():
        tail = tail_model(load_trained(path_b)[0], kc.layer)
    flags = tf.constant(mode, tf.float32)

    def select(xa):
        return tf.add_n([f * y for f, y in zip(tf.unstack(flags), orders_fn(xa))])

    def loss_fn(batch, training):
        (xa, _), labels = batch
        logits = tail(tf.stop_gradient(select(xa)), training=training)
        return {"loss": cross_entropy(logits, labels), "logits": logits}

    evaluator = Evaluator(strategy, lambda feats: tail(select(feats[0]), training=False))

    def test_metrics():
        return {
            k: v for k, v in evaluator(lambda shard: test_cache.test(tc.eval_batch_size, shard)).items() if k != "count"
        }

    before = test_metrics()
    name = "refine_" + "".join(map(str, mode))
    trainer = Trainer(tc, strategy, tail, loss_fn, train_cache.count // tc.batch_size, cfg.run_dir, name=name)
    trainer.fit(train_cache, cfg.seed, eval_fn=lambda epoch: {"test_" + k: v for k, v in test_metrics().items()})
    return before, test_metrics(), tail


def run(cfg, strategy):
    """Measure knowledge consistency between nets A and B; writes transnet_params.pkl,
    variance.{md,csv,json}, refine_*.pkl and results.json under run_dir."""
    kc = cfg.section("consistency")
    data = load_configured_data(cfg)
    path_a, path_b = _trained_nets(cfg, kc, strategy)
    with strategy.scope():
        (net_a, spec_a), (net_b, spec_b) = load_trained(path_a), load_trained(path_b)
    for path, spec in ((path_a, spec_a), (path_b, spec_b)):
        check_spec_matches_data(spec, data, path)
    taps = tap_model(net_a, kc.layer), tap_model(net_b, kc.layer)
    data_id = {
        "name": cfg.data.name,
        "classes": cfg.data.classes,
        "split_seed": cfg.data.split_seed,
        "train_per_class": cfg.data.train_per_class,
    }
    caches, reused = {}, {}
    chief = is_chief(strategy)
    for split, ds in (("train", data.train_eval), ("test", data.test)):
        identity = fingerprint([path_a, path_b], data_id, split, kc.layer, list(data.info.image_shape))
        caches[split], reused[split] = cache_features(
            run_path(cfg, "features", split),
            *taps,
            ds(kc.feature_batch_size),
            identity,
            shard_size=kc.shard_size,
            desc=f"{kc.layer} {split} features",
            write=chief,
        )

    model, trans, history = _train_transnet(cfg, kc, strategy, caches["train"])
    orders_fn = tf.function(lambda xa: trans.orders(xa))
    rows = variance_report(orders_fn, caches["test"], kc.feature_batch_size)
    p = [float(v) for v in trans.p.numpy()]
    print(write_table(run_path(cfg, "variance"), rows, summary={"layer": kc.layer, "p": p}))

    acc_a = evaluate_model(strategy, net_a, data, cfg.train.eval_batch_size)["top1"]
    acc_b = evaluate_model(strategy, net_b, data, cfg.train.eval_batch_size)["top1"]
    meta = {
        "layer": kc.layer,
        "net_a": path_a,
        "net_b": path_b,
        "p": p,
        "variance": rows,
        "transnet": {
            "feature_shape": list(caches["train"].feature_shape),
            "depth": kc.depth,
            "learn_p": kc.learn_p,
            "alphas": kc.alphas,
        },
        "config": cfg.to_dict(),
    }
    if chief:
        save_params(run_path(cfg, "transnet_params.pkl"), model, meta)

    summary = {
        "method": "consistency",
        "dataset": data.info.name,
        "layer": kc.layer,
        "net_a_top1": acc_a,
        "net_b_top1": acc_b,
        **{f"p{k}": v for k, v in enumerate(p)},
        **{f"var_order{k}_rel": r["relative"] for k, r in enumerate(rows[: kc.depth])},
        "var_residual_rel": rows[kc.depth]["relative"],
        "features_reused": reused["train"] and reused["test"],
        "transnet_train_loss": history[-1]["train_loss"] if history else float("nan"),
    }
    refine = []
    for mode in kc.in_modes:
        before, after, tail = _refine(cfg, kc, strategy, path_b, orders_fn, mode, caches["train"], caches["test"])
        tag = "".join(map(str, mode))
        refine.append(
            {"in_mode": tag, "top1_before": before["top1"], "top1_after": after["top1"], "loss_after": after["loss"]}
        )
        summary[f"refine_{tag}_top1"] = after["top1"]
        if chief:
            save_params(
                run_path(cfg, f"refine_{tag}_tail.pkl"),
                model_arrays(tail),
                {"layer": kc.layer, "in_mode": mode, "net_b": path_b, "test": after},
            )
    summary["transnet_params"] = run_path(cfg, "transnet_params.pkl")
    write_json(
        run_path(cfg, "results.json"),
        {"summary": summary, "variance": rows, "refine": refine, "transnet_history": history},
    )
    for cache in caches.values():  # a non-chief worker's private copies
        if not cache.folder.startswith(run_path(cfg, "features")):
            shutil.rmtree(cache.folder, ignore_errors=True)
    return summary
