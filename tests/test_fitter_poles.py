"""Fitter generality fixes (hunt L): poles between the scan's points, formulas the code generator
cannot print, Arb power series of tails holding sigmoid/tanh, exponential tails where y runs
opposite to x, and float64 artefacts reported as such. Expectations come from the mathematics of
each formula, not from observed output."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest

pytest.importorskip("sympy")
pytest.importorskip("flint")

from invact.fitting.branches import analyze  # noqa: E402
from invact.fitting.cli import main  # noqa: E402
from invact.fitting.errors import SpecError  # noqa: E402
from invact.fitting.formulas import get_spec  # noqa: E402
from invact.fitting.tables import dump_table, project_root  # noqa: E402


def _analyze(formula: str):
    return analyze(get_spec(formula, "t", {}))


# --- 1. poles and other points where f is not defined --------------------------------------------

@pytest.mark.parametrize("formula, points", [
    ("1/(x - 0.01) + 1/(x - 0.02)", ["0.01", "0.02"]),   # was certified with y range [0, 0]
    ("exp(1/(x - 0.01))", ["0.01"]),                      # was exact, y range [1, 1]: NaN gradients
    ("1/(x - 0.01) + 0.001*atan(x)", ["0.01"]),           # crashed: max() of an empty sequence
    ("1/(x - 0.01)**3", ["0.01"]),
    ("x + 1/(x - 0.01)", ["0.01"]),
    ("1/(x - 0.01) - 0.001*x", ["0.01"]),                 # "please report"
    ("log(abs(x - 0.01))", ["0.01"]),                     # "jumps from -inf to -inf"
    ("1/(x**3 - x + 0.3)", ["-1.12542", "0.338936", "0.786483"]),   # the cubic's three real roots
])
def test_a_pole_off_the_scan_grid_is_refused_naming_it(formula, points):
    with pytest.raises(SpecError) as info:
        _analyze(formula)
    msg = str(info.value)
    assert "not defined (or not continuous)" in msg
    for p in points:
        assert f"x = {p}:" in msg


def test_a_removable_zero_of_a_denominator_is_not_a_pole():
    """(x**2 - 1)/(x - 1) = x + 1 (exact rationals): one increasing branch, y from -inf to inf."""
    (b,) = _analyze("(x**2 - 1)/(x - 1)").branches
    assert b.direction == "increasing" and b.y_range == (-math.inf, math.inf)


@pytest.mark.parametrize("formula", [
    "(exp(x) - exp(1))/(x - 1)",        # -> e at 1 (exact root, sympy's limit)
    "(exp(x) - exp(0.7))/(x - 0.7)",    # -> exp(0.7): exp(0.7) and 0.7 rounded apart (residue ~1e-16)
    "sinh(x - 0.1)/(x - 0.1)",          # -> 1
    "x + (x - 0.5)/(exp(x - 0.5) - 1)", # -> 1.5; sympy folds exp(-0.5) into a Float factor
    "(x**2 - 2)/(x - sqrt(2))",         # = x + sqrt(2): an irrational exact root
])
def test_a_removable_point_off_the_rationals_is_not_a_pole(formula):
    """Each formula is 0/0 at one point with a finite limit equal from both sides: not singular (they
    were refused as 'a pole' when every root became a Float, at which sympy's limit is +-inf)."""
    from invact.fitting.domain import singular_points
    expr = get_spec(formula, "t", {}).substituted()
    assert singular_points(expr, -math.inf, math.inf, False, False) == []


@pytest.mark.parametrize("formula", ["(exp(x) - exp(1))/(x - 1)", "(exp(x) - exp(0.7))/(x - 0.7)",
                                     "x + (x - 0.5)/(exp(x - 0.5) - 1)"])
def test_a_removable_point_off_the_rationals_fits_one_increasing_branch(formula):
    """(e^x - e^c)/(x - c) = e^c (e^t - 1)/t with t = x - c: increasing (its derivative is
    e^c (t e^t - e^t + 1)/t^2 > 0); x + t/(e^t - 1) has derivative 1 - (e^t (t - 1) + 1)/(e^t - 1)^2 > 0."""
    (b,) = _analyze(formula).branches
    assert b.direction == "increasing"


def test_the_singular_point_budget_is_checked_between_zeros(monkeypatch):
    """A denominator with many zeros cannot overrun the per-piece budget: each zero's check here takes
    longer than the whole budget, so only the first is checked (and kept: it was found)."""
    from invact.fitting import domain
    calls = []

    def slow(expr, exact_expr, c, left, right):
        calls.append(c)
        import time
        time.sleep(0.6)
        return False
    monkeypatch.setattr(domain, "BUDGET_SECONDS", 0.5)
    monkeypatch.setattr(domain, "_continuous_at", slow)
    x = get_spec("x", "t", {}).substituted()
    expr = 1 / ((x - 1) * (x - 2) * (x - 3) * (x - 4) * (x - 5))
    assert domain.singular_points(expr, -math.inf, math.inf, False, False) == [("x = 1", "a pole (a division by 0)")]
    assert len(calls) == 1


def test_a_pole_sympy_cannot_locate_is_refused_by_the_monotone_check():
    """x + 0.001 sin(x) = 0.01 has a root near 0.01 (transcendental: solveset gives no closed form).
    f = 1/(x - 0.01 + 0.001 sin x) -> 0 at both infinities, so a 'decreasing' branch over the whole
    line would have the empty y range [0, 0]; x minus it would be 'increasing' across the pole."""
    for formula in ("1/(x - 0.01 + 0.001*sin(x))", "x - 1/(x - 0.01 + 0.001*sin(x))"):
        with pytest.raises(SpecError, match="pole, or a narrow wiggle"):
            _analyze(formula)


def test_pole_refusal_exits_2(tmp_path, capsys):
    assert main(["fit", "1/(x - 0.01) + 1/(x - 0.02)", "--name", "p", "--root", str(tmp_path)]) == 2
    assert "x = 0.01" in capsys.readouterr().err


@pytest.mark.parametrize("formula", ["1/x", "log(x)", "sqrt(x)"])
def test_refusals_at_grid_points_keep_their_wording(formula):
    with pytest.raises(SpecError, match="not real-valued"):
        _analyze(formula)


# --- 2. functions the code generator cannot print --------------------------------------------------

@pytest.mark.parametrize("formula, func", [("erfc(x)", "erfc"), ("acos(-tanh(x))", "acos"),
                                           ("atanh(0.5*tanh(x))", "atanh")])
@pytest.mark.parametrize("extra", [[], ["--no-generate"]])
def test_unprintable_function_refused_before_the_fit(tmp_path, capsys, formula, func, extra):
    assert main(["fit", formula, "--name", "e", "--root", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert f"function {func} is not supported in generated code" in err
    assert "allowed: exp, log" in err
    assert not list(tmp_path.rglob("e.json"))


def test_a_root_holding_an_unprintable_table_fails_with_exit_2(tmp_path, capsys):
    """A table (as an older invact wrote it with --no-generate) whose formula holds erfc: generate, and
    a fit into the root, stop at once naming the file and the function."""
    table = json.loads((project_root(None) / "generated" / "tables" / "tanh.json").read_text())
    table.update(name="e", formula="erfc(x)", torch_forward=None)
    folder = tmp_path / "generated" / "tables"
    folder.mkdir(parents=True)
    (folder / "e.json").write_text(dump_table(table))
    for argv in (["generate"], ["fit", "x", "--name", "lin"]):
        assert main([*argv, "--root", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "e.json" in err and "function erfc" in err


# --- 3. Arb power series of tails holding sigmoid or tanh -----------------------------------------

@pytest.mark.parametrize("formula", ["x**2*sigmoid(x)", "x**2*tanh(x)"])
def test_power_tail_bound_with_sigmoid_or_tanh(formula):
    """f ~ x^2 (n = 2): g = 2 sqrt(y) h with h = 2 would be exact for x^2. With s(x) = sigmoid(x) or
    tanh(x), R = 2x sqrt(s) / f' - 1 = 1/(sqrt(s) (1 + x s'/(2 s))) - 1, and s' <= 4 e^-x, 1 - s <= 2 e^-x
    for x >= 40, so |R| <= ~2 x e^-x < 1e-14: provable far below 1e-6 (it crashed before: a wide
    cell's ball of 1 + exp(-x) held 0, and arb_series has no tanh)."""
    from invact.fitting.power_bound import tail_bound
    seg = SimpleNamespace(transform=SimpleNamespace(root=2, sign=1), coeffs=[2.0], c0_lo=0.0, center=0.0,
                          scale=1.0, error=1e-12)
    expr = get_spec(formula, "t", {}).substituted()
    bound, proved = tail_bound(expr, seg, 40.0, 1.8e19, 1e-6)   # to y = float32 max
    assert proved and bound <= 1e-6


# --- 4. exponential tails where y runs opposite to x ----------------------------------------------

@pytest.mark.parametrize("formula, n_branches", [("cosh(x)", 2), ("exp(-x) - x", 1)])
def test_exponential_tail_against_x_fits(tmp_path, capsys, formula, n_branches):
    """cosh: y -> +inf as x -> -inf on its decreasing branch; exp(-x) - x: y -> +inf as x -> -inf and
    -inf as x -> +inf, one decreasing branch. Both are plain exponential growth (g ~ |y|)."""
    assert main(["fit", formula, "--name", "c", "--root", str(tmp_path), "--no-generate"]) == 0, capsys.readouterr().err
    table = json.loads((tmp_path / "generated" / "tables" / "c.json").read_text())
    assert table["n_branches"] == n_branches
    assert table["certificate"]["approx_error"] <= table["tolerance"]


# --- 5. float64 artefacts are named as such ------------------------------------------------------

def _printed_rel(x: float, dlog: float) -> float:
    """The relative tolerance the message's %.6g printing allows: x and f are each rounded to 6
    significant digits (relative error <= 5e-6 each), so f computed at the printed x is off by up to
    |d log f/dx| 5e-6 |x|, and the printed f by 5e-6 (1% slack for the second-order terms)."""
    return 1.01 * 5e-6 * (1 + abs(x * dlog))


def test_float64_overflow_of_f_is_not_called_a_property_of_f():
    """-log(1 - tanh(x)) = log((1 + e^{2x})/2) = 2x - log 2 + log(1 + e^{-2x}): finite everywhere."""
    with pytest.raises(SpecError, match="float64 cannot evaluate f at") as info:
        _analyze("-log(1 - tanh(x))")
    x, v = (float(s) for s in re.search(r"at x = (\S+) .*f is (\S+) there", str(info.value)).groups())
    f = 2 * x - math.log(2) + math.log1p(math.exp(-2 * x))
    assert v == pytest.approx(f, rel=_printed_rel(x, (1 + math.tanh(x)) / f))   # f' = 1 + tanh(x)


def test_float64_cancellation_of_f_prime_is_not_called_its_limit():
    """asin(2 sigmoid(x) - 1) = asin(tanh(x/2)): f' = sech(x/2)/2 -> 0 as x -> +-inf, not inf."""
    with pytest.raises(SpecError, match="float64 cannot evaluate f' at") as info:
        _analyze("asin(2*sigmoid(x) - 1)")
    x, v = (float(s) for s in re.search(r"at x = (\S+) .*f' is (\S+) there", str(info.value)).groups())
    assert v == pytest.approx(0.5 / math.cosh(x / 2), rel=_printed_rel(x, 0.5 * math.tanh(x / 2)))


def test_a_0_over_0_point_on_the_grid_is_not_blamed_on_float64():
    """x/(e^x - 1) at x = 0 (a grid point) is 0/0: evalf gives 0 there but ~1 (the limit) at
    +-1e-12, so f is not defined at 0 and float64 is not to blame: the old message stays."""
    with pytest.raises(SpecError, match=r"not real-valued \(or not finite\) on the real line: f\(0\) is nan") as info:
        _analyze("x/(exp(x) - 1)")
    assert "float64 cannot" not in str(info.value)


# --- 6. a segment's branch is checked on load ----------------------------------------------------

@pytest.mark.parametrize("change, words", [
    (lambda t: t["code_classes"][0]["segments"][0].update(branch=3), "branch 3 is not an index of its 1 branches"),
    (lambda t: t["code_classes"][0]["segments"][0].update(branch="0"), "branch '0' is not an index"),
    (lambda t: t["branches"][0].update(code=1), "of code 0 whose branch 0 has code 1"),
    (lambda t: t["branches"][0].update(direction="up"), "direction 'up' is not"),
])
def test_a_segment_branch_that_is_no_branch_of_its_code_is_refused(tmp_path, change, words):
    """A hand-edited table whose segment names a branch out of range crashed code generation
    (IndexError); one naming another code's branch would get that branch's sign clamp."""
    from invact.fitting.errors import TableError
    from invact.fitting.tables import load_table
    table = json.loads((project_root(None) / "generated" / "tables" / "tanh.json").read_text())
    assert len(table["branches"]) == 1 and len(table["code_classes"]) == 1
    change(table)
    path = tmp_path / "generated" / "tables" / "tanh.json"
    path.parent.mkdir(parents=True)
    path.write_text(dump_table(table))
    with pytest.raises(TableError, match="code_classes\\[0\\].segments\\[0\\]") as info:
        load_table(path)
    assert words in str(info.value)
