"""Pick the tf.distribute strategy from the environment and the config, and what XLA compiles.

auto: TF_CONFIG set -> MultiWorkerMirroredStrategy; >1 local GPU -> MirroredStrategy; 1 GPU ->
OneDeviceStrategy(GPU); `cpu_replicas` > 1 -> MirroredStrategy over that many logical CPUs
(tests, debugging); otherwise OneDeviceStrategy(CPU).
"""

import functools
import json
import os

import tensorflow as tf


def _configure_logical_cpus(n):
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError as e:
        raise RuntimeError(
            f"distribute.cpu_replicas={n} needs the CPU split before TensorFlow initialises its "
            f"devices; create the strategy first in the process ({e})"
        ) from None


def make_strategy(kind="auto", cpu_replicas=0):
    """Build the strategy named by `kind` (see module doc)."""
    if kind == "multi_worker" or (kind == "auto" and os.environ.get("TF_CONFIG")):
        try:
            json.loads(os.environ.get("TF_CONFIG", "{}"))
        except json.JSONDecodeError as e:
            raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from None
        comm = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=comm)
    if cpu_replicas > 1:
        _configure_logical_cpus(cpu_replicas)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_replicas]
        return tf.distribute.MirroredStrategy(devices)
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "mirrored" or (kind == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def uses_gpu(strategy):
    """True when the strategy's compute devices are GPUs."""
    devices = getattr(strategy.extended, "worker_devices", None) or ()
    return any("GPU" in d.upper() for d in devices) or bool(tf.config.list_logical_devices("GPU"))


def instance_function(method):
    """tf.function of a bound method whose retracing statistics belong to this instance: TF keys
    them by the method's code, so one trace in each of several Trainers/Evaluators (a KE
    generation, an LwM task) would be reported as "frequent retracing"."""
    return tf.function(functools.partial(method.__func__, method.__self__))


def jit_scope(setting, strategy, sync_bn=False):
    """What XLA compiles: "off", "gradients" (loss + gradients; all-reduce and update outside) or
    "step" (the whole replica step including the update). `auto` = on for GPUs; off here for CPUs,
    where the Trainer times the stage's step both ways and may turn it on (`xla_choice`). With one replica
    the whole step compiles; with several, jit-compiling the update fails under MirroredStrategy
    (TF 2.21, 2 logical CPUs), so only loss + gradients are compiled,
    and nothing when synchronised BN puts all-reduces inside the forward pass (they do not compile
    on CPU devices and are unverified on GPUs here)."""
    if setting == "off" or (setting == "auto" and not uses_gpu(strategy)):
        return "off"
    if strategy.num_replicas_in_sync == 1:
        return "step"
    return "off" if sync_bn else "gradients"


def is_multi_worker(strategy):
    """Whether `strategy` spans several processes (MultiWorkerMirroredStrategy with >1 worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return False
    return (
        sum(len(tasks) for name, tasks in resolver.cluster_spec().as_dict().items() if name in ("chief", "worker")) > 1
    )


def chief_process():
    """Whether this process is the chief of its cluster, from TF_CONFIG alone (no TF_CONFIG: a
    single process, the chief). Agrees with `is_chief` for MultiWorkerMirroredStrategy."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task") or {}
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in config.get("cluster", {})


def is_chief(strategy):
    """Only the chief writes params, reports and real checkpoints."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()
    )
