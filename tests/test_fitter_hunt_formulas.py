"""Formulas a hunt for new activations found mishandled, and the mechanisms behind them: a branch
narrower in y than the allowance for the noise of its ends (one code for branches y cannot tell
apart), an f' whose float64 terms overflow where f' is 1, sympy's quartic and casus irreducibilis
roots (minutes of simplification, decided by the clock), an f beyond float64's range that is no
float64 fault, and the float32 figure the CLI called an error (a sample). Each test failed before
its fix, except the guards of what must not change (marked so); expectations come from the
mathematics of each formula."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

sp = pytest.importorskip("sympy")

from invact.fitting import exact, fit, numeric  # noqa: E402
from invact.fitting.branches import analyze  # noqa: E402
from invact.fitting.errors import SpecError  # noqa: E402
from invact.fitting.formulas import BUILTINS, X, get_spec  # noqa: E402
from invact.fitting.pipeline import build_table  # noqa: E402
from helpers import CHEAP, invact_cli  # noqa: E402

GENERATED = Path(__file__).resolve().parents[1] / "generated" / "tables"


def _codes(formula: str) -> list[int]:
    return [b.code for b in analyze(get_spec(formula, "t", {})).branches]


# --- 1. a branch narrower in y than its ends' noise allowance -------------------------------------

def test_a_tiny_middle_branch_gets_a_code_and_certifies(tmp_path, capsys):
    """x**3 - 1e-6*x's middle branch spans y in +-3.85e-10 (x in +-5.77e-4). Its y overlap with either
    outer branch, its whole width, was under the absolute 1e-9 the code assignment allowed for the
    noise of touching ends: all three branches took one code, the code class's segments overlapped,
    and certification found g missed by 7e-7 (an internal error, exit 1). Three codes now: the outer
    branches overlap each other in y too (on the same +-3.85e-10)."""
    assert _codes("x**3 - 1e-6*x") == [2, 1, 0]
    status, out, err = invact_cli(capsys, "fit", "x**3 - 1e-6*x", "--name", "tiny", "--root", tmp_path / "r",
                                  "--no-generate", *CHEAP)
    assert status == 0, err
    assert "3 branches, 3 codes (2 bits)" in out, out


def test_a_branch_its_flat_tails_cover_is_one_constant():
    """x**3 - 1e-16*x's middle branch: |g| <= 1e-16 on y in +-3.85e-25, so the flat tails from its two
    ends (g within tolerance / 4 of 0) meet, and it was refused with 'no y range is left to fit ...; use
    a smaller --tolerance', which no tolerance changes. It is one constant 0 now, certified."""
    table = build_table(get_spec("x**3 - 1e-16*x", "t16", {}), fp32_samples=4096)
    middle = table["branches"][1]
    assert middle["route"] == "fit" and middle["pieces"] == 0 and [t["value"] for t in middle["tails"]] == ["0.0"]
    assert table["certificate"]["branches"][1]["approx_error"] <= 1e-16


def test_branches_y_cannot_tell_apart_get_codes_of_their_own_away_from_zero():
    """x**3 + 2e-4*x**2 - 1e-6*x + 1: the same tiny middle branch at y = 1 +- ~4e-10, where a relative
    1e-9 allowance is wider than it. At y = 1 (float32 y of every x in it) the three branches' g are
    f' at the roots of x**2 + 2e-4*x - 1e-6 = 0 and at x = 0: 2.2e-6, 1.8e-6 and -1e-6, 60 and more
    tolerances (5e-8) apart. One code for all three (the old allowance) gave the outer branches'
    x the middle branch's -1e-6, in a table certified without a miss (each branch checks only the y
    its code class gives it)."""
    xs = [(-2e-4 - math.sqrt(4e-8 + 4e-6)) / 2, 0.0, (-2e-4 + math.sqrt(4e-8 + 4e-6)) / 2]
    g = [3 * x * x + 4e-4 * x - 1e-6 for x in xs]
    assert min(abs(a - b) for a, b in [(g[0], g[1]), (g[1], g[2]), (g[0], g[2])]) > 5 * 5e-8
    assert _codes("x**3 + 2e-4*x**2 - 1e-6*x + 1") == [2, 1, 0]


def test_touching_branches_still_share_a_code():
    """A guard: the allowance for ends that touch stays: softplus's two pieces meet with a jump of 2.1e-9 at its
    threshold (log(1 + e^20) - 20), which the continuity check lets pass, so they share one code; a
    plateau between two ramps (y = 0 at both its ends) shares the ramps' code."""
    assert [b.code for b in analyze(BUILTINS["softplus"]).branches] == [0, 0]
    assert _codes("Piecewise((x, x < 0.1), (0.1, x < 0.3), (x - 0.2, True))") == [0, 0, 0]


def test_a_flat_end_touching_another_branch_gets_a_code_of_its_own(tmp_path, capsys):
    """Review r3: 1 - x**2 (x < 0) rises flatly to y = 1 at x = 0 (a sqrt end: g -> 0), and the branch
    of x > 1 starts at y = 1 - 5e-13 (within the ends' noise, exactly 1 in float32) with g = 0.01. One code
    for both gave every x of |x| < 1.7e-4 (float32 y = 1) the gradient 0.01 where f' is below 3.4e-4; with
    a code of its own the flat branch's g at y = 1 is its f' (0 at the end), within the information floor
    there (f'(x) for the x whose float32 y is 1: at most 2*sqrt(6e-8) = 4.9e-4). The same holds for branches
    that touch exactly (the middle plateau is y = 1 - 5e-13*(3x^2 - 2x^3), nearly flat)."""
    formula = "Piecewise((1 - x**2, x < 0), (1 - 5e-13*(3*x**2 - 2*x**3), x < 1), (1 - 5e-13 + 0.01*(x - 1), True))"
    codes = _codes(formula)
    assert codes[0] != codes[2], codes
    assert _codes("Piecewise((1 - x**2, x < 0), (1, x < 1), (1 + 0.01*(x - 1), True))")[0] != 0


# --- 2. an f' whose float64 terms overflow ------------------------------------------------------

def test_silu_written_with_exp_x_has_a_finite_f_prime():
    """x*exp(x)/(1 + exp(x)) is SiLU; its f' holds x*exp(2x)/(1 + exp(x))**2, inf/inf or inf/finite from
    x = 354.4 in float64 while f' -> 1 (the error measured there was inf). Its float64 f' is now
    finite and within a few ulps of sigma(x)(1 + x sigma(-x)) (terms of size |x| cancel: |x| ulps)."""
    f = sp.sympify("x*exp(x)/(1 + exp(x))", locals={"x": X})
    xs = np.array([-800.0, -30.0, -1.0, 0.5, 20.0, 354.5, 400.0, 800.0])
    got = numeric.numeric(sp.diff(f, X))(xs)
    with np.errstate(over="ignore"):
        s = 1 / (1 + np.exp(-xs))
    want = s * (1 + xs * (1 - s))
    assert np.all(np.abs(got - want) <= 8 * np.finfo(float).eps * np.maximum(1.0, np.abs(xs)))


def test_silu_written_with_exp_x_fits(tmp_path, capsys):
    """It fitted no table ('g is not smooth enough here ...; please report the formula'); it fits as
    x/(1 + exp(-x)) does: two branches, two codes."""
    status, out, err = invact_cli(capsys, "fit", "x*exp(x)/(1 + exp(x))", "--name", "silu2", "--root",
                                  tmp_path / "r", "--no-generate", *CHEAP)
    assert status == 0, err
    assert "2 branches, 2 codes (1 bits)" in out, out


@pytest.fixture
def unrewritten(monkeypatch):
    """numeric's float64 functions without the rewrite of exp(k*u)/(c + exp(u))**n: f' as sympy writes it."""
    monkeypatch.setattr(numeric, "_exp_ratio", lambda e: e, raising=False)
    numeric._numeric.cache_clear()
    yield
    numeric._numeric.cache_clear()


def test_an_overflowing_f_prime_is_named_not_called_unsmooth(unrewritten):
    """Where float64 f' is inf or NaN and f' to 15 digits is a number, the refusal names the overflow
    (exit 2), never 'not smooth enough' and 'please report the formula'."""
    with pytest.raises(SpecError, match=r"branch 1: float64 cannot evaluate f' at x = \S+ \(it gives -?(inf|nan)") \
            as info:
        build_table(get_spec("x*exp(x)/(1 + exp(x))", "s", {}), fp32_samples=4096)
    assert "please report" not in str(info.value) and "smooth" not in str(info.value)


def test_an_infinite_error_is_not_called_unsmooth():
    """The advice for pieces whose error measured inf or NaN says so, not that g is not smooth."""
    advice = fit._advice(math.inf, 5e-8)
    assert "inf or NaN" in advice and "smooth" not in advice and "please report" not in advice


# --- 3. exact routes decided by structure, not by the clock -----------------------------------

@pytest.mark.parametrize("formula, cheap", [
    ("x**2 - 3*x", True),
    ("x**3 + x", True),                     # f' has no real zeros: Cardano in real radicals
    ("x + 2*x**3", True),
    ("x**3 + 3*x**2 + 3*x", True),          # (x + 1)**3 - 1
    ("x**4 - 2*x**2", True),                # a quadratic in x**2
    ("x**4 + 4*x**3 + 4*x**2", True),       # (x + 1)**4 - 2*(x + 1)**2 + 1
    ("x**3 - x", False),                    # three real roots between its extremes: casus irreducibilis
    ("x**3 - 1e-6*x", False),
    ("x**4 - 2*x**2 + 0.5*x", False),       # Ferrari: ~26 s of simplification a root
    ("x**4 + x", False),
])
def test_polynomial_exact_routes_are_decided_by_structure(formula, cheap):
    """x**4 - 2*x**2 + 0.5*x took 154 s: every polynomial of degree <= 4 was tried, each branch's f' at
    sympy's four quartic roots ran into the 30 s guard (a faster machine would have written a closed
    form). Only roots that are cheap radicals are tried now."""
    assert bool(exact._invertible(sp.expand(sp.sympify(formula, locals={"x": X})))) is cheap


def test_f_prime_at_the_roots_is_simplified_once_per_expression(monkeypatch):
    """x**4 - 2*x**2's four branches share f' and its four roots: each simplified once, not once a branch."""
    exact._at_roots.cache_clear() if hasattr(exact, "_at_roots") else None
    calls = []
    simplest = exact._simplest
    monkeypatch.setattr(exact, "_simplest", lambda fp, r: calls.append(r) or simplest(fp, r))
    spec = get_spec("x**4 - 2*x**2", "bq", {})
    found = [exact.exact_expression(b, spec, "derivative") for b in analyze(spec).branches]
    assert all(g is not None for g in found)
    assert len(calls) == 4


def test_builtin_exact_routes_are_unchanged():
    """A guard: every built-in branch whose committed table is exact gets the same closed form (the tables are
    not refitted: the route and its text must come out of the same decision)."""
    for name, spec in BUILTINS.items():
        table = json.loads((GENERATED / f"{name}.json").read_text())
        texts = {s["branch"]: s["expr"] for cc in table["code_classes"] for s in cc["segments"] if s["kind"] == "exact"}
        for b in analyze(spec).branches:
            if table["branches"][b.index]["route"] == "exact":
                assert sp.sstr(exact.exact_expression(b, spec, "derivative")) == texts[b.index], (name, b.index)


# --- 4. f beyond float64's range ----------------------------------------------------------------

def test_f_beyond_float64_is_not_a_float64_fault(tmp_path, capsys):
    """exp(exp(x)) exceeds float64 from x = 6.57 (exp(713)): its value, not float64's rounding, and past
    float32's largest y already. It was refused with 'write the formula in a form whose terms stay
    within float64's range'. Now its branch is analysed: g = f'(f^-1(y)) = y*log(y), a closed form;
    exp(exp(x)) + x has no closed form, and its tail gets the reason exp(x*asinh(x)) gets (g/|y| = e^x
    grows without bound)."""
    table = build_table(get_spec("exp(exp(x))", "ee", {}), fp32_samples=4096)
    (seg,) = table["code_classes"][0]["segments"]
    assert sp.simplify(sp.sympify(seg["expr"]) - sp.sympify("y*log(y)")) == 0
    status, _, err = invact_cli(capsys, "fit", "exp(exp(x)) + x", "--name", "eex", "--root", tmp_path / "r",
                                "--no-generate", *CHEAP)
    assert status == 2, err
    assert "g faster than |y|" in err and "float64" not in err, err


def test_f_still_finite_in_fact_is_a_float64_fault():
    """A guard: the float64 refusal stays where f's own value is a float64 number (-log(1 - tanh(x)) at x = 18.8,
    tests/test_fitter_poles.py), and f' in fact finite where float64 gives inf or NaN."""
    with pytest.raises(SpecError, match="float64 cannot evaluate f at"):
        analyze(get_spec("-log(1 - tanh(x))", "t", {}))


# --- 5. the float32 figure is a sample ----------------------------------------------------------

def test_the_cli_calls_the_float32_figure_sampled(tmp_path, capsys):
    """tanh(x) - 0.5*tanh(2*x)'s summary said 'float32 error 9.31e-08' while y = f(-4.572) shows 9.83e-8:
    the figure is the largest at the values checked (every bf16 and fp16 y and a stratified sample of
    float32 y, docs/table-format.md CERT), a bound only with --exhaustive. fit, certify and show say so."""
    root = tmp_path / "r"
    status, out, err = invact_cli(capsys, "fit", "Piecewise((0.5*x, x < 0), (x, True))", "--name", "lk",
                                  "--root", root, "--no-generate", *CHEAP)
    assert status == 0, err
    assert "approx error 0 (proved bound)" in out and "2^12 stratified float32 y a branch, not a bound" in out, out
    status, out, err = invact_cli(capsys, "certify", "lk", "--root", root, "--no-generate", "--fp32-samples", "1000")
    assert status == 0, err
    assert "sampled: the largest at every bf16 and fp16 y and 1000 stratified float32 y" in out, out
    status, out, err = invact_cli(capsys, "show", "lk", "--root", root)
    assert status == 0, err
    assert "not a bound" in out, out

