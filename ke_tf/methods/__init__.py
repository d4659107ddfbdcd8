"""The methods, one package each: `<method>/loop.py` has `run(cfg, strategy) -> summary dict` and
writes pickled params plus a results JSON under `cfg.run_dir`; what only that method uses sits
beside it (EKG's search, LwM's Grad-CAM, the Trans-Net and its feature cache). `stage.py` is what
the loops share: data from the config, one trained stage, evaluation and the params file."""

import importlib

LOOPS = {
    "supervised": "ke_tf.methods.supervised.loop",
    "evolution": "ke_tf.methods.evolution.loop",
    "distillation": "ke_tf.methods.distillation.loop",
    "incremental": "ke_tf.methods.incremental.loop",
    "ekg": "ke_tf.methods.ekg.loop",
    "consistency": "ke_tf.methods.consistency.loop",
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
