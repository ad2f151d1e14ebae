"""The one parser of formula and table expression text: a whitelist, never Python's ``eval`` on raw text.

Formulas (``invact fit``) and every expression a table file holds (formula, segment ``expr``,
break and constant values, ``param_domain``) are checked by an ``ast`` walk before sympy sees them:
numbers, the variable (``x`` or ``y``), the declared parameter names, ``+ - * / **`` (``^`` in
formulas), unary minus, the functions and constants of :data:`FUNCTIONS` / :data:`CONSTANTS`,
and for ``Piecewise`` tuples, ``True`` and single comparisons ``< <= > >=``. Anything else raises
:class:`SpecError` naming the token. Only then is the text handed to sympy's parser, with a closed
namespace (no builtins, only these names), so no code in the text can run.

``torch_forward`` (the PyTorch forward of a built-in, pasted into generated code) is not parsed: it
must be one of the built-ins' own strings (:func:`check_torch_forward`).
"""

from __future__ import annotations

import ast
import contextlib
import keyword
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import NoReturn

from ..common.catalog import CATALOG
from .errors import SpecError

__all__ = ["FUNCTIONS", "CONSTANTS", "RESERVED", "MAX_DIGITS", "check_text", "check_torch_forward", "parse",
           "sympy_functions", "allowed_summary", "check_param_names", "is_reserved", "size_guard", "shown",
           "symbol_names"]

# what a formula may call (sympy_functions() maps them to sympy)
FUNCTIONS = ("exp", "log", "sqrt", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh",
             "asinh", "acosh", "atanh", "erf", "erfc", "abs", "Abs", "sign", "min", "max", "Min", "Max",
             "Piecewise", "Heaviside", "sigmoid", "softplus", "relu")
CONSTANTS = ("pi", "E")
# how many positional arguments each function takes (min, max); the rest take exactly one
ARITY = {"log": (1, 2), "Heaviside": (1, 2), "min": (1, None), "max": (1, None), "Min": (1, None),
         "Max": (1, None), "Piecewise": (1, None)}

# Names sympy's parser calls in the text it builds (its closed namespace: see parse)
PARSER_NAMES = ("Integer", "Float", "Rational", "Symbol")
# Keyword names of the public API that takes parameters as keywords: invact.activation(name, *,
# backend, **params), invact.functional.apply(input, name, *, backend, **params), Activation(self, ...)
API_NAMES = ("name", "backend", "input", "self")
# Names a parameter may not take: the variables, Python keywords, the formula language's functions and
# constants, and the names above. The generated code needs none: it names parameter NAME
# ``param_NAME`` (fitting.codegen.printer.mangle), and none of its own identifiers starts with
# ``param_`` (tests/test_trust.py scans generated/*.py for that).
RESERVED = frozenset({"x", "y", "True", "False", "None", *keyword.kwlist, *FUNCTIONS, *CONSTANTS,
                      *PARSER_NAMES, *API_NAMES})

# The most decimal digits a power of two constants may have (10**10**10, 2**-(2**20)): sympy computes
# such powers exactly while it parses, and a number of 10**10 digits takes hours; float64 holds 1.8e308.
MAX_DIGITS = 10_000

_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)
_COMPARE = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.BitXor: "^",
        ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.LShift: "<<", ast.RShift: ">>",
        ast.BitOr: "|", ast.BitAnd: "&", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is", ast.IsNot: "is not",
        ast.In: "in", ast.NotIn: "not in", ast.Not: "not", ast.Invert: "~"}


def allowed_summary() -> str:
    """One paragraph listing what a formula may contain (for help texts and errors)."""
    return ("numbers, x, parameters declared with --param, + - * / ** (or ^), unary minus, "
            f"{', '.join(CONSTANTS)}, and the functions {', '.join(FUNCTIONS)}; Piecewise conditions "
            "are single comparisons (< <= > >=) or True")


def shown(text: str, limit: int = 80) -> str:
    """``text`` for a message: its repr, shortened in the middle past ``limit`` characters."""
    if not isinstance(text, str) or len(text) <= limit:
        return repr(text)
    return f"{text[:limit // 2]!r}...{text[-limit // 4:]!r} ({len(text)} characters)"


@contextlib.contextmanager
def size_guard(what: str, text: str) -> Iterator[None]:
    """Python's recursion limit or memory, hit while parsing or simplifying ``text`` (thousands of terms,
    ``------x``), as a :class:`SpecError` naming ``what``, not an internal error."""
    try:
        yield
    except (RecursionError, MemoryError) as exc:
        raise SpecError(f"{what} {shown(text)} is too large or too deeply nested "
                        f"({type(exc).__name__}); write it shorter") from None


def _token(node: ast.AST, text: str) -> str:
    segment = ast.get_source_segment(text, node)
    if isinstance(node, ast.Attribute):
        return f".{node.attr}"
    if isinstance(node, (ast.BinOp, ast.BoolOp, ast.UnaryOp)):
        op = getattr(node, "op", None)
        if op is not None and type(op) in _OPS:
            return _OPS[type(op)]
    if isinstance(node, ast.Compare):
        bad = [op for op in node.ops if not isinstance(op, _COMPARE)]
        if bad and type(bad[0]) in _OPS:
            return _OPS[type(bad[0])]
    return segment if segment and len(segment) <= 40 else type(node).__name__


class _Whitelist(ast.NodeVisitor):
    """The whitelist walk of :func:`check_text`: :meth:`check` raises :class:`SpecError` for the first node
    outside the formula language (an unknown name first, wherever it is), naming ``what`` and its token.

    Each ``visit_`` method checks its node and returns the children to check next; :meth:`check` walks them
    depth first, left to right, from a list rather than by recursion, so that a deeply nested text costs no
    Python stack here (its limit is that of the power check after this walk)."""

    def __init__(self, what: str, text: str, src: str, names: set[str], xor: bool) -> None:
        self.what, self.text, self.src, self.names, self.xor = what, text, src, names, xor
        self.joined: dict[int, ast.BinOp] = {}   # id of a side of ``&`` / ``|`` -> that operation

    def refuse(self, node: ast.AST, why: str = "is not allowed") -> NoReturn:
        raise SpecError(f"{self.what} {self.text!r}: {_token(node, self.src)!r} {why}; allowed: {allowed_summary()}")

    def check(self, body: ast.expr) -> None:
        """Refuse the first unknown name of ``body`` (even inside a construct refused anyway), then the first
        node outside the language, in the order of the text."""
        unknown = [n for n in ast.walk(body) if isinstance(n, ast.Name) and n.id not in self.names | set(FUNCTIONS)]
        if unknown:
            called = {id(n.func) for n in ast.walk(body) if isinstance(n, ast.Call)}
            first = min(unknown, key=lambda n: n.col_offset)
            self.refuse(first, "is an unknown function" if id(first) in called else "is not a known name")
        pending: list[ast.AST] = [body]
        while pending:
            node = pending.pop()
            join = self.joined.pop(id(node), None)
            if join is not None and not isinstance(node, (ast.Compare, ast.BinOp)):   # (x > 0) & (x < 1)
                self.refuse(join, "joins conditions only")
            pending.extend(reversed(self.visit(node)))

    def generic_visit(self, node: ast.AST) -> NoReturn:
        self.refuse(node)      # a node without a visit_ method below is outside the language

    def visit_Constant(self, node: ast.Constant) -> list[ast.AST]:
        if node.value is not True and (isinstance(node.value, bool) or not isinstance(node.value, (int, float))):
            self.refuse(node)
        return []

    def visit_Name(self, node: ast.Name) -> list[ast.AST]:
        if node.id not in self.names:
            self.refuse(node, "is not a known name" if node.id not in FUNCTIONS else "must be called")
        return []

    def visit_BinOp(self, node: ast.BinOp) -> list[ast.AST]:
        if isinstance(node.op, (ast.BitAnd, ast.BitOr)):     # its sides are checked as conditions in turn
            self.joined.update({id(node.left): node, id(node.right): node})
        elif not isinstance(node.op, _BINOPS) and not (self.xor and isinstance(node.op, ast.BitXor)):
            self.refuse(node)
        return [node.left, node.right]

    def visit_UnaryOp(self, node: ast.UnaryOp) -> list[ast.AST]:
        if not isinstance(node.op, (ast.USub, ast.UAdd)):
            self.refuse(node)
        return [node.operand]

    def visit_Call(self, node: ast.Call) -> list[ast.AST]:
        if not (isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS):
            self.refuse(node.func, "is an unknown function")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args) or not node.args:
            self.refuse(node, "is not allowed (positional arguments only)")
        low, high = ARITY.get(node.func.id, (1, 1))
        if len(node.args) < low or (high is not None and len(node.args) > high):
            takes = f"{low}" if low == high else f"{low} or {high}" if high else f"{low} or more"
            self.refuse(node, f"has {len(node.args)} arguments: {node.func.id} takes {takes} "
                              f"argument{'s' if (high or 2) > 1 else ''}")
        return node.args

    def visit_Tuple(self, node: ast.Tuple) -> list[ast.AST]:
        return node.elts

    def visit_Compare(self, node: ast.Compare) -> list[ast.AST]:
        if len(node.ops) != 1 or not isinstance(node.ops[0], _COMPARE):
            self.refuse(node, "is not allowed (one comparison: < <= > >=)")
        return [node.left, node.comparators[0]]


def check_text(text: str, variables: tuple[str, ...], params: tuple[str, ...] | list[str] = (),
               what: str = "formula", xor: bool = False, relation: bool = False) -> ast.Expression:
    """Parse ``text`` as a Python expression and check every node against the whitelist.

    ``variables``: the tensor variable names allowed (``("x",)`` for formulas, ``("y",)`` for
    segments, ``()`` for parameter expressions); ``relation``: the whole text must be one comparison
    (``param_domain``). Raises :class:`SpecError` naming ``what`` and the offending token.
    """
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"{what} must be a non-empty expression string, got {text!r}")
    if not text.isascii():
        bad = next(ch for ch in text if not ch.isascii())
        raise SpecError(f"{what} {text!r} contains {bad!r}: only ASCII is allowed")
    control = next((ch for ch in text.strip() if not ch.isprintable()), None)
    if control is not None:
        kind = "a line break" if control in "\n\r\v\f" else "a tab" if control == "\t" else "the control character"
        raise SpecError(f"{what} {text!r} contains {kind} {control!r}: write it on one line, with spaces "
                        "(`invact fit` reads a formula's line breaks and tabs as spaces)")
    src = text.strip()
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as exc:
        raise SpecError(f"{what} {text!r} could not be parsed (SyntaxError: {exc.msg})") from None
    names = set(variables) | set(params) | set(CONSTANTS) | {"True"}
    body = tree.body
    if relation and not (isinstance(body, ast.Compare) and len(body.ops) == 1):
        raise SpecError(f"{what} {text!r} must be one comparison such as 'alpha > 0'")

    _Whitelist(what, text, src, names, xor).check(body)
    if xor and "^" in src:   # sympy reads ^ as ** (convert_xor): 10^10^10 is 10**(10**10), not (10^10)^10
        src = src.replace("^", "**")
        body = ast.parse(src, mode="eval").body
    _check_powers(body, src, lambda node, digits: _refuse_power(what, text, src, node, digits))
    return tree


def _refuse_power(what: str, text: str, src: str, node: ast.AST, digits: float) -> None:
    about = f" (about {digits:.2g})" if math.isfinite(digits) else ""
    raise SpecError(f"{what} {shown(text)}: the constant {shown(ast.get_source_segment(src, node), 40)} has more "
                    f"than {MAX_DIGITS} digits{about}; float64 holds numbers below 1.8e308, so write a "
                    "smaller constant or a float such as 1e300")


def _float_power(node: ast.BinOp) -> bool:
    """Whether the power ``node``'s base or exponent is itself a float literal (``-`` allowed): sympy then
    computes it as a Float (mpmath, any exponent at once: ``1.0001**100000``), which float64's range
    check sees afterwards. A float deeper inside (``Max(0.5, 10**10)``, ``0*1.0``) may leave the value
    exact, so it does not count."""
    def literal(n: ast.AST) -> bool:
        while isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            n = n.operand
        return isinstance(n, ast.Constant) and type(n.value) is float
    return literal(node.left) or literal(node.right)


def _check_powers(body: ast.AST, src: str, refuse) -> None:
    """Call ``refuse(node, digits)`` for a power of constants (no x, no parameter) whose exact value
    could have more than :data:`MAX_DIGITS` digits: sympy evaluates ``10**10**10`` or
    ``(1 + 10**-500)**10**6`` exactly while it parses, for hours. Estimated from the text, never by
    computing the power: each constant gets a :class:`_Size`; ``a**b`` has at most digits(a) * |b|
    digits (|b| log10 |a| for an integer a). A power with a float in it is a Float to sympy: not refused."""
    def pow_(base: float, exponent: float) -> float:
        try:
            return base ** exponent
        except (OverflowError, ZeroDivisionError):
            return math.inf

    def known(digits: float, value: float) -> _Size:
        if math.isnan(value):          # inf - inf, 0 * inf in float64: bounds unknown
            return _Size(digits, math.inf, 0.0, None)
        return _Size(digits, abs(value), abs(value), value)

    def bound(node: ast.AST) -> _Size | None:
        if isinstance(node, ast.Constant):
            v = node.value
            if type(v) is int:
                return known(len(str(abs(v))), _as_float(v))
            if type(v) is float:
                return known(max(1, math.ceil(abs(math.log10(v)))) if 0 < v < math.inf else 1, v)
            return None
        if isinstance(node, ast.Name):
            value = {"pi": math.pi, "E": math.e}.get(node.id)
            return None if value is None else known(1, value)
        if isinstance(node, ast.UnaryOp):
            a = bound(node.operand)
            return a if a is None or a.value is None or isinstance(node.op, ast.UAdd) else \
                known(a.digits, -a.value)
        if isinstance(node, ast.BinOp):
            a, b = bound(node.left), bound(node.right)
            if a is None or b is None:
                return None
            digits = a.digits + b.digits
            both = a.value is not None and b.value is not None
            if isinstance(node.op, ast.Pow):
                digits = a.digits * max(1.0, b.hi)
                left = node.left
                if isinstance(left, ast.Constant) and type(left.value) is int and abs(left.value) > 1:
                    digits = max(1.0, math.log10(abs(left.value)) * b.hi)   # 2**20000: 6021 digits
                if not digits <= MAX_DIGITS and not _float_power(node):
                    refuse(node, digits)
                if a.hi == 0:
                    return _Size(digits, 0.0, 0.0, None)     # 0**b: 0 or zoo
                if both:
                    size = pow_(abs(a.value), b.value)
                    return _Size(digits, size, size, size if a.value > 0 else None)
                return _Size(digits, pow_(max(a.hi, _inv(a.lo)), b.hi), pow_(min(a.lo, _inv(a.hi)), b.hi), None)
            if isinstance(node.op, ast.Mult):
                return known(digits, a.value * b.value) if both else _Size(digits, a.hi * b.hi, a.lo * b.lo, None)
            if isinstance(node.op, ast.Div):
                if both and b.value != 0:
                    return known(digits, a.value / b.value)
                return _Size(digits, a.hi * _inv(b.lo), a.lo * _inv(b.hi), None)
            floor = 10.0 ** -min(digits, 300)      # a nonzero p/q of that many digits is >= 1/q
            if both and isinstance(node.op, (ast.Add, ast.Sub)):
                value = a.value + b.value if isinstance(node.op, ast.Add) else a.value - b.value
                if abs(value) >= 1e-8 * max(abs(a.value), abs(b.value)):   # no cancellation
                    return known(digits, value)
            return _Size(digits, a.hi + b.hi, floor, None)
        if isinstance(node, (ast.Call, ast.Tuple, ast.Compare)):
            children = node.args if isinstance(node, ast.Call) else \
                node.elts if isinstance(node, ast.Tuple) else [node.left, *node.comparators]
            parts = [bound(c) for c in children]
            if any(p is None for p in parts):
                return None
            digits, hi = sum(p.digits for p in parts), max(p.hi for p in parts)
            if isinstance(node, ast.Call) and node.func.id in ("exp", "sinh", "cosh"):
                hi = pow_(math.e, hi)
            else:   # log, sqrt, erf, ..., Min, Max, Abs, Piecewise: |f| <= max(|args|, 2.31 digits) + 1
                hi = max(hi, 2.31 * digits) + 1
            return _Size(digits, hi, min(min(p.lo for p in parts), _inv(hi)), None)
        for child in ast.iter_child_nodes(node):   # not a constant, but a part of it may be
            bound(child)
        return None

    bound(body)


@dataclass(frozen=True)
class _Size:
    """A constant of formula text, estimated: about how many digits its exact value has (numerator and
    denominator), bounds of its absolute value (``lo``: of a nonzero value), and its value in float64
    where that is reliable (None: a function's, or after cancellation)."""

    digits: float
    hi: float
    lo: float
    value: float | None


def _inv(v: float) -> float:
    return 1 / v if v > 0 else math.inf


def _as_float(value: int) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf


@lru_cache(maxsize=1)
def sympy_functions() -> dict:
    """What formula and table text may name (:data:`FUNCTIONS`, :data:`CONSTANTS`), as sympy."""
    import sympy as sp
    return {
        "exp": sp.exp, "log": sp.log, "sqrt": sp.sqrt, "erf": sp.erf, "erfc": sp.erfc,
        "sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "asin": sp.asin, "acos": sp.acos, "atan": sp.atan,
        "sinh": sp.sinh, "cosh": sp.cosh, "tanh": sp.tanh, "asinh": sp.asinh, "acosh": sp.acosh, "atanh": sp.atanh,
        "Abs": sp.Abs, "abs": sp.Abs, "sign": sp.sign, "Heaviside": sp.Heaviside, "Piecewise": sp.Piecewise,
        "Max": sp.Max, "Min": sp.Min, "max": sp.Max, "min": sp.Min, "pi": sp.pi, "E": sp.E,
        "sigmoid": lambda z: 1 / (1 + sp.exp(-z)),
        "softplus": lambda z: sp.log(1 + sp.exp(z)),
        "relu": lambda z: sp.Piecewise((0, z <= 0), (z, True)),
    }


def parse(text: str, variables: tuple[str, ...], params: tuple[str, ...] | list[str] = (),
          what: str = "formula", xor: bool = False, relation: bool = False):
    """``text`` as a sympy expression (every symbol real), after :func:`check_text`."""
    import sympy as sp
    from sympy.parsing.sympy_parser import convert_xor, parse_expr, standard_transformations

    local = {**sympy_functions(), **{n: sp.Symbol(n, real=True) for n in (*variables, *params)}}
    closed = {"__builtins__": {}, "Integer": sp.Integer, "Float": sp.Float, "Rational": sp.Rational,
              "Symbol": sp.Symbol, "True": True}
    transformations = standard_transformations + ((convert_xor,) if xor else ())
    with size_guard(what, text):
        check_text(text, variables, params, what, xor, relation)
        try:
            return parse_expr(text.strip(), local_dict=local, global_dict=closed, transformations=transformations)
        except (SyntaxError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise SpecError(f"{what} {text!r} could not be parsed ({reason})") from None


def is_reserved(name: str) -> bool:
    """Whether ``name`` may not be a parameter: :data:`RESERVED`, or a leading underscore (Python's
    private and special names)."""
    return name in RESERVED or name.startswith("_")


def check_param_names(names, formula_symbols: set[str] | None = None, what: str = "--param") -> None:
    """Refuse reserved parameter names and, given the formula's free symbols, unused parameters."""
    for n in names:
        if not isinstance(n, str) or not (n.isascii() and n.isidentifier()) or is_reserved(n):
            raise SpecError(f"{what} {n!r}: parameter names must be ASCII identifiers (formulas are ASCII) not "
                            "starting with '_', and not x, y, a Python keyword, a function or constant of "
                            f"formulas, or one of {', '.join(PARSER_NAMES + API_NAMES)}")
    if formula_symbols is not None:
        unused = sorted(set(names) - formula_symbols)
        if unused:
            raise SpecError(f"{what} {', '.join(map(repr, unused))}: the formula does not contain "
                            f"{'this parameter' if len(unused) == 1 else 'these parameters'}")


def symbol_names(expr) -> set[str]:
    """The names of a parsed formula's free symbols (x and the parameters it uses), for
    :func:`check_param_names`."""
    return {s.name for s in expr.free_symbols}


def check_torch_forward(text: str | None, what: str = "torch_forward", params=None) -> None:
    """A table's ``torch_forward`` must be None or one of the built-ins' own strings: it is pasted
    into generated code and evaluated, so no other text is accepted. Given the table's ``params``,
    they must be that built-in's (generated code renames them in the text: a parameter ``F`` would
    turn ``F.elu`` into ``param_F.elu``)."""
    if text is None:
        return
    owners = [e for e in CATALOG if e.torch_forward == text]   # the built-ins' (formulas.BUILTINS)
    if not owners:
        raise SpecError(f"{what} {text!r} is not the PyTorch forward of a built-in activation "
                        "(only those are accepted: it becomes code)")
    if params is not None and not any(set(e.params) == set(params) for e in owners):
        raise SpecError(f"{what} {text!r} is {owners[0].name}'s, whose parameters are "
                        f"{sorted(owners[0].params) or 'none'}, not {sorted(params)}")
