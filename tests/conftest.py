"""Test configuration: quiet TF logs, the `slow` marker (learning runs and multi-minute end-to-end
runs), and shared fixtures.

`pytest` runs the fast suite (under 15 minutes on 2 cores); `pytest -m slow` the rest (CI runs both).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ke_tf  # noqa: E402,F401  first: its host-memory setting acts only before TensorFlow's threads allocate


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: learning runs on real data and multi-minute end-to-end runs (run with -m slow)"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("markexpr"):
        return
    kept = [item for item in items if "slow" not in item.keywords]
    deselected = [item for item in items if "slow" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
