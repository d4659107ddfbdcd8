"""The commands as a user meets them: shipped configs by name from any directory, quiet TensorFlow
start-up, progress that suits a captured log, a readable summary, and a wheel that installs them."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from ke_tf.config import ConfigError
from ke_tf.io.progress import PlainProgress, log_line, progress_bar
from ke_tf.io.report import plot_lines, vertical_table
from ke_tf.shipped_configs import RENAMED, describe, resolve_config, shipped_configs
from ke_tf.tf_startup import filter_startup_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_LINE = re.compile(r"^[IWEF]\d{4} ", re.M)

# What TF 2.21 prints while it loads on a CPU machine (shortened), then a Python warning.
STARTUP = """WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795485076.508117   26126 port.cc:153] oneDNN custom operations are on.
I0000 00:00:1795485076.508453   26126 cudart_stub.cc:31] Could not find cuda drivers on your machine.
W0000 00:00:1795485076.600000   26126 dataset.cc:997] Input of GeneratorDatasetOp will not be optimized.
E0000 00:00:1795485079.316926   26126 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)
/site-packages/x.py:3: UserWarning: something the user should see
"""


def test_startup_filter_keeps_what_the_log_level_allows():
    lines = STARTUP.splitlines(keepends=True)
    assert filter_startup_lines(STARTUP, 0) == STARTUP
    assert filter_startup_lines(STARTUP, 1) == "".join(lines[3:])
    assert filter_startup_lines(STARTUP, 2) == "".join(lines[4:])
    assert filter_startup_lines(STARTUP, 3) == lines[5]


def _command_stderr(tmp_path, *argv):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "test.py"), "--help", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "--trained_param" in done.stdout, done.stderr[-2000:]
    return done.stderr


def test_commands_keep_tensorflow_startup_quiet_unless_verbose(tmp_path):
    verbose = _command_stderr(tmp_path, "--verbose")
    assert ABSL_LINE.search(verbose), "TF printed no start-up lines, so this test shows nothing"
    quiet = _command_stderr(tmp_path)
    assert not ABSL_LINE.search(quiet) and "absl::InitializeLog" not in quiet, quiet


def test_python_m_ke_tf_convert_is_a_quiet_command(monkeypatch):
    from ke_tf import tf_startup

    # While `python -m` imports the package, sys.argv[0] is just "-m": the module comes from orig_argv.
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "ke_tf.convert", "--from", "x"], raising=False)
    assert tf_startup._is_command(["-m", "--from", "x"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "pytest"], raising=False)
    assert not tf_startup._is_command(["-m"])


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_progress_writes_one_line_per_interval(monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr("ke_tf.io.progress.time.monotonic", clock)
    with PlainProgress(total=100, desc="train epoch 1/2", unit="step", interval=30) as bar:
        for _ in range(100):
            clock.now += 1.0
            bar.update(1)
            bar.set_postfix(loss="0.5000")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"train epoch 1/2: {n}/100 step ({n}%), {n}s, 1 step/s, loss=0.5000" for n in (30, 60, 90)]
    assert bar.n == 100


def test_plain_progress_left_bars_close_with_a_line_and_disabled_bars_are_silent(monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr("ke_tf.io.progress.time.monotonic", clock)
    bar = PlainProgress(desc="features", unit="img", leave=True)
    clock.now = 4.0
    bar.update(360)
    bar.close()
    bar.close()
    with PlainProgress(total=10, initial=4, unit="step", interval=0, disable=True, leave=True) as quiet:
        quiet.update(6)
    assert quiet.n == 10
    assert capsys.readouterr().err == "features: 360 img, 4s, 90 img/s\n"


def test_progress_bar_is_tqdm_on_a_terminal_and_plain_in_a_captured_log(monkeypatch, capsys):
    from tqdm.auto import tqdm

    bar = progress_bar(total=3, desc="x")
    assert isinstance(bar, PlainProgress)
    bar.update(3)
    bar.close()
    log_line("epoch line")
    out, err = capsys.readouterr()
    assert out == "epoch line\n" and err == ""

    class Terminal:
        def isatty(self):
            return True

        def write(self, s):
            pass

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Terminal())
    terminal_bar = progress_bar(total=3, desc="x")
    assert isinstance(terminal_bar, tqdm)
    terminal_bar.close()


def test_vertical_table():
    assert vertical_table({"method": "supervised", "test_top1": 0.975, "macs": 40551040}).splitlines() == [
        "key       | value",
        "----------+-----------",
        "method    | supervised",
        "test_top1 | 0.9750",
        "macs      | 40,551,040",
    ]


def test_plots_of_generations_get_integer_ticks(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    figures = []
    monkeypatch.setattr("ke_tf.io.report.save_figure", lambda fig, path: figures.append(fig) or path)
    plot_lines(str(tmp_path / "g.png"), [1, 2, 3, 4], {"top-1": [0.1, 0.4, 0.8, 0.9]}, "generation", "top-1", "t")
    plot_lines(str(tmp_path / "m.png"), [40.5, 31.2, 20.3], {"loss": [0.2, 0.3, 0.5]}, "MACs (M)", "loss", "t")
    generation_ticks = [t for t in figures[0].axes[0].get_xticks() if 1 <= t <= 4]
    assert len(generation_ticks) >= 2 and all(float(t).is_integer() for t in generation_ticks)
    assert not all(float(t).is_integer() for t in figures[1].axes[0].get_xticks())


def test_shipped_configs_are_the_repository_configs_each_described():
    shipped = shipped_configs()
    assert sorted(shipped) == sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml"))
    for name, path in shipped.items():
        assert os.path.samefile(path, os.path.join(ROOT, "configs", name + ".yaml"))
        text = describe(path)
        assert text and "\n" not in text and len(text) <= 120, (name, text)


def test_config_is_a_path_or_a_shipped_name_from_any_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    shipped = os.path.join(ROOT, "configs", "digits_resnet20_supervised.yaml")
    assert os.path.samefile(resolve_config("digits_resnet20_supervised"), shipped)
    assert os.path.samefile(resolve_config("digits_resnet20_supervised.yaml"), shipped)
    (tmp_path / "digits_resnet20_supervised.yaml").write_text("method: supervised\n")
    assert resolve_config("digits_resnet20_supervised.yaml") == "digits_resnet20_supervised.yaml"  # a file wins
    with pytest.raises(
        ConfigError, match=r"config digits_resnet20_supervize not found: .*shipped: .*digits_resnet20_supervised"
    ):
        resolve_config("digits_resnet20_supervize")
    with pytest.raises(
        ConfigError,
        match=r"config file configs/digits_resnet20_ke.yaml not found; .*"
        r"--config digits_resnet20_ke",
    ):
        resolve_config("configs/digits_resnet20_ke.yaml")


def test_list_shows_each_shipped_config_with_its_description(monkeypatch, tmp_path, capsys):
    from ke_tf.cli import train_command

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ke-tf-train", "--list"])
    assert train_command() is None  # a console script exits with this value: status 0
    listed, renamed = capsys.readouterr().out.split("\n\nRenamed (the old names still work until ke_tf 0.2):\n")
    lines = listed.splitlines()
    assert len(lines) == len(shipped_configs())
    for line, (name, path) in zip(lines, shipped_configs().items()):
        assert line.split(None, 1) == [name, describe(path)]
    assert [line.split() for line in renamed.splitlines()] == [[old, "->", new] for old, new in RENAMED.items()]
    assert set(RENAMED.values()) <= set(shipped_configs())


def test_a_renamed_config_still_resolves_with_a_note(capsys):
    assert resolve_config("quickstart_ke_digits") == shipped_configs()["digits_resnet20_ke"]
    assert "config quickstart_ke_digits is now called digits_resnet20_ke" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script,config", [("train_cifar", "cifar10_resnet56_ekg"), ("train_flower", "flower102_resnet18_ke")]
)
def test_scripts_find_their_default_config_from_another_directory(monkeypatch, tmp_path, capsys, script, config):
    import importlib

    loaded = []

    def load_config(path, overrides=()):
        loaded.append(path)
        raise ConfigError("stop here")

    monkeypatch.setattr("ke_tf.config.load_config", load_config)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(script).main([])
    assert exc.value.code == 2 and capsys.readouterr().err == "error: stop here\n"
    assert os.path.samefile(loaded[0], os.path.join(ROOT, "configs", config + ".yaml"))


def test_ke_tf_train_requires_a_config(monkeypatch, capsys):
    from ke_tf.cli import train_command

    monkeypatch.setattr(sys, "argv", ["ke-tf-train"])
    with pytest.raises(SystemExit) as exc:
        train_command()
    assert exc.value.code == 2 and "--config is required" in capsys.readouterr().err


# ---- the wheel, as a cluster job gets it ---------------------------------------------------------
def _run(command, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_wheel_runs_the_quickstart_by_name_from_an_unrelated_directory(tmp_path):
    """Build a wheel from the sources, install it (and only it) into a fresh venv that borrows the
    heavy dependencies of this environment, train the digits quickstart through `ke-tf-train` by
    config name from another directory with the output captured as a scheduler would, and
    evaluate the result with `ke-tf-test`."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # what an sdist holds; building here leaves the checkout clean
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    for name in ("ke_tf", "configs"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ]
    )
    (wheel,) = (tmp_path / "dist").glob("ke_tf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for config in shipped_configs():
        assert f"ke_tf/configs/{config}.yaml" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for command in ("ke-tf-train", "ke-tf-test", "ke-tf-export"):
        assert command in entry_points

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    venv_site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # Dependencies (TensorFlow, ...) from this environment, after the venv's own site-packages.
    borrowed = dict.fromkeys(site.getsitepackages() + [sysconfig.get_paths()["purelib"]])
    with open(os.path.join(venv_site, "borrowed_dependencies.pth"), "w") as f:
        f.write("\n".join(borrowed) + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONPATH")}
    bin_dir = venv / "bin"
    where = _run(
        [python, "-c", "import ke_tf.shipped_configs as s; print(s.__file__); print(s.configs_dir())"],
        cwd=elsewhere,
        env=env,
    ).stdout.split()
    assert all(p.startswith(venv_site) for p in where), where
    listed = _run([str(bin_dir / "ke-tf-train"), "--list"], cwd=elsewhere, env=env).stdout
    listed = listed.split("\n\nRenamed")[0]
    assert sorted(line.split()[0] for line in listed.splitlines()) == sorted(shipped_configs())

    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:  # stdout and stderr into one file, as a batch scheduler does
        done = subprocess.run(
            [
                str(bin_dir / "ke-tf-train"),
                "--config",
                "digits_resnet20_supervised",
                "--set",
                "train.epochs=1",
                "--set",
                "data.image_size=16",
                "--set",
                "run_dir=run",
            ],
            cwd=elsewhere,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    text = log_path.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text and not ABSL_LINE.search(text) and "absl::" not in text, text
    assert "retracing" not in text, text
    lines = text.splitlines()
    assert lines[0].startswith(f"config {venv_site}/ke_tf/configs/digits_resnet20_supervised.yaml"), lines[0]
    assert sum("epoch 1/1" in line for line in lines) == 1, text
    summary = json.loads((elsewhere / "run" / "results.json").read_text())["summary"]
    assert f"test_top1   | {summary['test_top1']:.4f}" in lines, text

    evaluated = _run(
        [str(bin_dir / "ke-tf-test"), "--trained_param", "run/trained_params.pkl", "--json", "e.json"],
        cwd=elsewhere,
        env=env,
    )
    assert not ABSL_LINE.search(evaluated.stderr) and "absl::" not in evaluated.stderr, evaluated.stderr
    result = json.loads((elsewhere / "e.json").read_text())
    assert result["test_top1"] == pytest.approx(summary["test_top1"]) and result["examples"] == 360
    assert f"Top-1: {100 * summary['test_top1']:.2f}%" in evaluated.stdout
    assert "--trained_param" in _run([str(bin_dir / "ke-tf-export"), "--help"], cwd=elsewhere, env=env).stdout
