"""Distillation objectives for `model.fit`: Hinton's KD as a `keras.distillation` loss, and a
distiller for the objectives that also read the labels (Born-Again, EKG's memory bank)."""

import keras
import tensorflow as tf
from keras import ops

from ke_tf.losses import kd_loss


def replica_mean(per_example):
    """Mean of `per_example` over this replica's batch divided by the replicas in sync, as Keras'
    own losses do: the all-reduce then sums it into the global-batch mean (one device == N)."""
    return ops.mean(per_example) / tf.distribute.get_strategy().num_replicas_in_sync


def replica_regularisation(model):
    """`model`'s regularisation losses, divided as `replica_mean` divides the data term."""
    if not model.losses:
        return 0.0
    return ops.sum(model.losses) / tf.distribute.get_strategy().num_replicas_in_sync


@keras.saving.register_keras_serializable(package="ke_tf")
class HintonKD(keras.distillation.DistillationLoss):
    """Hinton et al. 2015's KD term for `keras.distillation.Distiller`: T^2 KL(softmax(t/T) ||
    softmax(s/T)) (`ke_tf.kd_loss`), batch-averaged. With `student_loss_weight = 1 - alpha` and a
    from-logits sparse cross-entropy the Distiller trains on `ke_tf.hinton_loss`."""

    def __init__(self, temperature=4.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        return replica_mean(kd_loss(student_outputs, ops.stop_gradient(teacher_outputs), self.temperature))

    def get_config(self):
        return {"temperature": self.temperature}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="ke_tf")
class TeacherBank(keras.Model):
    """Several teachers as one: their logits stacked to [B, K, M] (member 0 the best), the `bank`
    of `ke_tf.bank_distillation` (EKG's memory bank of sub-networks)."""

    def __init__(self, members, **kwargs):
        super().__init__(**kwargs)
        self.members = list(members)

    def build(self, input_shape):
        for member in self.members:
            member.build(input_shape)

    def call(self, x, training=False):
        return ops.stack([m(x, training=training) for m in self.members], axis=-1)

    def get_config(self):
        return {**super().get_config(), "members": [keras.saving.serialize_keras_object(m) for m in self.members]}

    @classmethod
    def from_config(cls, config):
        members = [keras.saving.deserialize_keras_object(m) for m in config.pop("members")]
        return cls(members, **config)


class LabelDistiller(keras.Model):
    """Trains `student` with `fit` on `objective(student_logits, teacher_outputs, labels)`, a
    per-example loss of `ke_tf.losses` (e.g. `ban_loss`, `bank_distillation`): what
    `keras.distillation.Distiller` cannot express, as its distillation losses never see the
    labels. The teacher is frozen and runs in inference mode; `compile`'s loss is not used."""

    def __init__(self, student, teacher, objective, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        self.objective = objective
        self.teacher.trainable = False

    def build(self, input_shape):
        self.student.build(input_shape)
        self.teacher.build(input_shape)

    def call(self, x, training=None):
        return self.student(x, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if sample_weight is not None:
            raise ValueError("LabelDistiller does not weight examples")
        if y_pred is None:
            y_pred = self(x, training=training)
        target = ops.stop_gradient(self.teacher(x, training=False))
        return replica_mean(self.objective(y_pred, target, y)) + replica_regularisation(self.student)
