"""Fitting and certification of tables built here (small samples keep the suite quick)."""

import numpy as np
import pytest
import sympy as sp

from invact.fitting.arb_bound import piece_bound
from invact.fitting.branches import analyze
from invact.fitting.errors import FitError, InputError
from invact.fitting.evaluate import eval_code_class
from invact.fitting.fit import fit_branch, f32_below
from invact.fitting.formulas import BUILTINS, X, get_spec
from invact.fitting.pipeline import build_table
from invact.fitting.reference import BranchReference

SAMPLES = 2**16   # fp32 sample per branch here; committed tables use >= 2**24 (test_certificates)


@pytest.fixture(scope="module")
def quick_gelu_table():
    return build_table(get_spec("x*sigmoid(1.702*x)", name="qg"), fp32_samples=SAMPLES)


def test_new_formula_meets_default_bounds(quick_gelu_table):
    t = quick_gelu_table
    assert t["code_bits"] == 1 and t["n_codes"] == 2
    assert t["certificate"]["approx_error"] <= 5e-8
    assert t["certificate"]["float32_eval_error"] <= 2.5e-7
    assert {b["route"] for b in t["branches"]} == {"fit"}
    kinds = {s["transform"]["kind"] for cc in t["code_classes"] for s in cc["segments"] if s["kind"] == "poly"}
    # the branch point's sqrt; towards the asymptote y -> 0- pieces in y itself, which cost less than
    # the log transform that would fit it in fewer pieces (fit.C_COST: the log costs every element)
    assert "sqrt" in kinds and "identity" in kinds and "log" not in kinds


def test_table_agrees_with_reference_on_a_fresh_grid(quick_gelu_table):
    """Independent of the points the fitter and the certifier looked at: x on a grid, y = f(x)."""
    t = quick_gelu_table
    f = sp.lambdify(X, get_spec("x*sigmoid(1.702*x)", name="qg").expr, "numpy")
    fp = sp.lambdify(X, sp.diff(get_spec("x*sigmoid(1.702*x)", name="qg").expr, X), "numpy")
    x = np.linspace(-12, 12, 200_001)
    y = f(x)
    code = (x <= float(t["forward_code"]["x_breaks"][0]["value"])).astype(int)  # side "left": x == b is left
    got = np.empty_like(y)
    for c in (0, 1):
        got[code == c] = eval_code_class(t["code_classes"][c], y[code == c], {})
    # real-arithmetic evaluation: the certified bound plus float64 rounding of the reference
    assert np.max(np.abs(got - fp(x))) <= t["certificate"]["approx_error"] + 1e-12


def _fit_right_branch(name: str, y_hi: float, tolerance: float):
    """(branch, reference, pieces) of a fit of the branch right of the minimum, from y_min to y_hi."""
    b = analyze(BUILTINS[name]).branches[1]
    ref = BranchReference(b)
    y_min = sp.N(b.expr.subs(X, sp.Float(b.x_range[0], 30)), 40)
    return b, ref, fit_branch(ref, f32_below(float(y_min)), y_hi, {"sqrt": (y_min, 1)}, tolerance)


def test_rigorous_bound_catches_a_perturbed_coefficient():
    b, ref, pieces = _fit_right_branch("gelu", 1.0, 5e-8)
    seg = pieces[-1].to_json()
    xa, xb = sorted(ref.inverse(np.array(seg["y_range"])))
    bound, _, proved = piece_bound(b.expr, seg, "derivative", xa, xb, 5e-8)
    assert proved and bound <= 5e-8
    seg["coeffs"][1] += 1e-6            # moves P by up to 1e-6 at u = +-1: far outside the bound
    _, _, proved = piece_bound(b.expr, seg, "derivative", xa, xb, 5e-8)
    assert not proved


def test_inverse_target():
    t = build_table(BUILTINS["gelu"], target="inverse", fp32_samples=SAMPLES)
    assert t["target"] == "inverse"
    assert t["certificate"]["approx_error"] <= 5e-8
    right = t["code_classes"][0]
    y = np.array([-0.1, 0.3, 2.0, 50.0])
    x = eval_code_class(right, y, {})
    f = sp.lambdify(X, BUILTINS["gelu"].expr, "mpmath")
    assert np.allclose([float(f(v)) for v in x], y, atol=2e-7)


@pytest.mark.parametrize("kwargs, error", [
    ({"target": "slope"}, InputError),
    ({"tolerance": -1.0}, InputError),
    ({"tolerance": 1e-12}, FitError),
])
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        build_table(BUILTINS["gelu"], fp32_samples=SAMPLES, **kwargs)


def test_looser_tolerance_needs_fewer_pieces():
    tight = _fit_right_branch("silu", 10.0, 5e-8)[2]
    loose = _fit_right_branch("silu", 10.0, 1e-4)[2]
    cost = lambda ps: sum(len(p.coeffs) for p in ps)  # noqa: E731
    assert cost(loose) < cost(tight)
    assert max(p.error for p in loose) <= 1e-4


def test_branch_point_exactly_representable():
    """x*tanh(x): y_min = 0 exactly, so the sqrt radicand reaches 0 at the branch point and the
    Taylor form cannot enclose the neighbouring cell; the endpoint bound must still prove it."""
    t = build_table(get_spec("x*tanh(x)", name="xtanh"), fp32_samples=SAMPLES)
    assert t["code_bits"] == 1
    assert t["certificate"]["approx_error"] <= 5e-8
    assert t["certificate"]["float32_eval_error"] <= 2.5e-7


def test_unstable_closed_form_is_not_used():
    """sympy's closed form of g for x**3 + x (Cardano) cancels catastrophically in float32 (1/0 for
    large y): the exact route must be refused by its float32 check, not written with an infinite
    float32 error; sigmoid's y(1 - y) passes the same check within the tolerance + F32_SLACK."""
    import sympy as sp

    from invact.fitting import pipeline
    from invact.fitting.branches import analyze
    from invact.fitting.exact import exact_expression
    from invact.fitting.fit import F32_SLACK
    from invact.fitting.formulas import get_spec

    for formula, stable in (("x**3 + x", False), ("sigmoid(x)", True)):
        spec = get_spec(formula, name="f")
        b = analyze(spec).branches[0]
        expr = exact_expression(b, spec, "derivative")
        assert expr is not None, formula
        seg = {"kind": "exact", "expr": sp.sstr(expr), "y_range": list(b.y_range), "branch": 0}
        err = pipeline._exact_float32_error(b, "derivative", seg, spec.params)
        assert (err <= 5e-8 + F32_SLACK) == stable, (formula, err)


def test_rounding_check_covers_the_fma_scheme(monkeypatch):
    """A piece is accepted only where both float32 schemes (kernels run either; the certificate bounds
    both) stay within budget: an FMA scheme off by 1e-6 (4x the float32 bound 2.5e-7) is seen by the
    fitter's dense rounding check, which the non-FMA scheme alone passes."""
    from invact.fitting import fit, segments

    _, _, pieces = _fit_right_branch("gelu", 1.0, 5e-8)
    piece = pieces[len(pieces) // 2]
    clean = fit._rounding_error(piece)
    assert clean <= 2.5e-7
    original = segments.PolySegment.evaluate_fma
    monkeypatch.setattr(segments.PolySegment, "evaluate_fma",
                        lambda self, y, params=None: original(self, y, params) + np.float32(1e-6))
    assert fit._rounding_error(piece) >= 1e-6 - clean
