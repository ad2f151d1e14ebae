"""Branch analysis of every built-in against known branch points and code widths."""

import math

import numpy as np
import pytest
import sympy as sp

from invact.fitting.branches import analyze
from invact.fitting.errors import SpecError
from invact.fitting.exact import Y, exact_expression
from invact.fitting.formulas import BUILTINS, get_spec

# x_min, y_min from docs/floors.md (float64). Branch points are polished with mpmath, so they
# must agree to a few float64 ulps (the y values are f at x_min, rounded once).
KNOWN_MINIMA = {
    "gelu": (-0.75179152469356446, -0.16997120747990366),
    "silu": (-1.2784645427610738, -0.27846454276107380),
}
# Non-monotone built-ins need one bit ("x left of the minimum"); monotone ones, and ones whose flat
# part y tells apart (relu, relu2), need none.
ONE_BIT = {"gelu", "gelu_tanh", "silu", "quick_gelu", "mish", "hardswish"}


@pytest.mark.parametrize("name", sorted(KNOWN_MINIMA))
def test_branch_point_matches_design(name):
    a = analyze(BUILTINS[name])
    left, right = a.branches
    x_min, y_min = KNOWN_MINIMA[name]
    assert left.x_range[1] == right.x_range[0]
    assert left.x_range[1] == pytest.approx(x_min, abs=4e-16)
    assert left.y_range[0] == pytest.approx(y_min, abs=1e-16)
    assert (left.direction, right.direction) == ("decreasing", "increasing")
    assert left.lower_end == "sqrt" and right.lower_end == "sqrt"
    assert left.upper_end == "log", "y -> 0- as x -> -inf is a log-type end"
    assert right.upper_end == "tail"


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_code_width(name):
    a = analyze(BUILTINS[name])
    assert a.code_bits == (1 if name in ONE_BIT else 0)
    # codes must tell apart any two branches whose y ranges overlap on an interval holding more than
    # one float32 value (softplus's threshold leaves a 2e-9 overlap at y = 20: no stored y inside it)
    for p in a.branches:
        for q in a.branches:
            if p.index < q.index and not (p.flat or q.flat):
                top = min(p.y_range[1], q.y_range[1])
                overlap = top - max(p.y_range[0], q.y_range[0])
                if overlap > float(np.spacing(np.float32(min(abs(top), 3e38)))):
                    assert p.code != q.code, (p, q)


def test_branch_reaching_plus_infinity_has_code_zero():
    # the runtime's one bit means "x left of the minimum"
    a = analyze(BUILTINS["gelu"])
    assert [b.code for b in a.branches] == [1, 0]
    assert a.x_breaks == [(a.branches[0].x_range[1], "left")]


def test_hardswish_flat_part_shares_the_left_code():
    a = analyze(BUILTINS["hardswish"])
    flat, dec, inc, lin = a.branches
    assert flat.direction == "constant" and flat.code == dec.code == 1
    assert inc.code == lin.code == 0
    assert a.x_breaks == [(-1.5, "left")]


@pytest.mark.parametrize("name, expected", [
    ("sigmoid", Y * (1 - Y)),
    ("tanh", 1 - Y**2),
    ("relu2", 2 * sp.sqrt(Y)),
    ("softplus", 1 - sp.exp(-sp.Symbol("beta", real=True) * Y)),
    ("elu", Y + sp.Symbol("alpha", real=True)),
])
def test_exact_route(name, expected):
    spec = BUILTINS[name]
    a = analyze(spec)
    rising = [b for b in a.branches if not b.flat and b.direction == "increasing"][0]
    got = exact_expression(rising, spec, "derivative")
    assert got is not None
    assert sp.simplify(got - expected) == 0


def test_no_closed_form_for_gelu():
    a = analyze(BUILTINS["gelu"])
    assert all(exact_expression(b, BUILTINS["gelu"], "derivative") is None for b in a.branches)


@pytest.mark.parametrize("formula, words", [
    ("sin(x)", "infinitely many"),
    ("sqrt(x)", "not real-valued"),
    ("log(x)", "not real-valued"),
])
def test_refusals(formula, words):
    with pytest.raises(SpecError, match=words):
        analyze(get_spec(formula, name="bad"))


def test_inflection_is_not_a_branch_point():
    a = analyze(get_spec("x**3 + x", name="cubic"))
    assert a.n_branches == 1 and a.branches[0].direction == "increasing"
    a = analyze(get_spec("x**3", name="cube"))
    b = a.branches
    # one monotone branch and no code, but split at the flat point x = 0 (f' has a double zero:
    # g ~ 3 |y|^(2/3) is singular there on both sides; issue 14)
    assert a.n_branches == 1 and a.code_bits == 0
    assert [x.direction for x in b] == ["increasing", "increasing"]
    assert math.isinf(b[0].x_range[0]) and b[0].x_range[1] == 0.0 and math.isinf(b[1].x_range[1])
    assert (b[0].upper_end, b[1].lower_end) == ("root", "root") and b[1].orders["lower"] == 2
