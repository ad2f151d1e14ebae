"""The autocast check of :func:`invact.patch` (``example=``): which norms may return the autocast dtype.

Norms with ``autocast_output`` (judged pre-norms by :func:`invact.norm_patch.feeds_linears`) are checked
first, on forwards of the example under bf16 autocast with the swapped norms (training mode, seeded as in
:mod:`invact.snapshot`): the model's outputs (every tensor its forwards return, bit for bit and dtype) with
every such norm returning torch's dtype, then with each group of them (the same attribute of the same parent
class: every layer's ``input_layernorm``) returning the autocast dtype, then (with several groups) the groups
kept, together. A group that changes the outputs feeds something other than autocast-lowered Linears (a
post-norm's residual add, the model's output) and keeps torch's dtype; the report says so. The outputs are
the tensors in what the forward returns, walked through dicts (Hugging Face's ModelOutput), tuples, lists and
dataclasses. Where nothing is compared (the step fails under autocast with torch's dtypes, the model returns
no tensor there, its parameters are on another device than cpu or cuda), the rule without ``example=``
decides (:func:`invact.norm_patch.checked_autocast`: the patched model's final norm keeps torch's dtype) and
the note says the guess was not checked, and why.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Callable

import torch
from torch import nn

from .norm_patch import checked_autocast
from .norms import SavingNorm
from .save_trace import Site, error_line, run_step
from .snapshot import State, seeded

__all__ = ["autocast_refusals", "Notes"]


def _outputs(model: nn.Module, example: Any) -> list[torch.Tensor]:
    """Every tensor the model's (outermost) forwards return in one run of the example, detached."""
    outs: list[torch.Tensor] = []
    depth = [0]

    def enter(m: nn.Module, args: Any) -> None:
        depth[0] += 1

    def leave(m: nn.Module, args: Any, out: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            stack, seen = [out], set()
            while stack:
                o = stack.pop()
                if id(o) in seen:          # an output holding itself (a dataclass's owner field, a list in itself)
                    continue
                seen.add(id(o))
                if isinstance(o, torch.Tensor):
                    outs.append(o.detach())
                elif isinstance(o, dict):
                    stack.extend(o.values())
                elif isinstance(o, (tuple, list)):
                    stack.extend(o)
                elif dataclasses.is_dataclass(o) and not isinstance(o, type):
                    stack.extend(getattr(o, f.name, None) for f in dataclasses.fields(o))   # init=False: maybe unset

    handles = (model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True))
    try:
        with seeded(model), torch.inference_mode(False), torch.enable_grad():
            out = run_step(model, example)
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


class Notes(dict):
    """:func:`autocast_refusals`' answer: per norm site, its autocast note after the check; ``compared``:
    whether the check compared the model's outputs (else ``unchecked`` says why not)."""

    def __init__(self, notes: dict[int, str], unchecked: str | None) -> None:
        super().__init__(notes)
        self.unchecked = unchecked
        self.compared = unchecked is None


def autocast_refusals(model: nn.Module, example: Any, sites: dict[int, Site], state: State) -> Notes:
    """The note on each norm site that had ``autocast_output``, after checking it under bf16 autocast (the
    sites must be in place), which sets ``autocast_output`` as decided: False where it changes the model's
    outputs or makes the step fail (with the reason); where nothing could be compared (:attr:`Notes.compared`
    False), as the rule without ``example=`` decides. ``state`` is put back after each run, so that every run
    starts from the same parameters (a step may run an optimizer)."""
    casts = {k for k, s in sites.items() if isinstance(s.new, SavingNorm) and s.new.autocast_output}
    if not casts:
        return Notes({}, None)
    device = next((p.device.type for p in model.parameters()), "cpu")
    if device not in ("cpu", "cuda"):
        return _unchecked(model, sites, casts, f"is on {device} (the check runs autocast on cpu or cuda "
                                               "only)")
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
            return error_line(exc)
        finally:
            state.restore()

    refused: dict[int, str] = {}
    try:
        plain = run(set())
        if isinstance(plain, list) and plain:
            refused = _refusals(run, plain, groups, casts)
    finally:
        for k in casts:
            sites[k].new.autocast_output = k not in refused
    if isinstance(plain, str) or not plain:   # fails under autocast, or nothing to compare: the rule decides
        return _unchecked(model, sites, casts, f"failed under bf16 autocast ({plain})" if isinstance(plain, str)
                          else "returned no tensor to compare (none in a tensor, dict, tuple, list or dataclass)")
    return Notes({k: refused.get(k) or _checked(model, sites[k], None)[1] for k in casts}, None)


def _refusals(run: Callable[[set[int]], list[torch.Tensor] | str], plain: list[torch.Tensor],
              groups: dict[tuple, set[int]], casts: set[int]) -> dict[int, str]:
    """The sites whose autocast output changes the outputs ``plain`` (of ``run`` with none), or makes the step
    fail: each group alone, then (with several) the groups kept, together; with the reason."""
    refused: dict[int, str] = {}
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
    return refused


def _checked(model: nn.Module, site: Site, unchecked: str | None) -> tuple[bool, str]:
    """(``autocast_output``, the note) of a norm site the check did not refuse
    (:func:`invact.norm_patch.checked_autocast`; a module at several paths keeps the autocast dtype only where
    each path does)."""
    decided = []
    for path in site.paths:
        parent, _, attr = path.rpartition(".")
        decided.append(checked_autocast(model.get_submodule(parent), attr, model, unchecked))
    return next((d for d in decided if not d[0]), decided[0])


def _unchecked(model: nn.Module, sites: dict[int, Site], casts: set[int], why: str) -> Notes:
    """:class:`Notes` where the check compared nothing (``why``): each site in ``casts`` set as the rule
    without ``example=`` decides."""
    notes = {}
    for k in casts:
        sites[k].new.autocast_output, notes[k] = _checked(model, sites[k], why)
    return Notes(notes, why)
