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
from collections.abc import Callable
from typing import Any

from torch import Tensor

from . import ops
from .common.catalog import Entry, group
from .norms import layer_norm, rms_norm  # noqa: F401 - norms that save their output (invact.norms)

# one function per `functional` name of the catalog (invact.common.catalog), built by _function below
_FUNCTIONS = group("functional")
__all__ = [*_FUNCTIONS, "apply", "layer_norm", "rms_norm"]


def _no_inplace(inplace: bool, fn: str) -> None:
    if inplace:
        raise ValueError(f"invact.functional.{fn}: inplace=True is not supported (invact returns a new "
                         f"tensor and saves it for backward); use y = invact.functional.{fn}(x)")


def table_selector(rows: tuple[Entry, ...]) -> Callable[..., str]:
    """``select(**arguments) -> table`` for catalog rows sharing a class or function: the rows'
    ``select`` arguments choose the table (``approximate='tanh'`` -> gelu_tanh); ValueError otherwise."""
    fields = tuple(n for n, _ in rows[0].select)
    tables = {tuple(v for _, v in row.select): row.name for row in rows}

    def select(**arguments: Any) -> str:
        key = tuple(arguments[f] for f in fields)
        try:
            return tables[key]
        except (KeyError, TypeError):
            pass
        choices = " or ".join(repr(k[0] if len(fields) == 1 else k) for k in tables)
        given = key[0] if len(fields) == 1 else key
        raise ValueError(f"{', '.join(fields)} must be {choices}, got {given!r}")
    return select


def gelu_table(approximate: str) -> str:
    """Table name for ``approximate`` ('none' -> gelu, 'tanh' -> gelu_tanh); ValueError otherwise."""
    return _GELU_SELECT(approximate=approximate)


_GELU_SELECT = table_selector(_FUNCTIONS["gelu"])


def apply(input: Tensor, name: str, *, backend: str | None = None, **params: float) -> Tensor:
    """Any table by name, e.g. one fitted with ``invact fit FORMULA --name NAME``."""
    return ops.apply(input, name, params or None, backend)


def _function(fn: str, rows: tuple[Entry, ...]) -> Callable[..., Tensor]:
    """``invact.functional.<fn>(input, *args, backend=None)`` for catalog rows sharing ``functional``:
    torch.nn.functional's arguments (``rows[0].args``), one :func:`invact.ops.apply` call."""
    names = tuple(n for n, _ in rows[0].args)
    defaults = dict(rows[0].args)
    table_args = rows[0].table_args
    select = table_selector(rows)

    def call(input: Tensor, *args: Any, backend: str | None = None, **kwargs: Any) -> Tensor:
        if len(args) > len(names):
            raise TypeError(f"{fn}() takes from 1 to {len(names) + 1} positional arguments but "
                            f"{len(args) + 1} were given")
        values = dict(defaults)
        values.update(zip(names, args))
        for key, value in kwargs.items():
            if key not in defaults or key in names[:len(args)]:
                raise TypeError(f"{fn}() got an unexpected keyword argument {key!r}" if key not in defaults
                                else f"{fn}() got multiple values for argument {key!r}")
            values[key] = value
        _no_inplace(values.get("inplace", False), fn)
        params = {k: float(values[k]) for k in table_args}
        return ops.apply(input, select(**values), params or None, backend)

    P = inspect.Parameter
    call.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [P("input", P.POSITIONAL_OR_KEYWORD, annotation="Tensor")]
        + [P(n, P.POSITIONAL_OR_KEYWORD, default=d, annotation=type(d).__name__) for n, d in rows[0].args]
        + [P("backend", P.KEYWORD_ONLY, default=None, annotation="str | None")], return_annotation="Tensor")
    call.__name__ = call.__qualname__ = fn
    call.__doc__ = rows[0].functional_doc
    return call


globals().update({fn: _function(fn, rows) for fn, rows in _FUNCTIONS.items()})
