"""The malloc pad `import ke_tf` sets (ke_tf/engine/host_memory.py): applied once, obeys the
opt-out and the user's own glibc tuning, rejects a malformed value."""

import platform
import sys

import pytest

from ke_tf.engine import host_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.fixture
def fresh(monkeypatch):
    """host_memory as if not yet applied in this process, with no malloc variables set."""
    monkeypatch.setattr(host_memory, "_applied", [])
    for name in (host_memory.PAD_ENV, "MALLOC_TOP_PAD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.skipif(not GLIBC, reason="the pad is a glibc malloc setting")
def test_import_applied_the_default_pad_once():
    # tests/conftest.py imports ke_tf first, with no malloc variables set by the test runner.
    assert host_memory._applied == [host_memory.DEFAULT_PAD_MB << 20]
    assert host_memory.keep_freed_host_memory() == host_memory.DEFAULT_PAD_MB << 20


@pytest.mark.skipif(not GLIBC, reason="the pad is a glibc malloc setting")
def test_pad_from_the_environment_variable(fresh):
    fresh.setenv(host_memory.PAD_ENV, "32")
    try:
        assert host_memory.keep_freed_host_memory() == 32 << 20
        fresh.setenv(host_memory.PAD_ENV, "0")
        assert host_memory.keep_freed_host_memory() == 32 << 20  # once per process: the first call decides
    finally:  # the rest of the suite keeps the pad `import ke_tf` set
        host_memory.ctypes.CDLL(None).mallopt(host_memory.M_TOP_PAD, host_memory.DEFAULT_PAD_MB << 20)


@pytest.mark.parametrize(
    "env",
    [{host_memory.PAD_ENV: "0"}, {"MALLOC_TOP_PAD_": "1048576"}, {"GLIBC_TUNABLES": "glibc.malloc.top_pad=1048576"}],
)
def test_opt_out_and_the_users_own_tuning_leave_malloc_alone(fresh, env):
    calls = []
    fresh.setattr(host_memory.ctypes, "CDLL", lambda name: calls.append(name))
    for name, value in env.items():
        fresh.setenv(name, value)
    assert host_memory.keep_freed_host_memory() is None
    assert calls == []


def test_malformed_pad_names_the_variable(fresh):
    fresh.setenv(host_memory.PAD_ENV, "64MB")
    with pytest.raises(ValueError, match="KE_TF_MALLOC_TOP_PAD_MB must be a whole number of MiB, got '64MB'"):
        host_memory.keep_freed_host_memory()
