"""Shared conversion steps: load a foreign checkpoint without running code from it, rename and
transpose its tensors onto a ke_tf model's variables, check every key and shape, write a params
file that `test.py` rebuilds.

A converter supplies only `layer_of(key) -> (ke_tf layer path, leaf) | None` (None: a known key
the ke_tf model does not use, e.g. BN's `num_batches_tracked`); `tensor_leaf` turns PyTorch leaf
names and layouts (OIHW kernels, (out, in) linear weights, BN weight/bias/running stats) into
Keras ones.
"""

import os

import numpy as np

from ke_tf.io.params import ParamsError, safe_loads

TORCH_LEAVES = {"running_mean": "moving_mean", "running_var": "moving_variance"}
BN_LEAVES = {"weight": "gamma", "bias": "beta", **TORCH_LEAVES}


def load_torch_state_dict(path):
    """A PyTorch checkpoint as `{key: float ndarray}`, loaded with `weights_only=True` (tensors
    and plain containers only; torch refuses anything that would run code). Accepts a bare
    state_dict or one under "state_dict"/"model"/"net"; strips DataParallel's "module." prefix."""
    try:
        import torch
    except ImportError:
        raise ParamsError(f"{path}: reading PyTorch checkpoints needs torch: pip install 'ke_tf[convert]'") from None
    if not os.path.isfile(path):
        raise ParamsError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError for unsafe or corrupt files
        raise ParamsError(
            f"{path}: not a loadable weights-only PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    return state_dict_arrays(obj, path, lambda t: t.detach().cpu().numpy() if hasattr(t, "detach") else t)


def load_pickled_arrays(path):
    """A pickled `{name: ndarray}` (EKG's params files) through ke_tf's restricted unpickler."""
    if not os.path.isfile(path):
        raise ParamsError(f"{path}: no such params file")
    with open(path, "rb") as f:
        return state_dict_arrays(safe_loads(f.read(), source=path), path)


def state_dict_arrays(obj, source, to_numpy=np.asarray):
    """`{key: ndarray}` from a (possibly wrapped) state dict; tensors go through `to_numpy`."""
    for wrapper in ("state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise ParamsError(f"{source}: expected a dict of tensors (a state_dict), got {type(obj).__name__}")
    arrays = {}
    for key, value in obj.items():
        value = to_numpy(value)
        if not isinstance(value, np.ndarray):
            raise ParamsError(f"{source}: key {key!r} is not a tensor ({type(value).__name__})")
        arrays[key[len("module.") :] if key.startswith("module.") else key] = value
    return arrays


def torch_leaf(leaf, value, is_bn):
    """(Keras leaf name, array in Keras layout) of a PyTorch parameter/buffer."""
    if is_bn:
        return BN_LEAVES.get(leaf, leaf), value
    if value.ndim == 4:  # conv weight or KE's conv mask: OIHW -> HWIO
        return ("kernel" if leaf == "weight" else leaf), value.transpose(2, 3, 1, 0)
    if value.ndim == 2:  # linear weight or mask: (out, in) -> (in, out)
        return ("kernel" if leaf == "weight" else leaf), value.T
    return leaf, value


def map_arrays(model, source_arrays, layer_of, leaf_of, source):
    """`{variable path: array}` for every variable of `model`, from `source_arrays` renamed by
    `layer_of(key) -> (layer path, leaf) | None` and converted by `leaf_of(leaf, value, is_bn)`.
    Raises ParamsError naming the first source key that maps nowhere, the first model variable
    nothing maps to, or the first shape that does not fit."""
    bn_layers = {v.path.rsplit("/", 1)[0] for v in model.weights if v.path.endswith("/moving_mean")}
    variables = {v.path: tuple(v.shape) for v in model.weights}
    arrays, origin = {}, {}
    for key, value in source_arrays.items():
        target = layer_of(key)
        if target is None:
            continue
        layer, leaf = target
        name, array = leaf_of(leaf, np.asarray(value), layer in bn_layers)
        path = f"{layer}/{name}"
        if path not in variables:
            raise ParamsError(
                f"{source}: key {key!r} (-> {path!r}) matches no variable of model {model.name!r}; "
                "wrong --arch or options?"
            )
        if path in arrays:
            raise ParamsError(f"{source}: keys {origin[path]!r} and {key!r} both map to {path!r}")
        array = array.reshape(-1) if len(variables[path]) == 1 else array
        if tuple(array.shape) != variables[path]:
            raise ParamsError(
                f"{source}: shape mismatch for key {key!r}: {tuple(np.shape(value))} -> "
                f"{tuple(array.shape)}, model variable {path!r} expects {variables[path]}"
            )
        arrays[path] = np.ascontiguousarray(array, dtype=np.float32)
        origin[path] = key
    missing = [p for p in variables if p not in arrays]
    if missing:
        raise ParamsError(
            f"{source}: no key gives model variable {missing[0]!r} ({len(missing)} missing); "
            "wrong --arch or options, or a truncated checkpoint?"
        )
    return arrays


def convert(source, source_arrays, spec, layer_of, leaf_of=torch_leaf, layers_meta=None, extra_meta=None):
    """Build `spec`'s model and map `source_arrays` onto it. Returns (model, arrays, metadata);
    the metadata lets `test.py` rebuild the model from a params file."""
    from ke_tf.io.params import apply_params
    from ke_tf.models import build_from_spec
    from ke_tf.models.from_params import layer_factory

    meta = {
        "model": spec,
        "layers": layers_meta or {"kind": "plain"},
        "converted_from": {"source": str(source), **(extra_meta or {})},
    }
    model = build_from_spec(spec, layer_factory(meta))
    arrays = map_arrays(model, source_arrays, layer_of, leaf_of, source)
    apply_params(model, arrays, source=source)
    return model, arrays, meta


def changed_widths(defaults, inferred):
    """The channel-group widths that differ from the architecture's defaults (slim or pruned
    checkpoints), or None for a full-width network."""
    changed = {k: int(v) for k, v in inferred.items() if defaults.get(k) != int(v)}
    return changed or None


def out_channels(arrays, key, source):
    """Output channels of the PyTorch conv/linear weight (or Keras kernel) `key`."""
    if key not in arrays:
        raise ParamsError(f"{source}: missing key {key!r}; wrong --arch or not a checkpoint of this format?")
    return int(arrays[key].shape[0])
