"""The rules that keep numerical identity tests valid on any CPU (tests/numerics.py): identities
compare float64 results at float64 round-off, and no test compares training results in float32
with a tight tolerance unless it states the measured bound."""

import ast
import os

import numpy as np
import pytest

from tests.numerics import assert_identical, assert_within_measured_bound

HERE = os.path.dirname(os.path.abspath(__file__))
# Calls that train: a comparison of their results is a step equivalence.
TRAINING_CALLS = {"Trainer", "fit", "_train", "_worker", "_two_workers", "run_method", "train_stage", "train_command"}
TIGHT = 1e-3  # below this, a float32 comparison depends on the CPU's summation order


def test_identity_assertion_refuses_float32_results():
    a = np.ones(3)
    assert_identical(a, a + 1e-12)
    with pytest.raises(AssertionError, match="float64"):
        assert_identical(a.astype(np.float32), a)
    with pytest.raises(AssertionError):
        assert_identical(a, a + 1e-6)
    with pytest.raises(AssertionError, match="measurement"):
        assert_within_measured_bound(a, a, 1e-3, "")


def _name(call):
    return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")


def _defaults(function):
    """The function's keyword defaults that are numbers: a tolerance passed down as `tol`."""
    args = function.args.args[len(function.args.args) - len(function.args.defaults) :]
    return {a.arg: d.value for a, d in zip(args, function.args.defaults) if isinstance(d, ast.Constant)}


def _tight_float_comparisons(function):
    """Lines of `assert_allclose` calls in `function` whose tolerance is tight (a literal or a
    defaulted argument), or left at numpy's default rtol 1e-7."""
    defaults, lines = _defaults(function), []
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and _name(node) == "assert_allclose":
            tolerances = [k.value for k in node.keywords if k.arg in ("rtol", "atol")]
            values = [
                t.value if isinstance(t, ast.Constant) else defaults.get(getattr(t, "id", None)) for t in tolerances
            ]
            if not tolerances or any(v is not None and 0 < v < TIGHT for v in values):
                lines.append(node.lineno)
    return lines


def test_no_training_equivalence_is_compared_in_float32_without_a_measured_bound():
    """A test that trains and then compares with a tight `assert_allclose` is a float32 step
    equivalence: it must use `assert_identical` on float64 results, or
    `assert_within_measured_bound` with the measurement its bound comes from."""
    offenders = []
    for name in sorted(os.listdir(HERE)):
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            tree = ast.parse(f.read(), name)
        functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        for function in (f for n, f in functions.items() if n.startswith("test_")):
            called = {_name(n) for n in ast.walk(function) if isinstance(n, ast.Call)}
            if called & TRAINING_CALLS:  # the test's own comparisons and those of the helpers it calls
                for checked in [function] + [functions[n] for n in called if n in functions]:
                    offenders += [f"{name}:{line} ({function.name})" for line in _tight_float_comparisons(checked)]
    assert not offenders, "float32 training equivalences without a measured bound:\n" + "\n".join(offenders)
