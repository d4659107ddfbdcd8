"""Stateless image transforms used by the pipelines.

All randomness comes from an explicit `seed` tensor of shape [2] so that the
same (seed, epoch, example index) always yields the same augmented image;
this is what makes checkpoint resume bit-exact.
"""

from __future__ import annotations

import tensorflow as tf


def split_seed(seed: tf.Tensor, num: int) -> tf.Tensor:
    """Derive `num` independent [2]-shaped seeds from one."""
    return tf.random.experimental.stateless_split(seed, num=num)


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
    """(x - mean) / std on the 0-255 scale, returned as float32."""
    image = tf.cast(image, tf.float32)
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def pad_random_crop(image: tf.Tensor, pad: int, seed: tf.Tensor) -> tf.Tensor:
    """Zero-pad by `pad` on each side, then crop back to the original size."""
    shape = tf.shape(image)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    return tf.image.stateless_random_crop(padded, shape, seed=seed)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def random_resized_crop(
    image: tf.Tensor, size: int, seed: tf.Tensor, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tf.Tensor:
    """Inception-style crop: random area fraction `scale`, aspect `ratio`,
    resized (bilinear) to size x size. Returns float32 on the 0-255 scale."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(crop, [size, size], method="bilinear")


def resize_center_crop(image: tf.Tensor, resize: int, size: int) -> tf.Tensor:
    """Resize the shorter side to `resize` (bilinear, antialiased) then take a
    centred size x size crop. Returns float32 on the 0-255 scale."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(resize, tf.float32) / tf.reduce_min(shape)
    new_hw = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    top = (new_hw[0] - size) // 2
    left = (new_hw[1] - size) // 2
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


def resize_to(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resize to size x size, kept on the 0-255 scale (float32)."""
    return tf.image.resize(image, [size, size], method="bilinear")
