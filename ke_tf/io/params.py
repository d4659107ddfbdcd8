"""Pickled parameter files: `{variable.path: ndarray}` plus plain-data metadata.

Writes are atomic (temp file + rename) so a crash never leaves a half-written file. Loading uses
a restricted unpickler that only reconstructs numpy arrays/dtypes/scalars and plain containers:
a pickle that would call anything else (e.g. `os.system` via `__reduce__`) is refused before any
of it runs.
"""

import hashlib
import io
import os
import pickle
import tempfile

import numpy as np

FORMAT = "ke_tf.params"
VERSION = 1

# The only globals a params pickle may name: what numpy needs to rebuild arrays and scalars.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),
}
_DTYPE_MODULES = ("numpy", "numpy.dtypes")


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the file and the problem."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS or (module in _DTYPE_MODULES and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: params files may only hold numpy arrays and plain Python values"
        )


def safe_loads(data, source="<bytes>"):
    """Unpickle `data` allowing only numpy arrays and plain Python values."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise ParamsError(f"{source}: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise ParamsError(f"{source}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None


def atomic_write_bytes(path, data):
    """Write `data` to `path` via a temp file in the same folder and an atomic rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path):
    """Hex SHA-256 of a file's bytes (cache fingerprints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_arrays(model):
    """`{variable.path: ndarray}` of every variable of `model` (masks and BN stats included)."""
    return {v.path: np.asarray(v.numpy()) for v in model.weights}


def save_params(path, model_or_arrays, metadata=None):
    """Save a model's variables (or a ready dict of arrays) and metadata atomically."""
    arrays = model_or_arrays if isinstance(model_or_arrays, dict) else model_arrays(model_or_arrays)
    payload = {"format": FORMAT, "version": VERSION, "variables": arrays, "metadata": metadata or {}}
    atomic_write_bytes(path, pickle.dumps(payload, protocol=4))
    return path


def load_params(path):
    """Load `(variables, metadata)` from a params file, refusing anything but plain data."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ParamsError(f"{path}: no such params file")
    with open(path, "rb") as f:
        payload = safe_loads(f.read(), source=path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ParamsError(f"{path}: not a ke_tf params file (missing format marker {FORMAT!r})")
    for key in ("variables", "metadata"):
        if not isinstance(payload.get(key), dict):
            raise ParamsError(f"{path}: missing or malformed key {key!r}")
    bad = [k for k, v in payload["variables"].items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ParamsError(f"{path}: variable {bad[0]!r} is not an array")
    return payload["variables"], payload["metadata"]


def apply_params(model, arrays, source="params", strict=True):
    """Assign `arrays` to `model`'s variables by path, checking names and shapes first so that
    nothing is assigned unless everything fits. With `strict`, every model variable must be given
    and every array used."""
    variables = {v.path: v for v in model.weights}
    missing = [p for p in variables if p not in arrays]
    unused = [p for p in arrays if p not in variables]
    if strict and missing:
        raise ParamsError(
            f"{source}: missing key {missing[0]!r} for model {model.name!r} "
            f"({len(missing)} missing); was it saved from another architecture?"
        )
    if strict and unused:
        raise ParamsError(
            f"{source}: key {unused[0]!r} matches no variable of model {model.name!r} "
            f"({len(unused)} unused); was it saved from another architecture?"
        )
    for p, v in variables.items():
        if p in arrays and tuple(arrays[p].shape) != tuple(v.shape):
            raise ParamsError(
                f"{source}: shape mismatch for {p!r}: file has {tuple(arrays[p].shape)}, model expects {tuple(v.shape)}"
            )
    for p, v in variables.items():
        if p in arrays:
            v.assign(arrays[p].astype(v.dtype))
    return model
