"""Born-Again Networks (Furlanello et al. 2018) with `fit`: each generation is a fresh student
distilled from the previous one with `ke_tf.ban_loss`; the generations and their ensemble."""

import keras

from ke_tf.keras.distill import LabelDistiller
from ke_tf.losses import ban_loss


def ensemble_model(models, name="ensemble"):
    """A functional model whose logits are the mean of `models`' logits (same inputs)."""
    inputs = keras.Input(shape=tuple(models[0].inputs[0].shape[1:]))
    outputs = [m(inputs) for m in models]
    return keras.Model(inputs, outputs[0] if len(outputs) == 1 else keras.layers.Average()(outputs), name=name)


def born_again(student_factory, fit_fn, generations, lam=0.5, tau=1.0, teacher=None):
    """Train `generations` students, `student_factory(g)` each, by `fit_fn(model)` (it compiles
    `model` with an optimizer and the label loss, and calls `fit`). Generation 0 learns from the
    labels (or from `teacher`), generation g from generation g-1 with CE + lam tau^2 soft CE.
    Returns (the generations, their ensemble model)."""
    if generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    models = []
    for g in range(generations):
        student = student_factory(g)
        if teacher is None:
            fit_fn(student)
        else:
            fit_fn(LabelDistiller(student, teacher, lambda s, t, y: ban_loss(s, t, y, lam, tau)))
            teacher.trainable = True  # frozen while it taught
        models.append(student)
        teacher = student
    return models, ensemble_model(models)
