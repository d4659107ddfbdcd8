"""Typed experiment configs: YAML + `--set a.b=value` overrides -> validated dataclasses.

Unknown keys, wrong types and impossible values are rejected before any work starts, with the
dotted key in the message. Method loops add their own section with `register_section`; the
loops are imported on demand, the first time a config names a section not yet registered.
"""

import dataclasses
import os
import sys
import typing

import yaml


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key."""


@dataclasses.dataclass
class DataConfig:
    name: str = "digits"  # digits | fashion_mnist | cifar10 | cifar100 | oxford_flowers102 | image_folder
    data_dir: typing.Optional[str] = None
    image_size: typing.Optional[int] = None
    classes: typing.Optional[typing.List[int]] = None
    test_split: str = "tst"  # image_folder only: tst | val
    on_bad_file: str = "fail"  # fail | skip
    split_seed: int = 0  # the digits train/test split and the train_per_class subset
    train_per_class: typing.Optional[int] = None  # class-balanced training subset (all images if unset)

    def validate(self, key):
        _choice(f"{key}.on_bad_file", self.on_bad_file, ("fail", "skip"))
        _choice(f"{key}.test_split", self.test_split, ("tst", "val"))
        for name in ("image_size", "train_per_class"):
            if getattr(self, name) is not None:
                _positive(f"{key}.{name}", getattr(self, name))


USER_MODEL_METHODS = ("supervised", "evolution", "ekg")


@dataclasses.dataclass
class ModelConfig:
    arch: str = "resnet20"
    options: typing.Dict[str, typing.Any] = dataclasses.field(default_factory=dict)  # arch/application keywords
    # A user's own functional model instead of `arch` (which is then ignored), for the methods in
    # USER_MODEL_METHODS: a saved .keras file (loaded in safe mode), or a keras.applications name built
    # with weights=None, the data's input shape and classes, logits out and `options` (e.g. alpha).
    keras_file: typing.Optional[str] = None
    application: typing.Optional[str] = None

    def validate(self, key):
        if self.keras_file is not None and self.application is not None:
            raise ConfigError(f"{key}.keras_file and {key}.application are exclusive; set one")
        if self.keras_file is not None:
            self._validate_keras_file(key)
        elif self.application is not None:
            from ke_tf.models.user import check_application, check_application_options

            check_application(self.application, f"{key}.application")
            check_application_options(self.options, f"{key}.options")
        else:
            from ke_tf.models import available_archs

            _choice(f"{key}.arch", self.arch, tuple(available_archs()))

    def _validate_keras_file(self, key):
        if not self.keras_file.endswith(".keras"):
            raise ConfigError(f"{key}.keras_file must be a saved Keras model (.keras), got {self.keras_file!r}")
        if not os.path.isfile(self.keras_file):
            raise ConfigError(f"{key}.keras_file {self.keras_file}: no such file")
        if self.options:
            raise ConfigError(f"{key}.options does not apply to {key}.keras_file (the file holds the model)")

    @property
    def user_key(self):
        """`keras_file` or `application` when the config names a user's model, else None."""
        return "keras_file" if self.keras_file is not None else "application" if self.application is not None else None

    def check_method(self, key, method):
        """Refuse a user's model for a method that only builds ke_tf's own archs."""
        if self.user_key and method not in USER_MODEL_METHODS:
            raise ConfigError(
                f"{key}.{self.user_key} is supported by method {', '.join(USER_MODEL_METHODS)}, not {method!r}"
            )


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128  # global batch (all replicas, all micro-batches)
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "cosine"  # constant | cosine | step | logspace
    warmup_epochs: float = 0.0
    decay_epochs: typing.List[float] = dataclasses.field(default_factory=list)
    decay_factor: float = 0.1
    final_lr: float = 0.0  # cosine floor / logspace end value
    weight_decay: float = 5e-4
    weight_decay_mode: str = "coupled"  # coupled (L2 added to gradients, SGD+L2 recipes) | decoupled
    label_smoothing: float = 0.0
    accum_steps: int = 1
    # Steps run by one tf.function call (metrics read once per call). 0 = auto: about 2 s of work
    # per call, at most 100 steps; loops always stop at epoch ends and step checkpoints.
    steps_per_loop: int = 0
    # With >1 replica, BN batch statistics over the global batch ("on": N replicas compute what one
    # device computes) or per replica with the moving statistics averaged every step ("off").
    # "auto": on when a replica's micro-batch is below 32 images (README: Clusters; engine.trainer).
    sync_bn: str = "auto"
    # auto: on for GPUs; on CPUs timed both ways on the stage's own step, the faster kept and
    # cached per model and machine (engine.xla_choice) | on | off
    jit_compile: str = "auto"
    mixed_precision: str = "none"  # none | bf16 | fp16
    checkpoint_every_epochs: int = 1
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    # auto: resume from the newest checkpoint that restores, refusing checkpoints of another model
    # or config; restart: delete the stage's checkpoints and train from step 0 (engine.checkpoints).
    resume: str = "auto"
    eval_every_epochs: int = 1
    eval_batch_size: int = 256
    on_nan: str = "stop"  # stop | skip
    progress: bool = True

    def validate(self, key):
        _positive(f"{key}.epochs", self.epochs)
        _positive(f"{key}.batch_size", self.batch_size)
        _positive(f"{key}.accum_steps", self.accum_steps)
        _positive(f"{key}.eval_batch_size", self.eval_batch_size)
        if self.lr <= 0:
            raise ConfigError(f"{key}.lr must be > 0, got {self.lr}")
        for name in (
            "weight_decay",
            "warmup_epochs",
            "final_lr",
            "checkpoint_every_epochs",
            "checkpoint_every_steps",
            "steps_per_loop",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"{key}.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"{key}.momentum must be in [0, 1), got {self.momentum}")
        _choice(f"{key}.optimizer", self.optimizer, ("sgd", "adam"))
        _choice(f"{key}.schedule", self.schedule, ("constant", "cosine", "step", "logspace"))
        _choice(f"{key}.weight_decay_mode", self.weight_decay_mode, ("coupled", "decoupled"))
        _choice(f"{key}.jit_compile", self.jit_compile, ("auto", "on", "off"))
        _choice(f"{key}.mixed_precision", self.mixed_precision, ("none", "bf16", "fp16"))
        _choice(f"{key}.on_nan", self.on_nan, ("stop", "skip"))
        _choice(f"{key}.sync_bn", self.sync_bn, ("auto", "on", "off"))
        _choice(f"{key}.resume", self.resume, ("auto", "restart"))
        if self.schedule == "logspace" and self.final_lr <= 0:
            raise ConfigError(f"{key}.final_lr must be > 0 for the logspace schedule")
        if self.batch_size % self.accum_steps:
            raise ConfigError(
                f"{key}.batch_size {self.batch_size} is not divisible by {key}.accum_steps {self.accum_steps}"
            )


@dataclasses.dataclass
class DistributeConfig:
    strategy: str = "auto"  # auto | one_device | mirrored | multi_worker
    cpu_replicas: int = 0  # >1: split the CPU into logical devices (tests, debugging)

    def validate(self, key):
        _choice(f"{key}.strategy", self.strategy, ("auto", "one_device", "mirrored", "multi_worker"))
        if self.cpu_replicas < 0:
            raise ConfigError(f"{key}.cpu_replicas must be >= 0")


_SECTIONS = {}


def register_section(name, cls):
    """Let a method loop own the config section `name` (a dataclass with optional validate())."""
    _SECTIONS[name] = cls
    return cls


def _register_method_sections():
    """Import the method loops, each of which registers its section (on demand: a config can be
    loaded before any loop was imported)."""
    from ke_tf.methods import register_sections

    register_sections()


@dataclasses.dataclass
class Config:
    description: str = ""  # one line shown by `ke-tf-train --list`
    method: str = "supervised"
    seed: int = 1
    run_dir: str = "runs/default"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distribute: DistributeConfig = dataclasses.field(default_factory=DistributeConfig)
    sections: typing.Dict[str, typing.Any] = dataclasses.field(default_factory=dict)

    def section(self, name):
        """The method section `name` (defaults if absent from the YAML)."""
        if name not in self.sections:
            if name not in _SECTIONS:
                _register_method_sections()
            self.sections[name] = _SECTIONS[name]()
        return self.sections[name]

    def to_dict(self):
        d = dataclasses.asdict(self)
        d.update(d.pop("sections"))
        return d


def _choice(key, value, choices):
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _positive(key, value):
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _check_type(key, value, tp):
    """Validate `value` against a (simple) type annotation; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _check_type(key, value, next(a for a in args if a is not type(None)))
    if origin in (list, typing.List):
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (typing.Any,)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, raw, key):
    if not isinstance(raw, dict):
        raise ConfigError(f"{key} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        renamed = getattr(cls, "RENAMED_KEYS", {}).get(name)
        if renamed is not None and renamed not in raw:
            print(f"note: config key {key}.{name} is now {key}.{renamed}", file=sys.stderr)
            name = renamed
        if name not in fields:
            raise ConfigError(
                f"unknown config key {key + '.' if key else ''}{name} (known: {', '.join(sorted(fields))})"
            )
        tp = hints[name]
        full = f"{key}.{name}" if key else name
        kwargs[name] = _build(tp, value, full) if dataclasses.is_dataclass(tp) else _check_type(full, value, tp)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(key)
    return obj


def from_dict(raw):
    """Build and validate a Config from a plain dict (e.g. parsed YAML)."""
    raw = dict(raw or {})
    top_level = {f.name for f in dataclasses.fields(Config)}
    if any(name not in top_level and name not in _SECTIONS for name in raw):
        _register_method_sections()
    sections = {}
    for name in list(raw):
        if name in _SECTIONS:
            sections[name] = _build(_SECTIONS[name], raw.pop(name), name)
    cfg = _build(Config, raw, "")
    cfg.sections = sections
    _check_type("method", cfg.method, str)
    cfg.model.check_method("model", cfg.method)
    return cfg


def apply_overrides(raw, overrides):
    """Apply `a.b=value` strings (values parsed as YAML) to a raw config dict."""
    raw = dict(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        dotted, text = item.split("=", 1)
        node = raw
        parts = dotted.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def load_config(path, overrides=()):
    """Read a YAML file, apply overrides and validate."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    return from_dict(apply_overrides(raw, overrides))
