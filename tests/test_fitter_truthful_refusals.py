"""Refusals of the fitter that named an untrue reason, and what fits once the reason is found: a
function whose changes lie away from x = 0 or below the scan's resolution (a huge parameter), a
branch whose g is large. Each test failed before its fix; expectations come from the mathematics of
each formula."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sympy")

from invact.fitting.branches import analyze  # noqa: E402
from invact.fitting.errors import FitError, ScaleError  # noqa: E402
from invact.fitting.formulas import get_spec  # noqa: E402
from invact.fitting.model import Table  # noqa: E402
from invact.fitting.pipeline import build_table  # noqa: E402
from invact.fitting.reference import BranchReference  # noqa: E402
from helpers import CHEAP, invact_cli  # noqa: E402

TOL = 5e-8


def _branches(formula: str):
    return analyze(get_spec(formula, "t", {})).branches


# --- 1. the scan: a rise far from 0, a rise finer than the grid ----------------------------------

def test_a_rise_far_from_zero_is_one_increasing_branch():
    """tanh(x - 1000) rises where a grid within 30 of 0 sees f' = 0 (sech(1030)^2 underflows): it was
    taken as decreasing ('the decreasing stretch ... has y range [1, -1], which is not increasing')."""
    (b,) = _branches("tanh(x - 1000)")
    assert b.direction == "increasing" and b.y_range == (-1.0, 1.0)


def test_a_rise_far_from_zero_fits_its_closed_form(tmp_path, capsys):
    """Its lower tail's scan started at x = 0, where y is already -1 in float64 ('g is still 0 from its
    limit 0'): it starts where f' is largest instead, and g = 1 - y**2 is the branch's closed form."""
    status, out, err = invact_cli(capsys, "fit", "tanh(x - 1000)", "--name", "far", "--root", tmp_path / "r",
                                  "--no-generate", *CHEAP)
    assert status == 0, err
    assert "pieces exact" in out, out


def test_a_plateau_between_rises_is_covered_by_the_reference():
    """tanh(x) + tanh(x - 1000) is flat at y = 0 for x in ~[20, 980] and rises to 2 at x = 1000; the
    reference's x table stopped at the plateau, so y in (0, 2) was clamped to it: g read 0 there, and
    a table of zeros on (0, 2) was certified. g(1) = f'(1000) = 1 + sech(1000)^2 = 1 in float64."""
    (b,) = _branches("tanh(x) + tanh(x - 1000)")
    ref = BranchReference(b, "derivative")
    y = np.array([0.5, 1.0, 1.5])
    # the reference's Newton stops at a step of <= 1e-8 |x|, leaving ~(|f''| / 2|f'|) (1e-8 * 1000)^2 <= 1e-10 in x
    # (|f''| <= 0.77, f' >= 0.75 here), and as much in g
    assert ref.inverse(y) == pytest.approx(1000 + np.arctanh(y - 1), abs=1e-9)
    assert ref(y) == pytest.approx(1 - (y - 1) ** 2, abs=1e-9)


def test_a_plateau_between_rises_gets_a_table_of_its_g():
    """The whole table: g(y) = 1 - (y - 1)^2 on (0, 2) (and 1 - y^2 + ... on (-2, 0)) within the
    tolerance and the float32 slack the fitter allows (5e-8 + 1.5e-7); it was 0 on (0, 2)."""
    table = Table.of(build_table(get_spec("tanh(x) + tanh(x - 1000)", "t", {}), fp32_samples=4096))
    y = np.float32([0.25, 0.5, 1.0, 1.5, 1.75])
    g = table.code_classes[0].evaluate(y).astype(np.float64)
    want = 1 - (y.astype(np.float64) - 1) ** 2
    assert np.max(np.abs(g - want) / np.maximum(1.0, np.abs(want))) <= TOL + 1.5e-7, (g, want)


def test_f_prime_zero_at_every_scan_point_is_refused_as_unresolved():
    """tanh(1e20*(x - 0.001))/1e20 rises within |x - 0.001| < 1e-19, between the scan's points, where
    float64 f' is 0 at every one: refused for that (it was 'the decreasing stretch ... not increasing')."""
    with pytest.raises(ScaleError) as info:
        _branches("tanh(1e20*(x - 0.001))/1e20")
    text = str(info.value)
    assert "f' is 0 (in float64) at every point the scan samples" in text, text
    assert "decreasing" not in text and "from y = -1e-20" in text, text


def test_a_huge_parameter_is_named_as_setting_a_scale_too_fine(tmp_path, capsys):
    """tanh(a*x)/a with a = 1e20 is increasing everywhere; its whole rise lies within |x| < ~1e-19, below
    the tail scan's first step: the refusal says so, with the x scale (y's way to its limit over g,
    1e-20) and the parameter, not 'the decreasing stretch ... is not increasing'."""
    status, _, err = invact_cli(capsys, "fit", "tanh(a*x)/a", "--param", "a=1e20", "--name", "t",
                                "--root", tmp_path / "r", "--no-generate", *CHEAP)
    assert status == 2 and "internal error" not in err, err
    last = err.strip().splitlines()[-1]
    assert "finer than the fitter's scans resolve" in last and "a scale of x of about 1e-20" in last, last
    assert "a = 1e+20" in last and "decreasing" not in last, last


# --- 2. a branch whose g is large: the absolute measure of the pieces ----------------------------

def test_large_g_refusal_names_the_absolute_measure_not_smoothness():
    """x**4*exp(0.002*x) for x < -2000: g = f' grows to about 1.34e8 (its largest |f'| there), and pieces
    held to an absolute 0.55 * 5e-8 cannot follow it with float32 coefficients: the refusal says that (a
    limitation of the fitter), no longer 'g is not smooth enough' (g is analytic there)."""
    from invact.fitting.fit import fit_branch
    from invact.fitting.ends import fit_range
    b = _branches("x**4*exp(0.002*x)")[0]
    ref = BranchReference(b, "derivative")
    y_lo, y_hi, origins, _, _ = fit_range(b, ref, "derivative", TOL)
    with pytest.raises(FitError) as info:
        fit_branch(ref, y_lo, y_hi, origins, TOL, degrees=(6,), rationals=())
    text = str(info.value)
    assert "not smooth" not in text and "a limitation of the fitter, not of the formula" in text, text
    assert "|g| reaches 1.34e+08" in text and "absolute error of 0.55 x tolerance" in text, text
