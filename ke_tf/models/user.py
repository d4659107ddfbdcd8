"""A user's own functional Keras model as a ke_tf model spec, so the training loops and params files
take it like a registered arch: a saved `.keras` file (`model.keras_file`) or a `keras.applications`
constructor (`model.application`, built with `weights=None`).

The spec names the source, the data's input shape and classes and, for a narrowed net, the width of
each channel group of the source's `ChannelGraph`. `build_user_model` loads or builds the source,
checks it against the spec and keeps the first `w` channels of each narrowed group: KE's kels slim
net exactly, and the shape of any pruned net (whose params file holds the sliced weights).
"""

import inspect
import os

import keras

from ke_tf.config import ConfigError
from ke_tf.io.params import ParamsError, file_sha256
from ke_tf.layers.factory import LayerFactory
from ke_tf.layers.split import SplitLayerFactory
from ke_tf.surgery.deploy import deploy_model
from ke_tf.surgery.graph import ChannelGraph
from ke_tf.surgery.slicing import slice_channels
from ke_tf.surgery.split_model import split_model

USER_KEYS = ("keras_file", "application")
# Set by ke_tf from the data (and no pretrained download); not options of the application.
RESERVED_OPTIONS = ("weights", "input_shape", "input_tensor", "classes", "classifier_activation")


def is_user_spec(spec):
    """True for a spec of a user's model (not of a registered ke_tf arch)."""
    return any(key in spec for key in USER_KEYS)


def application_names():
    """The model constructors of `keras.applications` (a spec can name nothing else)."""
    return sorted(n for n, f in vars(keras.applications).items() if inspect.isfunction(f) and n[:1].isupper())


def check_application(name, key="model.application"):
    """Raise ConfigError naming `key` unless `name` is a `keras.applications` constructor."""
    if name not in application_names():
        raise ConfigError(f"{key}: unknown keras.applications model {name!r}; known: {', '.join(application_names())}")


def check_application_options(options, key="model.options"):
    """Refuse application keywords ke_tf sets itself."""
    reserved = sorted(set(options) & set(RESERVED_OPTIONS))
    if reserved:
        raise ConfigError(f"{key}.{reserved[0]} is set by ke_tf (weights=None, the data's shape and classes, logits)")


def user_model_spec(num_classes, input_shape, keras_file=None, application=None, options=None):
    """Spec of a user's model: `keras_file` (recorded by absolute path and SHA-256, so a params file
    rebuilds exactly the architecture it was trained with) or an `application` with its `options`."""
    spec = {"num_classes": int(num_classes), "input_shape": [int(d) for d in input_shape], "widths": None}
    if keras_file is not None:
        path = os.path.abspath(keras_file)
        return {"arch": os.path.basename(path), "keras_file": path, "sha256": file_sha256(path), **spec}
    check_application(application)
    return {"arch": application, "application": application, "options": dict(options or {}), **spec}


def _source(spec):
    """The spec's key and source, for messages."""
    key = "keras_file" if "keras_file" in spec else "application"
    return f"model.{key}", spec[key]


def _load_keras_file(spec):
    """The `.keras` model of `spec` (safe mode: no code from the file), refusing a changed file."""
    path = spec["keras_file"]
    if not os.path.isfile(path):
        raise ParamsError(f"model.keras_file {path}: no such file (the net's architecture is read from it)")
    if file_sha256(path) != spec["sha256"]:
        raise ParamsError(f"model.keras_file {path} has changed since this net was trained with it (SHA-256 differs)")
    return keras.saving.load_model(path, compile=False, safe_mode=True)


def _build_application(spec):
    """The `keras.applications` model of `spec`: untrained, the data's shape and classes, logits."""
    check_application(spec["application"])
    check_application_options(spec["options"])
    constructor = getattr(keras.applications, spec["application"])
    return constructor(
        weights=None,
        input_shape=tuple(spec["input_shape"]),
        classes=spec["num_classes"],
        classifier_activation=None,
        **spec["options"],
    )


def _outputs_probabilities(model):
    """True when `model`'s output is a softmax (ke_tf's losses take logits)."""
    layer = model.outputs[0]._keras_history[0]
    softmax = keras.activations.get("softmax")
    return isinstance(layer, keras.layers.Softmax) or getattr(layer, "activation", None) is softmax


def check_fits(model, spec):
    """Raise ConfigError, naming the key, the source and the shapes, unless `model` takes the spec's
    input shape and outputs one logit per class."""
    key, source = _source(spec)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConfigError(f"{key} {source}: the model must have one input and one output (logits)")
    given = (tuple(model.inputs[0].shape[1:]), model.outputs[0].shape[-1])
    expected = (tuple(spec["input_shape"]), spec["num_classes"])
    if given != expected or len(model.outputs[0].shape) != 2:
        raise ConfigError(
            f"{key} {source}: the model takes input {given[0]} and outputs {tuple(model.outputs[0].shape[1:])}, "
            f"but the data gives images {expected[0]} of {expected[1]} classes"
        )
    if _outputs_probabilities(model):
        raise ConfigError(f"{key} {source}: the model ends in a softmax; ke_tf trains on logits (remove the softmax)")


def base_model(spec):
    """The user's model of `spec` at full width, checked against the spec's data."""
    model = _load_keras_file(spec) if "keras_file" in spec else _build_application(spec)
    check_fits(model, spec)
    return model


def default_user_widths(model):
    """{group: channels} of every prunable channel group of `model` (the unpruned widths)."""
    return {name: group.channels for name, group in ChannelGraph(model).prunable().items()}


def user_widths(spec):
    """Every prunable group's width of the user's model of `spec` (defaults overridden by `widths`)."""
    return {**default_user_widths(base_model(spec)), **(spec.get("widths") or {})}


def _with_layers(model, layers, spec):
    """`model` with the layer kind of a ke_tf factory, through the graph surgery that makes it: split
    layers for KE (`split_model`), BN folded for export (`deploy_model`), else plain."""
    from ke_tf.surgery.folding import FoldedLayerFactory  # (imports ke_tf.models)

    if isinstance(layers, SplitLayerFactory):
        return split_model(model, layers.split_rate, layers.split_mode, layers.seed)
    if isinstance(layers, FoldedLayerFactory):
        return deploy_model(model)
    if type(layers) is not LayerFactory:
        raise ValueError(
            f"{_source(spec)[1]}: a user's model takes plain, split or folded layers, not {type(layers).__name__} "
            "(gates: ke_tf.surgery.gating.insert_gates)"
        )
    return model


def build_user_model(spec, layers):
    """The user's model of `spec`, its groups narrowed to the spec's widths (first channels kept),
    with `layers`' kind (a `SplitLayerFactory` splits it with its rate, mode and seed)."""
    model = base_model(spec)
    widths = spec.get("widths") or {}
    if widths:
        model = slice_channels(model, {group: range(width) for group, width in widths.items()})
    return _with_layers(model, layers, spec)
