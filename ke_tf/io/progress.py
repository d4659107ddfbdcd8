"""Progress bars and log lines for long work, readable on a terminal and in a captured log.

On a terminal (stderr is a tty) bars are tqdm's. Otherwise (a cluster scheduler or CI writing the
output to a file) a bar writes no carriage-return updates: one plain line at most every
`PLAIN_INTERVAL_SECONDS` while it runs and, for bars that `leave` their result, one when it closes.
So an epoch shorter than the interval adds nothing beside the training loop's own epoch line.
"""

import sys
import time

from tqdm.auto import tqdm

PLAIN_INTERVAL_SECONDS = 60.0


def on_terminal(stream=None):
    """Whether `stream` (default: stderr, where bars go) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class PlainProgress:
    """The part of tqdm's interface ke_tf uses (`update`, `set_postfix`, `write`, `close`, `n`,
    context manager), reported as occasional plain lines on stderr."""

    def __init__(
        self, total=None, desc="", initial=0, unit="it", disable=False, leave=False, interval=PLAIN_INTERVAL_SECONDS
    ):
        self.total, self.desc, self.unit, self.disable, self.leave = total, desc, unit, disable, leave
        self.n = initial
        self.interval = interval
        self._initial = initial
        self._start = self._last_line = time.monotonic()
        self._postfix = {}
        self._closed = False

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._emit(now)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        self._postfix = {**(ordered_dict or {}), **kwargs}

    @staticmethod
    def write(s, file=None, end="\n"):
        print(s, file=file or sys.stdout, end=end, flush=True)

    def close(self):
        if not self._closed and self.leave:
            self._emit(time.monotonic())
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def line(self, now):
        """The progress line at time `now` (time.monotonic())."""
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        elapsed = now - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {done} {self.unit}{share}", f"{elapsed:.0f}s", f"{rate:.3g} {self.unit}/s"]
        parts += [f"{k}={v}" for k, v in self._postfix.items()]
        return ", ".join(parts)

    def _emit(self, now):
        if not self.disable:
            print(self.line(now), file=sys.stderr, flush=True)


def progress_bar(total=None, desc="", initial=0, unit="it", disable=False, leave=False):
    """A progress bar for `total` units of work starting at `initial` (tqdm on a terminal,
    `PlainProgress` otherwise)."""
    if not on_terminal():
        return PlainProgress(total=total, desc=desc, initial=initial, unit=unit, disable=disable, leave=leave)
    return tqdm(total=total, desc=desc, initial=initial, unit=unit, disable=disable, leave=leave, dynamic_ncols=True)


def log_line(message):
    """Print one line on stdout, flushed at once (so a captured log keeps the order of events)
    and without breaking a progress bar that is on screen."""
    if on_terminal():
        tqdm.write(message)
        sys.stdout.flush()
    else:
        print(message, flush=True)
