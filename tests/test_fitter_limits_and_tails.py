"""Limits of f' at x = +-inf that sympy and the extrapolation of f' at x = 2^k disagree on, and the
refusal of a tail whose g settles too slowly: each test failed before its fix; expectations come
from the mathematics of each formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("sympy")

import sympy as sp  # noqa: E402

from invact.fitting import limits  # noqa: E402
from invact.fitting.errors import FitError, SpecError  # noqa: E402
from invact.fitting.formulas import X, get_spec  # noqa: E402
from invact.fitting.numeric import numeric  # noqa: E402
from invact.fitting.pipeline import build_table  # noqa: E402


def _slow_fp():
    """f' of x/log(e + |x|): 1/L - sign(x) x / ((e + |x|) L^2), L = log(e + |x|), -> 0 like 1/log|x|."""
    e = sp.diff(X / sp.log(sp.E + sp.Abs(X)), X)
    return numeric(e), e


def test_a_limit_approached_like_one_over_log_is_sympys():
    """The doubling steps of 1/log|x| shrink by ~0.968 per octave, which the extrapolation took as
    geometric: it gave 0.0114, and that was kept over sympy's 0. f' at x = -1e300 is 1/log(1e300) -
    1/log(1e300)^2 = 0.00144, already below 0.0114: the values pass it, and approach 0."""
    f, e = _slow_fp()
    assert limits.value_at(f, -math.inf, e, "f'") == 0.0
    assert limits.value_at(f, math.inf, e, "f'") == 0.0


def test_a_limit_neither_candidate_is_told_apart_from_is_refused(monkeypatch):
    """Where the values out to |x| = 1e300 move towards both disagreeing candidates without passing
    either (1/log|x| falls towards 0 and -0.5 alike), no limit is stated: it was the extrapolated one."""
    f, e = _slow_fp()
    monkeypatch.setattr(limits, "_extrapolate", lambda fn, x: -0.5)
    with pytest.raises(SpecError, match=r"f''s limit as x -> -inf is uncertain: sympy's limit 0 and .* -0\.5"):
        limits.value_at(f, -math.inf, e, "f'")


def test_a_tail_too_slow_for_any_tolerance_offers_none():
    """x/log(e + |x|): g is still 1/log(1e15) - 1/log(1e15)^2 = 0.028 from its limit 0 at |x| = 1e15,
    so no --tolerance up to 1e-2 (4 x 0.028 would be needed) ends the tail there; the refusal offered
    'a looser --tolerance', and named the false limit 0.0114."""
    with pytest.raises(FitError, match=r"g does not settle to its limit 0 within") as info:
        build_table(get_spec("x/log(E + Abs(x))", name="t"), fp32_samples=4096)
    text = str(info.value)
    assert "--tolerance" not in text and "g is still 0.0281 from its limit" in text


def test_a_tail_a_looser_tolerance_ends_names_one_that_does():
    """x + x/(1000 log(e + |x|)): g - 1 ~ 1/(1000 log|x|) is 2.8e-5 at |x| = 1e15, so a tolerance of 4x
    that, rounded up, ends the tail there, and the fit it proposes succeeds."""
    spec = get_spec("x + x/(1000*log(E + Abs(x)))", name="t")
    with pytest.raises(FitError, match=r"--tolerance (\S+) or more would end the fit there") as info:
        build_table(spec, fp32_samples=4096)
    proposed = float(info.value.advice.split()[1])
    fp = numeric(sp.diff(spec.substituted(), X))
    gap = abs(float(fp(np.array([-1e15]))[0]) - 1.0)
    assert 4 * gap <= proposed <= 4 * gap * 1.1      # rounded up to two digits
    build_table(spec, tolerance=proposed, fp32_samples=4096)


# --- the layout search's first piece where g changes on a fine scale of x at the start ---------

@pytest.mark.parametrize("formula", [
    # f' = (0.5 + 0.6x + 0.15x^2 ...)/(1 + 0.2x + 0.01x^2)^2 rises smoothly 0.496 -> 5 on x >= 0 (a
    # double pole at x = -10), and g -> 5 like 1/y^2: the fitted part reaches x ~ 2.8e5
    "Piecewise((x + 0.02, x < 0), ((0.02 + 0.5*x + 0.3*x**2 + 0.05*x**3)/(1 + 0.2*x + 0.01*x**2), True))",
    # a flat point of order 2 at x = 0 (f' = x^2/(1 + x^2)), g -> 1 like 1/y^2 out to x ~ 9e3
    "x - atan(x)",
])
def test_a_branch_whose_first_piece_is_short_in_x_is_fitted(formula):
    """The greedy's pieces were searched linearly in x up to the far end of the fitted range (below
    1e6), so its shortest trial piece, 2^-14 of the way, ran from x = 0 to x ~ 17 (0.55): no degree
    met the tolerance there, and the branch was refused ('a looser tolerance would not help ...
    please report the formula'; x - atan(x) needed 1.1e-5). Where the linear steps find no piece, the
    search is retried in asinh(x), whose first steps are fine near the start. The certificate bounds
    every fitted piece by the tolerance (``build_table`` refuses a table whose bounds exceed it)."""
    table = build_table(get_spec(formula, name="t"), fp32_samples=4096)
    fitted = [b for b in table["branches"] if b["route"] == "fit"]
    assert fitted and all(b["pieces"] >= 1 for b in fitted)
    assert table["certificate"]["approx_error"] <= table["tolerance"]
