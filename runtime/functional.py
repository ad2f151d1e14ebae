"""Functional activations with :mod:`torch.nn.functional`'s names and signatures.

Each function is one call of :func:`invact.ops.apply`: the forward is PyTorch's own, the backward
rebuilds ``f'(x)`` from the saved output ``y`` (and a packed code of ``ceil(log2 k)`` bits per element
for activations with ``k`` monotone branches) through a fitted table. There is no per-activation
math here: activations are data (``generated/tables/*.json``).

``inplace``: accepted for signature compatibility. ``inplace=False`` (the default) is what invact
does; ``inplace=True`` raises :class:`ValueError`, because invact always returns a new tensor ``y``
and saves that tensor for backward — writing it back into ``input`` would keep two copies alive and
undo the memory saving. The modules (:class:`invact.SiLU` etc.) accept ``inplace=True`` and ignore it,
as a module's result is always used through its return value.

``backend`` (keyword-only, every function): ``"triton"``, ``"compiled"``, ``"eager"``, or ``None`` for
the default ($INVACT_BACKEND, else the best available for the tensor's device; see
:mod:`invact.backends`).

Examples
--------
>>> import torch, invact.functional as IF
>>> x = torch.randn(4, 8, requires_grad=True)
>>> IF.gelu(x).sum().backward()
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from . import ops
from .arguments import ArgumentTypeError, flag
from .common.catalog import Entry, group
from .common.params import real
from .norms import layer_norm, rms_norm  # noqa: F401 - norms that save their output (invact.norms)

# one function per `functional` name of the catalog (invact.common.catalog), built by _function below
_FUNCTIONS = group("functional")
__all__ = [*_FUNCTIONS, "apply", "layer_norm", "rms_norm"]


def _no_inplace(inplace: bool, fn: str) -> None:
    if inplace:
        raise ValueError(f"invact.functional.{fn}: inplace=True is not supported (invact returns a new "
                         f"tensor and saves it for backward); use y = invact.functional.{fn}(x)")


def _table_lookup(rows: tuple[Entry, ...]) -> Callable[[Mapping[str, Any]], str]:
    """``lookup(arguments) -> table`` for catalog rows sharing a class or function: the rows' ``select``
    arguments choose the table (``approximate='tanh'`` -> gelu_tanh); ValueError otherwise (also a TypeError
    for a value of another type than the choices)."""
    fields = tuple(n for n, _ in rows[0].select)
    if not fields:
        table = rows[0].name
        return lambda arguments: table
    one = len(fields) == 1           # one selecting field (GELU's approximate): its value is the key
    tables = {row.select[0][1] if one else tuple(v for _, v in row.select): row.name for row in rows}

    def lookup(arguments: Mapping[str, Any]) -> str:
        key = arguments[fields[0]] if one else tuple([arguments[f] for f in fields])
        try:
            return tables[key]
        except (KeyError, TypeError):
            choices = " or ".join(map(repr, tables))
            # a value of another type than the choices' (approximate=None): torch raises TypeError there
            error = ValueError if any(type(key) is type(k) for k in tables) else ArgumentTypeError
            raise error(f"{', '.join(fields)} must be {choices}, got {key!r}") from None
    return lookup


def table_selector(rows: tuple[Entry, ...]) -> Callable[..., str]:
    """``select(**arguments) -> table`` for catalog rows sharing a class or function (see
    :func:`_table_lookup`)."""
    lookup = _table_lookup(rows)
    return lambda **arguments: lookup(arguments)


def apply(input: Tensor, name: str, *, backend: str | None = None, **params: float) -> Tensor:
    """Any table by name, e.g. one fitted with ``invact fit FORMULA --name NAME``."""
    return ops.apply(input, name, params or None, backend)


def _function(fn: str, rows: tuple[Entry, ...]) -> Callable[..., Tensor]:
    """``invact.functional.<fn>(input, *args, backend=None)`` for catalog rows sharing ``functional``:
    torch.nn.functional's arguments (``rows[0].args``), one :func:`invact.ops.apply` call."""
    names = tuple(n for n, _ in rows[0].args)
    defaults = dict(rows[0].args)
    table_args = rows[0].table_args
    lookup = _table_lookup(rows)
    inplace = "inplace" in names
    default_params = {k: float(defaults[k]) for k in table_args}

    def call(input: Tensor, *args: Any, backend: str | None = None, **kwargs: Any) -> Tensor:
        values = _bind(fn, names, defaults, args, kwargs) if args or kwargs else defaults
        if inplace and values is not defaults and flag(values["inplace"], "inplace"):
            _no_inplace(True, fn)
        params = (dict(default_params) if values is defaults else {k: real(values[k], k) for k in table_args}) \
            if table_args else None
        return ops.apply(input, lookup(values), params, backend)

    P = inspect.Parameter
    call.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [P("input", P.POSITIONAL_OR_KEYWORD, annotation="Tensor")]
        + [P(n, P.POSITIONAL_OR_KEYWORD, default=d, annotation=type(d).__name__) for n, d in rows[0].args]
        + [P("backend", P.KEYWORD_ONLY, default=None, annotation="str | None")], return_annotation="Tensor")
    call.__name__ = call.__qualname__ = fn
    call.__doc__ = rows[0].functional_doc
    return call


def _bind(fn: str, names: tuple[str, ...], defaults: dict[str, Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call of ``fn(input, *names)`` over their defaults, with Python's TypeErrors."""
    if len(args) > len(names):
        raise TypeError(f"{fn}() takes from 1 to {len(names) + 1} positional arguments but {len(args) + 1} were given")
    values = dict(defaults)
    values.update(zip(names, args))
    for key, value in kwargs.items():
        if key not in defaults:
            raise TypeError(f"{fn}() got an unexpected keyword argument {key!r}")
        if key in names[:len(args)]:
            raise TypeError(f"{fn}() got multiple values for argument {key!r}")
        values[key] = value
    return values


globals().update({fn: _function(fn, rows) for fn, rows in _FUNCTIONS.items()})
