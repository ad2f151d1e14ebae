"""The one check of an activation's parameters, for the fitter (``ActivationSpec.with_params``) and the
runtime (``invact.ops``): names, real finite values, the table's domain relations.

``param_domain`` relations (``'alpha > 0'``) are table text: :func:`holds` compares them by an ``ast``
walk over numbers, parameter names, ``+ - * /`` and unary minus, never ``eval``.
"""

from __future__ import annotations

import ast
import math
import operator as op
from collections.abc import Callable, Iterable, Mapping

__all__ = ["DEFAULT_TOLERANCE", "ParamError", "check_params", "holds", "real"]

DEFAULT_TOLERANCE = 5e-8   # `invact fit --tolerance`'s default: the bound on g's approximation error


class ParamError(ValueError):
    """A parameter an activation cannot take; ``argument`` names it (``params['alpha']``)."""

    def __init__(self, message: str, argument: str = "params") -> None:
        super().__init__(message)
        self.argument = argument


def real(value: object, argument: str, label: str | None = None) -> float:
    """``value`` as a float: a real number (int, float, a one-element real tensor or array, anything
    ``float()`` takes but text); :class:`ParamError` naming ``argument`` (as ``label`` in the message,
    default ``argument``) otherwise, also for a tensor that requires grad: a table's parameters are
    constants, so no gradient could reach it."""
    # (a float first: under torch.compile Dynamo types a symbolic float as float and cannot getattr on it)
    if not isinstance(value, (int, float)) and getattr(value, "requires_grad", False) is True:
        raise ParamError(f"{label or argument} is a tensor that requires grad; invact's parameters are table "
                         "constants and get no gradient: pass float(p) or p.detach() to train without one, or "
                         "use torch.nn.functional's activation to learn it", argument)
    if not isinstance(value, (str, bytes, complex)):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a complex or many-element tensor
            pass
    raise ParamError(f"{label or argument} must be a real number, got {value!r}", argument)


_BINARY = {ast.Add: op.add, ast.Sub: op.sub, ast.Mult: op.mul, ast.Div: op.truediv}
_COMPARE = {ast.Lt: op.lt, ast.LtE: op.le, ast.Gt: op.gt, ast.GtE: op.ge}


def holds(relation: str, values: Mapping[str, float]) -> bool:
    """Whether a param_domain relation holds for ``values`` (not where it divides by 0); :class:`ParamError`
    if it is not one comparison of numbers, parameter names, + - * / and unary minus."""
    invalid = ParamError(f"param_domain {relation!r} is not a comparison of parameters and numbers; "
                         "run `invact generate` from a valid table", "param_domain")

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id in values:
            return values[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](value(node.left), value(node.right))
        raise invalid

    try:
        tree = ast.parse(relation, mode="eval").body
    except SyntaxError:
        raise invalid from None
    if not (isinstance(tree, ast.Compare) and len(tree.ops) == 1 and type(tree.ops[0]) in _COMPARE):
        raise invalid
    try:
        return _COMPARE[type(tree.ops[0])](value(tree.left), value(tree.comparators[0]))
    except ZeroDivisionError:   # a relation dividing by a parameter expression that is 0: not held
        return False


def check_params(name: str, defaults: Mapping[str, float], given: Mapping[str, object] | None = None,
                 domain: Iterable[str] = (), fixed: Callable[[dict[str, float]], str] | None = None,
                 hint: Callable[[dict[str, float]], str] | None = None) -> dict[str, float]:
    """``given`` over ``defaults`` as floats, in the defaults' order, for activation ``name``.

    Raises :class:`ParamError` for a name not in ``defaults``, a value that is not a finite real
    number, values other than the defaults when ``fixed`` is given (its message, from the values), or
    a ``domain`` relation that does not hold (followed by ``hint``'s text for the values, if given).
    """
    given = dict(given or {})
    unknown = [k for k in given if k not in defaults]
    if unknown:
        known = ", ".join(sorted(defaults)) or "none"
        what = "is not a parameter" if len(unknown) == 1 else "are not parameters"
        raise ParamError(f"params: {', '.join(map(repr, unknown))} {what} of {name!r} (known: {known})")
    values = {}
    for key, default in defaults.items():
        value = real(given.get(key, default), f"params[{key!r}]", f"params: {key!r}")
        if not math.isfinite(value):
            raise ParamError(f"params: {key!r} must be finite, got {value!r}", f"params[{key!r}]")
        values[key] = value
    if fixed is not None and values != {k: float(v) for k, v in defaults.items()}:
        raise ParamError(fixed(values))
    for rel in domain:
        if not holds(rel, values):
            raise ParamError(f"params: {name!r} needs {rel} (got {values})" + (f"; {hint(values)}" if hint else ""))
    return values
