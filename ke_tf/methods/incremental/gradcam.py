"""Differentiable Grad-CAM (Selvaraju et al. 2017) for LwM's attention distillation.

A^c = ReLU(sum_k alpha_k^c A^k) with alpha_k^c = mean_ij dy^c/dA^k_ij, taken at the last conv
block. The gradient dy^c/dA is computed with an inner tape, so when `grad_cam` runs under an
outer tape (the Trainer's) the map is differentiable w.r.t. the model's weights through both the
activations A and the weights alpha (second order, like torch's create_graph=True).
"""

import keras
import numpy as np
import tensorflow as tf

from ke_tf.io.report import pyplot, save_figure


def last_block_layer(model):
    """Name of the layer whose output is the last conv block's feature map: the input of the
    model's global-average-pooling head (all ke_tf ResNets end with `pool` -> `classifier`)."""
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
    if not pools:
        raise ValueError(
            f"model {model.name!r} has no global average pooling layer; pass the feature layer name explicitly"
        )
    pool_input = pools[-1].input
    return next(layer.name for layer in model.layers if layer.output is pool_input)


def feature_model(model, layer_name=None):
    """Functional view of `model` (sharing its weights) returning (feature_map, logits), with
    the feature map taken at `layer_name` (default: the last conv block's output)."""
    layer = model.get_layer(layer_name or last_block_layer(model))
    return keras.Model(model.inputs, [layer.output, model.outputs[0]], name=f"{model.name}_gradcam")


def grad_cam(fmodel, images, class_ids=None, training=False):
    """Grad-CAM maps of `fmodel` (from `feature_model`) for per-sample classes.

    `class_ids` [B] (int) picks the logit y^c of each sample; None uses each sample's argmax.
    Returns (maps [B, H, W] >= 0, logits [B, K], class_ids [B]). The inner tape watches the
    images, so it also works for frozen (non-trainable) models. With `training=True`, BN batch
    statistics couple the samples of the batch (as in the reference implementations)."""
    images = tf.convert_to_tensor(images)
    with tf.GradientTape() as tape:
        tape.watch(images)
        features, logits = fmodel(images, training=training)
        if class_ids is None:
            class_ids = tf.argmax(logits, axis=-1, output_type=tf.int32)
        scores = tf.gather(logits, tf.cast(class_ids, tf.int32), axis=1, batch_dims=1)
        # Per-sample scores are summed: d(sum_b y_b)/dA_b = dy_b/dA_b for a per-sample network.
        total = tf.reduce_sum(scores)
    grads = tape.gradient(total, features)
    dtype = tf.float32 if features.dtype in (tf.float16, tf.bfloat16) else features.dtype  # mixed precision
    features = tf.cast(features, dtype)
    alpha = tf.reduce_mean(tf.cast(grads, dtype), axis=[1, 2], keepdims=True)  # [B, 1, 1, C]
    maps = tf.nn.relu(tf.reduce_sum(alpha * features, axis=-1))
    return maps, logits, class_ids


def attention_pair(student_fm, teacher_fm, images, training):
    """LwM's forward pass: the teacher's Grad-CAM maps for its top class b (inference mode) and the
    student's maps for the same b (paper, sec. 4), with both nets' logits, as the dict
    `ke_tf.losses.incremental_objective` reads."""
    t_maps, t_logits, top = grad_cam(teacher_fm, images, training=False)
    s_maps, logits, _ = grad_cam(student_fm, images, top, training=training)
    return {"logits": logits, "maps": s_maps, "teacher_logits": t_logits, "teacher_maps": t_maps}


def incremental_outputs(student, teacher, images, training, beta, gamma, feature_models=None):
    """One batch's forward pass as the dict `ke_tf.losses.incremental_objective` reads: LwM's
    `attention_pair` when gamma (`feature_models`: the student's and teacher's `feature_model`),
    else the student's logits and, when beta, the teacher's (inference mode)."""
    if gamma:
        return attention_pair(*feature_models, images, training)
    outputs = {"logits": student(images, training=training)}
    if beta:
        outputs["teacher_logits"] = teacher(images, training=False)
    return outputs


def save_overlays(path, images, maps, titles, mean, std):
    """PNG grid of normalised `images` [N, H, W, 3] with their Grad-CAM `maps` [N, h, w] upsampled
    and overlaid; skipped with a warning when matplotlib is missing. Returns the path or None."""
    plt = pyplot(path)
    if plt is None:
        return None
    images = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    images = np.clip(images / 255.0, 0.0, 1.0)
    size = images.shape[1:3]
    maps = tf.image.resize(np.asarray(maps, np.float32)[..., None], size, method="bilinear").numpy()[..., 0]
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        heat = maps[i] / max(float(maps[i].max()), 1e-12)
        axes[0, i].imshow(images[i])
        axes[0, i].set_title(titles[i], fontsize=7)
        axes[1, i].imshow(images[i])
        axes[1, i].imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)
