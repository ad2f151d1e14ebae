"""Built-in formulas equal torch.nn.functional in float64 (values and autograd derivatives); bad specs."""

from __future__ import annotations

import dataclasses
import math

import mpmath
import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F

from invact.fitting.formulas import BUILTINS, X, SpecError, get_spec, parse_formula

# PyTorch's definitions, written independently of the specs' own torch_forward strings.
TORCH = {
    "gelu": lambda x, p: F.gelu(x),
    "gelu_tanh": lambda x, p: F.gelu(x, approximate="tanh"),
    "silu": lambda x, p: F.silu(x),
    "quick_gelu": lambda x, p: x * torch.sigmoid(1.702 * x),
    "mish": lambda x, p: F.mish(x),
    "softplus": lambda x, p: F.softplus(x, p["beta"], p["threshold"]),
    "elu": lambda x, p: F.elu(x, p["alpha"]),
    "celu": lambda x, p: F.celu(x, p["alpha"]),
    "selu": lambda x, p: p["scale"] * F.elu(x, p["alpha"]),
    "hardswish": lambda x, p: F.hardswish(x),
    "leaky_relu": lambda x, p: F.leaky_relu(x, p["negative_slope"]),
    "relu": lambda x, p: F.relu(x),
    "relu2": lambda x, p: torch.square(F.relu(x)),
    "sigmoid": lambda x, p: torch.sigmoid(x),
    "tanh": lambda x, p: torch.tanh(x),
}
EPS = np.finfo(np.float64).eps
# torch evaluates gelu as x/2 * (1 + erf(x/sqrt 2)) (tanh for gelu_tanh): the sum is rounded at
# magnitude 1 and then scaled by |x|, so its absolute error is ~eps*|x| even where the result is tiny.
CANCELS = {"gelu", "gelu_tanh"}
# The 50-digit reference has absolute error <= ~1e-50 * e^30 (largest intermediate on [-30, 30]);
# it matters only at x ~ 1e-300, where exp(x) - 1 rounds to 0 at 50 digits.
REF_ERROR = 1e-36


def grid(extra: tuple[float, ...] = ()) -> np.ndarray:
    """A wide grid plus the kinks of all built-ins (0, +-3, softplus' threshold) and their neighbours."""
    kinks = [0.0, -3.0, 3.0, 20.0, 10.0, 5.0, 1e-300, -1e-300, 1e-12, -1e-12, *extra]
    near = [np.nextafter(k, s) for k in kinks for s in (-np.inf, np.inf)]
    return np.unique(np.concatenate([np.linspace(-30, 30, 601), kinks, near]))


def exact(expr: sp.Expr, xs: np.ndarray) -> np.ndarray:
    """expr at the float64 points xs, evaluated with 50 significant digits, rounded to float64."""
    fn = sp.lambdify(X, expr, modules="mpmath")
    with mpmath.workdps(50):
        return np.array([float(fn(mpmath.mpf(float(v)))) for v in xs])


def torch_value_and_grad(name: str, params: dict, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    y = TORCH[name](x, params)
    y.sum().backward()
    return y.detach().numpy(), x.grad.numpy()


def check(name: str, spec, xs: np.ndarray) -> None:
    """torch's value and autograd derivative against the exact formula, within float64 rounding.

    Error model of a float64 evaluation: 8 ulps of the result (each libm function — exp, expm1,
    log1p, erf, tanh — is good to ~1 ulp, and a formula rounds a few more times), plus 8 eps * |x h'(x)|
    for the rounding of the arguments (x/sqrt(2), 1.702*x, ... carry a relative error eps), plus, for
    derivatives, 8 eps absolute: torch's backward formulas combine terms of size ~1 (1 - tanh^2,
    s*(1 + x*(1 - s))). A formula mismatch (a wrong constant, kink side or parameter) is off by far
    more: 0.0447 instead of 0.044715 shows up as ~1e-5, a kink convention as O(1).
    """
    value, grad = torch_value_and_grad(name, spec.params, xs)
    f = spec.substituted()
    f0, f1, f2 = (exact(e, xs) for e in (f, sp.diff(f, X), sp.diff(f, X, 2)))
    cancel = np.abs(xs) if name in CANCELS else 0.0
    for what, got, ref, slope, absolute in (("value", value, f0, f1, cancel),
                                            ("derivative", grad, f1, f2, 1.0 + np.abs(xs))):
        tol = 8 * EPS * (np.abs(ref) + np.abs(xs * slope) + absolute) + REF_ERROR
        bad = np.abs(got - ref) > tol
        assert not bad.any(), (f"{name} {what} differs from torch at x={xs[bad][:5]}: "
                               f"torch {got[bad][:5]}, formula {ref[bad][:5]}")


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_equals_torch(name):
    assert set(TORCH) == set(BUILTINS)
    check(name, BUILTINS[name], grid())


@pytest.mark.parametrize("name, params", [
    ("softplus", {"beta": 2.0, "threshold": 18.0}),   # the least threshold invact takes (catalog)
    ("softplus", {"beta": 0.5, "threshold": 30.0}),
    ("elu", {"alpha": 0.5}),
    ("celu", {"alpha": 2.0}),
    ("selu", {"alpha": 1.5, "scale": 0.75}),
    ("leaky_relu", {"negative_slope": 0.2}),
])
def test_parameter_overrides_equal_torch(name, params):
    spec = get_spec(name, params=params)
    assert spec.params == {**BUILTINS[name].params, **params}
    assert BUILTINS[name].params != spec.params                     # the built-in is left alone
    check(name, spec, grid(extra=(6.0, 2.0)))


def test_torch_forward_strings_match():
    """Each spec's torch_forward (what codegen prints) computes the same as PyTorch's definition."""
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    for name, spec in BUILTINS.items():
        got = eval(spec.torch_forward, {"F": F, "torch": torch, "x": x, **spec.params})
        # selu: F.selu's own constants vs. scale * elu(alpha): a few ulps apart
        torch.testing.assert_close(got, TORCH[name](x, spec.params), rtol=4 * EPS, atol=0, msg=name)


def test_user_formula():
    spec = get_spec("x*sigmoid(a*x)", name="scaled_silu", params={"a": 1.702})
    assert spec.name == "scaled_silu" and spec.params == {"a": 1.702}
    xs = grid()
    ref = exact(BUILTINS["quick_gelu"].substituted(), xs)
    # a = 1.702 in float64 is 1702/1000 * (1 - 2.5e-17): at |x| = 30 the value moves by ~30 * 1.7 *
    # 2.5e-17 relatively, ~1.3e-15
    assert np.allclose(exact(spec.substituted(), xs), ref, rtol=4e-15, atol=0)
    expr, _ = parse_formula("x^2 + abs(x)")                        # ^ is a power, abs is Abs
    assert expr == X**2 + sp.Abs(X)


@pytest.mark.parametrize("text, params, message", [
    ("", None, "non-empty string"),
    ("x**", None, "could not be parsed"),
    ("x*(1+", None, "could not be parsed"),
    ("x*a", None, "unknown symbols ['a']"),
    ("x*a", None, "--param NAME=VALUE"),
    ("2 + 3", None, "does not depend on x"),
    ("foo(x)", None, "'foo' is an unknown function"),
    ("x < 1", None, "not an expression"),
])
def test_bad_formulas(text, params, message):
    with pytest.raises(SpecError) as info:
        get_spec(text, name="f", params=params)
    assert message in str(info.value)


def test_bad_names_and_params():
    with pytest.raises(SpecError, match="unknown activation 'gelu2'; built-ins are: celu, elu, gelu"):
        get_spec("gelu2")
    with pytest.raises(SpecError, match="identifier"):
        get_spec("x*x", name="my act")
    with pytest.raises(SpecError, match=r"'beta' is not a parameter of 'elu' \(known: alpha\)"):
        get_spec("elu", params={"beta": 1.0})
    with pytest.raises(SpecError, match="known: none"):
        get_spec("gelu", params={"alpha": 1.0})
    with pytest.raises(SpecError, match="'alpha' must be a real number, got 'big'"):
        get_spec("elu", params={"alpha": "big"})
    with pytest.raises(SpecError, match="'alpha' must be finite"):
        get_spec("elu", params={"alpha": math.inf})
    with pytest.raises(SpecError, match="needs alpha > 0"):
        get_spec("elu", params={"alpha": -1.0})
    with pytest.raises(SpecError, match="must be finite"):
        get_spec("x*a", name="f", params={"a": math.nan})


@pytest.mark.parametrize("name, expr", [
    ("gelu_tanh", X * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (X + sp.Rational(447, 10**4) * X**3))) / 2),
    ("hardswish", sp.Piecewise((0, X < -3), (X * (X + 3) / 6, X <= 3), (X, True))),   # other kink sides
    ("relu", sp.Piecewise((0, X < 0), (X, True))),
])
def test_check_detects_wrong_formulas(name, expr):
    """The comparison can fail: a rounded constant or a kink owned by the other piece is caught."""
    wrong = dataclasses.replace(BUILTINS[name], expr=expr)
    with pytest.raises(AssertionError, match=f"{name} (value|derivative) differs"):
        check(name, wrong, grid())
