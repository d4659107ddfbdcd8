"""Results tables (markdown, CSV, JSON) and PNG plots; matplotlib is optional.

Only the chief process of a multi-worker run writes files (workers compute the same results)."""

import csv
import io
import json
import os
import warnings

from ke_tf.engine.strategy import chief_process
from ke_tf.io.params import atomic_write_bytes


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _fmt_readable(value):
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return _fmt(value)


def vertical_table(record):
    """A flat dict as two aligned columns, one `key | value` line per entry: a summary of many
    fields stays readable in a terminal or a log, where a one-row table of as many columns wraps."""
    rows = [(str(k), _fmt_readable(v)) for k, v in record.items()]
    key_width = max([len("key")] + [len(k) for k, _ in rows])
    value_width = max([len("value")] + [len(v) for _, v in rows])
    lines = [f"{'key':<{key_width}} | value", "-" * key_width + "-+-" + "-" * value_width]
    return "\n".join(lines + [f"{k:<{key_width}} | {v}" for k, v in rows])


def markdown_table(rows, columns=None):
    """Rows (dicts) as a markdown table."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_table(path_stem, rows, columns=None, summary=None):
    """Write `<stem>.md`, `<stem>.csv` and `<stem>.json` (rows plus an optional summary dict);
    returns the markdown text."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    md = markdown_table(rows, columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    if chief_process():
        atomic_write_bytes(path_stem + ".md", (md + "\n").encode())
        atomic_write_bytes(path_stem + ".csv", buf.getvalue().encode())
        atomic_write_bytes(
            path_stem + ".json",
            json.dumps({"rows": rows, **({"summary": summary} if summary else {})}, indent=1, default=float).encode(),
        )
    return md


def write_json(path, data):
    if chief_process():
        atomic_write_bytes(path, json.dumps(data, indent=1, default=float).encode())


def pyplot(path):
    """matplotlib.pyplot on the Agg backend, or None when this is not the chief process or (with
    a notice naming the skipped `path`) when matplotlib is not installed (extra `plot`)."""
    if not chief_process():
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib not installed (pip install ke_tf[plot]); skipping plot " + path, stacklevel=2)
        return None
    return plt


def save_figure(fig, path):
    """Write a matplotlib figure as PNG atomically and close it; returns the path."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_lines(path, x, series, xlabel, ylabel, title):
    """Line plot of `series` ({label: [y...]}) against `x` as a PNG (None without matplotlib);
    integer `x` (generations, tasks) gets integer ticks only."""
    plt = pyplot(path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series.items():
        ax.plot(x[: len(ys)], ys, marker="o", label=label)
    if all(float(v).is_integer() for v in x):  # generations, tasks, epochs, class counts
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
