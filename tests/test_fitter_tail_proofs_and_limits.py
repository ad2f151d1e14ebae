"""Fitter fixes from the fifth hunt: power tails whose proof overflowed (softplus far out), a piece that
no proof can close turned into an internal error, limits at +-inf taken from |x| <= 1e5 only, a
subnormal constant, and a --tolerance hint that did not hold. Expectations come from the mathematics
of each formula, not from observed output."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("sympy")
pytest.importorskip("flint")

import sympy as sp  # noqa: E402

from invact.fitting.branches import analyze  # noqa: E402
from invact.fitting.errors import FitError  # noqa: E402
from invact.fitting.formulas import X, get_spec  # noqa: E402
from helpers import CHEAP, invact_cli  # noqa: E402


# --- 1. certification failures: overflow in the tail's proof, a piece no proof closes --------------

def _softplus(z):
    return sp.log(1 + sp.exp(z))


@pytest.mark.parametrize("expr", [X * _softplus(X), _softplus(X) ** 2, sp.log(sp.cosh(X)), sp.sinh(X) * X])
def test_tail_proof_forms_have_no_growing_exp(expr):
    """On the far tail (x up to ~1e19) the proof's forms of f and f' hold only exps that shrink:
    log(1 + e^x) = x + log(1 + e^-x), e^x/(1 + e^x) = 1/(1 + e^-x), log cosh x = x + log((1 + e^-2x)/2);
    the identities are exact (checked at a point with 30 digits). sinh's e^x cannot shrink: it stays a
    factor, not a sum whose ball loses its sign."""
    from invact.fitting.power_bound import _exp_form
    forms = _exp_form((expr, sp.diff(expr, X)), (277.0, 1.8e19))
    for form, want in zip(forms, (expr, sp.diff(expr, X))):
        sums = [n for n in sp.preorder_traversal(form) if isinstance(n, sp.Add)]
        sums += [sp.Add.make_args(n.args[0]) for n in sp.preorder_traversal(form) if isinstance(n, sp.log)]
        for terms in [n.args if isinstance(n, sp.Add) else n for n in sums]:
            growing = [e for t in terms for e in sp.Mul.make_args(t)
                       if isinstance(e, sp.exp) and float(e.args[0].subs(X, 100)) > 0]
            assert not growing, (form, growing)
        for x in (3.0, 40.0):
            a, b = (e.subs(X, sp.Float(x, 40)).evalf(30) for e in (form, want))
            assert abs(a - b) <= 1e-25 * abs(b), (form, x)


def test_softplus_squared_gets_a_certified_power_tail(tmp_path, capsys):
    """softplus(x)**2 ~ x^2 as x -> inf: a power tail with n = 2 up to y = float32 max (x ~ 1.8e19), where
    log(1 + exp(x)) overflowed the proof's balls ('internal error: CertificationError ... reached inf')."""
    status, out, err = invact_cli(capsys, "fit", "softplus(x)**2", "--name", "sp2", "--root", tmp_path / "r", *CHEAP)
    assert status == 0, err
    table = json.loads((tmp_path / "r" / "generated" / "tables" / "sp2.json").read_text())
    kinds = [s["kind"] for cc in table["code_classes"] for s in cc["segments"]]
    assert "power_tail" in kinds and table["certificate"]["approx_error"] <= 5e-8


def test_piece_that_no_proof_closes_is_refused_naming_the_point(tmp_path, capsys):
    """x + exp(-1/x**2) (x > 0) is smooth but Arb has no finite enclosure of it on a ball holding x = 0,
    the end of its branch: exit 2 naming the piece and x = 0 (was an internal error 'reached 0')."""
    status, out, err = invact_cli(capsys, "fit", "x + Piecewise((exp(-1/x**2), x > 0), (0, True))", "--name", "fl",
                                  "--root", tmp_path / "r", *CHEAP)
    assert status == 2 and "internal error" not in err, err
    last = err.strip().splitlines()[-1]
    assert "piece on y in [0, " in last and "of branch 1" in last and "cannot be proved within 5e-08" in last, last
    assert "at x = 0 as inf or NaN" in last, last
    assert not (tmp_path / "r" / "generated" / "tables" / "fl.json").exists()


# --- 2. limits at +-inf ---------------------------------------------------------------------------

def _branches(formula: str):
    return analyze(get_spec(formula, "t", {})).branches


def test_limit_beyond_1e5_of_a_slowly_turning_function():
    """x*sigmoid(1e-6*x) = 1e6 * s(u) with s(u) = u*sigmoid(u), u = 1e-6 x: a minimum at u = -1.27846
    (s = -0.278465) and s -> 0 as u -> -inf; still linear at |x| = 1e5, it was taken to diverge
    ('... y range [-278465, -inf], which is not increasing; f may have a pole, or a narrow wiggle')."""
    left, right = _branches("x*sigmoid(1e-6*x)")
    assert left.direction == "decreasing" and right.direction == "increasing"
    assert left.x_range[1] == pytest.approx(-1.2784645427610737e6, rel=1e-9)
    assert left.y_range == pytest.approx((-278464.5427610738, 0.0), rel=1e-9, abs=1e-9)
    assert right.y_range[1] == math.inf


def test_limit_of_a_scaled_erf_is_its_scale():
    (b,) = _branches("1e6*erf(1e-6*x)")
    assert b.y_range == (-1e6, 1e6)


def test_tiny_slope_still_diverges():
    """1e-20*x moves by less than 1e-12 between the grid's points, but grows: its range is the real line."""
    (b,) = _branches("1e-20*x")
    assert b.y_range == (-math.inf, math.inf)


def test_subnormal_constant_is_refused_naming_it(tmp_path, capsys):
    status, _, err = invact_cli(capsys, "fit", "1e-320*x", "--name", "sub", "--root", tmp_path / "r", *CHEAP)
    assert status == 2 and "internal error" not in err, err
    assert "constant 1e-320, a subnormal float64 number" in err and "pole" not in err, err


# --- 3. the --tolerance hint ----------------------------------------------------------------------

def test_tolerance_hint_is_a_tolerance_that_was_tried():
    """1e6*tanh(x) with degree-6 pieces: the closest pieces need 6.8e-8 at 5e-8, but at 9e-8 (the old
    hint, 'likely to fit') the search stops elsewhere and needs 1e-7. A hint is given only once a
    search at it has met it; else the message names the tolerances tried."""
    from invact.fitting.fit import fit_branch
    from invact.fitting.ends import fit_range
    from invact.fitting.reference import BranchReference
    (b,) = _branches("1e6*tanh(x)")
    ref = BranchReference(b, "derivative")
    y_lo, y_hi, origins, _, _ = fit_range(b, ref, "derivative", 5e-8)
    with pytest.raises(FitError) as info:
        fit_branch(ref, y_lo, y_hi, origins, 5e-8, degrees=(6,), rationals=())
    text = str(info.value)
    hint = [w for w in text.split() if w.startswith("--tolerance")]
    tried = text.split("--tolerance ")[1].split()[0]
    if "or more is likely to fit" in text:
        fit_branch(ref, y_lo, y_hi, origins, float(tried), degrees=(6,), rationals=())   # it fits
    else:
        assert "either (tried)" in text and hint, text
        with pytest.raises(FitError):
            fit_branch(ref, y_lo, y_hi, origins, float(tried), degrees=(6,), rationals=())


def test_tolerance_hint_follows_the_searches():
    """The proposed tolerance is one a search met: the first try fails needing more, the second fits."""
    from invact.fitting.fit import _advice
    calls = []

    def search(tol):
        calls.append(tol)
        return (None, 4e-7) if len(calls) == 1 else (["a layout"], tol)

    text = _advice(6.8e-8, 5e-8, search)
    assert calls == [9e-8, 5e-7] and text.startswith("--tolerance 5e-07 or more is likely to fit"), text
    assert "tried" in _advice(6.8e-8, 5e-8, lambda tol: (None, 1e-7))
    assert "would not help" in _advice(0.3, 5e-8, search)
