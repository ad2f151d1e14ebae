"""One traced forward of :func:`invact.patch`'s example (:mod:`invact.measure`): who saved which storage.

A forward of the example runs in training mode, grad enabled, under
:func:`torch.autograd.graph.saved_tensors_hooks` (a forward records everything backward will keep; no backward
runs). Each saved storage (pointer, size; parameters apart) is charged to the modules that saved it, as in
:mod:`invact.saved`, but *every* saver is kept, not only the first (:class:`Trace`). Each swapped call's
output and its version counter are taken by the site's first forward hook and compared after the step. The
hooks record their own errors: one is raised as :class:`MeasureError`, never taken for the step failing.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .modes import TRIAL, install_mode, remove_mode
from .routing import FunctionalRouter
from .saved import SavedBytes, checked_for_backward, keep_for_backward
from .snapshot import seeded

__all__ = ["MeasureError", "Site", "Trace", "run_step", "storage_key", "trace_example"]

_OTHER = -1                                       # owner of storages saved outside every site
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
             torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout}


def run_step(model: nn.Module, example: Any) -> Any:
    """One run of ``example`` on ``model``: a forward of the inputs it holds, or the callable step. Run with
    inference mode off (the measurement needs autograd's saves), an input made under
    ``torch.inference_mode()`` is passed as a normal copy: autograd cannot save an inference tensor."""
    if isinstance(example, torch.Tensor):
        return model(_savable(example))
    if isinstance(example, (tuple, list)):
        return model(*map(_savable, example))
    if isinstance(example, dict):
        return model(**{k: _savable(v) for k, v in example.items()})
    return example(model)


def _savable(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


class MeasureError(RuntimeError):
    """invact's measurement itself failed (not the example step): a bug to report, never a reason to leave a swap."""


storage_key = SavedBytes._key  # one definition of "the same storage" for patch and invact.memory


@dataclass
class SiteCall:
    """One call of a site in a traced forward: its input's storage and size, its output's storage, and whether
    its saves were out of the trace's sight (package-internal: :mod:`invact.measure` reads them)."""

    x_key: tuple | None
    x_bytes: int
    y_key: tuple | None
    hidden: bool = False     # its saves were not ours to see: grad off, or another saved-tensor hook (checkpoint)
    grad_off: bool = False   # grad was off


class _DropoutWatch(TorchFunctionMode):
    """Records the storages of tensors passed to a dropout with p > 0 in training, each tensor held in ``keep``
    until the trace ends: a dropout's input is often freed as soon as the dropout returns (dropout saves its mask,
    not its input), and a storage allocated later at its address (a site's output) would read as its input."""

    def __init__(self, keep: list[Any]) -> None:
        super().__init__()
        self.inputs: set[tuple] = set()
        self.keep = keep

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUTS and args and isinstance(args[0], torch.Tensor):
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            train = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
            if p and train:
                self.inputs.add(storage_key(args[0]))
                self.keep.append(args[0])
        return func(*args, **kwargs)


@dataclass
class Trace:
    """One forward of the example: who saved which storage, and every call of every site."""

    savers: dict[tuple, set[int]] = field(default_factory=lambda: defaultdict(set))
    names: dict[tuple, set[tuple[int, str]]] = field(default_factory=lambda: defaultdict(set))  # (owner, path)
    calls: dict[int, list[SiteCall]] = field(default_factory=lambda: defaultdict(list))
    dropout_inputs: set[tuple] = field(default_factory=set)
    keep: list[Any] = field(default_factory=list)     # every tensor keyed, held so that no storage is reused mid-run
    modified: set[int] = field(default_factory=set)   # swapped sites whose output was written in place later
    route_modified: bool = False                      # a routed call's output was written in place later
    error: str | None = None                          # the step raised (with swaps in place): its first line
    packs: int = 0                                    # calls of the pack hook so far

    def hidden(self, site: int) -> bool:
        """Whether every call of ``site`` ran where this trace sees no saves: with grad off (a reentrant
        checkpoint's forward, no_grad) or under another saved-tensor hook (a non-reentrant checkpoint)."""
        return bool(self.calls[site]) and all(c.hidden for c in self.calls[site])

    @property
    def total(self) -> int:
        return sum(k[3] for k in self.savers)

    def only(self, site: int) -> int:
        """Bytes of the storages saved by ``site`` and nothing else."""
        return sum(k[3] for k, who in self.savers.items() if who == {site})


@dataclass
class Site:
    """A swapped module: its paths in the model, the original and its replacement."""

    paths: list[str]
    old: nn.Module
    new: nn.Module


def _site_map(sites: dict[int, Site], active: set[int]) -> dict[int, int]:
    out = {}
    for key, site in sites.items():
        for m in (site.new if key in active else site.old).modules():
            out[id(m)] = key
    return out


def trace_example(model: nn.Module, example: Any, sites: dict[int, Site], active: set[int], params: set[tuple],
                  router: FunctionalRouter | None = None) -> Trace:
    """One forward of the example with ``active``'s swaps in place. A step that raises with swaps (or the
    route) in place is recorded in ``trace.error``, not raised; with none, it raises."""
    _require_saved_tensor_hooks()
    trace, stack = Trace(), []
    starts: list[tuple[int, bool]] = []          # per site call being run: (packs before it, grad enabled)
    site_of = _site_map(sites, active)
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    outputs: dict[int, list[tuple[torch.Tensor, int]]] = defaultdict(list)   # swapped site -> (y, its version)
    swapped = {id(sites[k].new): k for k in active}

    def returned(m: nn.Module, args: Any, out: Any) -> None:   # first of m's forward hooks: y as it returns
        # without grad too: a reentrant checkpoint's forward, whose recomputation saves y for backward;
        # not the original, which shares its replacement's hooks and runs where the model calls it directly
        if id(m) in swapped and isinstance(out, torch.Tensor) and (out.requires_grad or not torch.is_grad_enabled()):
            outputs[swapped[id(m)]].append((out, out._version))

    def pack(t: torch.Tensor) -> torch.Tensor:
        trace.packs += 1
        key = storage_key(t)
        if key is not None and key[3] and key not in params and not isinstance(t, nn.Parameter):
            owner, name = stack[-1] if stack else (_OTHER, "<outside>")
            trace.savers[key].add(owner)
            trace.names[key].add((owner, name))
            trace.keep.append(t)
        return keep_for_backward(t)       # not t: the graph is freed where the step runs no backward

    def pre(m: nn.Module, args: Any) -> None:
        if id(m) in site_of:
            starts.append((trace.packs, torch.is_grad_enabled()))
        owner = site_of.get(id(m))
        if owner is None:                       # a module inside a site belongs to it
            owner = stack[-1][0] if stack and stack[-1][0] != _OTHER else _OTHER
        stack.append((owner, names.get(id(m), type(m).__name__)))

    def post(m: nn.Module, args: Any, kwargs: dict, out: Any) -> None:
        stack.pop()
        site = site_of.get(id(m))
        if site is not None:
            x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            y = out if isinstance(out, torch.Tensor) else None
            packs, grad = starts.pop()
            needs = (x is not None and x.requires_grad) or any(p.requires_grad for p in m.parameters())
            trace.calls[site].append(SiteCall(None if x is None else storage_key(x),   # x, y unknown without tensors
                                              0 if x is None else x.numel() * x.element_size(),
                                              None if y is None else storage_key(y),
                                              not grad or (needs and trace.packs == packs), not grad))
            trace.keep.extend((x, y))

    internal: list[Exception] = []               # errors raised by the hooks below: invact's, not the step's
    pre, post, returned, pack = (_guarded(f, internal) for f in (pre, post, returned, pack))
    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(
        post, with_kwargs=True, always_call=True))]
    handles += [m.register_forward_hook(returned, prepend=True) for m in model.modules() if id(m) in swapped]
    if router is not None:                       # beside any route an earlier patch installed, which stays
        install_mode(model, router, TRIAL, list(model.modules()))
        router.outputs = []
    watch, hooks = _DropoutWatch(trace.keep), torch.autograd.graph.saved_tensors_hooks(pack, checked_for_backward)
    try:
        with seeded(model), torch.inference_mode(False), torch.enable_grad(), watch, hooks:
            out = run_step(model, example)
            del out
    except Exception as exc:  # noqa: BLE001 - the user's step, any error: with swaps, a reason to leave them
        if not internal and not active and router is None:
            raise
        trace.error = error_line(exc)
    finally:
        for h in handles:
            h.remove()
        if router is not None:
            remove_mode(model, TRIAL)
            trace.route_modified = _written(router.outputs)
            router.outputs = None
    if internal:                                 # also where the step caught it
        exc = internal[0]
        raise MeasureError(f"invact.patch(example=...): the measurement failed, not the example step "
                           f"({type(exc).__name__}: {exc}); please report it") from exc
    trace.modified = {k for k, ys in outputs.items() if _written(ys)}
    trace.dropout_inputs = watch.inputs
    trace.keep.clear()
    return trace


def _require_saved_tensor_hooks() -> None:
    """Raise where :func:`torch.autograd.graph.disable_saved_tensors_hooks` disabled the hooks the trace needs."""
    if not torch._C._autograd._saved_tensors_hooks_is_enabled():
        reason = torch._C._autograd._saved_tensors_hooks_get_disabled_error_message()
        raise RuntimeError(f"invact.patch(example=...): measuring the example step needs saved-tensor hooks, "
                           f"disabled here by torch.autograd.graph.disable_saved_tensors_hooks ({reason!r}); "
                           "invact.patch(model) without example= works in this region (class rules only), or "
                           "pass example= outside it")


def error_line(exc: BaseException) -> str:
    """``exc`` in one line for a report: its type and its message's first line (160 characters at most)."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]


def _guarded(hook: Any, internal: list[Exception]) -> Any:
    """``hook``, recording in ``internal`` any error it raises (so that it is never taken for the step's)."""
    @functools.wraps(hook)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return hook(*args, **kwargs)
        except Exception as exc:
            internal.append(exc)
            raise
    return call


def _written(outputs: list[tuple[torch.Tensor, int]]) -> bool:
    """Was any of these tensors modified in place since its version was taken?"""
    return any(t._version != version for t, version in outputs)
