"""`Source`: an in-memory, fixed-order, random-access list of examples.

Every dataset is reduced to one of these (per split) so that shuffling,
class subsetting and hold-out splitting are plain numpy indexing, and the
example order of an epoch can be a numpy permutation that depends only on
(seed, epoch) — not on TensorFlow's global seed or a shuffle buffer.

`items` holds, depending on `kind`:
  * "array":   uint8 images, shape [N, H, W, C] (small fixed-size datasets);
  * "encoded": encoded image bytes (JPEG/PNG), shape [N], dtype object;
  * "path":    image file paths, shape [N], dtype object/str.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

KINDS = ("array", "encoded", "path")


@dataclasses.dataclass(frozen=True)
class Source:
    items: np.ndarray
    labels: np.ndarray  # int32 [N]
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown source kind {self.kind!r}; expected one of {KINDS}")
        if len(self.items) != len(self.labels):
            raise ValueError(f"{len(self.items)} items but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices) -> Source:
        """A new Source with the examples at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return Source(self.items[indices], self.labels[indices].astype(np.int32), self.kind)

    def relabel(self, labels) -> Source:
        return Source(self.items, np.asarray(labels, dtype=np.int32), self.kind)


def decode_item(item: tf.Tensor, kind: str) -> tf.Tensor:
    """Turn one `Source` item into a uint8 [H, W, 3] image tensor (graph-safe)."""
    if kind == "array":
        return item
    if kind == "path":
        item = tf.io.read_file(item)
    image = tf.io.decode_image(item, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image
