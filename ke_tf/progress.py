"""Progress bars and log lines for long work (a stub the engine codes against; see issue 17)."""
from tqdm.auto import tqdm


def progress_bar(total=None, desc="", initial=0, unit="it", disable=False, leave=False):
    """A tqdm bar for `total` units of work starting at `initial`."""
    return tqdm(total=total, desc=desc, initial=initial, unit=unit, disable=disable, leave=leave,
                dynamic_ncols=True)


def log_line(message):
    """Print one line without breaking a progress bar that is on screen."""
    tqdm.write(message)
