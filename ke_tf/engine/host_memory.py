"""Keep freed host memory in the process while training on a CPU.

TensorFlow's CPU kernels allocate and free their tensor buffers on every step. glibc's malloc pads
an arena's top by only 128 KiB (M_TOP_PAD) before it gives memory back to the kernel, so each step
gives pages back and faults them in again, zeroed, and on a VM the page faults cost more than the
convolutions. A 64 MiB pad keeps that memory in the process. `import ke_tf` sets it: it only acts on
arenas made after it, i.e. before TensorFlow's thread pools first allocate (the measurement is in
the README's benchmark notes).
"""

import ctypes
import os
import platform
import sys

M_TOP_PAD = -2  # glibc's mallopt parameter number (malloc.h)
DEFAULT_PAD_MB = 64
PAD_ENV = "KE_TF_MALLOC_TOP_PAD_MB"  # 0 leaves glibc's own setting alone
_applied = []


def _user_set_glibc_malloc():
    """True when the process was started with its own malloc tuning, which wins over ours."""
    return "MALLOC_TOP_PAD_" in os.environ or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_host_memory():
    """Set glibc's M_TOP_PAD to KE_TF_MALLOC_TOP_PAD_MB (default 64) MiB, once per process.
    Returns the pad in bytes, or None where nothing was set: not Linux/glibc, the process was
    started with MALLOC_TOP_PAD_ or GLIBC_TUNABLES, or the variable is 0."""
    if _applied:
        return _applied[0]
    pad = None
    value = os.environ.get(PAD_ENV, str(DEFAULT_PAD_MB))
    if not value.isdigit():
        raise ValueError(f"{PAD_ENV} must be a whole number of MiB, got {value!r}")
    if (
        int(value)
        and sys.platform.startswith("linux")
        and platform.libc_ver()[0] == "glibc"
        and not _user_set_glibc_malloc()
    ):
        if ctypes.CDLL(None).mallopt(M_TOP_PAD, int(value) << 20) == 1:
            pad = int(value) << 20
    _applied.append(pad)
    return pad
