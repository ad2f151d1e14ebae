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

def test_float64_overflow_of_f_is_not_called_a_property_of_f():
    """-log(1 - tanh(x)) = log((1 + e^{2x})/2) = 2x - log 2 + log(1 + e^{-2x}): finite everywhere."""
    with pytest.raises(SpecError, match="float64 cannot evaluate f at") as info:
        _analyze("-log(1 - tanh(x))")
    x, v = (float(s) for s in re.search(r"at x = (\S+) .*f is (\S+) there", str(info.value)).groups())
    assert v == pytest.approx(2 * x - math.log(2) + math.log1p(math.exp(-2 * x)), rel=1e-5)


def test_float64_cancellation_of_f_prime_is_not_called_its_limit():
    """asin(2 sigmoid(x) - 1) = asin(tanh(x/2)): f' = sech(x/2)/2 -> 0 as x -> +-inf, not inf."""
    with pytest.raises(SpecError, match="float64 cannot evaluate f' at") as info:
        _analyze("asin(2*sigmoid(x) - 1)")
    x, v = (float(s) for s in re.search(r"at x = (\S+) .*f' is (\S+) there", str(info.value)).groups())
    assert v == pytest.approx(0.5 / math.cosh(x / 2), rel=1e-5)
