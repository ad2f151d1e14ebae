"""Count the bytes a forward pass saves for backward.

>>> import torch, torch.nn as nn, invact
>>> model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
>>> with invact.memory(model) as base:
...     out = model(torch.randn(64, 256))
>>> invact.patch(model)                                        # doctest: +SKIP
>>> with invact.memory(model) as patched:                      # doctest: +SKIP
...     out = model(torch.randn(64, 256))
>>> print(patched.compare(base))                               # doctest: +SKIP

Every tensor autograd saves passes through :func:`torch.autograd.graph.saved_tensors_hooks`'s pack hook.
Tensors are counted by their storage (``untyped_storage()``: pointer, device, size in bytes; on the meta
device, where every pointer is 0, the storage itself), each storage once: the output of an activation is
usually also what the next Linear saves, and without de-duplication that sharing — the whole point of
saving the output — would be invisible. A storage is charged to the innermost module running when it is
first saved (module pre/post forward hooks); tensors saved outside any module go to ``"<outside>"``. A
storage freed inside the block (a step's graph after its backward) stays counted, and the one the
allocator puts at its address next counts too. The hook keeps each tensor detached (a saved output would
otherwise hold its own graph in a cycle gc cannot free: a forward never backpropagated would never be
freed) and, at backward, refuses one changed in place since it was saved, as autograd does without hooks.
Storages of the model's parameters (or, with no model, of leaf tensors that require grad) are counted
apart, in ``.parameters``, not in ``.total``.

Nested blocks: PyTorch hands each saved tensor to the innermost saved-tensor hook only, so one pack hook
serves every open counter (a stack, per thread): an inner ``invact.memory`` block counts into the outer
ones too. A block opened inside another saved-tensor hook (``torch.autograd.graph.save_on_cpu()``, an
offloading ``saved_tensors_hooks``) chains to it: each tensor is counted as handed to that hook, then
packed and unpacked by it, so the hook sees what it sees without the counter. Inside a non-reentrant
checkpoint the tensors go on to checkpointing's hook uncounted: it drops them, to recompute in backward.
A foreign hook opened inside a block takes the tensors saved under it away from every counter: seen at
module calls and at the block's end, it is reported by a RuntimeWarning naming it, and ``incomplete`` says
so. Selective activation checkpointing (``context_fn=create_selective_checkpoint_contexts(...)``) keeps
the outputs of the ops its policy saves in its own cache, outside saved-tensor hooks: uncounted, and
likewise reported where it is seen (at module calls and at the block's end: a checkpointed function that
calls no module goes unseen). Entering a counter that is already open raises RuntimeError.

Caveats: a view counts its whole storage (that is what stays alive); the counts are for eager mode;
tensors saved by a compiled graph are counted when its pack hooks run (``torch.compile`` may graph-break
around the hooks). The hooks run only while the context is open, so the model must be called inside it.

Name: this module is ``invact.saved``; ``invact.memory`` is its function below, re-exported;
other names: ``from invact.saved import SavedBytes`` (also ``invact.SavedBytes``).
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layout import is_jagged

__all__ = ["memory", "SavedBytes"]

_OUTSIDE = "<outside>"


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units, two decimals above 1 KiB; the one format of :func:`memory`'s and
    :func:`invact.patch`'s reports (package-internal).

    >>> format_bytes(1536), format_bytes(-3 * 2**20), format_bytes(512)
    ('1.50 KiB', '-3.00 MiB', '512 B')
    """
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


class _Open(threading.local):
    counters: list["SavedBytes"]

    def __init__(self) -> None:
        self.counters = []


_OPEN = _Open()   # the counters open in this thread, outermost first


def keep_for_backward(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """What a saved-tensor pack hook of invact's keeps of ``t``: ``t`` detached, and its version.

    Not ``t`` itself: where ``t`` is its node's own output (invact's activations and norms, torch's
    tanh), ``t`` -> grad_fn -> saved ``t`` is a cycle Python's gc cannot free, so the graph of a forward
    never backpropagated would live for good (autograd gives the unpacked tensor its grad_fn back). The
    detached tensor shares ``t``'s version counter: :func:`checked_for_backward` refuses an in-place
    change, as autograd does without hooks (with hooks, PyTorch does not check).
    """
    return t.detach(), t._version


def checked_for_backward(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
    """The tensor :func:`keep_for_backward` kept, refused (autograd's RuntimeError) where it was modified
    in place since it was saved. Not checked where Dynamo traces the unpack (compiled autograd): a traced
    version counter is not the tensor's (it read as changed: 1 != 1), and autograd checks the run's."""
    t, version = packed
    if not torch.compiler.is_compiling() and t._version != version:
        raise RuntimeError(
            f"one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"[{t.type()} {list(t.shape)}] is at version {t._version}; expected version {version} instead "
            "(saved under invact's saved-tensor hook: invact.memory or invact.patch's measured example). Hint: "
            "enable anomaly detection to find the operation that failed to compute its gradient, with "
            "torch.autograd.set_detect_anomaly(True).")
    return t


def _pack_all(counters: tuple["SavedBytes", ...], outer: Any, t: torch.Tensor) -> Any:
    """A block's pack hook, bound to the counters open when it was entered (its own last) and to the
    pack hook it was opened inside (``outer``, or None): PyTorch calls only the innermost hook, so it counts
    ``t`` in each counter, on whatever thread autograd runs it, then hands ``t`` on to ``outer``, which
    owns it; with none, it keeps ``t`` as :func:`keep_for_backward` says."""
    for counter in counters:
        counter._pack(t)
    return keep_for_backward(t) if outer is None else outer(t)


def _unpack_with(outer: Any, packed: Any) -> Any:
    """A block's unpack hook: the outer unpack hook's result (where there is none, the tensor kept,
    checked for in-place changes)."""
    return checked_for_backward(packed) if outer is None else outer(packed)


def _is_ours(hook: Any) -> bool:
    """Whether ``hook`` is a block's own pack hook (a partial of :func:`_pack_all`)."""
    return getattr(hook, "func", None) is _pack_all


def _is_checkpoints(hook: Any) -> bool:
    """Whether ``hook`` is non-reentrant checkpointing's own: what it is handed is recomputed, not kept."""
    return getattr(hook, "__module__", None) == "torch.utils.checkpoint"


def _chained_hooks(counters: tuple["SavedBytes", ...]) -> torch.autograd.graph.saved_tensors_hooks:
    """The saved-tensor hooks of a block opened inside the hooks active now. Where those are another
    block's, their outer hooks are chained instead (their counters are in ``counters`` already). Inside a
    non-reentrant checkpoint, tensors go on to its hook uncounted, as for a checkpoint inside a block."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(True)
    if top is not None and _is_ours(top[0]):
        top = (top[0].args[1], top[1].args[0])
    pack, unpack = top if top is not None else (None, None)
    return torch.autograd.graph.saved_tensors_hooks(
        functools.partial(_pack_all, () if _is_checkpoints(pack) else counters, pack),
        functools.partial(_unpack_with, unpack))


def _caching_mode() -> bool:
    """Whether selective activation checkpointing's caching dispatch mode is active."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    from torch.utils.checkpoint import _CachingTorchDispatchMode
    return any(isinstance(m, _CachingTorchDispatchMode) for m in _get_current_dispatch_mode_stack())


def _foreign_hook() -> str | None:
    """The name of the innermost saved-tensor pack hook where it is not invact's (None where it is)."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is None or _is_ours(top[0]):
        return None
    if _is_checkpoints(top[0]):
        return None   # non-reentrant checkpointing: what it drops is recomputed in backward, not kept
    return getattr(top[0], "__qualname__", repr(top[0]))


def _address(storage: torch.UntypedStorage, device: torch.device) -> int:
    """What tells ``storage`` apart from the others alive: its data pointer, or on the meta device, where
    every data pointer is 0, its storage object's (views of one storage share it)."""
    return storage._cdata if device.type == "meta" else storage.data_ptr()


@dataclass
class _Entry:
    module: str
    nbytes: int
    ref: Any                # weakref to the storage (its Python object lives as long as the storage)


class SavedBytes:
    """Context manager and report: bytes saved for backward during the forward(s) it encloses.

    Attributes (after the block): ``total`` (bytes, parameters excluded), ``parameters`` (bytes of
    parameter storages saved), ``by_module`` (``{module path: bytes}``, largest first), ``count``
    (distinct storages, parameters excluded), ``tensors`` (tensors packed, duplicates included),
    ``incomplete`` (None, or why tensors went uncounted: a foreign saved-tensor hook inside the block, or
    selective activation checkpointing, whose cache keeps op outputs outside saved-tensor hooks).
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        self.model = model
        self.tensors = 0
        self._storages: dict[tuple, _Entry] = {}
        self._freed: list[_Entry] = []      # storages counted, then freed: their key now names another
        self._stack: list[str] = []
        self._handles: list[Any] = []
        self._param_keys: set[tuple] = set()
        self._names: dict[int, str] = {}
        self._hooks = None
        #: why the count misses tensors (a foreign saved-tensor hook or selective checkpointing), else None
        self.incomplete: str | None = None

    # -- bookkeeping -----------------------------------------------------------------------------
    @staticmethod
    def _keyed_storage(t: torch.Tensor) -> tuple[tuple, torch.UntypedStorage] | None:
        """``t``'s storage and its key (device, address, bytes); None for a tensor without storage."""
        if is_jagged(t):                                 # a jagged tensor's bytes are its values' (the buffer:
            t = t._values                                # values() is an autograd view, saving t under hooks)
        try:
            s = t.untyped_storage()
            return (t.device.type, t.device.index, _address(s, t.device), s.nbytes()), s
        except (RuntimeError, NotImplementedError):   # tensors without storage (sparse, fake, DTensor)
            return None

    @staticmethod
    def _key(t: torch.Tensor) -> tuple | None:
        found = SavedBytes._keyed_storage(t)
        return None if found is None else found[0]

    def _is_parameter(self, t: torch.Tensor, key: tuple) -> bool:
        base = t._base if t._base is not None else t
        if self.model is not None:     # FSDP2's unsharded parameters are Parameters, not model.parameters()
            return key in self._param_keys or isinstance(base, nn.Parameter)
        return base.is_leaf and base.requires_grad

    def _pack(self, t: torch.Tensor) -> None:
        self.tensors += 1
        found = self._keyed_storage(t)
        if found is None or found[0][3] == 0:
            return
        key, storage = found
        old = self._storages.get(key)
        if old is not None and old.ref() is not None:
            return                                     # same storage already counted
        if old is not None:
            self._freed.append(old)                    # freed since: its address now holds another storage
        module = "<parameters>" if self._is_parameter(t, key) else (self._stack[-1] if self._stack else _OUTSIDE)
        self._storages[key] = _Entry(module, key[3], weakref.ref(storage))

    def _entries(self) -> list[_Entry]:
        """Every storage counted, each once: those freed since, then those in use."""
        return [*self._freed, *self._storages.values()]

    def _name_of(self, module: nn.Module) -> str:
        name = self._names.get(id(module))
        if name is None:                               # global hooks (no model): class name, call order
            name = f"{type(module).__name__}#{len(self._names)}"
            self._names[id(module)] = name
        return name

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._check_hooks()
        self._stack.append(self._name_of(module))

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._check_hooks()
        if self._stack:
            self._stack.pop()

    def _check_hooks(self) -> None:
        if torch.compiler.is_compiling():  # a module hook traced by Dynamo: checked at the block's end
            return
        if self.incomplete is None and (name := _foreign_hook()) is not None:
            self.incomplete = (f"a saved-tensor hook not invact's ({name}: torch.autograd.graph.save_on_cpu, "
                               "saved_tensors_hooks) was active inside the invact.memory block; PyTorch passes "
                               "each saved tensor to the innermost hook only, so the tensors saved under it were "
                               "not counted")
        if self.incomplete is None and _caching_mode():
            self.incomplete = ("selective activation checkpointing (torch.utils.checkpoint with context_fn="
                               "create_selective_checkpoint_contexts) was active inside the invact.memory block; "
                               "selective checkpointing keeps op outputs outside saved-tensor hooks, so the "
                               "outputs its policy saves were not counted")

    # -- context manager ---------------------------------------------------------------------------
    def __enter__(self) -> "SavedBytes":
        if self in _OPEN.counters:
            raise RuntimeError(f"{self!r} is already open: enter a new invact.memory(...) instead of re-entering it")
        self._hooks = _chained_hooks((*_OPEN.counters, self))
        self._hooks.__enter__()   # first: it raises where saved-tensor hooks are disabled, before any module hook
        if self.model is not None:
            for name, m in self.model.named_modules(remove_duplicate=True):
                self._names[id(m)] = name or "<root>"
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(self._post, always_call=True))
            for p in self.model.parameters():
                key = self._key(p)
                if key is not None:
                    self._param_keys.add(key)
        else:
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
            self._handles.append(register_module_forward_pre_hook(self._pre))
            self._handles.append(register_module_forward_hook(self._post, always_call=True))
        _OPEN.counters.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._check_hooks()
        self._hooks.__exit__(*exc)
        _OPEN.counters.remove(self)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        if self.incomplete is not None:
            warnings.warn(f"invact.memory: {self.incomplete}", RuntimeWarning, stacklevel=2)

    # -- results ---------------------------------------------------------------------------------
    @property
    def by_module(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for e in self._entries():
            if e.module != "<parameters>":
                out[e.module] += e.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    @property
    def total(self) -> int:
        return sum(self.by_module.values())

    @property
    def parameters(self) -> int:
        return sum(e.nbytes for e in self._entries() if e.module == "<parameters>")

    @property
    def count(self) -> int:
        return sum(1 for e in self._entries() if e.module != "<parameters>")

    def __str__(self) -> str:
        width = max([len(k) for k in self.by_module] + [6])
        lines = [f"saved for backward: {format_bytes(self.total)} in {self.count} storage(s) "
                 f"({self.tensors} tensors packed); parameters apart: {format_bytes(self.parameters)}"]
        lines += [f"  {k:<{width}}  {format_bytes(v):>11}" for k, v in self.by_module.items()]
        lines += [f"  incomplete: {self.incomplete}"] if self.incomplete else []
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<SavedBytes total={self.total} parameters={self.parameters} count={self.count}>"

    def compare(self, baseline: "SavedBytes") -> str:
        """A side-by-side table: this run against ``baseline`` (e.g. patched against unpatched)."""
        if not isinstance(baseline, SavedBytes):
            raise TypeError(f"baseline must be a SavedBytes (what invact.memory(...) returns), got "
                            f"{type(baseline).__name__}")
        a, b = baseline.by_module, self.by_module
        keys = list(dict.fromkeys(list(a) + list(b)))
        width = max([len(k) for k in keys] + [6])
        lines = [f"  {'module':<{width}}  {'baseline':>11}  {'this':>11}"]
        lines += [f"  {k:<{width}}  {format_bytes(a.get(k, 0)):>11}  {format_bytes(b.get(k, 0)):>11}" for k in keys]
        change = (self.total - baseline.total) / baseline.total if baseline.total else 0.0
        totals = f"{format_bytes(baseline.total):>11}  {format_bytes(self.total):>11}"
        lines.append(f"  {'total':<{width}}  {totals}  ({change:+.1%})")
        return "\n".join(lines)


def memory(model: nn.Module | None = None) -> SavedBytes:
    """A context manager counting the bytes saved for backward inside it; see :class:`SavedBytes`.

    With ``model``, bytes are split per module path and parameters are recognised by storage; without,
    global module hooks name modules ``Class#i`` and leaf tensors that require grad count as parameters.
    """
    return SavedBytes(model)
