"""Snapshot and restore of what measuring :func:`invact.patch` (``example=``) may change (:mod:`invact.measure`).

Runs use torch's forked RNG, Python's ``random`` and NumPy's global RNG seeded alike (:func:`seeded`: dropout
masks and, e.g., Wav2Vec2's NumPy-drawn SpecAugment masks agree between runs); the caller's RNG states are
restored. So are the buffers (:class:`State`): the forwards run in training mode, which moves BatchNorm's
running statistics (a module may also count its calls in one); and, where the example is a callable step,
which may run backward or an optimizer step, the parameters and their ``.grad``. The same objects are put back
under the same names, with their values as before, also when a forward raises. Every optimizer stepped during
the measurement (torch's global step pre-hook) is snapshot at its first step and put back: its state (the same
tensors, their values), ``param_groups`` (so the lr an LR scheduler wrote) and the state of its LR schedulers
(found as the objects referring to it); so is every ``torch.amp.GradScaler`` used, subclasses included (its
scale and growth counter). Only the measuring thread's: other threads' optimizers and scalers are left alone.
What refers to no optimizer is not found: a scheduler stepped where its optimizer is not, a counter of the
caller's own. FSDP2 modules (``fully_shard``) are resharded before the snapshot and before each restore: a
forward without backward leaves the root's parameters gathered, and FSDP's state must agree with those put back.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import random
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.amp import GradScaler
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.optim.optimizer import Optimizer, register_optimizer_step_pre_hook

from .recognise import fsdp_module_class

__all__ = ["State", "seeded"]


@contextlib.contextmanager
def seeded(model: nn.Module) -> Iterator[None]:
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


_SCALER_METHODS = ("scale", "update")
_WATCH_LOCK = threading.Lock()
_WATCHING: list[_Optimizers] = []              # open measurements, any thread
_ORIGINALS: dict[tuple[type, str], Any] = {}    # (class, method name) -> its own function, while wrapped


def _scaler_classes() -> list[type]:
    """GradScaler and every loaded subclass (FSDP's ShardedGradScaler defines its own scale and update)."""
    found, todo = [], [GradScaler]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _watched(method: Any) -> Any:
    @functools.wraps(method)
    def call(scaler: GradScaler, *args: Any, **kwargs: Any) -> Any:
        for watcher in list(_WATCHING):
            watcher.first_use(scaler)
        return method(scaler, *args, **kwargs)
    return call


def _wrap_scalers() -> None:
    """Wrap the scaler classes' own ``scale`` and ``update`` (:data:`_ORIGINALS` keeps them)."""
    for cls in _scaler_classes():
        for name in _SCALER_METHODS:
            if name in cls.__dict__ and (cls, name) not in _ORIGINALS:
                _ORIGINALS[cls, name] = cls.__dict__[name]
                setattr(cls, name, _watched(cls.__dict__[name]))


def _unwrap_scalers() -> None:
    for (cls, name), method in _ORIGINALS.items():
        setattr(cls, name, method)
    _ORIGINALS.clear()


class _Optimizers:
    """While entered, every optimizer this thread steps (torch's global step pre-hook) is snapshot at its
    first step, with its LR schedulers, and every GradScaler (subclasses included) this thread uses at its
    first ``scale`` or ``update`` (the classes' methods wrapped while any measurement is open, in any
    thread); :meth:`restore` puts them back as they were before. Other threads' optimizers and scalers
    are left alone."""

    def __init__(self) -> None:
        self.saved: dict[int, _Optimizer | _Scaler] = {}
        self.handle: Any = None
        self.thread: int | None = None

    def first_use(self, obj: Optimizer | GradScaler) -> None:
        """Snapshot ``obj`` (an optimizer or a scaler) the first time this measurement's thread uses it."""
        if threading.get_ident() == self.thread and id(obj) not in self.saved:
            self.saved[id(obj)] = _Scaler(obj) if isinstance(obj, GradScaler) else _Optimizer(obj)

    def _first_step(self, opt: Optimizer, args: Any, kwargs: Any) -> None:
        self.first_use(opt)

    def __enter__(self) -> _Optimizers:
        self.thread = threading.get_ident()
        self.handle = register_optimizer_step_pre_hook(self._first_step)
        with _WATCH_LOCK:
            _WATCHING.append(self)
            if len(_WATCHING) == 1:
                _wrap_scalers()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()
        with _WATCH_LOCK:
            _WATCHING.remove(self)
            if not _WATCHING:
                _unwrap_scalers()

    def restore(self) -> None:
        for saved in self.saved.values():
            saved.restore()


def _reshard(modules: list[nn.Module]) -> list[nn.Module]:
    """Reshard the FSDP2 modules (``fully_shard``) among ``modules``, and return them. A forward without
    backward leaves some gathered (the root's plain parameters registered, its state "unsharded"); resharded,
    each holds its sharded parameters again, the ones FSDP's state knows, so those are what is snapshot and
    put back, and the next forward gathers them anew."""
    fsdp = fsdp_module_class()
    found = [m for m in modules if fsdp is not None and isinstance(m, fsdp)]
    for m in found:
        m.reshard()
    return found


class State:
    """Parameters and buffers of some modules, snapshot: :meth:`restore` puts back the same objects under
    the same names and their values (copied in place only where they changed). ``steps``: the example
    is a callable step, which may run backward or an optimizer: parameters' values and ``.grad`` are
    kept too (a forward of model inputs changes only buffers, such as BatchNorm's statistics, so then
    the parameters, most of the memory, are not copied), and so is the state of every optimizer stepped
    while ``optimizers`` is entered, with its LR schedulers. FSDP2 modules (``fully_shard``) are resharded
    before the snapshot and before each restore (:func:`_reshard`)."""

    def __init__(self, modules: Any, steps: bool = True) -> None:
        self.optimizers = _Optimizers()
        unique = list({id(m): m for m in modules}.values())
        self.fsdp = _reshard(unique)
        self.slots = [(m, dict(m._parameters), dict(m._buffers)) for m in unique]
        self.values: dict[int, tuple] = {}
        for _, params, buffers in self.slots:
            for t in (*(params.values() if steps else ()), *buffers.values()):
                if t is not None and id(t) not in self.values and not nn.parameter.is_lazy(t):
                    grad = t.grad if isinstance(t, nn.Parameter) else None
                    self.values[id(t)] = (t, t.detach().clone(), None if t.is_inference() else t._version,
                                          grad, None if grad is None else grad.detach().clone())

    def restore(self) -> None:
        self.optimizers.restore()
        _reshard(self.fsdp)
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
