"""Plain supervised training: the baseline every method is compared with, and the quickstart."""

from ke_tf.io.report import write_json
from ke_tf.methods.stage import configured_spec, load_configured_data, run_path, save_trained, test_metrics, train_stage
from ke_tf.models import build_from_spec


def run(cfg, strategy):
    """Train `cfg.model.arch` on `cfg.data`; writes trained_params.pkl and results.json."""
    data = load_configured_data(cfg)
    spec = configured_spec(cfg, data)
    with strategy.scope():
        model = build_from_spec(spec)
    _, history, final = train_stage(cfg, strategy, model, data, cfg.run_dir)
    metadata = save_trained(
        strategy, run_path(cfg, "trained_params.pkl"), model, spec, cfg, metrics=test_metrics(final)
    )
    summary = {
        "method": "supervised",
        "arch": spec["arch"],
        "dataset": data.info.name,
        "test_top1": final["top1"],
        "test_top5": final["top5"],
        "test_loss": final["loss"],
        **metadata["complexity"],
        "epochs": len(history),
        "params_file": run_path(cfg, "trained_params.pkl"),
    }
    write_json(run_path(cfg, "results.json"), {"summary": summary, "history": history})
    return summary
