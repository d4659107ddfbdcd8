"""ReduceNet's annealed activation with `fit` (VanillaNet's schedule, Chen et al. 2023): the
student's ReLUs become linear over training so `ke_tf.deploy_model` can fuse the branches."""

import keras

from ke_tf.layers.activations import annealed_layers, linear_anneal, set_annealing
from ke_tf.surgery.deploy import deploy_model


class AnnealReLU(keras.callbacks.Callback):
    """Before each epoch sets every `AnnealedReLU`'s lambda to `linear_anneal(epoch,
    anneal_epochs)` (the schedule of our distillation loop), reaching 1 (identity) at
    `anneal_epochs` (default: the last epoch). Acts on `model`, else the fitted model's `student`
    (a Distiller's), else the fitted model."""

    def __init__(self, anneal_epochs=None, model=None):
        super().__init__()
        self.anneal_epochs = anneal_epochs
        self.target = model

    def annealed_model(self):
        return self.target if self.target is not None else getattr(self.model, "student", self.model)

    def on_train_begin(self, logs=None):
        if not annealed_layers(self.annealed_model()):
            raise ValueError("AnnealReLU: the model has no AnnealedReLU layer")
        if self.anneal_epochs is None:
            self.anneal_epochs = self.params["epochs"] - 1

    def on_epoch_begin(self, epoch, logs=None):
        set_annealing(self.annealed_model(), linear_anneal(epoch, self.anneal_epochs))

    def deploy(self):
        """The fused inference model (`ke_tf.deploy_model`); ReduceConv refuses lambda < 1."""
        return deploy_model(self.annealed_model())
