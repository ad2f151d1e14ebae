"""Swapping a module in place for its replacement and putting the original back, for :mod:`invact.patching`
(whose docstring says what patch and unpatch do and refuse): the hook dictionaries the two share, why a
module cannot be swapped whatever it computes (its forward set on the instance, torch.compile, a sharding),
the model inside a torch.compile / DDP / DataParallel wrapper, and why :func:`invact.unpatch` refuses to put
originals back.
"""

from __future__ import annotations

import sys
import weakref
from typing import Iterable

from torch import nn
from torch.nn.utils import parametrize

from . import recognise
from .modules import Activation
from .norms import SavingNorm

__all__ = ["HOOKS_MOVED", "has_hooks", "children", "fsdp_managed", "unswappable", "unwrapped", "undo", "swap",
           "put_back", "refuse_losses", "refuse_sharded"]


# the hook dictionaries a replacement shares with its original (so the hooks keep firing, handles remove them)
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
HOOKS_MOVED = "hooks registered on the original moved to the replacement (shared: their handles still remove them)"


def has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has a hook its replacement would take over (:func:`swap` shares them)."""
    return any(getattr(m, a, None) for a in _HOOK_DICTS)


# Module.__call__ runs a backward hook by the module's _is_full_backward_hook flag, which these set
_BACKWARD_REGISTRATION = ("register_full_backward_hook", "register_backward_hook")


def _share_hooks(old: nn.Module, new: nn.Module) -> None:
    """Make ``new`` use ``old``'s hook dictionaries (the same objects), and its full-backward-hook flag."""
    for name in _HOOK_DICTS:   # a module unpickled from an older torch may lack some: torch's setstate adds them
        if name in old.__dict__:
            new.__dict__[name] = old.__dict__[name]
    new._is_full_backward_hook = getattr(old, "_is_full_backward_hook", None)
    _rebind_hooks(new, old, new)
    for method in _BACKWARD_REGISTRATION:   # the flag is no shared object: the original registers through new
        old.__dict__[method] = getattr(new, method)


def _rebind_hooks(module: nn.Module, was: nn.Module, now: nn.Module) -> None:
    """Point ``module``'s load_state_dict pre-hooks that are called with ``was`` at ``now``. Those hooks
    (torch's public API) hold a weak reference to the module they were registered on, where the others
    are called with the module running them: so every hook sees the module in place."""
    for hook in getattr(module, "_load_state_dict_pre_hooks", {}).values():
        if getattr(hook, "with_module", False) and hook.module() is was:
            hook.module = weakref.ref(now)


def children(model: nn.Module) -> Iterable[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, attribute, path, child) for every edge of the module tree, shared parents once."""
    seen: set[int] = set()
    stack = [("", model)]
    while stack:
        prefix, parent = stack.pop()
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        items = [(a, c) for a, c in parent._modules.items() if c is not None]
        for attr, child in items:
            yield parent, attr, prefix + attr, child
        stack.extend((prefix + a + ".", c) for a, c in reversed(items))


_FORWARD_SET = ("its forward is overridden on the instance (module.forward = ..., as accelerate's hooks do): a "
                "replacement would run its class's forward and lose the override")
_COMPILED = ("wrapped by torch.compile: the wrapper's compiled forward calls this module itself, so a replacement "
             "would never run; patch before compiling, or patch the model and compile it after")
_COMPILED_ITSELF = ("compiled on its own (module.compile()): a replacement would run uncompiled; patch before "
                    "calling module.compile(), or compile the model after patching")
_FSDP = "sharded by FSDP2's fully_shard (applied to it or to a module above it)"
_DTENSORS = "its parameters are DTensors (sharded by fully_shard / FSDP2 or tensor parallelism)"
_SHARDED = ("{}: the sharding keeps using this module and writing its parameters into it; patch before fully_shard "
            "(before sharding)")


def fsdp_managed(model: nn.Module) -> set[int]:
    """The ids of ``model``'s modules under (or being) an FSDP2 ``FSDPModule``: fully_shard manages the
    parameters of every module below the one it is applied to."""
    fsdp = recognise.fsdp_module_class()
    if fsdp is None:
        return set()
    return {id(m) for f in model.modules() if isinstance(f, fsdp) for m in f.modules()}


def _sharding(child: nn.Module, managed: set[int]) -> str | None:
    """Why ``child`` belongs to a sharding, or None: fully_shard was applied to it, or it holds parameters
    under a module it was applied to (``managed``: :func:`fsdp_managed`; they are plain tensors while
    gathered, after a forward without backward), or its parameters or buffers are DTensors."""
    fsdp = recognise.fsdp_module_class()
    if (fsdp is not None and isinstance(child, fsdp)) or \
            (id(child) in managed and any(p is not None for p in child._parameters.values())):
        return _FSDP
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is not None and any(isinstance(t, dtensor) for t in (*child.parameters(), *child.buffers())):
        return _DTENSORS
    return None


def unswappable(parent: nn.Module, child: nn.Module, managed: set[int]) -> str | None:
    """Why ``child`` cannot be swapped in place whatever it computes, or None: its forward is set on the
    instance, its parent is torch.compile's wrapper of it (its forward bound to ``child``, so a swap runs
    nothing new), it was compiled on its own by ``module.compile()`` (a replacement would lose it), or it
    belongs to a sharding (:func:`_sharding`: the sharding keeps writing its parameters into ``child``)."""
    if "forward" in vars(child):
        return _FORWARD_SET
    if getattr(child, "_compiled_call_impl", None) is not None:
        return _COMPILED_ITSELF
    if _compiled_wrapper(parent):
        return _COMPILED
    sharded = _sharding(child, managed)
    return None if sharded is None else _SHARDED.format(sharded)


def _compiled_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is ``torch.compile``'s OptimizedModule (looked up where torch._dynamo is imported:
    a module compiled has imported it, and importing it for the check would be slow)."""
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    return compiled is not None and isinstance(module, compiled)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s OptimizedModule (``_orig_mod``) and DistributedDataParallel /
    DataParallel (``.module``), however deeply nested: its children are the model's own."""
    while True:
        if _compiled_wrapper(model):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def undo(model: nn.Module, paths: Iterable[str]) -> None:
    """Put back the originals of the replacements at ``paths`` (one call's swaps: earlier patches stay)."""
    for path in paths:
        parent, _, attr = path.rpartition(".")
        put_back(model.get_submodule(parent), attr, model.get_submodule(path))


def swap(parent: nn.Module, attr: str, old: nn.Module, new: nn.Module, done: dict[int, nn.Module]) -> None:
    """Put ``new`` at ``parent.attr`` in place of ``old``: ``old``'s training flag and hooks, a reference to
    ``old`` (for :func:`put_back`), and ``done[id(old)]`` (so a shared module gets one shared replacement)."""
    new.train(old.training)
    new._invact_replaced = (old,)
    _share_hooks(old, new)
    setattr(parent, attr, new)
    done[id(old)] = new


def _original(child: nn.Module) -> nn.Module | None:
    """The module ``child`` replaced; None where it replaced nothing."""
    original = getattr(child, "_invact_replaced", None)
    return original[0] if isinstance(child, (Activation, SavingNorm)) and original else None


def put_back(parent: nn.Module, attr: str, child: nn.Module) -> bool:
    """Put the original of ``child`` (a replacement at ``parent.attr``) back, handing it the replacement's
    training flag, parameters and buffers; False where ``child`` replaced nothing."""
    original = _original(child)
    if original is None:
        return False
    _hand_back(child, original)
    setattr(parent, attr, original)
    return True


def _lost(new: nn.Module, old: nn.Module) -> list[str]:
    """What putting ``old`` back in place of ``new`` would drop: a parametrization on ``new``, or
    parameters, buffers and submodules registered on it under names ``old`` lacks."""
    parametrized = parametrize.is_parametrized(new)
    lost = [f"a parametrization of {', '.join(new.parametrizations)}"] if parametrized else []
    for kind, theirs, mine in (("parameter", new._parameters, old._parameters), ("buffer", new._buffers, old._buffers),
                               ("submodule", new._modules, old._modules)):
        lost += [f"{kind} {name!r}" for name, value in theirs.items()
                 if value is not None and name not in mine and not (parametrized and name == "parametrizations")]
    return lost


def refuse_losses(model: nn.Module) -> None:
    """RuntimeError naming each replacement whose original would drop something put on it while patched."""
    losses = [f"module {path!r} ({type(child).__name__}): {', '.join(lost)}" for _, _, path, child in children(model)
              if (old := _original(child)) is not None and (lost := _lost(child, old))]
    if losses:
        raise RuntimeError(
            "invact.unpatch: putting the original modules back would drop what was added to their replacements "
            "while patched — " + "; ".join(losses) + ". Nothing was unpatched: remove it first "
            "(torch.nn.utils.parametrize.remove_parametrizations(module, name) keeps the parametrized weight as "
            "a plain parameter) and add it again after unpatch, or keep the model patched")


def refuse_sharded(model: nn.Module) -> None:
    """RuntimeError naming each replacement that belongs to a sharding (:func:`_sharding`): the sharding keeps
    writing parameters into the replacement, so the original put back would hold stale (sharded) ones."""
    managed = fsdp_managed(model)
    sharded = [f"module {path!r} ({type(child).__name__}: {why})" for _, _, path, child in children(model)
               if _original(child) is not None and (why := _sharding(child, managed)) is not None]
    if sharded:
        raise RuntimeError(
            "invact.unpatch: these replacements were sharded after patching — " + "; ".join(sharded) + ". The "
            "sharding keeps using the replacement, so the original put back would run on stale parameters. Nothing "
            "was unpatched: unpatch before sharding (fully_shard, tensor parallelism), or keep the model patched")


def _hand_back(new: nn.Module, old: nn.Module) -> None:
    """Give ``old`` the training flag, parameters and buffers ``new`` holds now (names both have), and its
    full-backward-hook flag (the hook dictionaries are shared; hooks called with ``new`` get ``old``)."""
    old.train(new.training)
    old._is_full_backward_hook = new._is_full_backward_hook
    _rebind_hooks(old, new, old)
    for method in _BACKWARD_REGISTRATION:
        old.__dict__.pop(method, None)
    for mine, theirs in ((old._parameters, new._parameters), (old._buffers, new._buffers)):
        for name in mine.keys() & theirs.keys():
            mine[name] = theirs[name]
