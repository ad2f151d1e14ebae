"""nn.Modules with :mod:`torch.nn`'s names, signatures and ``extra_repr``.

All classes are built from one base, :class:`Activation`, by :func:`_torch_style` from the rows of
the activation catalog (:mod:`invact.common.catalog`: the table, the constructor's fields); none holds
activation math. Every constructor also takes a keyword-only ``backend`` (``None``: the default for
the input's device; an unknown name raises here, availability is checked at the forward).

``inplace`` is accepted where :mod:`torch.nn` has it and ignored: the module returns a new tensor
``y`` and saves that tensor for backward (writing it back into the input would keep two copies alive).

Examples
--------
>>> import invact
>>> act = invact.GELU(approximate="tanh")
>>> act
GELU(approximate='tanh')
>>> invact.activation("softplus", beta=1.0)
Softplus(beta=1.0, threshold=20.0)
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from torch import Tensor, nn

from . import backends, constants, ops
from .common.catalog import Entry, group
from .common.params import real
from .functional import table_selector

# one class per `module` name of the catalog (invact.common.catalog), built by _torch_style below;
# class name -> its catalog rows (package-internal, read by invact.patch_rules)
ROWS_BY_CLASS = group("module")
__all__ = ["Activation", "activation", *ROWS_BY_CLASS, "module_for"]


def named_params(name: str, params: dict[str, float] | None) -> dict[str, float]:
    """Validate ``params`` for table ``name``; return them as floats, defaults filled in.

    Raises ``ValueError`` for an unknown table (listing the known ones), an unknown parameter, a
    non-finite value, values a table that is not parameter-generic was not fitted for, or values outside
    a generic table's domain — the same checks :func:`invact.ops.apply` makes, done here at
    construction so that a bad module fails when it is built, not at its first forward.
    """
    defaults = ops.info(name)["params"]
    # ops' own validator (one source of truth for the rules); it returns the values in table order
    return dict(zip(defaults, constants.param_values(name, params)))


class Activation(nn.Module):
    """Any invact table as a module: ``Activation("gelu")``, ``Activation("elu", alpha=0.5)``.

    Parameters
    ----------
    name : str
        A table in ``invact.generated`` (see ``invact.ops.names()``), including one a user fitted
        with ``invact fit FORMULA --name NAME``.
    backend : str, optional
        Implementation to use (keyword-only); ``None`` picks the default for the input's device.
    **params : float
        The table's parameters; missing ones take the table's values.
    """

    #: set on modules put in place by :func:`invact.patch`: ``(original_module,)``; see ``unpatch``.
    _invact_replaced: tuple[nn.Module, ...] | None = None

    def __init__(self, name: str, *, backend: str | None = None, **params: float) -> None:
        super().__init__()
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self.params = named_params(name, params)
        self.name = name
        self.backend = backends.check_name(backend)

    def table(self) -> tuple[str, dict[str, float] | None]:
        """The table name and the parameters passed to :func:`invact.ops.apply`."""
        return self.name, (self.params or None)

    def forward(self, input: Tensor) -> Tensor:
        name, params = self.table()
        return ops.apply(input, name, params, self.backend)

    def __prepare_scriptable__(self) -> nn.Module:
        raise ops.script_refused(self)

    def _backend_repr(self) -> str:
        return "" if self.backend is None else f"backend={self.backend!r}"

    def extra_repr(self) -> str:
        parts = [repr(self.name)] + [f"{k}={v!r}" for k, v in self.params.items()] + [self._backend_repr()]
        return ", ".join(p for p in parts if p)


class _TorchStyle(Activation):
    """Base of the torch.nn look-alikes: fields stored as attributes, as torch.nn does."""

    __signature__: inspect.Signature
    _fields: tuple[str, ...] = ()       # constructor fields in order (besides backend)
    _params: tuple[str, ...] = ()       # fields that are table parameters
    _table_of: Callable[..., str]       # fields -> table name
    _fixed_table: str | None = None     # the table when it does not depend on the fields
    _torch_extra_repr: Callable[[nn.Module], str] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            bound = self.__signature__.bind(*args, **kwargs)
        except TypeError as exc:  # bind's message lacks the callable's name, which torch.nn's has
            raise TypeError(f"{type(self).__name__}.__init__() {exc}") from None
        bound.apply_defaults()
        values = dict(bound.arguments)
        nn.Module.__init__(self)
        self.backend = backends.check_name(values.pop("backend"))
        for key, value in values.items():
            setattr(self, key, value)
        name, params = self.table()                          # validates approximate etc.
        named_params(name, params)

    # name/params follow the attributes, so ``m.beta = 2.0`` behaves as on torch.nn.Softplus
    @property
    def name(self) -> str:  # type: ignore[override]
        return type(self)._table_of(**{k: getattr(self, k) for k in self._fields})

    @property
    def params(self) -> dict[str, float]:  # type: ignore[override]
        return {k: real(getattr(self, k), k) for k in self._params}

    def extra_repr(self) -> str:
        base = self._torch_extra_repr() if self._torch_extra_repr is not None else ""
        return ", ".join(p for p in (base, self._backend_repr()) if p)


def _torch_class(qualified: str) -> type:
    module, name = qualified.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _torch_style(cls_name: str, rows: tuple[Entry, ...]) -> type:
    """A torch.nn look-alike class for catalog rows sharing ``module``: constructor fields ``rows[0].args``
    (``(name, default)`` in torch's order), the table chosen by the rows' ``select`` fields, the fields
    that are table parameters passed to it."""
    first = rows[0]
    sig = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for n, d in first.args]
        + [inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None)])
    torch_cls = _torch_class(first.torch) if first.torch is not None else None
    like = f"torch.nn.{cls_name}" if torch_cls is not None else "its formula"
    ns = {
        "__signature__": sig, "_fields": tuple(n for n, _ in first.args), "_params": first.table_args,
        "_fixed_table": first.name if len(rows) == 1 else None,
        "_table_of": staticmethod(table_selector(rows)),
        # torch's own extra_repr reads the same attributes, so the text is torch's exactly
        "_torch_extra_repr": torch_cls.__dict__.get("extra_repr") if torch_cls is not None else None,
        "__module__": __name__, "__qualname__": cls_name,
        "__doc__": f"{first.module_doc}\n\nSame signature and forward as {like}; backward from the saved output.\n"
                   f"Signature: {cls_name}{sig}",
    }
    return type(cls_name, (_TorchStyle,), ns)


# the torch.nn look-alike classes, in catalog order (package-internal, read by invact.patch_rules)
TORCH_STYLE_CLASSES = tuple(_torch_style(name, rows) for name, rows in ROWS_BY_CLASS.items())
globals().update({cls.__name__: cls for cls in TORCH_STYLE_CLASSES})

# table -> (the class serving it, the fields that select it: GELU, {'approximate': 'tanh'} for gelu_tanh)
_BY_TABLE = {row.name: (cls, dict(row.select))
             for cls, rows in zip(TORCH_STYLE_CLASSES, ROWS_BY_CLASS.values()) for row in rows}


def module_for(name: str, params: dict[str, float] | None = None, backend: str | None = None) -> Activation:
    """The module for table ``name``: a torch.nn look-alike when one takes the given parameters,
    else :class:`Activation`. Raises ``ValueError`` like :func:`named_params`."""
    given = dict(params or {})
    full = named_params(name, given)
    cls, fields = _BY_TABLE.get(name, (None, {}))
    if cls is not None and set(given) <= set(cls._params):
        return cls(**fields, **{k: full[k] for k in cls._params}, backend=backend)
    return Activation(name, backend=backend, **given)


def activation(name: str, *, backend: str | None = None, **params: float) -> nn.Module:
    """A module for any table in ``invact.generated``, including one just fitted with
    ``invact fit FORMULA --name NAME`` (looked up through :func:`invact.ops.names`).

    >>> invact.activation("gelu_tanh")
    GELU(approximate='tanh')
    >>> invact.activation("selu", alpha=2.0)      # no torch.nn.SELU takes alpha: the generic module
    Activation('selu', scale=1.0507009873554805, alpha=2.0)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    ops.info(name)  # ValueError for a name without code, saying why (invact.registry)
    return module_for(name, params, backend)
