"""The README's "use the layers in your own model" example runs as written."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ast
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section_code(title):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_layers_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_section_code("Use the layers in your own model"), "README.md", "exec"), {})
    assert (tmp_path / "my_model.keras").is_file()
    printed = capsys.readouterr().out.strip().splitlines()
    full, slim = (ast.literal_eval(line) for line in printed[-2:])
    assert slim["macs"] < 0.3 * full["macs"]
