"""Branch ends of every kind, on either side and either sign of y (issue 14): limits approached
like a power of 1/x (atan, softsign), exponentially on both sides (erf, the normal CDF), square-root
branch points that are maxima, and branches singular at both ends (x - 2*tanh(x))."""

import math

import numpy as np
import pytest
import sympy as sp
import torch

from invact.fitting.errors import FitError, SpecError

from invact.fitting.branches import analyze
from invact.fitting.evaluate import eval_code_class
from invact.fitting.formulas import X, get_spec
from invact.fitting.pipeline import build_table

SAMPLES = 2**14   # fp32 sample per branch here; the zoo and committed tables use more
# float64 information floor next to a branch point: y rounded by 1e-16 relative moves x by
# sqrt(2 * 1e-16 / f'') there, so g by ~sqrt(2 f'' 1e-17) ~ 3e-9 (tests/tolerances.py)
FLOOR64 = 4e-9


@pytest.mark.parametrize("formula, lo, hi, q", [
    ("atan(x)", -math.pi / 2, math.pi / 2, 1.0),          # pi/2 - atan(x) ~ 1/x: settles only by 1e16
    ("x/(1 + abs(x))", -1.0, 1.0, 1.0),                   # softsign: 1 - y = 1/(1 + x)
    ("x/sqrt(1 + x**2)", -1.0, 1.0, 2.0),                 # ISRU: 1 - y ~ 1/(2 x^2)
])
def test_power_law_limits(formula, lo, hi, q):
    a = analyze(get_spec(formula, name="t"))
    first, last = a.branches[0], a.branches[-1]
    assert first.y_range[0] == pytest.approx(lo, abs=1e-15) and last.y_range[1] == pytest.approx(hi, abs=1e-15)
    assert first.lower_end == last.upper_end == "power"
    assert first.orders["lower"] == last.orders["upper"] == q


def test_exponential_limits_on_both_sides():
    for formula, lo in (("erf(x)", -1.0), ("0.5*(1 + erf(x))", 0.0)):
        (b,) = analyze(get_spec(formula, name="t")).branches
        assert (b.lower_end, b.upper_end) == ("log", "log") and b.y_range == (lo, 1.0)


def test_branch_points_on_both_ends_and_maxima():
    a = analyze(get_spec("x - 2*tanh(x)", name="t"))
    assert [(b.lower_end, b.upper_end) for b in a.branches] == [("tail", "sqrt"), ("sqrt", "sqrt"), ("sqrt", "tail")]
    a = analyze(get_spec("-x*sigmoid(x)", name="t"))
    assert [b.upper_end for b in a.branches] == ["sqrt", "sqrt"]   # a maximum: both branches end at it


def _codes(table: dict, x: np.ndarray) -> np.ndarray:
    fc = table["forward_code"]
    idx = sum(((x > float(b["value"])) if b["side"] == "left" else (x >= float(b["value"]))).astype(int)
              for b in fc["x_breaks"]) if fc["x_breaks"] else np.zeros(x.shape, int)
    return np.asarray(fc["codes"])[idx]


@pytest.mark.parametrize("formula", [
    "atan(x)", "x/(1 + abs(x))", "x/sqrt(1 + x**2)", "erf(x)", "0.5*(1 + erf(x))",
    "x - 2*tanh(x)", "-x*sigmoid(x)", "x*sigmoid(-0.5*x)", "x - tanh(x)",
    "asinh(x)",       # g = 1/cosh(y) settles to 0 only by |x| ~ 1e8: the constant tail is found further out
    "1 - exp(-exp(x))",   # loglog: a piece ending at g = 0 from terms of ~0.3 rounds to 3.1e-7 in float32
                          # where the fit's float32 check is not dense (fit._rounding_error)
])
def test_fits_and_certifies(formula):
    """Default bounds met, and the table agrees with f' on a fresh grid of x (points neither the
    fitter nor the certifier chose), evaluated in real (float64) arithmetic."""
    spec = get_spec(formula, name="t")
    t = build_table(spec, fp32_samples=SAMPLES)
    assert t["certificate"]["approx_error"] <= 5e-8
    assert t["certificate"]["float32_eval_error"] <= 2.5e-7
    f, fp = (sp.lambdify(X, e, ["scipy", "numpy"]) for e in (spec.expr, sp.diff(spec.expr, X)))
    x = np.concatenate([np.linspace(-30, 30, 120_001), np.geomspace(30, 1e12, 2000), -np.geomspace(30, 1e12, 2000)])
    with np.errstate(all="ignore"):
        y, want = f(x), fp(x)
    ok = np.isfinite(y) & np.isfinite(want)
    x, y, want, code = x[ok], y[ok], want[ok], _codes(t, x[ok])
    got = np.empty_like(y)
    for c in range(t["n_codes"]):
        got[code == c] = eval_code_class(t["code_classes"][c], y[code == c], {})
    err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    assert np.max(err) <= t["certificate"]["approx_error"] + FLOOR64, x[np.argmax(err)]


def test_higher_order_flat_point_splits_the_branch():
    """tanhshrink: f' = tanh(x)^2 has a double zero at 0 (no sign change): g ~ (3|y|)^(2/3)."""
    a = analyze(get_spec("x - tanh(x)", name="t"))
    assert a.n_branches == 1 and a.code_bits == 0
    assert [(b.lower_end, b.upper_end) for b in a.branches] == [("tail", "root"), ("root", "tail")]
    assert a.branches[0].orders["upper"] == 2


@pytest.mark.parametrize("formula, words", [
    ("Piecewise((x, x > 0.5), (x, x < -0.5), (0, True))", r"discontinuous: f jumps at x = -0.5"),  # hardshrink
    ("Piecewise((x, x > 1), (0, True))", r"discontinuous: f jumps at x = 1 "),                     # threshold
    ("Piecewise((-(-x)**(1/3), x < 0), (x**(1/3), True))", r"unbounded next to y = -?0 .*x -> 0"),
])
def test_refusals_name_the_property_and_where(formula, words):
    with pytest.raises(SpecError, match=words):
        analyze(get_spec(formula, name="t"))


def test_unbounded_g_on_an_unbounded_range_is_not_a_tolerance_problem():
    """g growing like a power of y is a power tail (tests/test_power_tail.py: x**3 - x fits); growing
    like c|y| is an exponential tail (x + exp(x), sinh fit there too); faster than |y| (exp(x asinh x):
    g/y = asinh x + x/sqrt(1 + x^2)) is refused, and no tolerance would help."""
    with pytest.raises(FitError, match=r"grows without bound as x -> [+-]inf .* faster than any power of x, "
                                       r"but g/\|y\| grows without bound") as err:
        build_table(get_spec("exp(x*asinh(x))", name="t"), fp32_samples=SAMPLES)
    assert "tolerance" not in str(err.value)


@pytest.mark.parametrize("formula, torch_f, xs", [
    ("Min(Max(0, x/6 + 1/2), 1)", torch.nn.functional.hardsigmoid, [-3.0, 3.0, -5.0, 0.0]),
    ("Min(Max(0, x), 6)", torch.nn.functional.relu6, [0.0, 6.0, -1.0, 7.0, 2.0]),
    ("Min(Max(-1, x), 1)", torch.nn.functional.hardtanh, [-1.0, 1.0, -2.0, 0.5]),
])
def test_plateaus_follow_pytorch_at_their_kinks(formula, torch_f, xs):
    """On a plateau y carries no x: g is PyTorch's gradient there (0), also at the kink itself."""
    t = build_table(get_spec(formula, name="t"), fp32_samples=SAMPLES)
    assert t["code_bits"] == 0
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    torch_f(x).sum().backward()
    y = torch_f(x.detach()).numpy()
    got = eval_code_class(t["code_classes"][0], y, {})
    want = x.grad.numpy()
    assert ((got == 0) == (want == 0)).all()          # the kinks: exactly PyTorch's zero
    # PyTorch's hardsigmoid backward multiplies by 1/6 rounded to float32 even in float64
    np.testing.assert_allclose(got, want, rtol=2**-23, atol=0)


def test_cli_fits_power_ends_and_show_explains_them(tmp_path, capsys):
    """The front door: `invact fit "atan(x)"` exits 0 (it was exit 2, "no limit"), generated code
    included, and `invact show` says what each end kind of the table means."""
    from invact.fitting.cli import main
    assert main(["--root", str(tmp_path), "fit", "atan(x)", "--name", "arctan", "--fp32-samples", "4096"]) == 0
    capsys.readouterr()
    assert main(["--root", str(tmp_path), "show", "arctan"]) == 0
    out = capsys.readouterr().out
    assert "ends power/power" in out and "power: finite limit approached like |x|^-q" in out


@pytest.mark.parametrize("formula, words", [
    ("x + sin(x)", "touches zero without changing sign .* infinitely many flat points"),
    ("exp(-1/x**2)", r"no derivative at x = 0"),
])
def test_more_refusals(formula, words):
    with pytest.raises(SpecError, match=words):
        analyze(get_spec(formula, name="t"))


def test_flat_point_of_order_four():
    a = analyze(get_spec("x**5 + 0*x", name="t"))
    assert [(b.lower_end, b.upper_end) for b in a.branches] == [("tail", "root"), ("root", "tail")]
    assert a.branches[1].orders["lower"] == 4


def test_tolerance_advice_only_where_a_looser_bound_helps():
    """A degree-2 layout (64 pieces at most) cannot reach 5e-8 on GELU's right branch but gets within ~1e-5: the advice
    names a tolerance; a hopeless best error gets no tolerance advice."""
    from invact.fitting.fit import _advice, fit_branch, f32_below
    from invact.fitting.reference import BranchReference
    b = analyze(get_spec("x*(1 + erf(x/sqrt(2)))/2", name="t")).branches[1]
    y_min = sp.N(b.expr.subs(X, sp.Float(b.x_range[0], 30)), 40)
    with pytest.raises(FitError, match=r"--tolerance \S+ or more is likely to fit"):
        fit_branch(BranchReference(b), f32_below(float(y_min)), 1.0, {"sqrt": (y_min, 1)}, 5e-8,
                   degrees=(2,), rationals=())
    assert "--tolerance" not in _advice(0.3, 5e-8) and "would not help" in _advice(0.3, 5e-8)


@pytest.mark.parametrize("formula, words", [
    ("atan(x)", r"grows like \|y - -1.5708\|\^\(-1/1\)"),   # inverse of a power-law limit: unbounded x
    ("x - tanh(x)", "does not approach y"),                 # x = y + 1 far out: no x = y tail
])
def test_inverse_target_refusals(formula, words):
    with pytest.raises(FitError, match=words) as err:
        build_table(get_spec(formula, name="t"), target="inverse", fp32_samples=SAMPLES)
    assert "tolerance" not in str(err.value)
