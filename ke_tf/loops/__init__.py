"""Method loops. Each module has `run(cfg, strategy) -> summary dict` and writes pickled params
plus a results JSON under `cfg.run_dir`."""
import importlib

LOOPS = {
    "supervised": "ke_tf.loops.supervised",
    "evolution": "ke_tf.loops.evolution",
    "distillation": "ke_tf.loops.distillation",
    "incremental": "ke_tf.loops.incremental",
    "ekg": "ke_tf.loops.ekg",
    "consistency": "ke_tf.loops.consistency",
}


def get_loop(method):
    """The loop module for `method`."""
    if method not in LOOPS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(LOOPS))}")
    try:
        return importlib.import_module(LOOPS[method])
    except ModuleNotFoundError as e:
        if e.name == LOOPS[method]:
            raise ValueError(f"method {method!r} is not available in this version of ke_tf") from None
        raise


def register_sections():
    """Import every available loop so its config section is registered before validation."""
    for module in LOOPS.values():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
