"""The branch analysis spends its slow evalf calls only where they can change the answer (no timing asserts:
each test counts calls or checks that a path is not taken)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sympy")
pytest.importorskip("flint")
import sympy as sp  # noqa: E402

from invact.fitting import branches, scan  # noqa: E402
from invact.fitting.errors import SpecError  # noqa: E402
from invact.fitting.formulas import X, get_spec  # noqa: E402


def test_far_float64_fault_of_f_is_refused_before_the_scan(monkeypatch):
    """softclip log((1 + exp(5x))/(1 + exp(5x - 5)))/5 overflows float64 for x >= 142 (inf/finite), and its
    f' is float64 noise on x in [8, 142] with ~1900 sign changes, each once confirmed by evalf (minutes)
    before value_at refused f at x = 142.083. The refusal now comes first, with the same message."""
    def no_scan(piece):
        raise AssertionError("the scan of f' ran before the float64 refusal")
    monkeypatch.setattr(branches, "monotone_parts", no_scan)
    spec = get_spec("log((1 + exp(a*x))/(1 + exp(a*(x - 1))))/a", "softclip", {"a": 5.0})
    with pytest.raises(SpecError, match=r"float64 cannot evaluate f at x = 142\.083 .*f is 1 there"):
        branches.analyze(spec)


def test_sign_changes_sharing_a_grid_point_evaluate_it_once(monkeypatch):
    """Neighbouring sign changes (i, i+1) and (i+1, i+2) of float64 noise share x[i+1]: evalf runs
    once per grid point, not once per change and side."""
    calls: list[float] = []

    def counting(expr, x):
        calls.append(x)
        return sp.Float(1.0)
    monkeypatch.setattr(scan, "precise", counting)
    change = scan._precise_change(X, np.array([1.0, 2.0, 3.0, 4.0]))
    assert [change(0, 1), change(1, 2), change(2, 3)] == [False, False, False]   # f' = +1 at all four
    assert sorted(calls) == [1.0, 2.0, 3.0, 4.0]


def test_branches_of_one_piece_solve_their_inverse_once(monkeypatch):
    """x**2's two branches share the expression: sympy's solve of x**2 = y runs once for both (tanh(x)**3's
    solve runs into the 30 s guard, and did so once a branch)."""
    from invact.fitting import exact
    if hasattr(exact, "_roots"):
        exact._roots.cache_clear()
    solve, calls = sp.solve, []

    def counting(*args, **kwargs):
        calls.append(args[0])
        return solve(*args, **kwargs)
    monkeypatch.setattr(sp, "solve", counting)
    spec = get_spec("x**2", "square", {})
    found = [exact.exact_expression(b, spec, "derivative") for b in branches.analyze(spec).branches]
    assert [str(g) for g in found] == ["-2*sqrt(y)", "2*sqrt(y)"]
    assert calls == [sp.Eq(X**2, exact.Y)]
