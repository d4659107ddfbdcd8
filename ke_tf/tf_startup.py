"""Import TensorFlow without its start-up chatter when a ke_tf command runs (ke_tf/__init__.py
calls this first; a program that merely imports ke_tf keeps TensorFlow's own logging).

TF_CPP_MIN_LOG_LEVEL (default here: 3, errors that do not stop the run stay silent) filters TF's
C++ logs once it is loaded, but the lines its libraries print while loading (absl's "All log
messages before absl::InitializeLog()" banner, the oneDNN notice, `cudart_stub`, each twice)
ignore it. So the import runs with stderr captured, and the captured lines TF_CPP_MIN_LOG_LEVEL
would have filtered are dropped; everything else is written back. TF_CPP_MIN_LOG_LEVEL=0, or
`--verbose` on the command line of a ke_tf command (read here: it must act before TensorFlow
loads, which importing ke_tf does before the command parses its arguments), keeps all.
"""

import os
import re
import sys
import tempfile

DEFAULT_LEVEL = "3"
COMMANDS = ("ke-tf-train", "ke-tf-test", "ke-tf-export", "train_cifar.py", "train_flower.py", "test.py", "export.py")
MODULE_COMMANDS = ("ke_tf.convert", "ke_tf.export")
_SEVERITY = "IWEF"  # absl's INFO, WARNING, ERROR, FATAL = TF_CPP_MIN_LOG_LEVEL 0..3
_ABSL_LINE = re.compile(r"([IWEF])\d{4} [\d:.]+ +\d+ [^\]\s]+:\d+\] ")
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def filter_startup_lines(text, min_level):
    """`text` without the absl log lines below `min_level` (0-3) and, above 0, absl's banner."""
    kept = []
    for line in text.splitlines(keepends=True):
        match = _ABSL_LINE.match(line)
        if match and _SEVERITY.index(match.group(1)) < min_level:
            continue
        if min_level > 0 and line.rstrip("\r\n") == _ABSL_BANNER:
            continue
        kept.append(line)
    return "".join(kept)


def _is_command(argv):
    if bool(argv) and os.path.basename(argv[0]) in COMMANDS:
        return True
    # `python -m ke_tf.convert`: while the package imports, argv[0] is only "-m".
    orig = getattr(sys, "orig_argv", [])
    return "-m" in orig[:-1] and orig[orig.index("-m") + 1] in MODULE_COMMANDS


def _min_level(argv):
    if "--verbose" in argv[1:]:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    level = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_LEVEL)
    return int(level) if level.isdigit() else 0


def import_tensorflow():
    """Import TensorFlow (a no-op if it already is) at the log level described above."""
    if "tensorflow" in sys.modules:
        return
    if not _is_command(sys.argv):
        import tensorflow  # noqa: F401

        return
    min_level = _min_level(sys.argv)
    if min_level == 0:
        import tensorflow  # noqa: F401

        return
    try:
        # A file, not a pipe: a pipe nobody reads while TF loads could fill up and block the import.
        captured = tempfile.TemporaryFile()
        saved = os.dup(2)
    except OSError:  # nowhere to capture to, or no stderr to capture
        import tensorflow  # noqa: F401

        return
    sys.stderr.flush()
    with captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            sys.stderr.write(filter_startup_lines(captured.read().decode(errors="replace"), min_level))
            sys.stderr.flush()
