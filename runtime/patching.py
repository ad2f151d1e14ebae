"""Swap a model's activation modules for invact's, in place, and back.

:func:`patch` walks the module tree and replaces, under the same attribute names (so ``state_dict``
keys and loading are unchanged), every activation module it recognises by its exact class (the rules
are the activation catalog's, :mod:`invact.common.catalog`):

* torch.nn: GELU (both ``approximate``), SiLU, Mish, Softplus, ELU, CELU, SELU, Hardswish, LeakyReLU
  (and ReLU, Sigmoid, Tanh — see "no gain" below);
* Hugging Face ``transformers.activations`` (only if the model already imported it; invact never
  imports transformers): GELUActivation, GELUTanh (= PytorchGELUTanh), NewGELUActivation,
  AccurateGELUActivation, FastGELUActivation, QuickGELUActivation, SiLUActivation, MishActivation,
  ReLUSquaredActivation — the classes ``ACT2FN`` / ``ACT2CLS`` return for gelu, gelu_new,
  gelu_python, gelu_pytorch_tanh, gelu_python_tanh, gelu_accurate, gelu_fast, quick_gelu, silu,
  swish, mish, relu2 (and the torch.nn classes it maps hardswish, leaky_relu, relu, sigmoid, tanh to);
* timm (``timm.layers.activations`` / ``activations_me``, if imported): Swish, SwishMe, Mish, MishMe,
  HardSwish, HardSwishMe, GELU, GELUTanh, QuickGELU, Sigmoid, Tanh.

Exactness: a class is replaced only by a table for the same mathematical function. Hugging Face's
GELUActivation is ``F.gelu`` (or its erf formula in Python); NewGELU, Accurate and GELUTanh are the
tanh formula of ``F.gelu(approximate='tanh')``; FastGELU writes the same formula with
``sqrt(2/pi)`` truncated to 0.7978845608 — a relative change of 3.6e-12 (measured: the two differ by
< 1e-12 on [-8, 8] in float64), far below float32 rounding, so it gets the gelu_tanh table too
(the report says so). ClippedGELU (``gelu_10``), Laplace, SqrtSoftplus, xIELU, PReLU, ReLU6,
Hardsigmoid, HardMish, ... have no table and are left, with the reason.

No gain (left unless ``force=True``): PyTorch's ReLU, Sigmoid and Tanh, and LeakyReLU / ELU / CELU /
SELU with ``inplace=True``, already save their output for backward (measured with saved-tensor hooks),
so invact saves nothing there and only adds a kernel. An activation followed, in an ``nn.Sequential``,
by Dropout with ``p > 0`` is also left: the next layer then saves the dropout's output, not the
activation's, so invact would keep ``y`` (plus its code) where PyTorch keeps ``x`` — no saving. That
check is a heuristic: only an ``nn.Sequential`` states its execution order; other parents (e.g. Hugging
Face's GPT-2 MLP registers ``act`` before ``dropout`` but applies ``c_proj`` in between) are not judged.

Measured decisions (``example=``): the swaps are tried on one forward of the example and kept only
where they free saved bytes; the dropout heuristic above is then replaced by the measurement, modules
never called are restored, and fused GLU projections get their chunks copied (:mod:`invact.measure`).
Classes no rule names are probed (:mod:`invact.recognise`): a parameter-free module computing a known
activation is swapped, an elementwise one computing none is listed as not recognised.

Functional calls (``torch.nn.functional.gelu(x)``) are not modules: ``functional=True`` routes them
through :class:`invact.routing.FunctionalRouter` during the model's forward. Formulas written out in a
``forward`` (``x * torch.sigmoid(x)``) are not reached.

Normalization layers (``norms=True``, the default): torch.nn.LayerNorm / RMSNorm and Hugging Face's
RMSNorm / LayerNorm classes, recognised by a probe of what they compute, become :class:`invact.LayerNorm`
/ :class:`invact.RMSNorm`, which save their output (see :mod:`invact.norm_patch` and :mod:`invact.norms`).

Left whatever they compute (the report says why): a module whose ``forward`` is set on the instance
(``module.forward = ...``, accelerate's hooks), one torch.compile wraps itself (the ``_orig_mod`` of a
``torch.compile(module)`` child: its wrapper calls that object; ``torch.compile(model)`` of the whole model
is patched below its root), one sharded before patching (``fully_shard`` applied to it, or above it where it
holds parameters; parameters that are DTensors: tensor parallelism), and one holding
parameters, buffers or submodules under other names than its replacement would (a QAT observer, a user's
buffer, a weight computed by a ``torch.nn.utils.prune`` hook). Any error while swapping or measuring puts
this call's swaps back: :func:`patch` never leaves a model half patched.

The replaced module keeps a reference to its original (not registered as a submodule, so it is in
neither ``state_dict`` nor ``named_modules``); :func:`unpatch` puts the originals back.
Forward, forward pre-, backward and state-dict hooks (``state_dict``'s and ``load_state_dict``'s, pre and post)
registered on an original move to its replacement: the two share the hook dictionaries, so the hooks keep
firing, their handles still remove them, and after :func:`unpatch` the original has the hooks as they are then
(the report notes such modules). :func:`unpatch` refuses, changing nothing, where a replacement holds what its
original cannot take back (a parametrization, a parameter, buffer or submodule added while patched), or was
sharded after patching (the sharding keeps using the replacement: unpatch before sharding).
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from torch import nn
from torch.nn.utils import parametrize

from . import backends, measure, modes, norm_patch, ops, recognise
from .arguments import flag
from .common.catalog import CATALOG, LEFT, NO_TABLE as _NO_TABLE
from .modules import _CLASSES, _ROWS as _MODULE_ROWS, Activation, module_for, named_params
from .norms import _Saving
from .routing import FunctionalRouter

__all__ = ["patch", "unpatch", "PatchReport", "Replaced", "Left"]


# ---------------------------------------------------------------------------------------------------
# What is recognised: (module of the class, class name) -> rule, from the activation catalog
# (invact.common.catalog). Classes are matched exactly (a subclass may override forward) and looked up
# in sys.modules, so nothing is imported here.

@dataclass(frozen=True)
class _Rule:
    table: Callable[[nn.Module], str] | str | None      # None: an activation without a table
    params: Callable[[nn.Module], dict[str, float]] = lambda m: {}
    saves_output: Callable[[nn.Module], bool] = lambda m: False  # PyTorch already saves y
    note: str = ""                                       # why it is left (table None), or a remark


def _inplace(m: nn.Module) -> bool:
    return bool(getattr(m, "inplace", False))


_SAVES_OUTPUT: dict[str, Callable[[nn.Module], bool]] = {
    "always": lambda m: True, "inplace": _inplace, "never": lambda m: False}


def _key(qualified: str) -> tuple[str, str]:
    module, name = qualified.rsplit(".", 1)
    return module, name


def _catalog_rules() -> dict[tuple[str, str], _Rule]:
    """A torch.nn class reads its table (selecting fields) and parameters from its attributes, as the
    invact class of the same name does; other libraries' classes name one table at its defaults."""
    rules: dict[tuple[str, str], _Rule] = {}
    for cls in _CLASSES:
        rows = _MODULE_ROWS[cls.__name__]
        if rows[0].torch is not None:
            rules[_key(rows[0].torch)] = _Rule(
                cls._fixed_table or (lambda m, cls=cls: cls._table_of(**{k: getattr(m, k) for k in cls._fields})),
                lambda m, cls=cls: {k: getattr(m, k) for k in cls._params},
                _SAVES_OUTPUT[rows[0].saves_output])
    for row in CATALOG:
        for rule in row.rules:
            rules[_key(rule.cls)] = _Rule(row.name, saves_output=_SAVES_OUTPUT[row.saves_output], note=rule.note)
    for rule in LEFT:
        rules[_key(rule.cls)] = _Rule(None, note=rule.note)
    return rules


_RULES: dict[tuple[str, str], _Rule] = _catalog_rules()
# torch.nn.modules.activation classes that are not elementwise: not activations in invact's sense
_NOT_ELEMENTWISE = {"MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d", "GLU"}
_ACTIVATION_MODULES = {module for module, _ in _RULES}


def _rule_for(cls: type) -> _Rule | None:
    rule = _RULES.get((cls.__module__, cls.__qualname__))
    if rule is None:
        return None
    # the class must be the one that module defines (not a look-alike with the same names)
    mod = sys.modules.get(cls.__module__)
    return rule if mod is not None and getattr(mod, cls.__qualname__, None) is cls else None


def _recognised_base(cls: type) -> type | None:
    for base in cls.__mro__[1:]:
        if _rule_for(base) is not None and _RULES[(base.__module__, base.__qualname__)].table is not None:
            return base
    return None


# ---------------------------------------------------------------------------------------------------
# The report

@dataclass(frozen=True)
class Replaced:
    """One replaced module: its path in the model, the old class, the new module's repr, a remark."""

    path: str
    old: str
    new: str
    note: str = ""
    freed: int | None = None    # bytes freed, measured on ``example=`` (None: not measured, or only with others: note)


@dataclass(frozen=True)
class Left:
    """One activation module left in place, and why."""

    path: str
    cls: str
    reason: str


@dataclass
class PatchReport:
    """What :func:`patch` replaced and what it left (``len(report)`` = modules replaced)."""

    replaced: list[Replaced] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)
    measured: dict[str, int] | None = None      # baseline_bytes, patched_bytes, functional_bytes (None: no example)
    functional: str | None = None               # what the functional route did (None: functional=False)

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"invact.patch: replaced {len(self.replaced)} module(s), left {len(self.left)}"]
        if self.measured is None:
            lines.append("  decisions not measured (no example=): class rules only")
        else:
            b, p = self.measured["baseline_bytes"], self.measured["patched_bytes"]
            lines.append(f"  measured on the example: saved for backward {b} -> {p} bytes ({(p - b) / max(b, 1):+.1%})")
        if self.functional:
            lines.append(f"  functional calls: {self.functional}")
        groups: dict[tuple[str, ...], list[str]] = {}
        for r in self.replaced:
            freed = "" if r.freed is None else f"frees {r.freed} bytes"
            groups.setdefault(("replaced", f"{r.old} -> {r.new}", "; ".join(x for x in (freed, r.note) if x)),
                              []).append(r.path)
        for l in self.left:
            groups.setdefault(("left", l.cls, l.reason), []).append(l.path)
        for (kind, what, why), paths in groups.items():
            shown = ", ".join(paths[:3]) + (f", ... ({len(paths)} in all)" if len(paths) > 3 else "")
            lines.append(f"  {kind}: {len(paths)} x {what}{': ' + why if why else ''}\n      at {shown}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# only / exclude

def _selectors(value: Any, arg: str) -> list[tuple[str, Any]] | None:
    """Normalise ``only``/``exclude``: table names, class names, or nn.Module classes."""
    if value is None:
        return None
    items = [value] if isinstance(value, (str, type)) else value
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"{arg} must be a name, an nn.Module class, or a collection of them; "
                        f"got {type(value).__name__}") from None
    tables = set(ops.names())
    class_names = {name for (_, name) in _RULES}
    out = []
    for item in items:
        if isinstance(item, type):
            if not issubclass(item, nn.Module):
                raise TypeError(f"{arg}: {item.__name__} is not an nn.Module class")
            out.append(("class", item))
        elif isinstance(item, str):
            if item in tables:
                out.append(("table", item))
            elif item in class_names:
                out.append(("class_name", item))
            else:
                raise ValueError(f"{arg}: unknown name {item!r}; expected a table name "
                                 f"({', '.join(sorted(tables))}) or an activation class name "
                                 f"({', '.join(sorted(class_names))})")
        else:
            raise TypeError(f"{arg} items must be names (str) or nn.Module classes, got {item!r}")
    return out


def _selected(selectors: list[tuple[str, Any]], module: nn.Module, table: str) -> bool:
    for kind, v in selectors:
        if (kind == "table" and v == table) or (kind == "class" and isinstance(module, v)) \
                or (kind == "class_name" and type(module).__name__ == v):
            return True
    return False


def _qualname(cls: type) -> str:
    mod = "torch.nn" if cls.__module__.startswith("torch.nn.modules") else cls.__module__
    return f"{mod}.{cls.__qualname__}"


# the hook dictionaries a replacement shares with its original (so the hooks keep firing, handles remove them)
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_HOOKS_MOVED = "hooks registered on the original moved to the replacement (shared: their handles still remove them)"


def _has_hooks(m: nn.Module) -> bool:
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


def _dropout_follows(parent: nn.Module, attr: str) -> bool:
    """Heuristic: in an nn.Sequential, is the next module Dropout with p > 0?"""
    if not isinstance(parent, nn.Sequential):
        return False
    keys = list(parent._modules)
    i = keys.index(attr)
    nxt = parent._modules[keys[i + 1]] if i + 1 < len(keys) else None
    return isinstance(nxt, nn.modules.dropout._DropoutNd) and nxt.p > 0


def _children(model: nn.Module) -> Iterable[tuple[nn.Module, str, str, nn.Module]]:
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


def _verdict(rule: _Rule, parent: nn.Module, attr: str, child: nn.Module, only_sel, exclude_sel, force: bool,
             known: set[str], measured: bool = False) -> tuple[str | None, dict[str, float] | None, str | None]:
    """``(table, params, None)`` to replace ``child``, or ``(.., .., reason)`` to leave it."""
    try:
        table = rule.table if isinstance(rule.table, str) else rule.table(child)
    except ValueError as exc:                          # e.g. nn.GELU with an unknown approximate
        return None, None, str(exc)
    if exclude_sel is not None and _selected(exclude_sel, child, table):
        return table, None, "matched exclude"
    if only_sel is not None and not _selected(only_sel, child, table):
        return table, None, "not matched by only"
    if table not in known:
        return table, None, f"no table {table!r} in invact.generated"
    if not force and rule.saves_output(child):
        return table, None, (f"PyTorch's {type(child).__name__}{'(inplace=True)' if _inplace(child) else ''} "
                             "already saves its output: nothing to gain (force=True replaces it anyway)")
    if not force and not measured and _dropout_follows(parent, attr):
        return table, None, ("followed by Dropout(p>0) in its nn.Sequential, so the next layer does not save the "
                             "output and saving it gains nothing (heuristic on module order; force=True replaces "
                             "it anyway)")
    try:
        params = {k: float(v) for k, v in rule.params(child).items()}
        named_params(table, params)
    except (ValueError, TypeError) as exc:            # parameters the table cannot serve
        return table, None, str(exc)
    return table, params, None


# ---------------------------------------------------------------------------------------------------

def patch(model: nn.Module, only: Any = None, exclude: Any = None, *, force: bool = False,
          backend: str | None = None, norms: bool = True, autocast_output: bool | None = None,
          example: Any = None, functional: bool = False) -> PatchReport:
    """Replace ``model``'s activation modules by invact modules, in place.

    Parameters
    ----------
    model : nn.Module
        Patched in place; attribute names (and so ``state_dict`` keys) are kept.
    only, exclude : str, nn.Module class, or a collection of them, optional
        Restrict the replacement to / keep from it the activations that match: a table name
        (``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ...), a class name (``"GELUActivation"``), or a class
        (``nn.GELU``, matched with ``isinstance``). ``exclude`` wins over ``only``.
    force : bool
        Also replace activations that gain nothing (PyTorch already saves their output, or the
        heuristic sees Dropout next); off by default.
    backend : str, optional
        Passed to every new module; an unknown name raises ValueError before anything is swapped.
    norms : bool
        Also replace LayerNorm / RMSNorm layers (torch.nn's and Hugging Face's, recognised by a probe of
        what they compute; see :mod:`invact.norm_patch`) by invact's, which save their output. ``only``
        and ``exclude`` select activations only.
    autocast_output : bool, optional
        Norms return the autocast dtype under torch.autocast (True), torch's dtype (False), or, by
        default, the autocast dtype for pre-norms only (:func:`invact.norm_patch.feeds_linears`; with
        ``example``, also only where it leaves the model's outputs under bf16 autocast unchanged).
    example : tensor, tuple, list or dict of model inputs, or a callable ``step(model)``, optional
        Measure before keeping: one forward of this step (training mode, grad on) counts the bytes saved
        for backward per storage with the originals and with the swaps; a swap (activation or norm) is
        kept only where it frees bytes, else the original is put back and ``.left`` says why (dropout
        after it, its input kept alive by another consumer, y not saved by its consumer, never called,
        its output modified in place later in the forward). Replaces the class-order dropout heuristic;
        see :mod:`invact.measure`. Without it the class rules decide and the report says the decisions
        were not measured (an in-place op on a swapped output then raises PyTorch's error at backward).
        A callable step may run backward, an optimizer, an LR scheduler and a GradScaler: parameters,
        ``.grad``, the optimizers' state and ``param_groups``, their schedulers' and the scalers' state are
        put back afterwards. Uninitialised lazy modules raise ValueError (run one forward first).
    functional : bool
        Also route ``torch.nn.functional`` activation calls made during the model's forward through
        invact (:class:`invact.routing.FunctionalRouter`, entered by forward hooks on ``model`` and its
        modules, so a checkpointed module's recomputation routes too; works under ``torch.compile``);
        with ``example``, kept only if it frees bytes (measured as one unit). ``unpatch(model)`` removes
        the routes on the model and any submodule; ``unpatch(model.sub)`` leaves the model's route.

    Returns
    -------
    PatchReport
        ``.replaced`` (path, old class, new module) and ``.left`` (path, class, reason); ``str()`` is a
        readable summary. Undo with :func:`unpatch`.

    >>> import torch.nn as nn, invact
    >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    >>> report = invact.patch(mlp)
    >>> mlp[1]
    GELU(approximate='none')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    only_sel, exclude_sel = _selectors(only, "only"), _selectors(exclude, "exclude")
    # patch's own arguments are checked before any swap: their errors raise, never become a `left` reason
    backend = backends.check_name(backend)
    force, norms, functional = flag(force, "force"), flag(norms, "norms"), flag(functional, "functional")
    autocast_output = None if autocast_output is None else flag(autocast_output, "autocast_output")
    measure.check_example(example)
    report = PatchReport()
    if _rule_for(type(model)) is not None:
        report.left.append(Left("", _qualname(type(model)), "the model itself is an activation: it cannot be "
                                "replaced in place; use invact.activation(...) instead"))
    router = FunctionalRouter() if functional else None
    try:   # any error (in the swaps or the example step) puts this call's swaps back: never half patched
        _swap_all(model, report, _Walk(only_sel, exclude_sel, force, backend, norms, autocast_output, example,
                                       _fsdp_managed(model)))
        routed = (measure.decide(model, report, example, router, Left, check_autocast=norms and autocast_output is None)
                  if example is not None else functional)
    except BaseException:  # the model as it was (measure restored its state)
        _undo(model, report)
        raise
    if router is not None:
        report.functional = report.functional or "routed during the model's forward (not measured)"
        if routed:
            modes.install_router(model, router)
    return report


@dataclass
class _Walk:
    """patch's settings, and what one call has swapped and probed so far."""

    only: list | None
    exclude: list | None
    force: bool
    backend: str | None
    norms: bool
    autocast_output: bool | None
    example: Any
    managed: set[int] = field(default_factory=set)             # modules under FSDP2's fully_shard (_fsdp_managed)
    done: dict[int, nn.Module] = field(default_factory=dict)   # a shared module is replaced by one shared module
    probes: dict = field(default_factory=dict)                  # norm configurations probed in this call
    known: set[str] = field(default_factory=lambda: set(ops.names()))


def _swap_all(model: nn.Module, report: PatchReport, walk: _Walk) -> None:
    """Swap every module of ``model`` that a rule or probe recognises, recording each in ``report``."""
    for parent, attr, path, child in list(_children(model)):
        if id(child) in walk.done:
            why = _unswappable(parent, child, walk.managed)
            if why is not None:
                report.left.append(Left(path, _qualname(recognise.own_class(child)), why))
                continue
            setattr(parent, attr, walk.done[id(child)])
            report.replaced.append(Replaced(path, _qualname(type(child)), "invact." + repr(walk.done[id(child)]),
                                            "shared module"))
        elif isinstance(child, (Activation, _Saving)):
            continue
        elif walk.norms and norm_patch.is_candidate(child):
            _swap_norm(parent, attr, path, child, report, walk)
        else:
            _swap_activation(parent, attr, path, child, report, walk)


def _swap_norm(parent: nn.Module, attr: str, path: str, child: nn.Module, report: PatchReport, walk: _Walk) -> None:
    cls = recognise.own_class(child)
    why = _unswappable(parent, child, walk.managed)
    new, note = (None, why) if why is not None else \
        norm_patch.replacement(parent, attr, child, walk.backend, walk.autocast_output, walk.probes)
    if new is None:
        report.left.append(Left(path, _qualname(cls), note))
        return
    note = "; ".join(x for x in (note, _HOOKS_MOVED if _has_hooks(child) else "") if x)
    _record(report, Replaced(path, _qualname(cls), "invact." + repr(new), note), parent, attr, child, new, walk)


def _swap_activation(parent: nn.Module, attr: str, path: str, child: nn.Module, report: PatchReport,
                     walk: _Walk) -> None:
    cls = recognise.own_class(child)
    rule = _rule_for(cls)
    if rule is None and recognise.is_candidate(child):
        rule, why = _probed_rule(child, walk.example is None)
        if why is not None:
            report.left.append(Left(path, _qualname(cls), why))
            return
    if rule is None:
        base = _recognised_base(cls)
        if base is not None:
            report.left.append(Left(path, _qualname(cls), f"subclass of {base.__name__}: its forward may differ"))
        elif cls.__module__ in _ACTIVATION_MODULES and cls.__name__ not in _NOT_ELEMENTWISE:
            report.left.append(Left(path, _qualname(cls), _NO_TABLE))
        return
    if rule.table is None:
        report.left.append(Left(path, _qualname(cls), rule.note))
        return
    table, params, why = _verdict(rule, parent, attr, child, walk.only, walk.exclude, walk.force, walk.known,
                                  walk.example is not None)
    new = None if why is not None else module_for(table, params, walk.backend)
    why = why or _unswappable(parent, child, walk.managed) or recognise.state_mismatch(child, new)
    if why is not None:
        report.left.append(Left(path, _qualname(cls), why))
        return
    notes = [rule.note] if rule.note else []
    if _inplace(child):
        notes.append("inplace=True not kept: the new module returns a new tensor")
    if _has_hooks(child):
        notes.append(_HOOKS_MOVED)
    _record(report, Replaced(path, _qualname(cls), "invact." + repr(new), "; ".join(notes)), parent, attr, child, new,
            walk)


def _probed_rule(child: nn.Module, unmeasured: bool) -> tuple[_Rule | None, str | None]:
    """(the rule of the activation a probe finds ``child`` computes, None), (None, why it is left), or (None,
    None) where it is no activation."""
    cls = type(child)
    table, like = recognise.probe(child)
    extra = recognise.extra_arguments(child)
    if table is not None and extra is not None:
        return None, (f"computes {table} on the probe, but its forward takes more than the input ({extra}); "
                      "invact's activations take one tensor")
    if table is not None:
        return _Rule(table, saves_output=lambda m, t=table: t in recognise.SAVES_OUTPUT and unmeasured,
                     note=f"recognised by a probe: computes {table} (within 2^-26 relative, float64)"), None
    if like and _recognised_base(cls) is None:
        return None, "not recognised: elementwise on the probe, but computes none of invact's activations"
    return None, None


def _record(report: PatchReport, entry: Replaced, parent: nn.Module, attr: str, old: nn.Module, new: nn.Module,
            walk: _Walk) -> None:
    """Swap ``old`` for ``new`` and record it at once (so an error after it puts it back: :func:`_undo`)."""
    _swap(parent, attr, old, new, walk.done)
    report.replaced.append(entry)


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


def _fsdp_managed(model: nn.Module) -> set[int]:
    """The ids of ``model``'s modules under (or being) an FSDP2 ``FSDPModule``: fully_shard manages the
    parameters of every module below the one it is applied to."""
    fsdp = recognise.fsdp_module_class()
    if fsdp is None:
        return set()
    return {id(m) for f in model.modules() if isinstance(f, fsdp) for m in f.modules()}


def _sharding(child: nn.Module, managed: set[int]) -> str | None:
    """Why ``child`` belongs to a sharding, or None: fully_shard was applied to it, or it holds parameters
    under a module it was applied to (``managed``: :func:`_fsdp_managed`; they are plain tensors while
    gathered, after a forward without backward), or its parameters or buffers are DTensors."""
    fsdp = recognise.fsdp_module_class()
    if (fsdp is not None and isinstance(child, fsdp)) or \
            (id(child) in managed and any(p is not None for p in child._parameters.values())):
        return _FSDP
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is not None and any(isinstance(t, dtensor) for t in (*child.parameters(), *child.buffers())):
        return _DTENSORS
    return None


def _unswappable(parent: nn.Module, child: nn.Module, managed: set[int]) -> str | None:
    """Why ``child`` cannot be swapped in place whatever it computes, or None: its forward is set on the
    instance, its parent is torch.compile's wrapper of it (its forward bound to ``child``, so a swap runs
    nothing new), it was compiled on its own by ``module.compile()`` (a replacement would lose it), or it
    belongs to a sharding (:func:`_sharding`: the sharding keeps writing its parameters into ``child``)."""
    if "forward" in vars(child):
        return _FORWARD_SET
    if getattr(child, "_compiled_call_impl", None) is not None:
        return _COMPILED_ITSELF
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    if compiled is not None and isinstance(parent, compiled):
        return _COMPILED
    sharded = _sharding(child, managed)
    return None if sharded is None else _SHARDED.format(sharded)


def _undo(model: nn.Module, report: PatchReport) -> None:
    """Put back the originals of ``report``'s swaps (this call's only: earlier patches stay)."""
    for r in report.replaced:
        parent, _, attr = r.path.rpartition(".")
        _put_back(model.get_submodule(parent), attr, model.get_submodule(r.path))


def _swap(parent: nn.Module, attr: str, old: nn.Module, new: nn.Module, done: dict[int, nn.Module]) -> None:
    new.train(old.training)
    new._invact_replaced = (old,)
    _share_hooks(old, new)
    setattr(parent, attr, new)
    done[id(old)] = new


def _original(child: nn.Module) -> nn.Module | None:
    """The module ``child`` replaced; None where it replaced nothing."""
    original = getattr(child, "_invact_replaced", None)
    return original[0] if isinstance(child, (Activation, _Saving)) and original else None


def _put_back(parent: nn.Module, attr: str, child: nn.Module) -> bool:
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


def _refuse_losses(model: nn.Module) -> None:
    """RuntimeError naming each replacement whose original would drop something put on it while patched."""
    losses = [f"module {path!r} ({type(child).__name__}): {', '.join(lost)}" for _, _, path, child in _children(model)
              if (old := _original(child)) is not None and (lost := _lost(child, old))]
    if losses:
        raise RuntimeError(
            "invact.unpatch: putting the original modules back would drop what was added to their replacements "
            "while patched — " + "; ".join(losses) + ". Nothing was unpatched: remove it first "
            "(torch.nn.utils.parametrize.remove_parametrizations(module, name) keeps the parametrized weight as "
            "a plain parameter) and add it again after unpatch, or keep the model patched")


def _refuse_sharded(model: nn.Module) -> None:
    """RuntimeError naming each replacement that belongs to a sharding (:func:`_sharding`): the sharding keeps
    writing parameters into the replacement, so the original put back would hold stale (sharded) ones."""
    managed = _fsdp_managed(model)
    sharded = [f"module {path!r} ({type(child).__name__}: {why})" for _, _, path, child in _children(model)
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


def unpatch(model: nn.Module) -> list[str]:
    """Put back the modules :func:`patch` replaced (the same objects); returns their paths.

    Each restored module gets the training flag and the parameters and buffers (the same objects, under
    the names both have) of the module it replaces, so whatever was assigned while patched
    (``load_state_dict(..., assign=True)``, ``module.weight = ...``) stays; it shares its hooks with the
    replacement, so hooks registered while patched stay too. A parametrization, or a parameter, buffer or
    submodule the original lacks, registered on a replacement while patched would be lost: then nothing is
    unpatched, and a RuntimeError names each module and what it holds. So is a replacement sharded after
    patching (FSDP2's ``fully_shard`` applied to it or above it, or DTensor parameters): unpatch before sharding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    restored = []
    _refuse_sharded(model)
    _refuse_losses(model)
    modes.remove_modes(model)
    for parent, attr, path, child in list(_children(model)):
        if _put_back(parent, attr, child):
            restored.append(path)
    return restored
