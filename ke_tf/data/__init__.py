"""ke_tf.data: deterministic, resumable image input pipelines.

`load_data(name, ...)` returns an `ImageData` whose `train(batch_size, epoch,
seed)` pipeline depends only on (seed, epoch), so a resumed run sees exactly
the batches it would have seen. Also: class subsets / orders for
class-incremental learning (`class_order`, `incremental_tasks`).
"""

from ke_tf.data.image_data import ImageData
from ke_tf.data.info import DatasetInfo
from ke_tf.data.loader import KNOWN as KNOWN_DATASETS
from ke_tf.data.loader import load_data
from ke_tf.data.tasks import class_order, incremental_tasks

__all__ = ["DatasetInfo", "ImageData", "KNOWN_DATASETS", "class_order", "incremental_tasks", "load_data"]
