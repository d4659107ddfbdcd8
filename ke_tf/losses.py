"""Per-example losses shared by the method loops (the Trainer averages over the global batch).
They compute in float32 for float16/bfloat16 inputs and in the inputs' own dtype otherwise, so a
float64 model trains on a float64 loss."""

import tensorflow as tf


def at_least_float32(x):
    """`x` in float32 when it is a half-precision (or integer) tensor, else unchanged."""
    x = tf.convert_to_tensor(x)
    return x if x.dtype in (tf.float32, tf.float64) else tf.cast(x, tf.float32)


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Per-example softmax cross-entropy on integer labels, optionally label-smoothed
    (targets (1-eps)*onehot + eps/K, as torch's CrossEntropyLoss(label_smoothing=eps))."""
    logits = at_least_float32(logits)
    labels = tf.cast(labels, tf.int32)
    if not label_smoothing:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    k = tf.shape(logits)[-1]
    targets = tf.one_hot(labels, k, dtype=logits.dtype) * (1.0 - label_smoothing) + label_smoothing / tf.cast(
        k, logits.dtype
    )
    return tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)


def soft_cross_entropy(logits, target_logits, temperature=1.0):
    """Per-example CE between softmax(target/T) and softmax(logits/T) (no T^2 factor)."""
    t = float(temperature)
    logits = at_least_float32(logits)
    targets = tf.nn.softmax(tf.cast(target_logits, logits.dtype) / t)
    return tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits / t)


def kd_loss(student_logits, teacher_logits, temperature):
    """Hinton KD per example: T^2 * KL(softmax(t/T) || softmax(s/T))."""
    t = float(temperature)
    student = at_least_float32(student_logits) / t
    teacher = tf.cast(teacher_logits, student.dtype) / t
    p = tf.nn.softmax(teacher)
    kl = tf.reduce_sum(p * (tf.nn.log_softmax(teacher) - tf.nn.log_softmax(student)), axis=-1)
    return t * t * kl


def classifier_loss(model, label_smoothing=0.0):
    """The standard supervised `loss_fn` for the Trainer: CE of `model` on (images, labels)."""

    def loss_fn(batch, training):
        logits = model(batch[0], training=training)
        return {"loss": cross_entropy(logits, batch[1], label_smoothing), "logits": logits}

    return loss_fn


def attention_distillation(student_maps, teacher_maps, eps=1e-12):
    """LwM's L_AD per example: L1 distance between the L2-normalised, vectorised attention maps
    ||Q_S/||Q_S||_2 - Q_T/||Q_T||_2||_1 (maps [B, H, W])."""
    b = tf.shape(student_maps)[0]
    s = tf.reshape(at_least_float32(student_maps), [b, -1])
    t = tf.reshape(tf.cast(teacher_maps, s.dtype), [b, -1])
    s = s / (tf.norm(s, axis=-1, keepdims=True) + eps)
    t = t / (tf.norm(t, axis=-1, keepdims=True) + eps)
    return tf.reduce_sum(tf.abs(s - t), axis=-1)
