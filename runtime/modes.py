"""Modes entered during a module's forward: the functional route, and copied chunks of fused projections.

A mode is entered by forward hooks on the modules it covers, with one stack of entered calls per thread
(:class:`_Scope`), so a checkpointed module's recomputation in backward is routed as its forward was; the
hooks are methods of a module-level class, so the model pickles and a copy has its own mode. A mode is kept
in its owner's ``__dict__`` under one attribute per kind (:data:`CHUNKS`, :data:`TRIAL`, the router's), so
that it can be found and removed again; :func:`remove_modes` removes every route and chunk-copy mode in a tree.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .routing import FunctionalRouter

__all__ = ["CopyChunks", "install_router", "remove_router", "remove_modes", "install_mode", "remove_mode",
           "CHUNKS", "TRIAL", "ModeStackError"]

_ROUTER, CHUNKS, TRIAL = "_invact_router", "_invact_chunks", "_invact_router_trial"   # keys in an owner's __dict__
_SPLITS = {torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split}
# torch.overrides' private API of a thread's torch-function mode stack: PyTorch has no public one that takes a
# mode from below others (a mode's own __exit__ pops the top one), so it is looked up, and its effect checked
_STACK_API = ("_get_current_function_mode_stack", "_pop_mode", "_push_mode")


class ModeStackError(RuntimeError):
    """torch.overrides' private mode-stack functions that :func:`_exit_mode` uses are missing, or did not
    leave the stack as they did in the PyTorch versions invact was tested with."""


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


class _Calls(threading.local):
    """A thread's entered calls of one scope, outermost first: (id of the module, frame calling the hook; None
    where Dynamo traced the call)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, Any]] = []


class _Scope:
    """Forward hooks entering ``mode`` around the outermost call of the modules they are on, per thread: torch's
    mode stack is a thread's own, so a model called from two threads at once, or by nn.DataParallel's
    replicas, which share its hooks, enters and leaves the mode in each thread. An object of a module-level
    class, not closures: a model carrying it pickles, and a deep copy gets its own scope and mode.

    Each thread keeps a stack of the calls it entered, so that a leave undoes only an enter that happened
    (a user's pre-hook registered before ours that raises skips our enter, while torch still runs our
    always-called leave). torch runs always-called hooks for an Exception only: a KeyboardInterrupt (any
    BaseException) mid-forward leaves its calls on the stack and the mode entered, until the next call of
    these modules in that thread drops the calls no longer running (their frames are off the Python stack)
    or :func:`remove_mode` in that thread exits the mode."""

    def __init__(self, mode: TorchFunctionMode) -> None:
        self.mode, self._local = mode, _Calls()

    def __getstate__(self) -> dict[str, Any]:
        return {"mode": self.mode}      # the calls are the running ones, not the model's

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["mode"])

    @property
    def calls(self) -> list[tuple[int, Any]]:
        """The calling thread's entered calls (:class:`_Calls`)."""
        return self._local.calls

    def enter(self, module: nn.Module, args: Any) -> None:
        calls, frame = self.calls, None if torch.compiler.is_compiling() else sys._getframe(1)
        if frame is not None and calls:
            self._drop_finished(frame)
        if not calls:
            self.mode.__enter__()
        calls.append((id(module), frame))

    def leave(self, module: nn.Module, args: Any, out: Any) -> None:
        calls = self.calls
        frame = None if torch.compiler.is_compiling() else sys._getframe(1)   # torch's caller of both hooks
        if calls and calls[-1][0] == id(module) and (calls[-1][1] is None or frame is None or calls[-1][1] is frame):
            calls.pop()
            if not calls:
                _exit_mode(self.mode)

    def close(self) -> None:
        """Exit the mode where the calling thread still has it entered (a forward interrupted)."""
        if self.calls:
            self.calls.clear()
            _exit_mode(self.mode)

    def _drop_finished(self, frame: Any) -> None:
        """Drop the entered calls whose frames no longer run (a BaseException went through them), exiting the
        mode where none is left. A running call's frame is ``frame`` or one of its callers'; the walk up
        stops at the innermost entered call's frame (a few frames up, where nothing was interrupted)."""
        calls, running = self.calls, set()
        while calls:
            entered = calls[-1][1]
            while frame is not None and entered is not None and frame is not entered:
                running.add(id(frame))      # ids of live frames: the entered ones are held, never reused
                frame = frame.f_back
            if entered is None or frame is entered or id(entered) in running:
                return
            calls.pop()
        _exit_mode(self.mode)


def _exit_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off the calling thread's torch-function mode stack, wherever it is: the modes entered
    above it (and not left) stay, in their order. ModeStackError where torch's private stack API is
    missing or did not do that (never a mode silently left entered, or another one dropped)."""
    if torch.compiler.is_compiling():
        mode.__exit__(None, None, None)
        return
    get_stack, pop, push = _stack_api()
    stack = get_stack()
    if mode not in stack:
        return
    on_top = stack[-1] is mode
    at = len(stack) - 1 if on_top else stack.index(mode)
    if on_top:
        mode.__exit__(None, None, None)
    else:
        for _ in stack[at:]:
            pop()
        for m in stack[at + 1:]:
            push(m)
    _check_exited(get_stack(), stack[:at] + stack[at + 1:], mode)


def _stack_api() -> tuple:
    """(get the stack, pop the top mode, push a mode) of torch.overrides (:data:`_STACK_API`); ModeStackError
    naming what is missing."""
    missing = [name for name in _STACK_API if not callable(getattr(torch.overrides, name, None))]
    if missing:
        raise ModeStackError(f"torch {torch.__version__} lacks torch.overrides.{', torch.overrides.'.join(missing)}, "
                             "which invact uses to exit a functional route or chunk-copy mode (invact.modes); "
                             "use the PyTorch release invact is tested with (its pyproject.toml)")
    return tuple(getattr(torch.overrides, name) for name in _STACK_API)


def _check_exited(after: list, expected: list, mode: TorchFunctionMode) -> None:
    """ModeStackError unless the stack ``after`` exiting ``mode`` is ``expected`` (the modes in order)."""
    if len(after) != len(expected) or any(a is not e for a, e in zip(after, expected)):
        raise ModeStackError(f"exiting {type(mode).__name__} left torch's torch-function mode stack as "
                             f"{[type(m).__name__ for m in after]}, not {[type(m).__name__ for m in expected]}: "
                             f"torch {torch.__version__}'s private torch.overrides.{'/'.join(_STACK_API)} "
                             "changed behaviour (invact.modes relies on them)")


def install_mode(owner: nn.Module, mode: TorchFunctionMode, attr: str,
                 modules: list[nn.Module] | None = None) -> None:
    """Enter ``mode`` around every outermost call of ``owner`` (or of any of ``modules``), kept in
    ``owner.__dict__[attr]``."""
    remove_mode(owner, attr)
    scope = _Scope(mode)
    handles = [h for m in modules or [owner] for h in (m.register_forward_pre_hook(scope.enter),
                                                        m.register_forward_hook(scope.leave, always_call=True))]
    owner.__dict__[attr] = (mode, handles, scope)


def remove_mode(module: nn.Module, attr: str) -> TorchFunctionMode | None:
    """Remove the mode :func:`install_mode` kept in ``module.__dict__[attr]``, exiting it where the calling
    thread still has it entered (a forward interrupted by a KeyboardInterrupt); returns it (None if none)."""
    entry = module.__dict__.pop(attr, None)
    if entry is None:
        return None
    mode, handles, *scope = entry       # no scope in a model pickled before scopes were kept here
    for h in handles:
        h.remove()
    for s in scope:
        s.close()
    return mode


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
