"""Learning without Memorizing (Dhar et al., CVPR 2019) for `model.fit`: a student with an extended
head trained on new-class data only, distilled from the frozen old-class teacher by LwF's KD on the
old outputs and Grad-CAM attention distillation, with the objective of ke_tf's incremental loop."""

import keras

from ke_tf.keras.distill import replica_mean, replica_regularisation
from ke_tf.losses import incremental_objective
from ke_tf.methods.incremental.gradcam import feature_model, incremental_outputs


class LwM(keras.Model):
    """Trains `student` (the teacher's classes first, then the new ones) with `fit` on
    CE + beta * L_D + gamma * L_AD (`ke_tf.losses.incremental_objective`); gamma = 0 is LwF, beta =
    gamma = 0 plain fine-tuning. `layer`: the feature map Grad-CAM reads, by name in both nets
    (default: the input of their last global average pooling). The teacher is frozen and runs in
    inference mode; `compile`'s loss is not used, its metrics see the student's logits. `predict`
    and `evaluate` run the student (evaluate's loss is the same objective in inference mode)."""

    def __init__(self, student, teacher, layer=None, beta=1.0, gamma=1.0, temperature=2.0, ce_over="all", **kwargs):
        super().__init__(**kwargs)
        n_old, n_new = teacher.outputs[0].shape[-1], student.outputs[0].shape[-1]
        if n_new <= n_old:
            raise ValueError(f"LwM: the student has {n_new} outputs, not more than the teacher's {n_old}")
        if ce_over not in ("all", "new"):
            raise ValueError(f"LwM: ce_over must be 'all' or 'new', got {ce_over!r}")
        if min(beta, gamma) < 0 or temperature <= 0:
            raise ValueError(f"LwM: needs beta, gamma >= 0 and temperature > 0 (got {beta}, {gamma}, {temperature})")
        self.student, self.teacher = student, teacher
        self.teacher.trainable = False
        self.n_old, self.beta, self.gamma = n_old, float(beta), float(gamma)
        self.temperature, self.ce_over = float(temperature), ce_over
        self._feature_models = (feature_model(student, layer), feature_model(teacher, layer)) if self.gamma else None

    def build(self, input_shape):
        self.student.build(input_shape)
        self.teacher.build(input_shape)

    def forward(self, x, training):
        """The dict `incremental_objective` reads: the student's logits, the teacher's (beta) and
        both Grad-CAM maps for the teacher's top class (gamma)."""
        return incremental_outputs(self.student, self.teacher, x, training, self.beta, self.gamma, self._feature_models)

    def call(self, x, training=None):
        # Training returns the whole forward pass: the student's Grad-CAM needs the activations
        # of the very pass whose weights the step differentiates (one BN update per step).
        return self.forward(x, True) if training else self.student(x, training=False)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if sample_weight is not None:
            raise ValueError("LwM does not weight examples")
        outputs = y_pred if isinstance(y_pred, dict) else self.forward(x, False)
        per_example = incremental_objective(
            outputs, y, self.n_old, self.beta, self.gamma, self.temperature, self.ce_over
        )
        return replica_mean(per_example) + replica_regularisation(self.student)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        logits = y_pred["logits"] if isinstance(y_pred, dict) else y_pred
        return super().compute_metrics(x, y, logits, sample_weight)
