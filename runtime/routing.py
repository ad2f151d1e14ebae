"""Route functional activation calls (``torch.nn.functional.gelu(x)`` inside a model's forward) to invact.

Modules can be swapped; a function call cannot. :class:`FunctionalRouter` is a
:class:`torch.overrides.TorchFunctionMode` that, while active, sends ``F.gelu``, ``F.silu``,
``F.mish``, ``F.softplus``, ``F.elu``, ``F.celu``, ``F.selu``, ``F.hardswish`` and ``F.leaky_relu`` to
:mod:`invact.functional` — only where the result is PyTorch's and its input could be freed: the input
needs a gradient and grad mode is on (or torch.jit.trace or torch.export records the forward, whatever
the grad mode), the call is not in-place, and the arguments are ones invact's op takes. Every other call
(and every other function) runs untouched. ``routed`` counts the calls it sent. Whether a routed call
frees memory depends on what else keeps its input (``F.gelu(h) + h * h`` saves h anyway, and then the
code is extra): ``invact.patch(model, functional=True, example=...)`` measures that and routes only where
it frees bytes; a bare router does not measure.

A bare router routes the calls made while it is active: the recomputation of a non-reentrant
``torch.utils.checkpoint`` runs in backward, outside the ``with`` block, unrouted, and torch then raises
its CheckpointError (a different number of tensors saved); ``patch(model, functional=True)`` enters its
router around every module's call, recomputations included.

>>> with invact.route_functional() as router:
...     loss = model(batch).sum()
>>> loss.backward(); router.routed
Counter({'gelu': 12})
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import functional as IF, ops
from .common.catalog import group

__all__ = ["FunctionalRouter", "route_functional", "ROUTED"]


def _no_inplace(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(input, *args, inplace: bool = False, **kwargs):
        if inplace:
            return None  # in-place writes into x: nothing for invact to save instead
        return fn(input, *args, **kwargs)
    return call


def _positional_inplace(count: int, fn: Callable) -> Callable:
    """Accept torch.nn.functional's optional positional arguments (the last being ``inplace``)."""
    inner = _no_inplace(fn)

    def call(input, *args, **kwargs):
        if len(args) > count:
            kwargs["inplace"], args = args[count], args[:count]
        return inner(input, *args, **kwargs)
    return call


def _route(rows: tuple) -> Callable:
    """The invact call for torch.nn.functional's function of these catalog rows (their ``args``)."""
    names = [n for n, _ in rows[0].args]
    fn = getattr(IF, rows[0].functional)
    return _positional_inplace(names.index("inplace"), fn) if "inplace" in names else fn


# torch.nn.functional function -> invact call (returns None to leave the call to PyTorch): the
# catalog's functions that torch.nn.functional has too (rows with a torch.nn class), where PyTorch saves
# the input (invact.common.catalog)
ROUTED: dict[Callable, tuple[str, Callable]] = {
    getattr(F, name): (name, _route(rows)) for name, rows in group("functional").items()
    if rows[0].torch is not None and rows[0].saves_output != "always"}


def _worth_routing(args: tuple, kwargs: dict) -> bool:
    """x will be differentiated, or a program is being recorded (torch.jit.trace, whose check reruns
    the model under no_grad, and torch.export): recorded, invact's op trains whatever the grad mode then."""
    x = args[0] if args else kwargs.get("input")
    return (isinstance(x, torch.Tensor) and (ops.recording() or (x.requires_grad and torch.is_grad_enabled()))
            and x.is_floating_point() and x.layout == torch.strided)


def _names(only: object, known: set[str]) -> set[str]:
    """``only`` as a set of names: None (all ``known``), one name, or an iterable of names; TypeError
    naming ``only`` otherwise."""
    if only is None:
        return set(known)
    if isinstance(only, str):          # one name, as patch(only="gelu") takes it (not its letters)
        return {only}
    try:
        names = set(only)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"only must be a name (str), an iterable of names or None, got {type(only).__name__}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"only: names must be str, got {bad[0]!r}")
    return names


class FunctionalRouter(TorchFunctionMode):
    """While active, functional activation calls that save their input run through invact instead.

    ``only``: a name or names (``"gelu"``, ``{"gelu", "silu"}``, ...) to route; default all of :data:`ROUTED`.
    ``outputs``: a list that, where set, collects ``(y, y._version)`` of every routed call
    (:mod:`invact.save_trace` checks whether a later in-place op wrote into a y that backward reads).
    """

    def __init__(self, only: str | Iterable[str] | None = None) -> None:
        super().__init__()
        known = {name for name, _ in ROUTED.values()}
        names = _names(only, known)
        unknown = sorted(names - known)
        if unknown:
            raise ValueError(f"only: {unknown} are not routable functional activations; known: {sorted(known)}")
        self.only = names
        self.routed: Counter[str] = Counter()
        self.outputs: list[tuple[torch.Tensor, int]] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = ROUTED.get(func)
        if entry is not None and entry[0] in self.only and _worth_routing(args, kwargs):
            try:  # the mode is off inside its own handler: invact's ops run as usual
                y = entry[1](*args, **kwargs)
            except (TypeError, ValueError):  # arguments invact's op does not take (or a parameter set
                y = None                     # without a table): PyTorch's call as written
            if y is not None:
                self.routed[entry[0]] += 1
                if self.outputs is not None:
                    self.outputs.append((y, y._version))
                return y
        return func(*args, **kwargs)


def route_functional(only: str | Iterable[str] | None = None) -> FunctionalRouter:
    """A context manager routing functional activation calls to invact (see :class:`FunctionalRouter`)."""
    return FunctionalRouter(only)
