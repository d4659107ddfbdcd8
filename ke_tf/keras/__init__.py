"""The methods inside Keras's own training API (`model.fit`, callbacks, `keras.distillation`):
Hinton KD as a `Distiller` loss, label-aware distillation (Born-Again, EKG's memory bank),
Born-Again generations, ReduceNet's ReLU annealing, Knowledge Evolution, LwM and iterative
prune-finetune schedules. Inside this package
`import keras` is the top-level Keras (absolute imports); users reach it as `ke_tf.keras`."""

from ke_tf.keras.born_again import born_again, ensemble_model
from ke_tf.keras.callbacks import AnnealReLU
from ke_tf.keras.distill import HintonKD, LabelDistiller, TeacherBank
from ke_tf.keras.evolution import KnowledgeEvolution
from ke_tf.keras.lwm import LwM
from ke_tf.keras.pruning import PruneFinetune

__all__ = [
    "AnnealReLU",
    "HintonKD",
    "KnowledgeEvolution",
    "LabelDistiller",
    "LwM",
    "PruneFinetune",
    "TeacherBank",
    "born_again",
    "ensemble_model",
]
