"""The exact route is decided by the formula's structure only (fitting/exact.py).

- float coefficients are read as the rationals sympy's solve makes of them, so an expanded float
  polynomial gets the closed form its exact twin gets;
- x occurring once (tanh(x)**3) is inverted layer by layer, each layer a solve of one function of a
  bare symbol, never sympy's solve of the whole chain (which for tanh(x)**3 runs for minutes and was cut
  by a 30 s clock, so the machine's speed chose the table); the clock is a safety net whose firing is an
  error naming it;
- the fitter's modules import no private names of each other.
"""

from __future__ import annotations

import ast
from contextlib import contextmanager
from pathlib import Path

import pytest

sp = pytest.importorskip("sympy")

from invact.fitting import exact, get_spec  # noqa: E402
from invact.fitting.branches import analyze  # noqa: E402
from invact.fitting.formulas import X  # noqa: E402

FITTING = Path(__file__).resolve().parent.parent / "fitting"


def _closed_forms(formula: str) -> list:
    spec = get_spec(formula, "t", {})
    return [exact.exact_expression(b, spec, "derivative") for b in analyze(spec).branches]


# --- 1. float coefficients --------------------------------------------------------------------

@pytest.mark.parametrize("shifted", ["(x + 0.1)**4 - 1e-4", "(x + 0.1)**4 - 2*(x + 0.1)**2", "(x + 0.1)**3 + 0.5"])
def test_an_expanded_float_polynomial_is_recognised_like_its_exact_form(shifted):
    """(x + 0.1)**4 - 1e-4 expanded in floats is x**4 + 0.4*x**3 + 0.06*x**2 + 0.004*x + 1.4e-20: shifted by
    0.1 its x**3 .. x coefficients round to ~1e-20, not 0, and it was fitted while the exact form
    (x + 1/10)**4 - 1/10000 had a closed form."""
    floats = sp.expand(sp.sympify(shifted, locals={"x": X}))
    rationals = sp.expand(sp.nsimplify(sp.sympify(shifted, locals={"x": X}), rational=True))
    assert floats.has(sp.Float) and not rationals.has(sp.Float)
    assert exact._invertible(floats) is True
    assert exact._invertible(rationals) is True


def test_float_coefficients_do_not_admit_a_general_quartic():
    """The rationals are the floats' own values: a quartic that is not a shifted biquadratic stays out."""
    assert exact._invertible(sp.expand(sp.sympify("(x + 0.1)**4 - 1e-4 + 1e-3*x", locals={"x": X}))) is False


def test_the_expanded_float_quartic_gets_a_clean_closed_form():
    """Both branches of the expanded float form get g = 0.004*(10000*y + 1)**(3/4) (signed), as the exact
    form does, without float residue terms (3.5e-18*(10000*y + 1)**(1/4)) from f' in floats."""
    found = _closed_forms("x**4 + 0.4*x**3 + 0.06*x**2 + 0.004*x")
    want = sp.sympify("0.004*(10000*y + 1)**(3/4)", locals={"y": exact.Y})
    assert len(found) == 2 and all(g is not None for g in found)
    for g, sign in zip(found, (-1, 1)):
        assert len(sp.Add.make_args(g)) == 1, g
        y0 = sp.Float("0.3")
        assert abs(float(g.subs(exact.Y, y0)) - sign * float(want.subs(exact.Y, y0))) <= 1e-12


# --- 2. chains: no clock in the decision ------------------------------------------------------

# chains of two functions or powers or more (one, as tanh(2*x + 1), sympy's solve inverts as a whole, as fast)
CHAINS = ["tanh(x)**3", "tanh(2*x + 1)**3", "atan(x)**3", "exp(atan(x))", "1/(1 + exp(-x))", "log(1 + exp(x))"]


@pytest.mark.parametrize("formula", CHAINS)
def test_a_chain_is_solved_one_layer_at_a_time(formula, monkeypatch):
    """sympy's solve only ever sees one function (or power, sum, product) of a bare symbol: the time it
    takes is bounded by the layer, not by what sympy makes of the whole chain (tanh(x)**3 = y as a cubic
    in exp(2x): minutes)."""
    exact._roots.cache_clear()
    solve, whole = sp.solve, []

    def one_layer(eq, *args, **kwargs):
        (z,) = eq.lhs.free_symbols                  # these formulas have no parameters
        if z == X or [a for a in eq.lhs.args if a.has(z)] != [z]:
            whole.append(eq)
            raise NotImplementedError              # what the old route caught: no closed form
        return solve(eq, *args, **kwargs)
    monkeypatch.setattr(sp, "solve", one_layer)
    spec = get_spec(formula, "t", {})
    for b in analyze(spec).branches:
        exact.exact_expression(b, spec, "derivative")
    exact._roots.cache_clear()
    assert whole == []


@pytest.mark.parametrize("formula", ["tanh(x)**3", "x**2", "1/(1 + exp(-x))"])
def test_the_guard_firing_is_an_error_naming_it(formula, monkeypatch):
    """A guard that fires (here at once) is reported, never taken as 'no closed form' (a silent choice that
    a slower machine would make differently)."""
    for cache in (exact._roots, exact._at_roots, exact._layer_roots):
        cache.cache_clear()

    @contextmanager
    def fires(seconds):
        raise TimeoutError
        yield  # pragma: no cover
    monkeypatch.setattr(exact, "time_limit", fires)
    spec = get_spec(formula, "t", {})
    with pytest.raises(exact.SolveGuardError, match="SOLVE_SECONDS"):
        for b in analyze(spec).branches:
            exact.exact_expression(b, spec, "derivative")
    for cache in (exact._roots, exact._at_roots, exact._layer_roots):
        cache.cache_clear()


@pytest.mark.parametrize("formula, cheap", [
    ("tanh(x)**3", True),                    # a chain: each layer solved alone
    ("atan(2*x + 1)**3", True),
    ("Max(x, 0)**3", False),                 # a layer with no inverse
    ("(exp(x) + 2)**3/(exp(x) + 1)", False),  # a cubic in exp(x): Cardano with y inside
    ("(exp(x) + 2)/(exp(x) + 1)", True),
])
def test_which_formulas_are_solved_is_structural(formula, cheap):
    assert exact._invertible(sp.sympify(formula, locals={"x": X})) is cheap


def test_tanh_cubed_gets_the_same_answer_every_time():
    """Decided by its layers: tanh(x)**3's closed form 3*y**(2/3)*(1 - y**(2/3)) comes out of sympy as a
    quotient that cancels (0/0) as y -> 1, so no branch has a closed form, on any machine."""
    assert _closed_forms("tanh(x)**3") == [None, None]
    assert [str(g) for g in _closed_forms("1/(1 + exp(-x))")] == ["y*(1 - y)"]


# --- 4. no private names across the fitter's modules -------------------------------------------

def test_fitter_modules_import_no_private_names_of_each_other():
    """branches.code_breaks, branches.codes_clash and exact.agrees are package-internal API (param_domain uses
    them), not private helpers reached into."""
    found = []
    for path in sorted(FITTING.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                found += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                          and not a.name.startswith("__")]
    assert found == []
    from invact.fitting.branches import code_breaks, codes_clash  # noqa: F401
    from invact.fitting.exact import agrees  # noqa: F401
