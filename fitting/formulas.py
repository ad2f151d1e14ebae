"""Activation formulas: built-in names and user formula strings -> :class:`ActivationSpec`.

Each built-in equals PyTorch's own definition (``torch.nn.functional``) to float64 rounding, including
its conventions at kinks: the piece whose condition owns a boundary point gives the derivative there
(relu's gradient at 0 is 0, hardswish's at -3 is 0 and at 3 is 1, as torch.autograd gives).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field

import sympy as sp

from ..common.catalog import CATALOG, Entry
from ..common.params import ParamError, check_params
from .errors import SpecError
from .expressions import check_param_names, check_text, parse, size_guard, symbol_names, sympy_functions

__all__ = ["X", "SpecError", "ActivationSpec", "BUILTINS", "get_spec", "parse_formula"]

X = sp.Symbol("x", real=True)
SYMPY_FUNCTIONS = sympy_functions()  # what formula and table text may name (fitting.expressions)


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
        """A copy with some parameters replaced; unknown names, values that are not finite reals and
        values outside ``domain`` are refused (:func:`invact.common.params.check_params`, the runtime's
        check too) with :class:`SpecError`."""
        if not overrides:
            return self
        params = _checked(self.name, self.params, overrides, self.domain)
        return ActivationSpec(self.name, self.expr, params, self.domain, self.doc, self.torch_forward)

    def check_domain(self) -> None:
        _checked(self.name, self.params, None, self.domain)


def _checked(name: str, defaults: dict[str, float], given: dict | None, domain: tuple[str, ...] = ()
             ) -> dict[str, float]:
    try:
        return check_params(name, defaults, given, domain)
    except ParamError as exc:
        raise SpecError(str(exc)) from None


def _builtin(entry: Entry) -> ActivationSpec:
    expr = parse(entry.formula, ("x",), tuple(entry.params), f"built-in {entry.name!r} formula")
    return ActivationSpec(entry.name, expr, dict(entry.params), entry.domain, entry.doc, entry.torch_forward)


#: the catalog's activations (invact.common.catalog) as specs, by name
BUILTINS: dict[str, ActivationSpec] = {e.name: _builtin(e) for e in CATALOG}


def parse_formula(text: str, params: dict[str, float] | None = None) -> tuple[sp.Expr, dict[str, float]]:
    """Parse a user formula in ``x``; every other free symbol must be a declared parameter, and every
    declared parameter must occur. Only whitelisted syntax is accepted (:mod:`.expressions`)."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError("formula must be a non-empty string in x, e.g. 'x*sigmoid(1.702*x)'")
    text = one_line(text)
    params = dict(params or {})
    check_param_names(params)
    with size_guard("formula", text):
        return _parse_formula(text, params)


def _parse_formula(text: str, params: dict[str, float]) -> tuple[sp.Expr, dict[str, float]]:
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
    check_constants(expr, f"formula {text!r}")
    if X not in expr.free_symbols:
        raise SpecError(f"formula {text!r} does not depend on x")
    check_param_names(params, symbol_names(expr))
    undefined = [f for f in expr.atoms(sp.Function) if type(f).__name__ not in _KNOWN_FUNC_NAMES]
    if undefined:
        raise SpecError(f"formula {text!r} uses unknown functions {sorted(str(f.func) for f in undefined)}")
    return expr, params


def one_line(text: str) -> str:
    """A formula as given (a shell string over several lines) with each run of ASCII whitespace --
    line breaks and tabs included -- as one space, the ends stripped: table text is one line."""
    return re.sub(r"[ \t\n\r\f\v]+", " ", text).strip()


def check_constants(expr: sp.Expr, what: str) -> None:
    """Refuse constants that float64 cannot hold: zoo, oo or nan (a division by zero, log(0)), the
    imaginary unit (sqrt(-1)), and numbers beyond float64's range (10**400) or subnormal in it (1e-320),
    with :class:`SpecError`."""
    bad = [c for c in (sp.zoo, sp.oo, -sp.oo, sp.nan) if expr.has(c)]
    if bad:
        raise SpecError(f"{what} is not finite: it contains {bad[0]} (from a division by zero, log(0) or "
                        "another undefined constant); write the formula without it")
    if expr.has(sp.I):
        raise SpecError(f"{what} is not real-valued: it contains the imaginary unit I (from sqrt(-1) or a "
                        "fractional power of a negative number); a table needs a real f")
    for c in sorted(expr.atoms(sp.Number), key=sp.default_sort_key):
        v = 0.0 if c.is_zero else abs(float(sp.Float(c, 30)))
        if not math.isfinite(v):
            raise SpecError(f"{what} has the constant {_short(c)}, out of float64 range (|c| < 1.8e308); "
                            "the fitter evaluates f in float64")
        if 0.0 < v < sys.float_info.min:   # 1e-320*x is 0 in float64 for |x| < 1e4
            raise SpecError(f"{what} has the constant {v:.3g}, a subnormal float64 number (nonzero and below "
                            f"{sys.float_info.min:.3g} in magnitude: fewer than 53 significant bits); the fitter "
                            "evaluates f in float64: scale the formula so that its constants are normal float64 numbers")


def _short(c: sp.Number) -> str:
    text = str(c)
    return text if len(text) <= 40 else f"{sp.Float(c, 4)}"


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
        name_or_formula = one_line(name_or_formula)
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
    with size_guard("formula", name_or_formula):
        return ActivationSpec(label, expr, _checked(label, params, None), doc=name_or_formula)
