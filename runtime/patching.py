"""Swap a model's activation modules for invact's, in place, and back.

:func:`patch` walks the module tree and replaces, under the same attribute names (so ``state_dict``
keys and loading are unchanged), every activation module it recognises by its exact class (the rules
are the activation catalog's, :mod:`invact.common.catalog`, read by :mod:`invact.patch_rules`):

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
neither ``state_dict`` nor ``named_modules``); :func:`unpatch` puts the originals back (the swap, the
refusals and the putting back are :mod:`invact.patch_swaps`'s).
Forward, forward pre-, backward and state-dict hooks (``state_dict``'s and ``load_state_dict``'s, pre and post)
registered on an original move to its replacement: the two share the hook dictionaries, so the hooks keep
firing, their handles still remove them, and after :func:`unpatch` the original has the hooks as they are then
(the report notes such modules). :func:`unpatch` refuses, changing nothing, where a replacement holds what its
original cannot take back (a parametrization, a parameter, buffer or submodule added while patched), or was
sharded after patching (the sharding keeps using the replacement: unpatch before sharding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import backends, measure, modes, norm_patch, ops, recognise
from .arguments import flag
from .common.catalog import NO_TABLE as _NO_TABLE
from .modules import Activation, module_for, named_params
from .norms import SavingNorm
from .patch_rules import ACTIVATION_MODULES, NOT_ELEMENTWISE, RULES, Rule, inplace, recognised_base, rule_for
from .patch_swaps import (HOOKS_MOVED, children, fsdp_managed, has_hooks, put_back, refuse_losses, refuse_sharded,
                          swap, undo, unswappable)
from .routing import FunctionalRouter

__all__ = ["patch", "unpatch", "PatchReport", "Replaced", "Left"]


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
    class_names = {name for (_, name) in RULES}
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


def _dropout_follows(parent: nn.Module, attr: str) -> bool:
    """Heuristic: in an nn.Sequential, is the next module Dropout with p > 0?"""
    if not isinstance(parent, nn.Sequential):
        return False
    keys = list(parent._modules)
    i = keys.index(attr)
    nxt = parent._modules[keys[i + 1]] if i + 1 < len(keys) else None
    return isinstance(nxt, nn.modules.dropout._DropoutNd) and nxt.p > 0


def _verdict(rule: Rule, parent: nn.Module, attr: str, child: nn.Module,
             walk: _Walk) -> tuple[str | None, dict[str, float] | None, str | None]:
    """``(table, params, None)`` to replace ``child``, or ``(.., .., reason)`` to leave it, under ``walk``'s
    only, exclude, force and known tables (the dropout heuristic only without ``example``)."""
    try:
        table = rule.table if isinstance(rule.table, str) else rule.table(child)
    except ValueError as exc:                          # e.g. nn.GELU with an unknown approximate
        return None, None, str(exc)
    if walk.exclude is not None and _selected(walk.exclude, child, table):
        return table, None, "matched exclude"
    if walk.only is not None and not _selected(walk.only, child, table):
        return table, None, "not matched by only"
    if table not in walk.known:
        return table, None, f"no table {table!r} in invact.generated"
    if not walk.force and rule.saves_output(child):
        return table, None, (f"PyTorch's {type(child).__name__}{'(inplace=True)' if inplace(child) else ''} "
                             "already saves its output: nothing to gain (force=True replaces it anyway)")
    if not walk.force and walk.example is None and _dropout_follows(parent, attr):
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
    if rule_for(type(model)) is not None:
        report.left.append(Left("", _qualname(type(model)), "the model itself is an activation: it cannot be "
                                "replaced in place; use invact.activation(...) instead"))
    router = FunctionalRouter() if functional else None
    try:   # any error (in the swaps or the example step) puts this call's swaps back: never half patched
        _swap_all(model, report, _Walk(only_sel, exclude_sel, force, backend, norms, autocast_output, example,
                                       model, fsdp_managed(model)))
        routed = (measure.decide(model, report, example, router, Left, check_autocast=norms and autocast_output is None)
                  if example is not None else functional)
    except BaseException:  # the model as it was (measure restored its state)
        undo(model, [r.path for r in report.replaced])
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
    model: nn.Module | None = None                               # the model patch was called on
    managed: set[int] = field(default_factory=set)             # modules under FSDP2's fully_shard (fsdp_managed)
    done: dict[int, nn.Module] = field(default_factory=dict)   # a shared module is replaced by one shared module
    probes: dict = field(default_factory=dict)                  # norm configurations probed in this call
    known: set[str] = field(default_factory=lambda: set(ops.names()))


def _swap_all(model: nn.Module, report: PatchReport, walk: _Walk) -> None:
    """Swap every module of ``model`` that a rule or probe recognises, recording each in ``report``."""
    for parent, attr, path, child in list(children(model)):
        if id(child) in walk.done:
            why = unswappable(parent, child, walk.managed)
            if why is not None:
                report.left.append(Left(path, _qualname(recognise.own_class(child)), why))
                continue
            setattr(parent, attr, walk.done[id(child)])
            report.replaced.append(Replaced(path, _qualname(type(child)), "invact." + repr(walk.done[id(child)]),
                                            "shared module"))
        elif isinstance(child, (Activation, SavingNorm)):
            continue
        elif walk.norms and norm_patch.is_candidate(child):
            _swap_norm(parent, attr, path, child, report, walk)
        else:
            _swap_activation(parent, attr, path, child, report, walk)


def _swap_norm(parent: nn.Module, attr: str, path: str, child: nn.Module, report: PatchReport, walk: _Walk) -> None:
    cls = recognise.own_class(child)
    why = unswappable(parent, child, walk.managed)
    new, note = (None, why) if why is not None else \
        norm_patch.replacement(parent, attr, child, walk.backend, walk.autocast_output, walk.probes,
                               norm_patch.Patching(walk.model, walk.example is not None))
    if new is None:
        report.left.append(Left(path, _qualname(cls), note))
        return
    note = "; ".join(x for x in (note, HOOKS_MOVED if has_hooks(child) else "") if x)
    _record(report, Replaced(path, _qualname(cls), "invact." + repr(new), note), parent, attr, child, new, walk)


def _swap_activation(parent: nn.Module, attr: str, path: str, child: nn.Module, report: PatchReport,
                     walk: _Walk) -> None:
    cls = recognise.own_class(child)
    rule = rule_for(cls)
    if rule is None and recognise.is_candidate(child):
        rule, why = _probed_rule(child, walk.example is None)
        if why is not None:
            report.left.append(Left(path, _qualname(cls), why))
            return
    if rule is None:
        base = recognised_base(cls)
        if base is not None:
            report.left.append(Left(path, _qualname(cls), f"subclass of {base.__name__}: its forward may differ"))
        elif cls.__module__ in ACTIVATION_MODULES and cls.__name__ not in NOT_ELEMENTWISE:
            report.left.append(Left(path, _qualname(cls), _NO_TABLE))
        return
    if rule.table is None:
        report.left.append(Left(path, _qualname(cls), rule.note))
        return
    table, params, why = _verdict(rule, parent, attr, child, walk)
    new = None if why is not None else module_for(table, params, walk.backend)
    why = why or unswappable(parent, child, walk.managed) or recognise.state_mismatch(child, new)
    if why is not None:
        report.left.append(Left(path, _qualname(cls), why))
        return
    notes = [rule.note] if rule.note else []
    if inplace(child):
        notes.append("inplace=True not kept: the new module returns a new tensor")
    if has_hooks(child):
        notes.append(HOOKS_MOVED)
    _record(report, Replaced(path, _qualname(cls), "invact." + repr(new), "; ".join(notes)), parent, attr, child, new,
            walk)


def _probed_rule(child: nn.Module, unmeasured: bool) -> tuple[Rule | None, str | None]:
    """(the rule of the activation a probe finds ``child`` computes, None), (None, why it is left), or (None,
    None) where it is no activation."""
    cls = type(child)
    table, like = recognise.probe(child)
    extra = recognise.extra_arguments(child)
    if table is not None and extra is not None:
        return None, (f"computes {table} on the probe, but its forward takes more than the input ({extra}); "
                      "invact's activations take one tensor")
    if table is not None:
        return Rule(table, saves_output=lambda m, t=table: t in recognise.SAVES_OUTPUT and unmeasured,
                     note=f"recognised by a probe: computes {table} (within 2^-26 relative, float64)"), None
    if like and recognised_base(cls) is None:
        return None, "not recognised: elementwise on the probe, but computes none of invact's activations"
    return None, None


def _record(report: PatchReport, entry: Replaced, parent: nn.Module, attr: str, old: nn.Module, new: nn.Module,
            walk: _Walk) -> None:
    """Swap ``old`` for ``new`` and record it at once (so an error after it puts it back: :func:`undo`)."""
    swap(parent, attr, old, new, walk.done)
    report.replaced.append(entry)


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
    refuse_sharded(model)
    refuse_losses(model)
    modes.remove_modes(model)
    for parent, attr, path, child in list(children(model)):
        if put_back(parent, attr, child):
            restored.append(path)
    return restored
