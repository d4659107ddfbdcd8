"""Import checkpoints of the reference implementations as ke_tf params files.

    python -m ke_tf.convert --from ke_pytorch SRC.pth --arch resnet18 --out params.pkl
    python test.py --trained_param params.pkl --dataset oxford_flowers102

`convert_checkpoint(fmt, src, arch, out, **options)` is the Python entry; `src` is a file path
or an already loaded `{key: ndarray}` dict (torch-free). Nothing is executed from a source file:
PyTorch files load with `torch.load(weights_only=True)` (torch: `pip install 'ke_tf[convert]'`),
pickles through ke_tf's restricted unpickler, `.npz` files without pickles.
"""

import os

import numpy as np

from ke_tf.convert.common import load_pickled_arrays, load_torch_state_dict, state_dict_arrays
from ke_tf.convert.ekg_tf2 import convert_ekg_tf2
from ke_tf.convert.ke_pytorch import convert_ke_pytorch
from ke_tf.convert.reducenet_pytorch import convert_reducenet_pytorch
from ke_tf.io.params import ParamsError, save_params

# format: (converter, loader of a source file)
FORMATS = {
    "ke_pytorch": (convert_ke_pytorch, load_torch_state_dict),
    "reducenet_pytorch": (convert_reducenet_pytorch, load_torch_state_dict),
    "ekg_tf2": (convert_ekg_tf2, load_pickled_arrays),
}


def load_npz(path):
    """`{key: ndarray}` from an `.npz` (pickled objects refused)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise ParamsError(f"{path}: not a readable .npz of plain arrays ({e})") from None


def load_source(fmt, src):
    """`{key: ndarray}` of `src` (a path, or a dict passed through) in format `fmt`."""
    if isinstance(src, dict):
        return state_dict_arrays(src, "<dict>")
    path = os.fspath(src)
    return load_npz(path) if path.endswith(".npz") else FORMATS[fmt][1](path)


def convert_checkpoint(fmt, src, arch, out=None, dataset=None, **options):
    """Convert `src` (format `fmt`, see FORMATS) into a ke_tf model of `arch`; with `out`, write
    a params file (recording `dataset` for test.py). Returns (model, arrays, metadata)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown source format {fmt!r}; known: {', '.join(FORMATS)}")
    source = "<dict>" if isinstance(src, dict) else os.fspath(src)
    model, arrays, meta = FORMATS[fmt][0](load_source(fmt, src), arch, source=source, **options)
    if dataset:
        meta["data"] = {"name": dataset, "image_size": meta["model"]["input_shape"][0]}
    if out is not None:
        save_params(out, arrays, meta)
    return model, arrays, meta
