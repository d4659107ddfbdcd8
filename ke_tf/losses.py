"""Every objective of the methods, per example (the Trainer averages over the global batch). Each
docstring gives the formula and the power of the temperature that scales the soft term: Hinton's
KD and Born-Again use T^2, EKG's memory bank T^1, LwF/LwM and EKG's search T^0. They compute in
float32 for float16/bfloat16 inputs and in the inputs' own dtype otherwise, so a float64 model
trains on a float64 loss."""

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


def hinton_loss(student_logits, teacher_logits, labels, alpha, temperature, label_smoothing=0.0, class_mean=False):
    """Hinton KD (Hinton et al. 2015), T^2: (1 - alpha) * CE(s, y) + alpha * T^2 KL(softmax(t/T) ||
    softmax(s/T)); the KL divided by the number of classes with `class_mean` (torch's KLDivLoss
    'mean', as ReduceNet's code)."""
    kd = kd_loss(student_logits, teacher_logits, temperature)
    if class_mean:
        kd = kd / tf.cast(tf.shape(student_logits)[-1], kd.dtype)
    return (1.0 - alpha) * cross_entropy(student_logits, labels, label_smoothing) + alpha * kd


def ban_loss(student_logits, teacher_logits, labels, lam, tau, label_smoothing=0.0):
    """Born-Again Networks (Furlanello et al. 2018, KC's BornAgain.py), tau^2:
    CE(s, y) + lambda * tau^2 * CE(softmax(t/tau), softmax(s/tau))."""
    soft = soft_cross_entropy(student_logits, teacher_logits, tau)
    return cross_entropy(student_logits, labels, label_smoothing) + lam * (tau * tau) * soft


def lwf_distillation(student_logits, teacher_logits, temperature):
    """LwM's L_D, T^0: LwF's distillation (Li & Hoiem; LwM Eq. 3 reuses it) of the old outputs,
    KL(softmax(t/T) || softmax(s/T)) with no T^2 factor. LwF weights it by lambda_o = 1 and FACIL's
    lwf/lwm (beta = 1, T = 2) use the plain cross-entropy of the T-softened outputs (same gradient
    as this KL); Hinton's T^2 (`kd_loss`) would make beta = 1 act as beta = 4."""
    t = float(temperature)
    return kd_loss(student_logits, teacher_logits, t) / (t * t)


def incremental_objective(outputs, labels, n_old, beta, gamma, temperature, ce_over="all"):
    """A class-incremental task's per-example loss (LwM, Dhar et al. 2019; LwF with gamma = 0;
    fine-tuning with beta = gamma = 0): CE(s, y) + beta * L_D(old outputs) + gamma * L_AD(maps).
    `outputs`: the student's "logits", and the "teacher_logits" (beta) and both Grad-CAM "maps" /
    "teacher_maps" (gamma) that `ke_tf.methods.incremental.gradcam.attention_pair` gives. CE over
    every seen output (`ce_over="all"`) or the new task's only ("new": outputs n_old.. vs y - n_old)."""
    logits, labels = outputs["logits"], tf.cast(labels, tf.int32)
    if ce_over == "new":
        loss = cross_entropy(logits[:, n_old:], labels - n_old)
    else:
        loss = cross_entropy(logits, labels)
    if beta:
        loss += beta * lwf_distillation(logits[:, :n_old], tf.stop_gradient(outputs["teacher_logits"]), temperature)
    if gamma:
        loss += gamma * attention_distillation(outputs["maps"], tf.stop_gradient(outputs["teacher_maps"]))
    return loss


def search_objective(logits, labels, ensemble_logits):
    """EKG's sub-network search score, T^0: CE(logits, y) + CE(softmax(ensemble), logits) (the soft
    targets at T = 1)."""
    return cross_entropy(logits, labels) + soft_cross_entropy(logits, ensemble_logits, 1.0)


def bank_distillation(logits, labels, bank, temperature):
    """EKG's memory-bank fine-tuning loss, T^1 (the reference scales the KL by T, not Hinton's T^2):
    CE(s, y) + T * KL(softmax(teacher/T) || softmax(s/T)). `bank` [B, K, M] holds M members' logits,
    member 0 the best; the teacher is the mean logits of the members closer (batch KL at T) to the
    best member than the student is, the best always counted: early on the student learns from
    all members, later only from the strong ones."""
    t = float(temperature)
    logits = at_least_float32(logits)
    members = tf.transpose(tf.cast(bank, logits.dtype), [0, 2, 1])  # [B, M, K]
    best = members[:, :1, :]
    student_gap = tf.reduce_sum(kd_loss(tf.stop_gradient(logits), best[:, 0], t))
    member_gaps = tf.reduce_sum(kd_loss(members, best, t), axis=0)  # [M]
    chosen = tf.cast(member_gaps < student_gap, logits.dtype)
    chosen = tf.tensor_scatter_nd_update(chosen, [[0]], tf.ones([1], logits.dtype))
    teacher = tf.einsum("bmk,m->bk", members, chosen) / tf.reduce_sum(chosen)
    return cross_entropy(logits, labels) + kd_loss(logits, teacher, t) / t


def transnet_loss(prediction, target, p, alphas):
    """Knowledge consistency's Trans-Net loss (no temperature): MSE(g(x_A), x_B) per example +
    sum_k alpha_k p_k^2 (the reference's default L2 penalty on the order gates, pushing towards
    low-fuzziness explanations); the batch mean is the paper's loss."""
    prediction = at_least_float32(prediction)
    mse = tf.reduce_mean(tf.square(prediction - tf.cast(target, prediction.dtype)), axis=[1, 2, 3])
    penalty = tf.reduce_sum(tf.constant(alphas, prediction.dtype) * tf.square(tf.cast(p, prediction.dtype)))
    return mse + penalty
