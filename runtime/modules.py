"""nn.Modules with :mod:`torch.nn`'s names, signatures and ``extra_repr``.

All classes are built from one base, :class:`Activation`, by :func:`_torch_style` from a line of
data each (the table, the constructor's fields); none holds activation math. Every constructor also
takes a keyword-only ``backend`` (``None``: the default for the input's device).

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

import inspect
from typing import Any, Callable

from torch import Tensor, nn

from . import ops
from .functional import gelu_table

__all__ = ["Activation", "activation", "GELU", "SiLU", "Mish", "Softplus", "ELU", "CELU", "SELU", "Hardswish",
           "LeakyReLU", "ReLU", "Sigmoid", "Tanh", "QuickGELU", "ReLU2", "module_for"]


def check_params(name: str, params: dict[str, float] | None) -> dict[str, float]:
    """Validate ``params`` for table ``name``; return them as floats, defaults filled in.

    Raises ``ValueError`` for an unknown table (listing the known ones), an unknown parameter, a
    non-finite value, values a table that is not parameter-generic was not fitted for, or values outside
    a generic table's domain — the same checks :func:`invact.ops.apply` makes, done here at
    construction so that a bad module fails when it is built, not at its first forward.
    """
    defaults = ops.info(name)["params"]
    # ops' own validator (one source of truth for the rules); it returns the values in table order
    return dict(zip(defaults, ops._check_params(name, params)))


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
        self.params = check_params(name, params)
        self.name = name
        self.backend = backend

    def table(self) -> tuple[str, dict[str, float] | None]:
        """The table name and the parameters passed to :func:`invact.ops.apply`."""
        return self.name, (self.params or None)

    def forward(self, input: Tensor) -> Tensor:
        name, params = self.table()
        return ops.apply(input, name, params, self.backend)

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
        bound = self.__signature__.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        nn.Module.__init__(self)
        self.backend = values.pop("backend")
        for key, value in values.items():
            setattr(self, key, value)
        name, params = self.table()                          # validates approximate etc.
        check_params(name, params)

    # name/params follow the attributes, so ``m.beta = 2.0`` behaves as on torch.nn.Softplus
    @property
    def name(self) -> str:  # type: ignore[override]
        return type(self)._table_of(**{k: getattr(self, k) for k in self._fields})

    @property
    def params(self) -> dict[str, float]:  # type: ignore[override]
        return {k: float(getattr(self, k)) for k in self._params}

    def extra_repr(self) -> str:
        base = self._torch_extra_repr() if self._torch_extra_repr is not None else ""
        return ", ".join(p for p in (base, self._backend_repr()) if p)


def _torch_style(cls_name: str, table: str | Callable[..., str], fields: tuple[tuple[str, Any], ...] = (),
                 params: tuple[str, ...] = (), torch_cls: type | None = None, doc: str = "") -> type:
    """A torch.nn look-alike class: ``fields`` are ``(name, default)`` in torch's order, ``params``
    the fields passed to the table, ``table`` a table name or a function of the fields."""
    sig = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for n, d in fields]
        + [inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None)])
    like = f"torch.nn.{torch_cls.__name__}" if torch_cls is not None else "its formula"
    ns = {
        "__signature__": sig, "_fields": tuple(n for n, _ in fields), "_params": params,
        "_fixed_table": table if isinstance(table, str) else None,
        "_table_of": staticmethod(table if callable(table) else (lambda **_: table)),
        # torch's own extra_repr reads the same attributes, so the text is torch's exactly
        "_torch_extra_repr": torch_cls.__dict__.get("extra_repr") if torch_cls is not None else None,
        "__module__": __name__, "__qualname__": cls_name,
        "__doc__": f"{doc}\n\nSame signature and forward as {like}; backward from the saved output.\n"
                   f"Signature: {cls_name}{sig}",
    }
    return type(cls_name, (_TorchStyle,), ns)


_I = (("inplace", False),)
# name, table (or fields -> table), constructor fields, which fields are table parameters, torch class
GELU = _torch_style("GELU", gelu_table, (("approximate", "none"),),
                    torch_cls=nn.GELU, doc="GELU: ``x * Phi(x)``, or its tanh approximation.")
SiLU = _torch_style("SiLU", "silu", _I, torch_cls=nn.SiLU, doc="SiLU / Swish: ``x * sigmoid(x)``.")
Mish = _torch_style("Mish", "mish", _I, torch_cls=nn.Mish, doc="Mish: ``x * tanh(softplus(x))``.")
Softplus = _torch_style("Softplus", "softplus", (("beta", 1.0), ("threshold", 20.0)), ("beta", "threshold"),
                        nn.Softplus, "Softplus: ``log(1 + exp(beta*x)) / beta``.")
ELU = _torch_style("ELU", "elu", (("alpha", 1.0),) + _I, ("alpha",), nn.ELU, "ELU.")
CELU = _torch_style("CELU", "celu", (("alpha", 1.0),) + _I, ("alpha",), nn.CELU, "CELU.")
SELU = _torch_style("SELU", "selu", _I, torch_cls=nn.SELU, doc="SELU with PyTorch's constants.")
Hardswish = _torch_style("Hardswish", "hardswish", _I, torch_cls=nn.Hardswish,
                         doc="Hardswish: ``x * relu6(x + 3) / 6``.")
LeakyReLU = _torch_style("LeakyReLU", "leaky_relu", (("negative_slope", 0.01),) + _I, ("negative_slope",),
                         nn.LeakyReLU, "LeakyReLU.")
ReLU = _torch_style("ReLU", "relu", _I, torch_cls=nn.ReLU,
                    doc="ReLU. torch.nn.ReLU already saves its output: no memory gain.")
Sigmoid = _torch_style("Sigmoid", "sigmoid", torch_cls=nn.Sigmoid,
                       doc="Sigmoid. torch.nn.Sigmoid already saves its output: no memory gain.")
Tanh = _torch_style("Tanh", "tanh", torch_cls=nn.Tanh,
                    doc="Tanh. torch.nn.Tanh already saves its output: no memory gain.")
QuickGELU = _torch_style("QuickGELU", "quick_gelu", doc="QuickGELU (CLIP): ``x * sigmoid(1.702 * x)``.")
ReLU2 = _torch_style("ReLU2", "relu2", doc="Squared ReLU (Primer): ``relu(x) ** 2``.")

_CLASSES = (GELU, SiLU, Mish, Softplus, ELU, CELU, SELU, Hardswish, LeakyReLU, ReLU, Sigmoid, Tanh,
            QuickGELU, ReLU2)


_BY_TABLE = {cls._fixed_table: cls for cls in _CLASSES if cls._fixed_table}
_GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


def module_for(name: str, params: dict[str, float] | None = None, backend: str | None = None) -> Activation:
    """The module for table ``name``: a torch.nn look-alike when one takes the given parameters,
    else :class:`Activation`. Raises ``ValueError`` like :func:`check_params`."""
    given = dict(params or {})
    full = check_params(name, given)
    if name in _GELU_APPROXIMATE and not given:
        return GELU(_GELU_APPROXIMATE[name], backend=backend)
    cls = _BY_TABLE.get(name)
    if cls is not None and set(given) <= set(cls._params):
        return cls(**{k: full[k] for k in cls._params}, backend=backend)
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
    if name not in ops.names():
        known = ", ".join(sorted(ops.names()))
        raise ValueError(f"unknown activation {name!r}; tables: {known} "
                         "(fit a new one with `invact fit FORMULA --name NAME`)")
    return module_for(name, params, backend)
