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

from torch import Tensor

from . import ops
from .norms import layer_norm, rms_norm  # noqa: F401 - norms that save their output (invact.norms)

__all__ = ["gelu", "silu", "mish", "softplus", "elu", "celu", "selu", "hardswish", "leaky_relu", "relu",
           "relu2", "sigmoid", "tanh", "quick_gelu", "apply", "layer_norm", "rms_norm"]

_GELU_TABLES = {"none": "gelu", "tanh": "gelu_tanh"}


def _no_inplace(inplace: bool, fn: str) -> None:
    if inplace:
        raise ValueError(f"invact.functional.{fn}: inplace=True is not supported (invact returns a new "
                         f"tensor and saves it for backward); use y = invact.functional.{fn}(x)")


def gelu_table(approximate: str) -> str:
    """Table name for ``approximate`` ('none' -> gelu, 'tanh' -> gelu_tanh); ValueError otherwise."""
    try:
        return _GELU_TABLES[approximate]
    except (KeyError, TypeError):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}") from None


def apply(input: Tensor, name: str, *, backend: str | None = None, **params: float) -> Tensor:
    """Any table by name, e.g. one fitted with ``invact fit FORMULA --name NAME``."""
    return ops.apply(input, name, params or None, backend)


def gelu(input: Tensor, approximate: str = "none", *, backend: str | None = None) -> Tensor:
    """``F.gelu``: ``x * Phi(x)``; ``approximate='tanh'`` uses the tanh formula (table gelu_tanh)."""
    return ops.apply(input, gelu_table(approximate), None, backend)


def silu(input: Tensor, inplace: bool = False, *, backend: str | None = None) -> Tensor:
    """``F.silu``: ``x * sigmoid(x)``."""
    _no_inplace(inplace, "silu")
    return ops.apply(input, "silu", None, backend)


def mish(input: Tensor, inplace: bool = False, *, backend: str | None = None) -> Tensor:
    """``F.mish``: ``x * tanh(softplus(x))``."""
    _no_inplace(inplace, "mish")
    return ops.apply(input, "mish", None, backend)


def softplus(input: Tensor, beta: float = 1.0, threshold: float = 20.0, *,
             backend: str | None = None) -> Tensor:
    """``F.softplus``: ``log(1 + exp(beta*x)) / beta``, linear where ``beta*x > threshold``."""
    return ops.apply(input, "softplus", {"beta": float(beta), "threshold": float(threshold)}, backend)


def elu(input: Tensor, alpha: float = 1.0, inplace: bool = False, *, backend: str | None = None) -> Tensor:
    """``F.elu``: ``x`` for ``x > 0``, ``alpha*(exp(x) - 1)`` otherwise."""
    _no_inplace(inplace, "elu")
    return ops.apply(input, "elu", {"alpha": float(alpha)}, backend)


def celu(input: Tensor, alpha: float = 1.0, inplace: bool = False, *, backend: str | None = None) -> Tensor:
    """``F.celu``: ``x`` for ``x > 0``, ``alpha*(exp(x/alpha) - 1)`` otherwise."""
    _no_inplace(inplace, "celu")
    return ops.apply(input, "celu", {"alpha": float(alpha)}, backend)


def selu(input: Tensor, inplace: bool = False, *, backend: str | None = None) -> Tensor:
    """``F.selu``: ``scale * elu(x, alpha)`` with PyTorch's fixed constants."""
    _no_inplace(inplace, "selu")
    return ops.apply(input, "selu", None, backend)


def hardswish(input: Tensor, inplace: bool = False, *, backend: str | None = None) -> Tensor:
    """``F.hardswish``: ``x * relu6(x + 3) / 6``."""
    _no_inplace(inplace, "hardswish")
    return ops.apply(input, "hardswish", None, backend)


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False, *,
               backend: str | None = None) -> Tensor:
    """``F.leaky_relu``: ``x`` for ``x > 0``, ``negative_slope * x`` otherwise."""
    _no_inplace(inplace, "leaky_relu")
    return ops.apply(input, "leaky_relu", {"negative_slope": float(negative_slope)}, backend)


def relu(input: Tensor, inplace: bool = False, *, backend: str | None = None) -> Tensor:
    """``F.relu``. PyTorch's relu already saves its output: invact gains no memory here."""
    _no_inplace(inplace, "relu")
    return ops.apply(input, "relu", None, backend)


def relu2(input: Tensor, *, backend: str | None = None) -> Tensor:
    """``relu(x) ** 2`` (Primer; Hugging Face ``ReLUSquaredActivation``)."""
    return ops.apply(input, "relu2", None, backend)


def sigmoid(input: Tensor, *, backend: str | None = None) -> Tensor:
    """``torch.sigmoid``. PyTorch's sigmoid already saves its output: invact gains no memory here."""
    return ops.apply(input, "sigmoid", None, backend)


def tanh(input: Tensor, *, backend: str | None = None) -> Tensor:
    """``torch.tanh``. PyTorch's tanh already saves its output: invact gains no memory here."""
    return ops.apply(input, "tanh", None, backend)


def quick_gelu(input: Tensor, *, backend: str | None = None) -> Tensor:
    """``x * sigmoid(1.702 * x)`` (CLIP; Hugging Face ``QuickGELUActivation``)."""
    return ops.apply(input, "quick_gelu", None, backend)
