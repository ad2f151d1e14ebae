"""Fitter bugs found by a hunt: a critical point far out silently dropped, crashes on constants
float64 cannot hold, a Piecewise undefined on part of the line, refusals whose reasons or figures
contradicted themselves. Each test failed before its fix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from invact.fitting import cli
from invact.fitting.branches import analyze
from invact.fitting.errors import FitError, SpecError
from invact.fitting.formulas import get_spec


def fit_cli(tmp_path, capsys, formula: str, *extra: str) -> tuple[int, str]:
    """`invact fit FORMULA --name t` into tmp_path (no code generated): (exit status, stderr)."""
    code = cli.main(["fit", formula, "--name", "t", "--root", str(tmp_path), "--fp32-samples", "4096",
                     "--no-generate", *extra])
    return code, capsys.readouterr().err


def branches(formula: str):
    return analyze(get_spec(formula, name="t")).branches


# ---------------------------------------------------------------------------------------------
# 1. every sign change of f' is a branch point or a refusal

@pytest.mark.parametrize("formula, x_max", [
    ("x - x**2/140", 70.0),           # beyond the fine scan's |x| <= 60: was one increasing branch
    ("x - x**2/1e4", 5000.0),         # beyond the old wide scan's 480
])
def test_a_maximum_far_out_splits_the_branch(formula, x_max):
    left, right = branches(formula)
    assert (left.direction, right.direction) == ("increasing", "decreasing")
    # brentq + mpmath polish: the root to float64 rounding (x_max is exact here)
    assert left.x_range[1] == right.x_range[0] == pytest.approx(x_max, rel=1e-14)
    assert (left.upper_end, right.upper_end) == ("sqrt", "sqrt")


def test_silus_minimum_scaled_beyond_the_scan():
    """x*sigmoid(0.02*x) has silu's minimum at x = -1.2784645427610738 / 0.02 = -63.9: it was
    dropped, and the one branch through it was refused with a best error below the tolerance."""
    left, right = branches("x*sigmoid(0.02*x)")
    # silu's x_min (tests/test_branches.py KNOWN_MINIMA) scaled: float64 rounding of the quotient
    assert left.x_range[1] == pytest.approx(-1.2784645427610738 / 0.02, rel=1e-14)
    assert (left.direction, right.direction) == ("decreasing", "increasing")


def test_cli_writes_both_branches_of_a_far_maximum(tmp_path, capsys):
    code, err = fit_cli(tmp_path, capsys, "x - x**2/140")
    assert code == 0, err
    table = json.loads((tmp_path / "generated" / "tables" / "t.json").read_text())
    assert [b["direction"] for b in table["branches"]] == ["increasing", "decreasing"]
    assert table["code_bits"] == 1


def test_a_sign_change_beyond_the_scan_is_refused_not_dropped():
    with pytest.raises(SpecError, match=r"f' changes sign near x = 5e\+39, beyond \|x\| = 1e\+15"):
        branches("x - x**2/1e40")


def test_float64_overflow_is_no_sign_change():
    """silu's float64 f' turns positive at x = -355 (one term overflows to -0): not a branch point."""
    assert len(branches("x*sigmoid(x)")) == 2
    assert len(branches("x/sqrt(1 + x**2)")) == 1     # cancellation noise far out: no flat points


def test_a_refusal_reports_a_figure_above_the_tolerance(monkeypatch):
    """A piece failing on its float32 error once reported its (smaller) approximation error, e.g.
    "no polynomial layout meets 5e-08 (best error reached 4.45e-09)". Here every piece's float32
    error is inflated by 1e-5: the figure reported must be the tolerance the pieces need."""
    from invact.fitting import fit
    from invact.fitting.reference import BranchReference

    real = fit.fit_piece

    def worse(*args, **kwargs):
        piece = real(*args, **kwargs)
        piece.float32_error += 1e-5
        return piece
    monkeypatch.setattr(fit, "fit_piece", worse)
    b = branches("tanh(x)")[0]
    with pytest.raises(FitError) as info:
        fit.fit_branch(BranchReference(b), -0.5, 0.5, {}, 5e-8, degrees=(8,), rationals=())
    assert info.value.best_error > 5e-8
    # 1e-5 added, less F32_SLACK (1.5e-7) that float32 evaluation may add: within float rounding
    assert info.value.best_error >= 1e-5 - 1.5e-7
    assert "--tolerance 2e-05 or more" in str(info.value)


# ---------------------------------------------------------------------------------------------
# 2. constants float64 cannot hold: exit 2 with the reason, never an internal error

@pytest.mark.parametrize("formula, words", [
    ("10**400*x", "out of float64 range"),
    ("sqrt(-1)*x", "not real-valued"),
    ("(-1)**0.5*x", "not real-valued"),
    ("x/0", "not finite"),
    ("1/0*x", "not finite"),
    ("log(0)*x", "not finite"),
    ("exp(x)**(1/0)", "not finite"),            # was "does not depend on x"
])
def test_bad_constants_exit_2_with_the_reason(tmp_path, capsys, formula, words):
    code, err = fit_cli(tmp_path, capsys, formula)
    assert code == 2, err
    assert words in err and "internal error" not in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# 3. a Piecewise must cover the line

@pytest.mark.parametrize("formula, where", [
    ("Piecewise((x, x<0))", r"[0, inf)"),
    ("Piecewise((x, x<0), (2*x, x>1))", r"[0, 1]"),
])
def test_piecewise_undefined_somewhere_is_refused(tmp_path, capsys, formula, where):
    code, err = fit_cli(tmp_path, capsys, formula)
    assert code == 2, err
    assert f"undefined (not real-valued) for x in {where}" in err


def test_piecewise_missing_only_a_point_is_refused():
    """A single x left out is refused too: the generated code has no piece there, so y and the gradient
    were NaN at x = 0 (tests/test_cli_hunt_fixes.py runs the CLI and names the fix)."""
    with pytest.raises(SpecError, match=r"undefined \(not real-valued\) at x = 0"):
        branches("Piecewise((x, x<0), (2*x, x>0))")


# ---------------------------------------------------------------------------------------------
# 4. f' that float64 gives as NaN (0*inf, inf/inf) is not infinite, and is not a missing derivative

def test_a_zero_of_non_integer_order_is_refused_for_that_reason():
    """abs(x)**1.5: f' = 1.5*x**1.5/x is NaN at 0 in float64 but -> 0; it was reported as f' -> inf."""
    with pytest.raises(SpecError, match=r"f' -> 0 like \|x - x0\|\^0.5 .* non-integer order") as info:
        branches("abs(x)**1.5")
    assert "unbounded" not in str(info.value)


def test_a_flat_end_undefined_at_the_point_itself_is_fitted(tmp_path, capsys):
    """exp(-1/x**2) for x > 0: f and f' are NaN at x = 0 in float64 (exp(-1/0)), their limits are 0;
    it was refused as 'f' -> inf as x -> 0'."""
    formula = "Piecewise((exp(-1/x**2), x>0), (0, True))"
    flat, right = branches(formula)
    assert flat.flat and right.lower_end == "root" and right.limits["lower"] == 0.0
    code, err = fit_cli(tmp_path, capsys, formula)
    assert code == 0, err


def test_sigmoid_derivative_does_not_overflow_to_nan():
    """x*sigmoid(25*x): 25*x*exp(-25*x)/(1 + exp(-25*x))**2 is inf/inf at x = -30; it was refused
    as 'has no derivative at x = -29.97'. The stable form gives the value (to float64 underflow)."""
    import sympy as sp

    from invact.fitting.branches import numeric
    from invact.fitting.formulas import X
    assert len(branches("x*sigmoid(25*x)")) == 2
    fp = numeric(sp.diff(get_spec("x*sigmoid(25*x)", name="t").substituted(), X))
    v = fp(np.array([-1000.0, -30.0, -1.0, 0.0, 30.0]))
    assert np.isfinite(v).all()
    # f'(-1) = sigmoid(-25) (1 - 25 sigmoid(25)) = -24 e^-25 to 1e-10 relative (e^-25 terms dropped)
    assert v[2] == pytest.approx(-24 * np.exp(-25.0), rel=1e-9)
    assert v[3] == 0.5 and v[4] == 1.0


def test_a_tail_y_cannot_resolve_is_refused_for_that_reason():
    """1e8*tanh(x): y reaches -1e8 in float64 at x ~ -19 while g = 1e8*sech(x)**2 is still above
    tolerance / 4; it was refused as 'g does not settle to its limit 0 by |x| = 1e15'."""
    from invact.fitting.pipeline import build_table
    with pytest.raises(FitError, match=r"y reaches its limit -100000000 .* y no longer tells g apart") as info:
        build_table(get_spec("1e8*tanh(x)", name="t"), fp32_samples=4096)
    assert "by |x| = 1e15" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# 5. arguments and parameters

@pytest.mark.parametrize("formula, words", [
    ("relu(x,1)", "relu takes 1 argument"),
    ("exp(x, 2) + x", "exp takes 1 argument"),
])
def test_a_function_with_too_many_arguments_says_so(tmp_path, capsys, formula, words):
    code, err = fit_cli(tmp_path, capsys, formula)
    assert code == 2 and words in err and "<lambda>" not in err and "positional argument" not in err


def test_a_parameter_given_twice_is_refused(tmp_path, capsys):
    code, err = fit_cli(tmp_path, capsys, "x + b*tanh(x)", "--param", "b=1", "--param", "b=2")
    assert code == 2 and "--param b is given twice (b=1 and b=2)" in err


def test_a_generic_table_excludes_where_a_denominator_vanishes(tmp_path, capsys):
    """log(1 + exp(b*x))/b is exact for every b != 0; its table recorded no domain, so the runtime
    took b = 0 (NaN). Relations are < <= > >= only: the side of 0 the fit was made on."""
    from invact.common.params import ParamError, check_params
    code, err = fit_cli(tmp_path, capsys, "log(1+exp(b*x))/b", "--param", "b=1")
    assert code == 0, err
    table = json.loads((tmp_path / "generated" / "tables" / "t.json").read_text())
    assert table["param_generic"] and table["param_domain"] == ["b > 0"]
    assert check_params("t", table["params"], {"b": 2.0}, table["param_domain"]) == {"b": 2.0}
    with pytest.raises(ParamError, match="needs b > 0"):
        check_params("t", table["params"], {"b": 0.0}, table["param_domain"])
