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
bytes; each round is a forward, at most one per site and usually two. A site dropped there was measured
beside swaps that may not be kept, so it is re-tried against the kept ones (:func:`_retry`) where it has
neighbours (sites sharing a storage with it: one's output is the other's input): added to them where a
neighbour's swap changed since, or in place of its kept neighbours; a try is kept where every swap still
frees bytes and the bytes saved around the site and its neighbours fall (the rest of the run is not read:
a step's own drift is no saving). Sites that do not interact are tried together in one forward, each
kept or left on its own bytes (the losers settled, the winners tried again together), so a model whose
layers repeat one pattern costs a few more forwards (one where every layer gains alike), not one per
layer; at most two per dropped site in all. A left site's reason is read from the last forward that measured it beside the final
swaps. The final configuration's total is the measured one; if it were above the baseline (storages saved
jointly by several sites are charged to none of them) every swap is dropped. A site never called in the
baseline step is restored, and so is one
whose replacement is not called with the swap in place (the model calls the original through a reference
outside its module tree, as a torch.compile wrapper's forward does). The measurement's own hooks record
their errors: one is raised as :class:`MeasureError`, never taken for the step failing.

Norms with ``autocast_output`` are checked first, under bf16 autocast (:mod:`invact.autocast_check`).

The functional route (``functional=True``) is measured as one unit: one more forward with
:class:`invact.routing.FunctionalRouter` active during the model's forward; it is kept if the total
falls and no routed call's output is modified in place later. (Per call site it would need a router that
knows which module called it, at run time too.) The route is entered by forward hooks on every module of
the model (:mod:`invact.modes`), so a checkpointed module's recomputation in backward is routed as its forward
was. A route installed earlier (by a patch of the model or of a submodule) stays during the measurement, and a
kept route replaces the routes of the modules under it; :func:`remove_modes` removes every route in the tree.

Runs are seeded alike, and the caller's RNG states, every module's training flag, buffers, parameters (for a
callable step), optimizers, LR schedulers and GradScalers are restored (:mod:`invact.snapshot`): buffers,
parameters, optimizers and scalers after every run, so that each starts from the same state.
Uninitialised lazy modules are refused (ValueError).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from .autocast_check import autocast_refusals
from .modes import CHUNKS, CopyChunks, install_mode, install_router, remove_mode, remove_modes, remove_router
from .routing import FunctionalRouter
from .save_trace import MeasureError, Site, SiteCall, Trace, storage_key, trace_example
from .saved import format_bytes
from .snapshot import State

# install_router, remove_router, remove_modes, CopyChunks and MeasureError: re-exported (callers import them here)

__all__ = ["check_example", "decide", "install_router", "remove_router", "remove_modes", "CopyChunks", "Trace",
           "MeasureError"]


def check_example(example: Any) -> None:
    """Raise TypeError unless ``example`` is a tensor, a tuple/list/dict of inputs, or a callable step."""
    if example is None or isinstance(example, (torch.Tensor, tuple, list, dict)) or callable(example):
        return
    raise TypeError("example must be a tensor, a tuple (or list) or dict of model inputs, or a callable "
                    f"taking the model and running one step; got {type(example).__name__}")


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


def _place(model: nn.Module, sites: dict[int, Site], active: set[int]) -> None:
    for key, site in sites.items():
        module = site.new if key in active else site.old
        for path in site.paths:
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent), attr, module)


def _before_dropout(key: int, trace: Trace) -> bool:
    """Whether a call of ``key`` returned what a dropout then took (so y is an extra tensor)."""
    return any(c.y_key in trace.dropout_inputs for c in trace.calls[key])


_DROPOUT = "dropout after it: the next layer saves the dropout's output, so y is an extra tensor"


def _shared_input(key: int, base: Trace) -> SiteCall | None:
    """The first call of site ``key`` whose input another consumer also saves in ``base``, or None."""
    return next((c for c in base.calls[key] if c.x_key in base.savers and base.savers[c.x_key] != {key}), None)


def _slices(call: SiteCall) -> int:
    """How many inputs of ``call``'s size its input's storage holds (k > 1: its input is a 1/k slice)."""
    return call.x_key[3] // max(call.x_bytes, 1)


def _fused_input(key: int, base: Trace) -> bool:
    """Whether site ``key``'s input is kept alive by another consumer and is a 1/k slice of a larger storage
    (k > 1) in ``base``: a chunk of a fused projection, which copying its parent's chunks may free
    (:class:`CopyChunks`, :func:`_fused_unit`). Where such a site frees nothing, :func:`_why` says so."""
    call = _shared_input(key, base)
    return call is not None and _slices(call) > 1


def _why(key: int, base: Trace, pat: Trace) -> str:
    """Why site ``key`` frees nothing, read from the storages of its calls."""
    reasons = []
    if (c := _shared_input(key, base)) is not None:
        others = {name for owner, name in base.names[c.x_key] if owner != key}
        part = f", a 1/{_slices(c)} slice of a larger storage (a fused projection)" if _fused_input(key, base) else ""
        reasons.append(f"input kept alive by another consumer ({', '.join(sorted(others))}{part})")
    if base.hidden(key):
        return _DROPOUT + " (not measured: " + _hidden_cause(base, key) + ")"
    for c in pat.calls[key]:
        if pat.savers.get(c.y_key) == {key}:
            reasons.append(_DROPOUT if c.y_key in pat.dropout_inputs else
                           "y not saved by its consumer, so y is an extra tensor")
            break
    freed, added = base.only(key), pat.only(key)
    return "; ".join(reasons + [f"measured: frees {format_bytes(freed)}, adds {format_bytes(added)}"])


def _hidden_cause(trace: Trace, key: int) -> str:
    """Why a forward of the example shows none of ``key``'s saves."""
    if all(c.grad_off for c in trace.calls[key]):
        return ("the example runs it without grad (a reentrant checkpoint's forward, whose recomputation in backward "
                "saves y instead of x, or no_grad)")
    return ("the example runs it under another saved-tensor hook (a non-reentrant checkpoint, whose recomputation "
            "saves y instead of x, or an offloading hook)")


def _run(state: State, model: nn.Module, example: Any, sites: dict[int, Site], active: set[int], params: set[tuple],
         router: FunctionalRouter | None = None) -> Trace:
    """One measuring forward (:func:`trace_example`), ``state`` put back after it: every run starts from the same
    parameters, buffers and optimizer state (a callable step may run an optimizer, and saved sizes may depend on
    them: a data-dependent selection)."""
    try:
        return trace_example(model, example, sites, active, params, router)
    finally:
        state.restore()


def _parents(model: nn.Module, site: Site) -> list[nn.Module]:
    return [model.get_submodule(path.rpartition(".")[0]) for path in site.paths]


def _params(model: nn.Module, sites: dict[int, Site]) -> set[tuple]:
    mods = [model] + [m for s in sites.values() for m in (s.old, s.new)]
    return {k for m in mods for p in m.parameters() if (k := storage_key(p)) is not None}


def decide(model: nn.Module, report: Any, example: Any, router: FunctionalRouter | None,
           left_cls: Any, check_autocast: bool = False) -> bool:
    """Measure ``report``'s swaps (and ``router``) on ``example``; undo those that free nothing, in place.

    ``report`` is the :class:`invact.patching.PatchReport` of swaps just made; kept entries get ``freed``,
    dropped ones move to ``report.left`` (built with ``left_cls(path, class, reason)``). Returns whether
    the functional route frees bytes (False without ``router``). ``check_autocast``: norms with
    ``autocast_output`` keep it only where it leaves the model's outputs unchanged under autocast.
    """
    sites: dict[int, Site] = {}
    for r in report.replaced:
        new = model.get_submodule(r.path)
        site = sites.setdefault(id(new), Site([], new._invact_replaced[0], new))
        site.paths.append(r.path)
    _refuse_lazy(model)
    modules = [m for s in [model, *(x for s in sites.values() for x in (s.old, s.new))] for m in s.modules()]
    flags = {id(m): (m, m.training) for m in modules}
    params = _params(model, sites)
    state = State(modules, steps=not isinstance(example, (torch.Tensor, tuple, list, dict)))  # else run_step calls it
    try:
        with state.optimizers:
            measured = _measure(model, report, example, router, sites, params, state, check_autocast)
    finally:
        for m, flag in flags.values():
            m.train(flag)
        state.restore()
    _report(report, sites, measured, left_cls)
    return bool(measured.routed and measured.routed[0])


def _refuse_lazy(model: nn.Module) -> None:
    """ValueError where a lazy module (``nn.LazyLinear``, ...) has not been initialised: the example would
    initialise it, from the caller's RNG, and the measurement leaves the model's state as it was."""
    lazy = [f"{name or '<root>'} ({type(m).__name__})" for name, m in model.named_modules()
            if any(t is not None and nn.parameter.is_lazy(t) for t in (*m._parameters.values(), *m._buffers.values()))]
    if lazy:
        raise ValueError(f"invact.patch(example=...): uninitialised lazy module(s) {', '.join(lazy)}; run one forward "
                         "of the model first (as before building an optimizer or DDP), then patch")


class _Measured(NamedTuple):
    """What :func:`_measure` decided."""

    active: set[int]              # the sites kept swapped
    reasons: dict[int, str]       # why each other site is left
    base: Trace                   # the run with the originals
    final: Trace                  # the run of the kept swaps (and route)
    routed: tuple | None          # the functional route: (kept, bytes freed, calls routed, why left); None: no router
    unit: tuple | None            # fused projections kept as one unit: (their sites, the note, bytes freed)


def _measure(model: nn.Module, report: Any, example: Any, router: FunctionalRouter | None, sites: dict[int, Site],
             params: set[tuple], state: State, check_autocast: bool) -> _Measured:
    """The runs of :func:`decide`, the sites placed as decided."""
    model.train()
    if check_autocast:
        _check_autocast(model, report, example, sites, state)
    _place(model, sites, set())
    base = _run(state, model, example, sites, set(), params)
    reasons = {k: "never called in the example step" for k in sites if not base.calls[k]}
    hidden = {k for k in sites if base.hidden(k)}     # kept unmeasured, as without example=
    trial = _Trial(model, example, sites, params, state, base, hidden)
    fused: set[int] = set()     # sites left for freeing nothing whose input is a fused projection's chunk
    active, final, dropped = _settle(trial, set(sites) - set(reasons), reasons, fused)
    active, final = _retry(trial, active, final, dropped, reasons, fused)
    active, final, unit = _fused_unit(trial, active, final, reasons, fused)
    _place(model, sites, active)
    routed = None
    if router is not None:
        final, routed = _route(trial, active, final, router)
    return _Measured(active, reasons, base, final, routed, unit)


def _check_autocast(model: nn.Module, report: Any, example: Any, sites: dict[int, Site], state: State) -> None:
    """With every swap in place, replace the autocast part of each guessed norm's note on ``report`` by what
    :func:`autocast_refusals` found (checked and kept, refused: its choice set back, or not checked)."""
    _place(model, sites, set(sites))
    notes = autocast_refusals(model, example, sites, state)
    for i, r in enumerate(report.replaced):
        key = id(model.get_submodule(r.path))
        if key in notes:
            kept = [x for x in r.note.split("; ") if x and not x.startswith("autocast output")]
            note = "; ".join([notes[key], *kept])
            report.replaced[i] = replace(r, new="invact." + repr(sites[key].new), note=note)


def _settle(trial: _Trial, active: set[int], reasons: dict[int, str],
            fused: set[int]) -> tuple[set[int], Trace, dict[int, tuple[Trace, frozenset[int]]]]:
    """Swap ``active``, drop each site freeing nothing (why: ``reasons``; :func:`_fused_input` sites also in
    ``fused``), measure again, until every remaining site frees bytes; none where together they save more than
    the baseline. Returns the swaps kept, their run, and the sites left for freeing nothing that :func:`_retry`
    may try again (each with the run that measured it swapped, and that run's swaps)."""
    base, hidden = trial.base, trial.hidden
    final = base
    dropped: dict[int, tuple[Trace, frozenset[int]]] = {}
    while active:
        final = trial.measure(active)
        refused = _refused(final, active)
        bad = set(refused) or _frees_nothing(active, hidden, base, final)
        reasons.update(refused or {k: _why(k, base, final) for k in bad})
        if not refused:
            fused |= {k for k in bad - hidden if _fused_input(k, base)}
            dropped.update({k: (final, frozenset(active)) for k in bad - hidden - fused})
        active -= bad
        if not bad:
            break
    else:
        final = base
    if final.total > base.total:          # joint storages charged to no site: never worse than baseline
        added = format_bytes(final.total - base.total)
        reasons.update({k: f"measured: the swaps together add {added}" for k in active})
        active, final = set(), base
    return active, final, dropped


def _fused_unit(trial: _Trial, active: set[int], final: Trace, reasons: dict[int, str],
                fused: set[int]) -> tuple[set[int], Trace, tuple | None]:
    """Try the ``fused`` sites (left for freeing nothing, their input a fused projection's chunk) as one unit
    with their parents' chunk/split outputs copied (:class:`CopyChunks`): kept where the unit frees bytes,
    else their parents' modes removed and their reasons say what copying freed. Returns the swaps kept, their
    run, and the unit kept (its sites, the note, the bytes it frees) or None."""
    if not fused:
        return active, final, None
    parents = {id(p): p for k in fused for p in _parents(trial.model, trial.sites[k])}
    for p in parents.values():
        install_mode(p, CopyChunks(), CHUNKS)
    keys = active | fused
    run = trial.measure(keys)
    refused = _refused(run, keys)
    gain = final.total - run.total if not refused else 0
    if gain > 0:
        note = (f"fused projection: its parent's chunk/split outputs copied, measured as one unit of "
                f"{len(fused)} site(s) freeing {format_bytes(gain)}"
                + (" together (not per module)" if len(fused) > 1 else ""))
        for k in fused:
            del reasons[k]
        return keys, run, (fused, note, gain)
    for p in parents.values():
        remove_mode(p, CHUNKS)
    for k in fused:
        reasons[k] += (f"; copying its parent's chunks (one unit of {len(fused)}) " +
                       (refused[k] if k in refused else f"frees {format_bytes(gain)}"))
    return active, final, None


def _route(trial: _Trial, active: set[int], final: Trace, router: FunctionalRouter) -> tuple[Trace, tuple]:
    """One more run of the swaps ``active`` (in place) with ``router``'s route on: (the run kept, (whether the
    route is kept, the bytes it frees, the calls it routed, why it is left))."""
    with_route = _run(trial.state, trial.model, trial.example, trial.sites, active, trial.params, router)
    why = ("a routed call's output is modified in place later in the forward: invact saves y, so backward "
           "would fail" if with_route.route_modified else
           f"the example step fails with the route ({with_route.error})" if with_route.error else "")
    routed = (with_route.total < final.total and not why, final.total - with_route.total, dict(router.routed), why)
    router.routed.clear()
    return (with_route if routed[0] else final), routed


def _frees_nothing(keys: set[int], hidden: set[int], base: Trace, trace: Trace) -> set[int]:
    """The sites of ``keys`` whose swaps free nothing in ``trace``: measured ones whose storages saved alone do not
    shrink, unmeasured (hidden) ones whose output feeds a dropout."""
    return {k for k in keys - hidden if base.only(k) - trace.only(k) <= 0} | \
        {k for k in keys & hidden if _before_dropout(k, trace)}


def _local(trace: Trace, region: set[int]) -> int:
    """Bytes ``trace`` saves around ``region``'s sites: storages one of them saves, or one of their calls takes or
    returns (whoever saves it). Swapping a site changes only these; the rest of the run (a drifting total) is not
    read."""
    touched = {s for k in region for c in trace.calls[k] for s in (c.x_key, c.y_key)}
    return sum(key[3] for key, who in trace.savers.items() if who & region or key in touched)


def _neighbours(base: Trace, sites: dict[int, Site]) -> dict[int, set[int]]:
    """Per site, the sites whose calls share a storage with its calls in the baseline (one's output is the other's
    input, or both take one input): those whose swaps change which of its storages it alone saves."""
    touched = {k: {s for c in base.calls[k] for s in (c.x_key, c.y_key) if s is not None} for k in sites}
    by_storage: dict[tuple, set[int]] = defaultdict(set)
    for k, storages in touched.items():
        for s in storages:
            by_storage[s].add(k)
    return {k: set().union(*(by_storage[s] for s in storages)) - {k} for k, storages in touched.items()}


@dataclass
class _Trial:
    """One more measured run of a set of swaps (:func:`_retry`), and how many have run."""

    model: nn.Module
    example: Any
    sites: dict[int, Site]
    params: set[tuple]
    state: State
    base: Trace
    hidden: set[int]
    runs: int = 0

    def run(self, keys: set[int]) -> Trace:
        """:meth:`measure`, counted in :attr:`runs` (:func:`_retry`'s budget)."""
        self.runs += 1
        return self.measure(keys)

    def measure(self, keys: set[int]) -> Trace:
        """One measured run with the swaps ``keys`` in place (the others' originals)."""
        _place(self.model, self.sites, keys)
        return _run(self.state, self.model, self.example, self.sites, keys, self.params)

    def bad(self, keys: set[int], trace: Trace) -> set[int]:
        """The swaps of ``keys`` that ``trace`` refuses or that free nothing in it."""
        return set(_refused(trace, keys)) | _frees_nothing(keys, self.hidden, self.base, trace)

    def paths(self, keys: set[int]) -> str:
        return ", ".join(self.sites[k].paths[0] for k in self.sites if k in keys)


@dataclass
class _Search:
    """The state of :func:`_retry`: the kept swaps and their run, the sites left for freeing nothing (each with the
    run that last measured it swapped, and that run's swaps), why each site is left (and which of them for a fused
    projection's chunk: :func:`_fused_input`), and the kept neighbours each was tried in place of."""

    trial: _Trial
    active: set[int]
    final: Trace
    dropped: dict[int, tuple[Trace, frozenset[int]]]
    reasons: dict[int, str]
    fused: set[int]
    near: dict[int, set[int]]
    exchanged: dict[int, frozenset[int]] = field(default_factory=dict)

    def stale(self, k: int) -> bool:
        """Whether a neighbour's swap changed since ``k`` was measured."""
        return k in self.dropped and any((n in self.dropped[k][1]) != (n in self.active) for n in self.near[k])

    def exchangeable(self, k: int) -> bool:
        """Whether ``k`` has kept neighbours it was not yet tried in place of."""
        out = frozenset(self.near[k] & self.active)
        return k in self.dropped and bool(out) and self.exchanged.get(k) != out

    def todo(self) -> list[int]:
        return [k for k in self.trial.sites if self.stale(k) or self.exchangeable(k)]

    def gain(self, k: int, trace: Trace) -> int:
        """Bytes ``trace`` saves less than the kept swaps' run around ``k`` and its neighbours (:func:`_local`)."""
        region = {k} | self.near[k]
        return _local(self.final, region) - _local(trace, region)

    def attempt(self, chosen: set[int]) -> set[int]:
        """Try ``chosen`` (no two neighbours, nor sharing one): each stale site added to the kept swaps, each other in
        place of its kept neighbours. All are kept where every swap frees bytes and each saves less around itself
        and its neighbours (:meth:`gain`); else the run settles the losers (a site refused, freeing nothing, beside a
        neighbour freeing nothing, or saving no less: their reason from it), every site where ``chosen`` is one, and
        the others are tried again. Returns the sites settled."""
        added = {k for k in chosen if self.stale(k)}
        out = {k: self.near[k] & self.active for k in chosen - added}
        keys = (self.active - set().union(*out.values())) | chosen
        trace = self.trial.run(keys)
        bad = self.trial.bad(keys, trace)
        gains = {k: self.gain(k, trace) for k in chosen}
        losers = {k for k in chosen if ({k} | self.near[k]) & bad or gains[k] <= 0}
        if not bad and not losers:
            self.keep(chosen, out, keys, trace, gains)
            return chosen
        settled = chosen if len(chosen) == 1 else losers
        for k in settled:
            if k in added:
                self.dropped[k] = (trace, frozenset(keys))
                self.leave(k, keys, trace, bad, gains[k])
            else:
                self.exchanged[k] = frozenset(out[k])
        return settled

    def keep(self, chosen: set[int], out: dict[int, set[int]], keys: set[int], trace: Trace,
             gains: dict[int, int]) -> None:
        """Keep the swaps ``keys`` measured in ``trace``: ``chosen`` kept, each in place of ``out[k]``."""
        for k, ns in out.items():
            for n in ns:
                self.dropped[n], self.exchanged[n] = self.dropped[k], frozenset(self.near[n] & keys)
                self.reasons[n] = (f"with it swapped, {self.trial.paths({k})} frees nothing; "
                                   f"{self.trial.paths({k})} swapped in its place saves {format_bytes(gains[k])} less "
                                   "(measured on the two and their neighbours)")
                self.fused.discard(n)
        for k in chosen:
            del self.dropped[k], self.reasons[k]
            self.fused.discard(k)
        self.active, self.final = keys, trace

    def leave(self, key: int, keys: set[int], trace: Trace, bad: set[int], gain: int) -> None:
        """Record why ``key`` is not kept with the other swaps of ``keys`` (:meth:`why_left`), in ``fused`` too
        where it frees nothing and its input is a fused projection's chunk."""
        self.reasons[key], fused = self.why_left(key, keys, trace, bad, gain)
        (self.fused.add if fused else self.fused.discard)(key)

    def why_left(self, key: int, keys: set[int], trace: Trace, bad: set[int], gain: int) -> tuple[str, bool]:
        """Why ``key`` is not kept with the other swaps of ``keys`` (measured in ``trace``), and whether that is
        :func:`_why`'s for a fused projection's chunk (:func:`_fused_input`)."""
        trial = self.trial
        refused = _refused(trace, keys)
        if key in refused:
            return refused[key], False
        if key in _frees_nothing({key}, trial.hidden, trial.base, trace):
            return _why(key, trial.base, trace), key not in trial.hidden and _fused_input(key, trial.base)
        freed = format_bytes(trial.base.only(key) - trace.only(key))
        if spoiled := (bad & self.near[key]) or bad - {key}:
            verb = "frees" if len(spoiled) == 1 else "free"
            return f"measured: frees {freed}, but with it swapped, {trial.paths(spoiled)} {verb} nothing", False
        return (f"measured: frees {freed}, but with it swapped, it and its neighbours save {format_bytes(-gain)} "
                "more than without it"), False


def _apart(todo: list[int], near: dict[int, set[int]]) -> set[int]:
    """The sites of ``todo``, in order, that are not neighbours of an earlier one taken nor share one with it."""
    taken: set[int] = set()
    reach: set[int] = set()
    for k in todo:
        if not ({k} | near[k]) & reach:
            taken.add(k)
            reach |= {k} | near[k]
    return taken


def _retry(trial: _Trial, active: set[int], final: Trace, dropped: dict[int, tuple[Trace, frozenset[int]]],
           reasons: dict[int, str], fused: set[int]) -> tuple[set[int], Trace]:
    """Re-try the sites left for freeing nothing against the kept swaps: one whose neighbours' swaps
    (:func:`_neighbours`) changed since it was measured is added to them; one beside kept neighbours is tried in their
    place. A try is kept where every swap frees bytes and the bytes saved around each site fall. Sites that do not
    interact are tried together in one run (each kept or left on its own bytes; one by one where a run settles
    none); none without neighbours is re-tried. At most two
    runs per site ``dropped`` holds: a site then still measured with other swaps than those kept says so. Returns the
    swaps kept and their run (``reasons`` and ``fused`` updated as :class:`_Search` says)."""
    search = _Search(trial, active, final, dropped, reasons, fused, _neighbours(trial.base, trial.sites))
    budget, together = 2 * len(dropped), set()          # together: the last group that settled nothing
    while trial.runs < budget and (todo := search.todo()):
        chosen = _apart(todo, search.near)
        if len(chosen) > 1 and chosen != together:       # one run for many layers that do not interact
            together = set() if search.attempt(chosen) else chosen
            continue
        search.attempt({todo[0]})
    for k in filter(search.stale, trial.sites):
        reasons[k] += f"; measured with other swaps than those kept (re-measuring stops after {trial.runs} runs)"
    return search.active, search.final


def _report(report: Any, sites: dict[int, Site], measured: _Measured, left_cls: Any) -> None:
    """Write ``measured`` into ``report``: kept swaps with the bytes they free, the others moved to ``left``."""
    active, reasons, base, final, routed, unit = measured
    by_path = {p: k for k, s in sites.items() for p in s.paths}
    kept, first = [], set()
    fused, note, gain = unit or (set(), "", 0)
    for r in report.replaced:
        key = by_path[r.path]
        if key in fused:                      # measured as a unit: per module only where it is one
            kept.append(replace(r, freed=gain if len(fused) == 1 else None,
                                note="; ".join(x for x in (note, r.note) if x)))
        elif key in active and base.hidden(key):
            note = f"not measured: {_hidden_cause(base, key)}; kept, as without example="
            kept.append(replace(r, freed=None, note="; ".join(x for x in (note, r.note) if x)))
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
        report.functional = (f"routed: {sum(calls.values())} call(s) {calls}, frees {format_bytes(freed)} (measured "
                             "as one unit)" if keep else
                             f"left: routing {sum(calls.values())} call(s) {calls}: {why} (measured as one unit)"
                             if why else
                             f"left: routing {sum(calls.values())} call(s) {calls} frees {format_bytes(freed)} "
                             "(measured as one unit)")
