"""Knowledge Evolution (Taha et al., CVPR'21) with `fit`: generations of a split network, the reset
hypothesis re-drawn and the optimizer restarted in between; the fit hypothesis is the slim model."""

import numpy as np

from ke_tf.layers.split import REINIT_RULES, reinitialize_reset_hypothesis, split_layers
from ke_tf.methods.evolution.loop import generation_seed
from ke_tf.surgery.split_model import slim_model


def accuracy(model, x, y, batch_size=256):
    """Top-1 accuracy of `model`'s logits on arrays (x, y)."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(y).reshape(-1)))


class KnowledgeEvolution:
    """Drives a compiled model from `ke_tf.split_model` (or built with `SplitLayerFactory`) through
    KE generations with its own `fit`. Between generations (`next_generation`) the reset weights
    are re-drawn exactly as our evolution loop does (same seeds, same `reinit` rule) and the model
    is recompiled from its compile config: a fresh optimizer, its schedule back at step 0."""

    def __init__(self, model, seed=0, reinit="kaiming_uniform"):
        if not split_layers(model):
            raise ValueError(f"{model.name} has no split layers: split it with ke_tf.split_model first")
        if reinit not in REINIT_RULES:
            raise ValueError(f"reinit must be one of {REINIT_RULES}, got {reinit!r}")
        self.model = model
        self.seed = int(seed)
        self.reinit = reinit
        self.generation = 1
        self.trained = False  # whether the current generation has been fitted
        self.history = []

    def next_generation(self):
        """Start generation g + 1: re-draw the reset hypothesis, restart the optimizer."""
        if not self.model.compiled:
            raise ValueError("compile the model before training it with KnowledgeEvolution")
        self.generation += 1
        reinitialize_reset_hypothesis(self.model, generation_seed(self.seed, self.generation), self.reinit)
        self.model.compile_from_config(self.model.get_compile_config())
        self.trained = False

    def fit(self, x, y, generations, validation_data=None, **fit_kwargs):
        """`generations` more generations of `model.fit(x, y, **fit_kwargs)`; with `validation_data`
        (x, y) logs the dense and (kels) slim accuracy of each. Returns the per-generation rows."""
        for _ in range(generations):
            if self.trained:
                self.next_generation()
            fitted = self.model.fit(x, y, **fit_kwargs)
            self.trained = True
            row = {"generation": self.generation, "loss": fitted.history["loss"][-1]}
            if validation_data is not None:
                row["dense_accuracy"] = accuracy(self.model, *validation_data)
                if self.kels:
                    row["slim_accuracy"] = accuracy(self.slim(), *validation_data)
            self.history.append(row)
        return self.history

    @property
    def kels(self):
        return all(layer.split_mode == "kels" for layer in split_layers(self.model))

    def slim(self):
        """The slim (fit-hypothesis) plain Keras model of the current weights (`ke_tf.slim_model`)."""
        return slim_model(self.model)
