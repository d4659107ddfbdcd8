"""SIGINT/SIGTERM during a stage are remembered, not acted on, until the running loop of steps
returns; the Trainer then writes a checkpoint and stops (every worker at the same step)."""

import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """`with StopSignals() as s:` catches SIGINT/SIGTERM into `s.received` (the signal number,
    None until one arrives) and restores the previous handlers on exit. Outside the main thread
    Python cannot install handlers, and the previous ones stay."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def _catch(self, signum, frame):
        self.received = signum

    def __enter__(self):
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._catch)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False
