"""The experiment configs shipped with ke_tf and `--config` resolution (a path or a shipped name).

The repository's configs/ is the only copy: setup.py installs it as package data `ke_tf/configs`,
and a checkout or an editable install reads it where it is.
"""

import os
import sys

import yaml

from ke_tf.config import ConfigError

SUFFIX = ".yaml"
# Configs are named <dataset>_<arch>_<method>. The names before that scheme still resolve, with a
# note, for one release (until 0.2).
RENAMED = {
    "cifar100_lwm": "cifar100_resnet32_lwm",
    "cifar10_ban": "cifar10_resnet20_ban",
    "cifar10_consistency": "cifar10_resnet56_consistency",
    "cifar10_kd": "cifar10_resnet20_kd",
    "cifar10_reducenet20": "cifar10_reduce20_reducenet",
    "cifar10_resnet56": "cifar10_resnet56_supervised",
    "quickstart_consistency_digits": "digits_resnet20_consistency",
    "quickstart_digits": "digits_resnet20_supervised",
    "quickstart_ekg_digits": "digits_resnet20_ekg",
    "quickstart_kd_digits": "digits_resnet20_kd",
    "quickstart_ke_digits": "digits_resnet20_ke",
    "quickstart_lwm_digits": "digits_resnet20_lwm",
    "quickstart_reducenet_digits": "digits_reduce20_reducenet",
}


def configs_dir():
    """ke_tf/configs of an installed package, or configs/ beside ke_tf/ in a checkout."""
    package = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(package, "configs"), os.path.join(os.path.dirname(package), "configs")):
        if os.path.isdir(candidate):
            return candidate
    raise ConfigError(f"no shipped configs next to {package} (ke_tf/configs or ../configs)")


def shipped_configs():
    """{name: path} of the shipped configs, sorted by name."""
    folder = configs_dir()
    return {f[: -len(SUFFIX)]: os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(SUFFIX)}


def describe(path):
    """The config's one-line `description`."""
    with open(path, encoding="utf-8") as f:
        return str((yaml.safe_load(f) or {}).get("description", ""))


def resolve_config(name_or_path):
    """An existing file `name_or_path`, else the shipped config of that name (`.yaml` optional)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = shipped_configs()
    base = os.path.basename(name_or_path)
    name = base[: -len(SUFFIX)] if base.endswith(SUFFIX) else base
    if not os.path.dirname(name_or_path):  # a bare name
        if name in shipped:
            return shipped[name]
        if name in RENAMED:
            print(f"note: config {name} is now called {RENAMED[name]}; the old name goes in ke_tf 0.2", file=sys.stderr)
            return shipped[RENAMED[name]]
        raise ConfigError(
            f"config {name_or_path} not found: no such file and no shipped config of that name "
            f"(shipped: {', '.join(shipped)}; --list describes them)"
        )
    hint = f"; the shipped config of that name runs with --config {name}" if name in shipped else ""
    raise ConfigError(f"config file {name_or_path} not found{hint}")
