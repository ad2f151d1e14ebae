"""Fitter fixes from the last hunt's leftovers: removable 0/0 points on the scan's grid, a signed zero
between a Piecewise's pieces, corners hidden in a formula, one printability check per fit. Expectations
come from the mathematics of each formula, not from observed output."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("sympy")
pytest.importorskip("flint")

from invact.fitting.branches import analyze  # noqa: E402
from invact.fitting.errors import SpecError  # noqa: E402
from invact.fitting.formulas import get_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SQRT2 = math.sqrt(2.0)


def _analyze(formula: str):
    return analyze(get_spec(formula, "t", {}))


# --- 1. removable points (0/0 with a finite limit) ----------------------------------------------

# each c is a point of the scan's grid (-60 + 0.006 k): float64 f and f' there, next to the 0/0, were
# read as a wiggle ('the decreasing stretch x in [0.3, 0.3] ... not increasing')
@pytest.mark.parametrize("c", ["0.3", "0.6", "-1.2"])
def test_removable_point_on_the_scan_grid_keeps_one_decreasing_branch(c):
    """t/(e^t - 1), t = x - c: its derivative (e^t (1 - t) - 1)/(e^t - 1)^2 < 0 for t != 0 (and -1/2 at
    0), so one decreasing branch; y -> 0 as t -> inf and y ~ -t -> inf as t -> -inf."""
    (b,) = _analyze(f"(x - {c})/(exp(x - {c}) - 1)").branches
    assert b.direction == "decreasing" and b.y_range == (0.0, math.inf)
    assert b.removable == [pytest.approx(float(c), abs=1e-15)]


def test_removable_point_of_an_increasing_formula():
    """(e^t - 1)/t = sum t^k/(k+1)! is increasing (its derivative (t e^t - e^t + 1)/t^2 > 0), 0 at -inf."""
    (b,) = _analyze("(exp(x - 0.45) - 1)/(x - 0.45)").branches
    assert b.direction == "increasing" and b.y_range == (0.0, math.inf) and b.removable == [0.45]


@pytest.mark.parametrize("formula, c", [("(x - 0.3)/(exp(x - 0.3) - 1)", "0.3"),
                                        ("(exp(x - 0.45) - 1)/(x - 0.45)", "0.45"),
                                        ("x + (x - 0.5)/(exp(x - 0.5) - 1)", "0.5")])
def test_fitting_through_a_removable_point_is_refused_naming_it(formula, c):
    """No closed form, so g must be fitted through the 0/0 point, where float64 f' has no correct digits
    (the last two were 'internal error: CertificationError ... please report')."""
    from invact.fitting.pipeline import build_table
    with pytest.raises(SpecError, match=rf"x = {c} is a removable point of the formula \(0/0 there"):
        build_table(get_spec(formula, "t", {}), fp32_samples=4096)


def test_removable_point_on_the_check_grid_is_named():
    with pytest.raises(SpecError, match=r"f\(0\) is nan; x = 0 is a removable point"):
        _analyze("x/(exp(x) - 1)")


# --- 2. a signed zero between two pieces ----------------------------------------------------------

@pytest.mark.parametrize("formula", ["Piecewise((0.01*x, x < 0), (x, True))",
                                     "Piecewise((x, x >= 0), (0.01*x, True))"])
def test_pieces_meeting_at_a_signed_zero_get_codes_of_their_own(formula):
    """y = 0 belongs to the x >= 0 piece (slope 1); the other piece's 0.01 x underflows to -0 in 16-bit
    y, which y cannot tell from it: the code (the x side, x >= 0 at the break 0) must."""
    a = _analyze(formula)
    assert (a.n_codes, a.code_bits, a.x_breaks) == (2, 1, [(0.0, "right")])


@pytest.mark.parametrize("formula", ["Piecewise((0.01*x, x <= 0), (x, True))", "Piecewise((x, x < 0), (0.01*x, True))"])
def test_pieces_whose_zero_owner_absorbs_the_underflow_share_a_code(formula):
    """y = 0 belongs to the slope-0.01 piece, whose values are the ones that underflow to 0; the slope-1
    piece's y = x never does (the built-in leaky_relu's table, 0 bits, is of this kind)."""
    assert _analyze(formula).n_codes == 1
    assert analyze(get_spec("leaky_relu")).n_codes == 1


def test_leaky_formula_gradient_matches_torch_at_underflowing_x(tmp_path):
    root = tmp_path / "lk"
    subprocess.run([sys.executable, "-m", "invact.fitting.cli", "fit", "Piecewise((0.01*x, x < 0), (x, True))",
                    "--name", "lk", "--root", str(root), "--fp32-samples", "65536"],
                   check=True, capture_output=True, cwd=REPO)
    out = subprocess.run([sys.executable, "-c", f"""
import torch, invact
invact.use_root({str(root)!r})
for dt in (torch.float16, torch.bfloat16):
    # float16: 0.01 x underflows to -0 for |x| < 3e-6; bfloat16 for |x| < 1e-38
    x = torch.tensor([-2e-6, -3e-7, -6e-8, -1e-39, -0.0, 0.0, 6e-8, -1.0, 2.0], dtype=dt)
    a = x.clone().requires_grad_(); invact.functional.apply(a, 'lk', backend='eager').sum().backward()
    b = x.clone().requires_grad_(); torch.where(b < 0, 0.01 * b, b).sum().backward()
    print(dt, torch.equal(a.grad, b.grad), a.grad.tolist(), b.grad.tolist())
"""], check=True, capture_output=True, text=True, cwd=REPO)
    # both gradients are the slope constant (0.01 or 1) rounded once to the dtype: equal bit for bit
    assert out.stdout.count(" True ") == 2, out.stdout


# --- 3. corners -----------------------------------------------------------------------------------

@pytest.mark.parametrize("formula, at", [("acosh(1 + x**2)", "0"), ("sqrt(x**4 + 2*x**2)", "0"),
                                         ("sqrt((x - 0.3)**4 + 2*(x - 0.3)**2)", "0.3"),
                                         ("acosh(1 + (x - 0.3)**2)", "0.3")])
def test_a_corner_inside_a_piece_is_refused_naming_it(formula, at):
    """Each is |t| sqrt(t^2 + 2) or acosh(1 + t^2), t = x - c: f' -> -sqrt(2) and sqrt(2) on the two sides
    of c, and the formula's f' is 0/0 at c (at 0 a grid point: 'no derivative'; at 0.3 the scan took the
    jump for a zero of f' and gave the increasing branch the end slope -sqrt(2))."""
    with pytest.raises(SpecError, match=rf"has a corner at x = {at} inside one piece of its formula: f' jumps "
                                        r"there from -1\.41421 to 1\.41421") as info:
        _analyze(formula)
    assert "Abs" in str(info.value)


def test_the_same_corner_written_with_abs_gives_two_branches():
    """acosh(1 + x^2) = log(1 + x^2 + |x| sqrt(x^2 + 2)): the Abs splits it at 0 into a decreasing and an
    increasing branch, y in [0, inf), with f' -> -sqrt(2) and sqrt(2) at y = 0 (as Abs(x)'s -1 and 1)."""
    left, right = _analyze("log(1 + x**2 + Abs(x)*sqrt(x**2 + 2))").branches
    assert (left.direction, right.direction) == ("decreasing", "increasing")
    assert left.y_range == right.y_range == (0.0, math.inf)
    assert left.limits["lower"] == pytest.approx(-SQRT2, rel=1e-12)
    assert right.limits["lower"] == pytest.approx(SQRT2, rel=1e-12)
    assert [b.direction for b in _analyze("Abs(x)").branches] == ["decreasing", "increasing"]


def test_a_smooth_minimum_is_no_corner():
    for formula in ("x**2", "x*tanh(x)", "x**4 - x**2"):
        assert len(_analyze(formula).branches) >= 2


# --- 4. one printability check per fit ------------------------------------------------------------

def test_a_fit_prints_each_tables_formula_once(tmp_path, monkeypatch):
    """The tree's tables are checked before the fit (a broken one refuses it before the long work) and
    their code is generated after: each formula goes through the printers' check once."""
    from invact.fitting import codegen
    from invact.fitting.cli import main
    tables = tmp_path / "generated" / "tables"
    tables.mkdir(parents=True)
    shutil.copy(REPO / "generated" / "tables" / "leaky_relu.json", tables / "leaky_relu.json")
    cache = getattr(codegen, "_print_problem", None)
    if cache is not None:
        cache.cache_clear()
    calls = Counter()
    real = codegen.to_torch

    def counting(formula, *args, **kwargs):
        calls[str(formula)] += 1
        return real(formula, *args, **kwargs)
    monkeypatch.setattr(codegen, "to_torch", counting)
    assert main(["fit", "2*x + 1", "--name", "lin", "--root", str(tmp_path), "--fp32-samples", "4096"]) == 0
    assert (tables / "lin.json").is_file() and len(calls) == 2
    assert set(calls.values()) == {1}, calls
