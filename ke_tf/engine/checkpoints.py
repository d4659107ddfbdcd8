"""Which checkpoint a training stage resumes from, and whether it may.

A stage resumes from its newest checkpoint that restores: a damaged newer one (truncated, missing
or corrupt file) is reported in one line and skipped. Next to the checkpoints the chief keeps a
record of what they were made from (`made_from.json`: the model's variables and the settings
that change what a checkpoint holds or what its step means); checkpoints of another model or
config are refused before anything is restored. `train.resume: restart` deletes the stage's
checkpoints instead. Every worker reads the chief's folder and the workers agree on the outcome,
so a refusal is raised on every worker and never leaves one waiting in a collective.
"""

import glob
import json
import os
import re
import shutil
import sys
import tempfile

import tensorflow as tf
from google.protobuf.message import DecodeError

from ke_tf.config import ConfigError
from ke_tf.io.params import atomic_write_bytes
from ke_tf.io.progress import log_line

RECORD = "made_from.json"
PREFIX = "ckpt"
# What a failed restore raises: a damaged file (OpError: missing, corrupt, short index; IndexError:
# short data file; DecodeError: corrupt object graph), or checkpoints older than the record that
# were made from another model (ValueError: shapes; AssertionError: unmatched objects).
RESTORE_ERRORS = (tf.errors.OpError, IndexError, DecodeError, ValueError, AssertionError)
START_OVER = "use another run_dir, or --set train.resume=restart to delete them and start over"
SHOWN = 3  # variable names shown per kind of difference


class CheckpointError(ConfigError):
    """A stage cannot resume from its checkpoints (none restores, or they were made from another
    model or config): an expected failure, reported as one `error:` line."""


def made_from(model, cfg, steps_per_epoch):
    """What a stage's checkpoints mean: the model's variables (path -> shape) and the settings
    that change what a checkpoint holds (optimizer slots, the fp16 loss scale) or what its step
    counter means (the epoch it falls in, the data order); JSON-ready."""
    settings = {
        "train.optimizer": cfg.optimizer,
        "train.mixed_precision": cfg.mixed_precision,
        "train.batch_size": cfg.batch_size,
        "steps per epoch": steps_per_epoch,
        "model input shape": getattr(model, "input_shape", None),
        "variable dtypes": sorted({v.dtype for v in model.weights}),
    }
    record = {"settings": settings, "variables": {v.path: list(v.shape) for v in model.weights}}
    return json.loads(json.dumps(record))  # tuples -> lists, as read back from the file


def differences(recorded, current):
    """What differs between two `made_from` records, one phrase per difference."""
    found = [
        f"{key} {recorded['settings'].get(key)} there, {value} here"
        for key, value in current["settings"].items()
        if recorded["settings"].get(key) != value
    ]
    there, here = recorded["variables"], current["variables"]
    for label, names in (
        ("only in the checkpoints", [n for n in there if n not in here]),
        ("only in this model", [n for n in here if n not in there]),
    ):
        if names:
            found.append(f"{len(names)} model variable(s) {label} ({_some(names)})")
    reshaped = [
        f"{n} {tuple(there[n])} there, {tuple(here[n])} here" for n in here if n in there and there[n] != here[n]
    ]
    if reshaped:
        found.append(f"{len(reshaped)} model variable(s) with another shape ({_some(reshaped)})")
    return found


def _some(items):
    return ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")


def _reason(error):
    """A restore error as one short phrase."""
    text = str(error).strip()
    first = re.sub(r"^\{\{[^}]*\}\}\s*", "", text.splitlines()[0] if text else "")  # TF's op prefix
    return f"{type(error).__name__}: {first[:200]}"


class StageCheckpoints:
    """The checkpoints of one stage in `folder` (the chief's: every worker reads it, only the
    chief writes it) and the record of what they were made from (`made_from(...)`)."""

    def __init__(self, folder, chief, record, policy="auto"):
        self.folder, self.chief, self.record, self.policy = folder, chief, record, policy
        self._recorded = False

    def open_manager(self, checkpoint, keep):
        """The stage's CheckpointManager: the chief writes into the folder (emptied first when
        restarting), other workers into a temporary folder."""
        if not self.chief:
            return tf.train.CheckpointManager(checkpoint, tempfile.mkdtemp(prefix="ke_tf_ckpt_"), keep)
        if self.policy == "restart" and os.path.isdir(self.folder):
            shutil.rmtree(self.folder)
            log_line(f"train.resume=restart: deleted the checkpoints in {self.folder}")
        return tf.train.CheckpointManager(checkpoint, self.folder, keep, checkpoint_name=PREFIX)

    def candidates(self):
        """Checkpoint paths in the folder, newest (highest step) first; one without an index
        file was never completed and is not one."""
        indexes = glob.glob(os.path.join(glob.escape(self.folder), f"{PREFIX}-*.index"))
        numbered = [
            (int(m.group(1)), p[: -len(".index")]) for p in indexes if (m := re.search(rf"{PREFIX}-(\d+)\.index$", p))
        ]
        return [path for _, path in sorted(numbered, reverse=True)]

    def check_record(self):
        """Refuse checkpoints made from another model or config (a folder without a record,
        written before records existed, is taken as it is)."""
        path = os.path.join(self.folder, RECORD)
        try:
            with open(path) as f:
                recorded = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path} is unreadable ({e}): {START_OVER}") from None
        found = differences(recorded, self.record)
        if found:
            raise CheckpointError(
                f"the checkpoints in {self.folder} were made from another model or config: "
                f"{'; '.join(found)}. To train this one, {START_OVER}"
            )

    def restore(self, checkpoint):
        """Restore the newest checkpoint that restores into `checkpoint`; returns its path, or
        None when there is none (or when restarting). Raises CheckpointError when the
        checkpoints were made from something else, or when none of them restores."""
        paths = [] if self.policy == "restart" else self.candidates()
        if paths:
            self.check_record()
        failed = []
        for path in paths:
            try:
                checkpoint.restore(path).assert_existing_objects_matched()
                return path
            except RESTORE_ERRORS as e:
                failed.append(f"{os.path.basename(path)}: {_reason(e)}")
                print(
                    f"warning: checkpoint {path} cannot be restored ({_reason(e)}); trying an older one",
                    file=sys.stderr,
                    flush=True,
                )
        if failed:
            raise CheckpointError(f"no checkpoint in {self.folder} can be restored ({'; '.join(failed)}): {START_OVER}")
        return None

    def save(self, manager, step):
        """Write checkpoint `step`; the chief writes the record (atomically) before its first one."""
        if self.chief and not self._recorded:
            atomic_write_bytes(os.path.join(self.folder, RECORD), json.dumps(self.record, indent=1).encode())
            self._recorded = True
        manager.save(checkpoint_number=step)


def settle(name, failure, step, latest, cluster_mean=None):
    """Make every worker take the same resume outcome: raise `failure` (a CheckpointError or
    None) if any worker has one, and raise if the workers restored different steps.
    `cluster_mean(x)` is the mean of a host value over the cluster (a collective every worker
    calls); None for one process."""
    if cluster_mean is None:
        if failure is not None:
            raise failure
        return
    if cluster_mean(float(failure is not None)) > 0:
        raise failure or CheckpointError(f"{name}: another worker cannot resume from the checkpoints; see its log")
    mean = cluster_mean(step)
    if mean != step or cluster_mean(step**2) != mean**2:
        raise RuntimeError(
            f"{name}: workers restored different steps (this worker: step {step} from "
            f"{latest or 'no checkpoint'}; cluster mean {mean:g}). Every worker must see the "
            f"chief's checkpoints: put run_dir on a filesystem all workers share."
        )
