"""Modes entered during a module's forward: the functional route, and copied chunks of fused projections.

A mode is entered by forward hooks on the modules it covers, with one depth count (:class:`_Scope`), so a
checkpointed module's recomputation in backward is routed as its forward was; the hooks are methods of a
module-level class, so the model pickles and a copy has its own mode. A mode is kept in its owner's
``__dict__`` under one attribute per kind (:data:`CHUNKS`, :data:`TRIAL`, the router's), so that it can be
found and removed again; :func:`remove_modes` removes every route and chunk-copy mode in a tree.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .routing import FunctionalRouter

__all__ = ["CopyChunks", "install_router", "remove_router", "remove_modes", "install_mode", "remove_mode",
           "CHUNKS", "TRIAL"]

_ROUTER, CHUNKS, TRIAL = "_invact_router", "_invact_chunks", "_invact_router_trial"   # keys in an owner's __dict__
_SPLITS = {torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split}


class CopyChunks(TorchFunctionMode):
    """``chunk`` / ``split`` return contiguous copies of the pieces (of tensors that need grad).

    A fused projection's output (Phi-3's ``gate_up_proj``) is otherwise kept alive whole by whichever
    piece a later op saves; with copies, nothing keeps the whole storage (split and clone save nothing
    for backward), so an invact activation on one piece frees it: 2n saved bytes become n for the
    copied ``up`` piece, the gate piece being saved by nobody. The copy costs a transient n.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _SPLITS and torch.is_grad_enabled() and isinstance(out, (tuple, list)) and len(out) > 1 \
                and all(isinstance(t, torch.Tensor) and t.requires_grad for t in out):
            return type(out)(t.clone(memory_format=torch.contiguous_format) for t in out)
        return out


class _Scope:
    """Forward hooks entering ``mode`` around the outermost call of the modules they are on (one depth count
    for all, per thread: torch's mode stack is a thread's own, so a model called from two threads at once,
    or by nn.DataParallel's replicas, which share its hooks, enters and leaves the mode in each thread). An
    object of a module-level class, not closures: a model carrying it pickles, and a deep copy gets its own
    scope and mode."""

    def __init__(self, mode: TorchFunctionMode) -> None:
        self.mode, self._local = mode, threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {"mode": self.mode}      # the depths are the running calls', not the model's

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["mode"])

    @property
    def depth(self) -> int:
        """How deep the calling thread is in the modules' forwards."""
        return getattr(self._local, "depth", 0)

    def enter(self, module: nn.Module, args: Any) -> None:
        if self.depth == 0:
            self.mode.__enter__()
        self._local.depth = self.depth + 1

    def leave(self, module: nn.Module, args: Any, out: Any) -> None:
        self._local.depth = self.depth - 1
        if self.depth == 0:
            self.mode.__exit__(None, None, None)


def install_mode(owner: nn.Module, mode: TorchFunctionMode, attr: str,
                 modules: list[nn.Module] | None = None) -> None:
    """Enter ``mode`` around every outermost call of ``owner`` (or of any of ``modules``), kept in
    ``owner.__dict__[attr]``."""
    remove_mode(owner, attr)
    scope = _Scope(mode)
    handles = [h for m in modules or [owner] for h in (m.register_forward_pre_hook(scope.enter),
                                                        m.register_forward_hook(scope.leave, always_call=True))]
    owner.__dict__[attr] = (mode, handles)


def remove_mode(module: nn.Module, attr: str) -> TorchFunctionMode | None:
    """Remove the mode :func:`install_mode` kept in ``module.__dict__[attr]``; returns it (None if none)."""
    entry = module.__dict__.pop(attr, None)
    if entry is None:
        return None
    for h in entry[1]:
        h.remove()
    return entry[0]


def install_router(model: nn.Module, router: FunctionalRouter) -> None:
    """Enter ``router`` around every outermost call of ``model`` or of any of its modules: a checkpointed
    submodule's recomputation in backward (``torch.utils.checkpoint``, Hugging Face's gradient checkpointing)
    then routes the calls its forward routed. It replaces the routes of ``model``'s modules (it covers them)."""
    for m in model.modules():
        remove_mode(m, _ROUTER)
    install_mode(model, router, _ROUTER, list(model.modules()))


def remove_router(model: nn.Module) -> FunctionalRouter | None:
    """Remove the route :func:`install_router` put on ``model``; returns its router (None if none)."""
    return remove_mode(model, _ROUTER)


def remove_modes(model: nn.Module) -> None:
    """Remove every functional route and chunk-copy mode installed on ``model`` or on any of its modules (by
    a patch of the model or of a submodule)."""
    for m in model.modules():
        remove_mode(m, _ROUTER)
        remove_mode(m, CHUNKS)
