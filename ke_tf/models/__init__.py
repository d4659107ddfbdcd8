"""Model registry: `build_model(arch, ...)` builds any ke_tf architecture by name, and
`model_spec` records what is needed to rebuild it from a params file. A spec can also name a user's
own functional model (`ke_tf.models.user`: a `.keras` file or a `keras.applications` model)."""

from ke_tf.layers.factory import PLAIN
from ke_tf.models.resnet import CONFIGS as IMAGENET_DEPTHS
from ke_tf.models.resnet import imagenet_default_widths, resnet
from ke_tf.models.resnet_cifar import DEPTHS as CIFAR_DEPTHS
from ke_tf.models.resnet_cifar import cifar_default_widths, resnet_cifar
from ke_tf.models.user import build_user_model, is_user_spec, user_widths

_BUILDERS = {}
_DEFAULT_WIDTHS = {}


def register_arch(name, builder, default_widths):
    """Add an architecture: `builder(num_classes, input_shape, widths, layers, **options)`."""
    _BUILDERS[name] = builder
    _DEFAULT_WIDTHS[name] = default_widths


for _d in CIFAR_DEPTHS:
    register_arch(
        f"resnet{_d}",
        lambda num_classes, input_shape, widths, layers, _d=_d, **o: resnet_cifar(
            _d, num_classes, input_shape, widths, layers, **o
        ),
        lambda _d=_d, width_mult=1.0, **o: cifar_default_widths(_d, width_mult),
    )
for _d in IMAGENET_DEPTHS:
    register_arch(
        f"resnet{_d}",
        lambda num_classes, input_shape, widths, layers, _d=_d, **o: resnet(
            _d, num_classes, input_shape, widths, layers, **o
        ),
        lambda _d=_d, width_mult=1.0, **o: imagenet_default_widths(_d, width_mult),
    )


def available_archs():
    return sorted(_BUILDERS)


def _check_arch(arch):
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(available_archs())}")


def default_widths(arch, **options):
    """Channel-group widths of the unpruned `arch`."""
    _check_arch(arch)
    return _DEFAULT_WIDTHS[arch](**options)


def build_model(arch, num_classes, input_shape, widths=None, layers=PLAIN, **options):
    """Build `arch` as a functional Keras model; `widths` overrides channel groups (slim/pruned
    nets), `layers` swaps in split or gated layers, `options` are arch-specific keywords."""
    _check_arch(arch)
    if widths:
        unknown = sorted(set(widths) - set(default_widths(arch, **_width_options(options))))
        if unknown:
            raise ValueError(f"{arch}: unknown channel groups {unknown}")
    return _BUILDERS[arch](num_classes, tuple(input_shape), widths, layers, **options)


def _width_options(options):
    return {k: v for k, v in options.items() if k == "width_mult"}


def model_spec(arch, num_classes, input_shape, widths=None, **options):
    """Plain-data description of a model, stored in params metadata so it can be rebuilt."""
    return {
        "arch": arch,
        "num_classes": int(num_classes),
        "input_shape": [int(d) for d in input_shape],
        "widths": dict(widths) if widths else None,
        "options": dict(options),
    }


def spec_widths(spec):
    """Every channel-group width of `spec`: the arch's defaults, overridden by the spec's own
    `widths` (a slim or pruned net)."""
    if is_user_spec(spec):
        return user_widths(spec)
    defaults = default_widths(spec["arch"], **_width_options(spec.get("options", {})))
    return {**defaults, **(spec.get("widths") or {})}


def build_from_spec(spec, layers=PLAIN):
    """Inverse of `model_spec` (and of `ke_tf.models.user.user_model_spec`)."""
    if is_user_spec(spec):
        return build_user_model(spec, layers)
    return build_model(
        spec["arch"], spec["num_classes"], spec["input_shape"], spec.get("widths"), layers, **spec.get("options", {})
    )


import ke_tf.models.reducenet  # noqa: E402,F401  (registers reduce20/reduce56)
