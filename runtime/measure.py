"""Measured keep-or-drop for :func:`invact.patch` (``example=``) and the functional route (``functional=True``).

How a swap is judged. Every replaced module is a *site* (a module shared by several paths is one site).
The example step runs once with the original modules (the baseline), then with the candidate swaps, each
time as a forward in training mode, grad enabled, under :func:`torch.autograd.graph.saved_tensors_hooks`
(a forward records everything backward will keep; no backward runs). Each saved storage (pointer, size;
parameters apart) is charged to the modules that saved it, as in :mod:`invact.saved`, but *every* saver
is kept, not only the first. A storage saved only inside site ``s`` lives because of ``s`` alone, so

    bytes freed by s = (bytes saved only by s, baseline) - (bytes saved only by s, swapped)

which is exactly what removing ``s``'s saves changes in the total. The activation's input freed, and its
output ``y`` shared with the next saved tensor, both show up there: an input another consumer also saves
(a chunk of a fused projection) is not "only s" in the baseline, and a ``y`` nothing else saves (dropout
after the activation, a consumer that does not save its input) is "only s" in the swapped run.

A swapped site whose output is modified in place after it returns (``Dropout(inplace=True)`` or
``ReLU(inplace=True)`` next, ``h *= s``, an in-place op in one of its forward hooks) is left whatever it
frees: invact saves ``y``, so backward would fail. Each swapped call's output and its version counter are
taken by the site's first forward hook and compared after the step; a step that raises with swaps in place
(a callable step running backward) leaves the sites so written, or, with none, every swap of that run.

Sites interact (an activation's ``y`` may be the next activation's input), so the decision iterates:
swap every candidate, drop each site freeing <= 0 bytes, measure again, until every remaining site frees
bytes; each round is a forward, at most one per site and usually two. The final configuration's total
is the measured one; if it were above the baseline (storages saved jointly by several sites are charged
to none of them) every swap is dropped. A site never called in the baseline step is restored, and so is one
whose replacement is not called with the swap in place (the model calls the original through a reference
outside its module tree, as a torch.compile wrapper's forward does). The measurement's own hooks record
their errors: one is raised as :class:`MeasureError`, never taken for the step failing.

Norms with ``autocast_output`` (judged pre-norms by :func:`invact.norm_patch.feeds_linears`) are checked
first, on forwards of the example under bf16 autocast with the swapped norms (training mode, seeded as
below): the model's outputs (every tensor its forwards return, bit for bit and dtype) with every such norm
returning torch's dtype, then with each group of them (the same attribute of the same parent class: every
layer's ``input_layernorm``) returning the autocast dtype, then (with several groups) the groups kept,
together. A group that changes the outputs feeds something other than autocast-lowered Linears (a
post-norm's residual add, the model's output) and keeps torch's dtype; the report says so. A step that
fails under autocast or whose model returns no tensor leaves the attribute names' decision.

The functional route (``functional=True``) is measured as one unit: one more forward with
:class:`invact.routing.FunctionalRouter` active during the model's forward; it is kept if the total
falls and no routed call's output is modified in place later. (Per call site it would need a router that
knows which module called it, at run time too.) The route is entered by forward hooks on every module of
the model (one depth count), so a checkpointed module's recomputation in backward is routed as its forward
was; the hooks are methods of a module-level class, so the model pickles and a copy has its own router.
A route installed earlier (by a patch of the model or of a submodule) stays during the measurement, and a kept
route replaces the routes of the modules under it; :func:`remove_modes` removes every route in the tree.

Runs use torch's forked RNG, Python's ``random`` and NumPy's global RNG seeded alike (dropout masks and,
e.g., Wav2Vec2's NumPy-drawn SpecAugment masks agree between runs); the caller's RNG states are restored,
and so is every module's training flag. So are the buffers (:class:`_State`): the forwards run in training
mode, which moves BatchNorm's running statistics (a module may also count its calls in one); and, where the
example is a callable step, which may run backward or an optimizer step, the parameters and their ``.grad``.
The same objects are put back under the same names, with their values as before, also when a forward
raises. Every optimizer stepped during the measurement (torch's global step pre-hook) is snapshot at its
first step and put back: its state (the same tensors, their values), ``param_groups`` (so the lr an LR
scheduler wrote) and the state of its LR schedulers (found as the objects referring to it); so is every
``torch.amp.GradScaler`` used (its scale and growth counter). What refers to no optimizer is not found: a
scheduler stepped where its optimizer is not, a counter of the caller's own. Uninitialised lazy modules are refused (ValueError).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import random
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
import numpy as np
from torch import nn
from torch.amp import GradScaler
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.optim.optimizer import Optimizer, register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode

from .norms import _Saving
from .routing import FunctionalRouter
from .saved import SavedBytes

__all__ = ["check_example", "decide", "install_router", "remove_router", "remove_modes", "CopyChunks", "Trace",
           "MeasureError"]

_OTHER = -1                                       # owner of storages saved outside every site
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
             torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout}


def check_example(example: Any) -> None:
    """Raise TypeError unless ``example`` is a tensor, a tuple/list/dict of inputs, or a callable step."""
    if example is None or isinstance(example, (torch.Tensor, tuple, list, dict)) or callable(example):
        return
    raise TypeError("example must be a tensor, a tuple (or list) or dict of model inputs, or a callable "
                    f"taking the model and running one step; got {type(example).__name__}")


def _step(model: nn.Module, example: Any) -> Any:
    if isinstance(example, torch.Tensor):
        return model(example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    if isinstance(example, dict):
        return model(**example)
    return example(model)


@contextlib.contextmanager
def _seeded(model: nn.Module):
    """torch (forked, CPU and the model's CUDA devices), random and numpy seeded with 0; states restored."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


class MeasureError(RuntimeError):
    """invact's measurement itself failed (not the example step): a bug to report, never a reason to leave a swap."""


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _put(current: Any, saved: Any) -> Any:
    """``saved``'s value, written into ``current`` where it is a tensor of the same kind (the same object
    stays: a CUDA graph or a fused kernel may hold it), else a copy (``saved`` is kept for the next restore)."""
    if isinstance(current, torch.Tensor) and isinstance(saved, torch.Tensor) and \
            (current.dtype, current.shape, current.device) == (saved.dtype, saved.shape, saved.device):
        with torch.no_grad():
            current.copy_(saved)
        return current
    return _copy(saved)


def _schedulers(opt: Optimizer) -> list[Any]:
    """The LR schedulers of ``opt`` (objects refer to their optimizer; it does not refer to them)."""
    found = []
    for ref in gc.get_referrers(opt):
        if isinstance(ref, dict) and ref.get("optimizer") is opt:     # an instance __dict__ (Python < 3.11)
            found += [o for o in gc.get_referrers(ref) if getattr(o, "__dict__", None) is ref]
        else:
            found.append(ref)
    return list({id(s): s for s in found if isinstance(s, (LRScheduler, ReduceLROnPlateau))
                 and s.optimizer is opt}.values())


class _Optimizer:
    """One optimizer's state, ``param_groups`` (lr, ...) and its LR schedulers' state, snapshot."""

    def __init__(self, opt: Optimizer) -> None:
        self.opt = opt
        self.state = {p: {k: _copy(v) for k, v in s.items()} for p, s in opt.state.items()}
        self.groups = [{k: _copy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
        self.schedulers = [(s, copy.deepcopy(s.state_dict())) for s in _schedulers(opt)]

    def restore(self) -> None:
        opt = self.opt
        for p in [p for p in opt.state if p not in self.state]:
            del opt.state[p]
        for p, saved in self.state.items():
            now = opt.state[p]
            for k in [k for k in now if k not in saved]:
                del now[k]
            now.update({k: _put(now.get(k), v) for k, v in saved.items()})
        del opt.param_groups[len(self.groups):]
        for group, saved in zip(opt.param_groups, self.groups):
            for k in [k for k in group if k != "params" and k not in saved]:
                del group[k]
            group.update({k: _put(group.get(k), v) for k, v in saved.items()})
        for scheduler, saved in self.schedulers:
            scheduler.load_state_dict(copy.deepcopy(saved))


class _Scaler:
    """One ``torch.amp.GradScaler``'s scale, growth counter and settings, snapshot (the scale's tensors are
    created at its first ``scale()``: where they were not yet, they are dropped again)."""

    _TENSORS = ("_scale", "_growth_tracker")

    def __init__(self, scaler: GradScaler) -> None:
        self.scaler = scaler
        self.values = {k: _copy(v) for k, v in vars(scaler).items() if k != "_per_optimizer_states"}

    def restore(self) -> None:
        for k, v in self.values.items():
            setattr(self.scaler, k, _put(getattr(self.scaler, k, None), v) if k in self._TENSORS and v is not None
                    else _copy(v))
        self.scaler._per_optimizer_states.clear()       # what update() leaves: no step in flight


class _Optimizers:
    """While entered, every optimizer stepped (torch's global step pre-hook) is snapshot at its first step,
    with its LR schedulers, and every ``torch.amp.GradScaler`` at its first ``scale`` or ``update`` (the two
    methods wrapped on the class meanwhile); :meth:`restore` puts them back as they were before."""

    _SCALER_METHODS = ("scale", "update")

    def __init__(self) -> None:
        self.saved: dict[int, _Optimizer | _Scaler] = {}
        self.handle: Any = None
        self.methods: dict[str, Any] = {}

    def _first_step(self, opt: Optimizer, args: Any, kwargs: Any) -> None:
        if id(opt) not in self.saved:
            self.saved[id(opt)] = _Optimizer(opt)

    def _watched(self, method: Any) -> Any:
        @functools.wraps(method)
        def call(scaler: GradScaler, *args: Any, **kwargs: Any) -> Any:
            if id(scaler) not in self.saved:
                self.saved[id(scaler)] = _Scaler(scaler)
            return method(scaler, *args, **kwargs)
        return call

    def __enter__(self) -> _Optimizers:
        self.handle = register_optimizer_step_pre_hook(self._first_step)
        self.methods = {name: GradScaler.__dict__[name] for name in self._SCALER_METHODS}
        for name, method in self.methods.items():
            setattr(GradScaler, name, self._watched(method))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()
        for name, method in self.methods.items():
            setattr(GradScaler, name, method)

    def restore(self) -> None:
        for saved in self.saved.values():
            saved.restore()


class _State:
    """Parameters and buffers of some modules, snapshot: :meth:`restore` puts back the same objects under
    the same names and their values (copied in place only where they changed). ``steps``: the example
    is a callable step, which may run backward or an optimizer: parameters' values and ``.grad`` are
    kept too (a forward of model inputs changes only buffers, such as BatchNorm's statistics, so then
    the parameters, most of the memory, are not copied), and so is the state of every optimizer stepped
    while ``optimizers`` is entered, with its LR schedulers."""

    def __init__(self, modules: Any, steps: bool = True) -> None:
        self.optimizers = _Optimizers()
        self.slots = [(m, dict(m._parameters), dict(m._buffers)) for m in {id(m): m for m in modules}.values()]
        self.values: dict[int, tuple] = {}
        for _, params, buffers in self.slots:
            for t in (*(params.values() if steps else ()), *buffers.values()):
                if t is not None and id(t) not in self.values and not nn.parameter.is_lazy(t):
                    grad = t.grad if isinstance(t, nn.Parameter) else None
                    self.values[id(t)] = (t, t.detach().clone(), None if t.is_inference() else t._version,
                                          grad, None if grad is None else grad.detach().clone())

    def restore(self) -> None:
        self.optimizers.restore()
        for m, params, buffers in self.slots:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
        with torch.no_grad():
            for t, saved, version, grad, grad_value in self.values.values():
                if (t.dtype, t.shape, t.device) != (saved.dtype, saved.shape, saved.device):
                    t.data = saved                 # a step that reassigned .data
                elif version is None:              # an inference tensor: no version counter, written in inference mode
                    if not torch.equal(t, saved):
                        with torch.inference_mode():
                            t.copy_(saved)
                elif t._version != version or not torch.equal(t, saved):
                    t.copy_(saved)
                if isinstance(t, nn.Parameter):
                    if t.grad is not grad:
                        t.grad = grad
                    if grad is not None and not torch.equal(grad, grad_value):  # accumulated into in place
                        grad.copy_(grad_value)


_key = SavedBytes._key  # one definition of "the same storage" for patch and invact.memory


@dataclass
class _Call:
    x_key: tuple | None
    x_bytes: int
    y_key: tuple | None
    hidden: bool = False     # its saves were not ours to see: grad off, or another saved-tensor hook (checkpoint)
    grad_off: bool = False   # grad was off


class _DropoutWatch(TorchFunctionMode):
    """Records the storages of tensors passed to a dropout with p > 0 in training."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: set[tuple] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUTS and args and isinstance(args[0], torch.Tensor):
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            train = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
            if p and train:
                self.inputs.add(_key(args[0]))
        return func(*args, **kwargs)


@dataclass
class Trace:
    """One forward of the example: who saved which storage, and every call of every site."""

    savers: dict[tuple, set[int]] = field(default_factory=lambda: defaultdict(set))
    names: dict[tuple, set[tuple[int, str]]] = field(default_factory=lambda: defaultdict(set))  # (owner, path)
    calls: dict[int, list[_Call]] = field(default_factory=lambda: defaultdict(list))
    dropout_inputs: set[tuple] = field(default_factory=set)
    keep: list[Any] = field(default_factory=list)     # tensors held so that no storage is reused mid-run
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


def _run(model: nn.Module, example: Any, sites: dict[int, _Site], active: set[int], params: set[tuple],
         router: FunctionalRouter | None = None) -> Trace:
    """One forward of the example with ``active``'s swaps in place. A step that raises with swaps (or the
    route) in place is recorded in ``trace.error``, not raised; with none, it raises."""
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
        key = _key(t)
        if key is not None and key[3] and key not in params and not isinstance(t, nn.Parameter):
            owner, name = stack[-1] if stack else (_OTHER, "<outside>")
            trace.savers[key].add(owner)
            trace.names[key].add((owner, name))
            trace.keep.append(t)
        return t

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
            trace.calls[site].append(_Call(None if x is None else _key(x),   # x, y unknown without tensors
                                           0 if x is None else x.numel() * x.element_size(),
                                           None if y is None else _key(y),
                                           not grad or (needs and trace.packs == packs), not grad))
            trace.keep.extend((x, y))

    internal: list[Exception] = []               # errors raised by the hooks below: invact's, not the step's
    pre, post, returned, pack = (_guarded(f, internal) for f in (pre, post, returned, pack))
    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(
        post, with_kwargs=True, always_call=True))]
    handles += [m.register_forward_hook(returned, prepend=True) for m in model.modules() if id(m) in swapped]
    if router is not None:                       # beside any route an earlier patch installed, which stays
        _install(model, router, _TRIAL, list(model.modules()))
        router.outputs = []
    watch = _DropoutWatch()
    try:
        with _seeded(model), torch.enable_grad(), watch, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = _step(model, example)
            del out
    except Exception as exc:  # noqa: BLE001 - the user's step, any error: with swaps, a reason to leave them
        if not internal and not active and router is None:
            raise
        trace.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
    finally:
        for h in handles:
            h.remove()
        if router is not None:
            _remove(model, _TRIAL)
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


_WRITTEN = ("its output is modified in place later in the forward (an in-place op after it, or in a forward "
            "hook): invact saves y, so backward would fail")


_BYPASSED = ("its replacement is never called with the swap in place: the original still runs (the model calls "
             "it through a reference outside its module tree, such as a torch.compile wrapper's forward)")


def _refused(trace: Trace, active: set[int]) -> dict[int, str]:
    """Sites a swapped run refuses whatever they free: those whose output was written in place; where the step
    failed and none was, every active site; else those whose replacement was not called (the baseline called
    every active site's original)."""
    if trace.modified:
        return {k: _WRITTEN for k in trace.modified}
    if trace.error is not None:
        return {k: f"the example step fails with the swaps ({trace.error})" for k in active}
    return {k: _BYPASSED for k in active if not trace.calls[k]}


# ---------------------------------------------------------------------------------------------------
# modes active during a module's forward: the functional route, and copied chunks of fused projections

_ROUTER, _CHUNKS, _TRIAL = "_invact_router", "_invact_chunks", "_invact_router_trial"
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
    for all). An object of a module-level class, not closures: a model carrying it pickles, and a deep copy
    gets its own scope and mode."""

    def __init__(self, mode: TorchFunctionMode) -> None:
        self.mode, self.depth = mode, 0

    def enter(self, module: nn.Module, args: Any) -> None:
        if self.depth == 0:
            self.mode.__enter__()
        self.depth += 1

    def leave(self, module: nn.Module, args: Any, out: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.mode.__exit__(None, None, None)


def _install(owner: nn.Module, mode: TorchFunctionMode, attr: str, modules: list[nn.Module] | None = None) -> None:
    """Enter ``mode`` around every outermost call of ``owner`` (or of any of ``modules``), kept in
    ``owner.__dict__[attr]``."""
    _remove(owner, attr)
    scope = _Scope(mode)
    handles = [h for m in modules or [owner] for h in (m.register_forward_pre_hook(scope.enter),
                                                        m.register_forward_hook(scope.leave, always_call=True))]
    owner.__dict__[attr] = (mode, handles)


def _remove(module: nn.Module, attr: str) -> TorchFunctionMode | None:
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
        _remove(m, _ROUTER)
    _install(model, router, _ROUTER, list(model.modules()))


def remove_router(model: nn.Module) -> FunctionalRouter | None:
    """Remove the route :func:`install_router` put on ``model``; returns its router (None if none)."""
    return _remove(model, _ROUTER)


def remove_modes(model: nn.Module) -> None:
    """Remove every functional route and chunk-copy mode installed on ``model`` or on any of its modules (by
    a patch of the model or of a submodule)."""
    for m in model.modules():
        _remove(m, _ROUTER)
        _remove(m, _CHUNKS)


# ---------------------------------------------------------------------------------------------------

@dataclass
class _Site:
    paths: list[str]
    old: nn.Module
    new: nn.Module


def _place(model: nn.Module, sites: dict[int, _Site], active: set[int]) -> None:
    for key, site in sites.items():
        module = site.new if key in active else site.old
        for path in site.paths:
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent), attr, module)


def _site_map(sites: dict[int, _Site], active: set[int]) -> dict[int, int]:
    out = {}
    for key, site in sites.items():
        for m in (site.new if key in active else site.old).modules():
            out[id(m)] = key
    return out


def _fmt(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KiB" if abs(n) >= 2**10 else f"{n} B"


def _before_dropout(key: int, trace: Trace) -> bool:
    """Whether a call of ``key`` returned what a dropout then took (so y is an extra tensor)."""
    return any(c.y_key in trace.dropout_inputs for c in trace.calls[key])


_DROPOUT = "dropout after it: the next layer saves the dropout's output, so y is an extra tensor"


def _why(key: int, base: Trace, pat: Trace) -> str:
    """Why site ``key`` frees nothing, read from the storages of its calls."""
    reasons = []
    for c in base.calls[key]:
        if c.x_key in base.savers and base.savers[c.x_key] != {key}:
            others = {name for owner, name in base.names[c.x_key] if owner != key}
            whole = c.x_key[3] // max(c.x_bytes, 1)
            part = f", a 1/{whole} slice of a larger storage (a fused projection)" if whole > 1 else ""
            reasons.append(f"input kept alive by another consumer ({', '.join(sorted(others))}{part})")
            break
    if base.hidden(key):
        return _DROPOUT + " (not measured: " + _hidden_cause(base, key) + ")"
    for c in pat.calls[key]:
        if pat.savers.get(c.y_key) == {key}:
            reasons.append(_DROPOUT if c.y_key in pat.dropout_inputs else
                           "y not saved by its consumer, so y is an extra tensor")
            break
    freed, added = base.only(key), pat.only(key)
    return "; ".join(reasons + [f"measured: frees {_fmt(freed)}, adds {_fmt(added)}"])


def _hidden_cause(trace: Trace, key: int) -> str:
    """Why a forward of the example shows none of ``key``'s saves."""
    if all(c.grad_off for c in trace.calls[key]):
        return ("the example runs it without grad (a reentrant checkpoint's forward, whose recomputation in backward "
                "saves y instead of x, or no_grad)")
    return ("the example runs it under another saved-tensor hook (a non-reentrant checkpoint, whose recomputation "
            "saves y instead of x, or an offloading hook)")


def _parents(model: nn.Module, site: _Site) -> list[nn.Module]:
    return [model.get_submodule(path.rpartition(".")[0]) for path in site.paths]


def _params(model: nn.Module, sites: dict[int, _Site]) -> set[tuple]:
    mods = [model] + [m for s in sites.values() for m in (s.old, s.new)]
    return {k for m in mods for p in m.parameters() if (k := _key(p)) is not None}


def _outputs(model: nn.Module, example: Any) -> list[torch.Tensor]:
    """Every tensor the model's (outermost) forwards return in one run of the example, detached."""
    outs: list[torch.Tensor] = []
    depth = [0]

    def enter(m: nn.Module, args: Any) -> None:
        depth[0] += 1

    def leave(m: nn.Module, args: Any, out: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            stack = [out]
            while stack:
                o = stack.pop()
                if isinstance(o, torch.Tensor):
                    outs.append(o.detach())
                elif isinstance(o, dict):
                    stack.extend(o.values())
                elif isinstance(o, (tuple, list)):
                    stack.extend(o)

    handles = (model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True))
    try:
        with _seeded(model), torch.enable_grad():
            out = _step(model, example)
            del out
    finally:
        for h in handles:
            h.remove()
    return outs


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Same dtypes, shapes and bits."""
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape
        and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        for x, y in zip(a, b))


def _check_autocast(model: nn.Module, example: Any, sites: dict[int, _Site], state: _State) -> dict[int, str]:
    """Norm sites whose ``autocast_output`` changes the model's outputs under bf16 autocast, or makes the
    step fail (set back to False), with the reason; the sites must be in place. ``state`` is put back
    after each run, so that every run starts from the same parameters (a step may run an optimizer)."""
    casts = {k for k, s in sites.items() if isinstance(s.new, _Saving) and s.new.autocast_output}
    if not casts:
        return {}
    device = next((p.device.type for p in model.parameters()), "cpu")
    if device not in ("cpu", "cuda"):
        return {}
    groups: dict[tuple, set[int]] = defaultdict(set)
    for k in casts:
        for path in sites[k].paths:
            parent, _, attr = path.rpartition(".")
            groups[(type(model.get_submodule(parent)).__qualname__, attr)].add(k)

    def run(on: set[int]) -> list[torch.Tensor] | str:
        """The outputs, or why the step failed."""
        for k in casts:
            sites[k].new.autocast_output = k in on
        try:
            with torch.autocast(device, dtype=torch.bfloat16):
                return _outputs(model, example)
        except Exception as exc:  # noqa: BLE001 - the user's step, any error: reported as the reason
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
        finally:
            state.restore()

    refused: dict[int, str] = {}
    try:
        plain = run(set())
        if isinstance(plain, str) or not plain:  # fails under autocast, or nothing to compare: names decide
            return {}
        for (cls, attr), keys in groups.items():
            got = run(keys)
            if isinstance(got, str):
                refused.update({k: f"torch's dtype under autocast: measured, with the autocast dtype of {cls}.{attr} "
                                   f"the step fails ({got})" for k in keys})
            elif not _same(plain, got):
                refused.update({k: f"torch's dtype under autocast: measured, the autocast dtype of {cls}.{attr} "
                                   "changes the model's output (not only Linears consume it)" for k in keys})
        rest = casts - set(refused)
        if len(groups) > 1 and rest and not (isinstance(got := run(rest), list) and _same(plain, got)):
            refused.update({k: "torch's dtype under autocast: measured, the norms' autocast outputs together "
                               "change the model's output or fail" for k in rest})
    finally:
        for k in casts:
            sites[k].new.autocast_output = k not in refused
    return refused


def decide(model: nn.Module, report: Any, example: Any, router: FunctionalRouter | None,
           left_cls: Any, check_autocast: bool = False) -> bool:
    """Measure ``report``'s swaps (and ``router``) on ``example``; undo those that free nothing, in place.

    ``report`` is the :class:`invact.patching.PatchReport` of swaps just made; kept entries get ``freed``,
    dropped ones move to ``report.left`` (built with ``left_cls(path, class, reason)``). Returns whether
    the functional route frees bytes (False without ``router``). ``check_autocast``: norms with
    ``autocast_output`` keep it only where it leaves the model's outputs unchanged under autocast.
    """
    sites: dict[int, _Site] = {}
    for r in report.replaced:
        new = model.get_submodule(r.path)
        site = sites.setdefault(id(new), _Site([], new._invact_replaced[0], new))
        site.paths.append(r.path)
    _refuse_lazy(model)
    modules = [m for s in [model, *(x for s in sites.values() for x in (s.old, s.new))] for m in s.modules()]
    flags = {id(m): (m, m.training) for m in modules}
    params = _params(model, sites)
    state = _State(modules, steps=not isinstance(example, (torch.Tensor, tuple, list, dict)))  # else _step calls it
    try:
        with state.optimizers:
            active, reasons, base, final, routed, unit = _measure(model, report, example, router, sites, params,
                                                                  state, check_autocast)
    finally:
        for m, flag in flags.values():
            m.train(flag)
        state.restore()
    _report(report, sites, active, reasons, base, final, left_cls, routed, unit)
    return bool(routed and routed[0])


def _refuse_lazy(model: nn.Module) -> None:
    """ValueError where a lazy module (``nn.LazyLinear``, ...) has not been initialised: the example would
    initialise it, from the caller's RNG, and the measurement leaves the model's state as it was."""
    lazy = [f"{name or '<root>'} ({type(m).__name__})" for name, m in model.named_modules()
            if any(t is not None and nn.parameter.is_lazy(t) for t in (*m._parameters.values(), *m._buffers.values()))]
    if lazy:
        raise ValueError(f"invact.patch(example=...): uninitialised lazy module(s) {', '.join(lazy)}; run one forward "
                         "of the model first (as before building an optimizer or DDP), then patch")


def _measure(model: nn.Module, report: Any, example: Any, router: FunctionalRouter | None, sites: dict[int, _Site],
             params: set[tuple], state: _State, check_autocast: bool) -> tuple:
    """The runs of :func:`decide`: ``(active, reasons, base, final, routed, unit)``, the sites placed as decided."""
    model.train()
    if check_autocast:
        _place(model, sites, set(sites))
        refused = _check_autocast(model, example, sites, state)
        for i, r in enumerate(report.replaced):
            key = id(model.get_submodule(r.path))
            if key in refused:
                kept = [x for x in r.note.split("; ") if x and not x.startswith("autocast output")]
                note = "; ".join([refused[key], *kept])
                report.replaced[i] = replace(r, new="invact." + repr(sites[key].new), note=note)
    _place(model, sites, set())
    base = _run(model, example, sites, set(), params)
    reasons = {k: "never called in the example step" for k in sites if not base.calls[k]}
    hidden = {k for k in sites if base.hidden(k)}     # kept unmeasured, as without example=
    active, final = set(sites) - set(reasons), base
    while active:
        _place(model, sites, active)
        final = _run(model, example, sites, active, params)
        refused = _refused(final, active)
        bad = set(refused) or {k for k in active - hidden if base.only(k) - final.only(k) <= 0} | \
            {k for k in active & hidden if _before_dropout(k, final)}
        reasons.update(refused or {k: _why(k, base, final) for k in bad})
        active -= bad
        if not bad:
            break
    else:
        final = base
    if final.total > base.total:          # joint storages charged to no site: never worse than baseline
        reasons.update({k: f"measured: the swaps together add {_fmt(final.total - base.total)}" for k in active})
        active, final = set(), base
    fused = {k for k, why in reasons.items() if "fused projection" in why}
    parents = {id(p): p for k in fused for p in _parents(model, sites[k])}
    unit = None
    if fused:                             # one unit: these swaps with their parents' chunks copied
        for p in parents.values():
            _install(p, CopyChunks(), _CHUNKS)
        _place(model, sites, active | fused)
        trial = _run(model, example, sites, active | fused, params)
        refused = _refused(trial, active | fused)
        gain = final.total - trial.total if not refused else 0
        if gain > 0:
            note = (f"fused projection: its parent's chunk/split outputs copied, measured as one unit of "
                    f"{len(fused)} site(s) freeing {_fmt(gain)}")
            active, final, unit = active | fused, trial, (fused, note, gain)
            for k in fused:
                del reasons[k]
        else:
            for p in parents.values():
                _remove(p, _CHUNKS)
            for k in fused:
                reasons[k] += (f"; copying its parent's chunks (one unit of {len(fused)}) " +
                               (refused[k] if k in refused else f"frees {_fmt(gain)}"))
    _place(model, sites, active)
    routed = None
    if router is not None:
        with_route = _run(model, example, sites, active, params, router)
        why = ("a routed call's output is modified in place later in the forward: invact saves y, so backward "
               "would fail" if with_route.route_modified else
               f"the example step fails with the route ({with_route.error})" if with_route.error else "")
        routed = (with_route.total < final.total and not why, final.total - with_route.total,
                  dict(router.routed), why)
        router.routed.clear()
        if routed[0]:
            final = with_route
    return active, reasons, base, final, routed, unit


def _report(report: Any, sites: dict[int, _Site], active: set[int], reasons: dict[int, str], base: Trace,
            final: Trace, left_cls: Any, routed: tuple | None, unit: tuple | None) -> None:
    by_path = {p: k for k, s in sites.items() for p in s.paths}
    kept, first = [], set()
    fused, note, gain = unit or (set(), "", 0)
    for r in report.replaced:
        key = by_path[r.path]
        if key in fused:                      # the unit's bytes on its first entry
            kept.append(replace(r, freed=0 if first & fused else gain, note="; ".join(x for x in (note, r.note) if x)))
            first.add(key)
        elif key in active and base.hidden(key):
            note = f"not measured: {_hidden_cause(base, key)}; kept, as without example="
            kept.append(replace(r, freed=0, note="; ".join(x for x in (note, r.note) if x)))
        elif key in active:
            kept.append(replace(r, freed=(base.only(key) - final.only(key)) if key not in first else 0))
            first.add(key)
        else:
            report.left.append(left_cls(r.path, r.old, reasons[key]))
    report.replaced[:] = kept
    report.measured = {"baseline_bytes": base.total, "patched_bytes": final.total,
                       "functional_bytes": routed[1] if routed and routed[0] else 0}
    if routed is not None:
        keep, freed, calls, why = routed
        report.functional = (f"routed: {sum(calls.values())} call(s) {calls}, frees {_fmt(freed)} (measured as one "
                             "unit)" if keep else
                             f"left: routing {sum(calls.values())} call(s) {calls}: {why} (measured as one unit)"
                             if why else
                             f"left: routing {sum(calls.values())} call(s) {calls} frees {_fmt(freed)} (measured "
                             "as one unit)")
