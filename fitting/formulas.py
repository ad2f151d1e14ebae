"""Activation formulas: built-in names and user formula strings -> :class:`ActivationSpec`.

Each built-in equals PyTorch's own definition (``torch.nn.functional``) to float64 rounding, including
its conventions at kinks: the piece whose condition owns a boundary point gives the derivative there
(relu's gradient at 0 is 0, hardswish's at -3 is 0 and at 3 is 1, as torch.autograd gives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy as sp

from .errors import SpecError
from .expressions import check_param_names, check_text, parse

__all__ = ["X", "SpecError", "ActivationSpec", "BUILTINS", "get_spec", "parse_formula"]

X = sp.Symbol("x", real=True)
SYMPY_FUNCTIONS = {  # what formula and table text may name (fitting.expressions checks it first)
    "exp": sp.exp, "log": sp.log, "sqrt": sp.sqrt, "erf": sp.erf, "erfc": sp.erfc,
    "sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "asin": sp.asin, "acos": sp.acos, "atan": sp.atan,
    "sinh": sp.sinh, "cosh": sp.cosh, "tanh": sp.tanh, "asinh": sp.asinh, "acosh": sp.acosh, "atanh": sp.atanh,
    "Abs": sp.Abs, "abs": sp.Abs, "sign": sp.sign, "Heaviside": sp.Heaviside, "Piecewise": sp.Piecewise,
    "Max": sp.Max, "Min": sp.Min, "max": sp.Max, "min": sp.Min, "pi": sp.pi, "E": sp.E,
    "sigmoid": lambda z: 1 / (1 + sp.exp(-z)),
    "softplus": lambda z: sp.log(1 + sp.exp(z)),
    "relu": lambda z: sp.Piecewise((0, z <= 0), (z, True)),
}


@dataclass(frozen=True)
class ActivationSpec:
    """An activation as a sympy expression in ``x`` with named parameters.

    ``expr`` keeps the parameters as symbols; ``params`` holds their values; ``domain`` lists
    relations the parameters must satisfy for the branch structure recorded in a table to hold.
    """

    name: str
    expr: sp.Expr
    params: dict[str, float] = field(default_factory=dict)
    domain: tuple[str, ...] = ()
    doc: str = ""
    torch_forward: str | None = None

    @property
    def symbols(self) -> dict[str, sp.Symbol]:
        return {n: sp.Symbol(n, real=True) for n in self.params}

    def substituted(self) -> sp.Expr:
        """The expression with parameter values in place of their symbols."""
        subs = {sym: sp.Float(self.params[n], 30) if not float(self.params[n]).is_integer()
                else sp.Integer(int(self.params[n])) for n, sym in self.symbols.items()}
        return self.expr.subs(subs)

    def formula(self) -> str:
        return sp.sstr(self.expr)

    def with_params(self, overrides: dict[str, float] | None) -> "ActivationSpec":
        """A copy with some parameters replaced; unknown names and non-finite values are refused."""
        if not overrides:
            return self
        params = dict(self.params)
        for key, value in overrides.items():
            if key not in params:
                known = ", ".join(sorted(params)) or "none"
                raise SpecError(f"parameter {key!r} is not a parameter of {self.name!r} (known: {known})")
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise SpecError(f"parameter {key!r} must be a real number, got {value!r}") from None
            if not math.isfinite(value):
                raise SpecError(f"parameter {key!r} must be finite, got {value!r}")
            params[key] = value
        spec = ActivationSpec(self.name, self.expr, params, self.domain, self.doc, self.torch_forward)
        spec.check_domain()
        return spec

    def check_domain(self) -> None:
        for rel in self.domain:
            ok = parse(rel, (), tuple(self.params), "param_domain", relation=True).subs(
                {s: self.params[n] for n, s in self.symbols.items()})
            if ok is not sp.true:
                vals = ", ".join(f"{n}={v!r}" for n, v in self.params.items())
                raise SpecError(f"{self.name!r} needs {rel} (got {vals})")


def _sym(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


def _sigmoid(z):
    return 1 / (1 + sp.exp(-z))


_a, _b, _t, _s, _sl = _sym("alpha"), _sym("beta"), _sym("threshold"), _sym("scale"), _sym("negative_slope")
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946

BUILTINS: dict[str, ActivationSpec] = {s.name: s for s in [
    ActivationSpec("gelu", X * (1 + sp.erf(X / sp.sqrt(2))) / 2, doc="torch.nn.GELU()", torch_forward="F.gelu(x)"),
    ActivationSpec("gelu_tanh", X * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (X + sp.Rational(44715, 10**6) * X**3))) / 2,
                   doc="torch.nn.GELU(approximate='tanh')", torch_forward="F.gelu(x, approximate='tanh')"),
    ActivationSpec("silu", X * _sigmoid(X), doc="torch.nn.SiLU()", torch_forward="F.silu(x)"),
    ActivationSpec("quick_gelu", X * _sigmoid(sp.Rational(1702, 1000) * X), doc="x*sigmoid(1.702x) (CLIP)", torch_forward="x * torch.sigmoid(1.702 * x)"),
    ActivationSpec("mish", X * sp.tanh(sp.log(1 + sp.exp(X))), doc="torch.nn.Mish()", torch_forward="F.mish(x)"),
    ActivationSpec("softplus", sp.Piecewise((X, _b * X > _t), (sp.log(1 + sp.exp(_b * X)) / _b, True)),
                   {"beta": 1.0, "threshold": 20.0}, ("beta > 0", "threshold > 0"),
                   doc="torch.nn.Softplus(beta, threshold)", torch_forward="F.softplus(x, beta, threshold)"),
    ActivationSpec("elu", sp.Piecewise((_a * (sp.exp(X) - 1), X <= 0), (X, True)), {"alpha": 1.0},
                   ("alpha > 0",), doc="torch.nn.ELU(alpha)", torch_forward="F.elu(x, alpha)"),
    ActivationSpec("celu", sp.Piecewise((_a * (sp.exp(X / _a) - 1), X <= 0), (X, True)), {"alpha": 1.0},
                   ("alpha > 0",), doc="torch.nn.CELU(alpha)", torch_forward="F.celu(x, alpha)"),
    ActivationSpec("selu", sp.Piecewise((_s * _a * (sp.exp(X) - 1), X <= 0), (_s * X, True)),
                   {"alpha": _SELU_ALPHA, "scale": _SELU_SCALE}, ("alpha > 0", "scale > 0"),
                   doc="torch.nn.SELU()", torch_forward="F.selu(x)"),
    ActivationSpec("hardswish", sp.Piecewise((0, X <= -3), (X * (X + 3) / 6, X < 3), (X, True)),
                   doc="torch.nn.Hardswish()", torch_forward="F.hardswish(x)"),
    ActivationSpec("leaky_relu", sp.Piecewise((_sl * X, X <= 0), (X, True)), {"negative_slope": 0.01},
                   ("negative_slope > 0",), doc="torch.nn.LeakyReLU(negative_slope)", torch_forward="F.leaky_relu(x, negative_slope)"),
    ActivationSpec("relu", sp.Piecewise((0, X <= 0), (X, True)), doc="torch.nn.ReLU()", torch_forward="F.relu(x)"),
    ActivationSpec("relu2", sp.Piecewise((0, X <= 0), (X**2, True)), doc="relu(x)**2 (Primer)", torch_forward="torch.square(F.relu(x))"),
    ActivationSpec("sigmoid", _sigmoid(X), doc="torch.nn.Sigmoid()", torch_forward="torch.sigmoid(x)"),
    ActivationSpec("tanh", sp.tanh(X), doc="torch.nn.Tanh()", torch_forward="torch.tanh(x)"),
]}


def parse_formula(text: str, params: dict[str, float] | None = None) -> tuple[sp.Expr, dict[str, float]]:
    """Parse a user formula in ``x``; every other free symbol must be a declared parameter, and every
    declared parameter must occur. Only whitelisted syntax is accepted (:mod:`.expressions`)."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError("formula must be a non-empty string in x, e.g. 'x*sigmoid(1.702*x)'")
    params = dict(params or {})
    check_param_names(params)
    try:
        expr = parse(text, ("x",), tuple(params), "formula", xor=True)
    except SpecError as exc:
        unknown = _unknown_names(text, params)
        if not unknown:
            raise
        raise SpecError(f"formula {text!r} has unknown symbols {unknown}: "
                        "use x for the input and declare parameters with --param NAME=VALUE") from exc
    if not isinstance(expr, sp.Expr):
        raise SpecError(f"formula {text!r} is not an expression in x")
    if X not in expr.free_symbols:
        raise SpecError(f"formula {text!r} does not depend on x")
    check_param_names(params, {s.name for s in expr.free_symbols})
    undefined = [f for f in expr.atoms(sp.Function) if type(f).__name__ not in _KNOWN_FUNC_NAMES]
    if undefined:
        raise SpecError(f"formula {text!r} uses unknown functions {sorted(str(f.func) for f in undefined)}")
    return expr, params


def _unknown_names(text: str, params: dict) -> list[str]:
    """Bare names in an otherwise allowed formula that are neither x, a constant nor a parameter."""
    try:
        check_text(text, ("x",), tuple(params) + tuple(_free_names(text)), "formula", xor=True)
    except (SpecError, SyntaxError):
        return []
    return sorted(set(_free_names(text)) - set(params) - {"x"})


def _free_names(text: str) -> list[str]:
    import ast
    tree = ast.parse(text.strip(), mode="eval")
    calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in calls
            and n.id not in SYMPY_FUNCTIONS and n.id != "True" and not n.id.startswith("__")]


_KNOWN_FUNC_NAMES = {"exp", "log", "erf", "erfc", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh",
                     "tanh", "asinh", "acosh", "atanh", "Abs", "sign", "Heaviside", "Piecewise", "Max", "Min"}


def get_spec(name_or_formula: str, name: str | None = None,
             params: dict[str, float] | None = None) -> ActivationSpec:
    """A built-in by name (with parameter overrides) or a new activation from a formula string."""
    if isinstance(name_or_formula, str):
        name_or_formula = name_or_formula.strip()
    if name_or_formula in BUILTINS:
        return BUILTINS[name_or_formula].with_params(params)
    if name_or_formula.isidentifier() and "x" != name_or_formula and name is None:
        known = ", ".join(sorted(BUILTINS))
        raise SpecError(f"unknown activation {name_or_formula!r}; built-ins are: {known} "
                        "(or give a formula in x with --name)")
    expr, params = parse_formula(name_or_formula, params)
    label = name or "custom"
    if not label.isidentifier():
        raise SpecError(f"name must be a Python identifier, got {label!r}")
    for key, value in params.items():
        if not math.isfinite(float(value)):
            raise SpecError(f"parameter {key!r} must be finite, got {value!r}")
    return ActivationSpec(label, expr, {k: float(v) for k, v in params.items()}, doc=name_or_formula)
