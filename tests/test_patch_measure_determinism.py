"""invact.patch(model, example=...) gives the same report for the same model and example, and blames a site on a
dropout only where its output is the dropout's input (runtime/save_trace.py: _DropoutWatch).

The trace compares storage keys (device, address, bytes: invact.saved) of tensors it saw at different times: a
site's output against the inputs of every dropout. Each keyed tensor is held until the forward ends; a dropout's
input was not (dropout saves its mask, not its input), so a site's output allocated later at its address read as
"dropout after it", as the allocator happened to reuse it.

Forcing the reuse: glibc maps every allocation above its largest mmap threshold (32 MiB on 64-bit) on its own,
and Linux places a new mapping top-down in the highest gap that fits: the one just unmapped, where the freed
tensor's length equals the new one's. Byte counts are exact integer arithmetic on storages (no tolerance).
"""

from __future__ import annotations

import copy
import random
import weakref

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

import invact

BIG = (32 << 20) // 4 + 1024      # float32 elements: above glibc's largest mmap threshold (32 MiB)


class FreedDropoutInput(nn.Module):
    """A dropout's input freed as the dropout returns, then the activation's output allocated at once (in a
    reentrant checkpoint, where its saves are not seen, with ``hidden``); ``y + d`` saves neither."""

    def __init__(self, hidden: bool = False) -> None:
        super().__init__()
        self.act, self.hidden = nn.GELU(), hidden
        self.reused: list[bool] = []       # per forward: whether y took the freed input's address

    def forward(self, x):
        t = x * 3.0                                     # saved by nobody
        d = F.dropout(t, 0.5, self.training)
        address = t.data_ptr()
        del t
        y = cp.checkpoint(self.act, x, use_reentrant=True) if self.hidden else self.act(x)
        self.reused.append(y.data_ptr() == address)
        return y + d


def test_a_freed_dropout_input_does_not_name_a_later_output():
    """With the swap, y is saved by GELU alone and feeds ``y + d``, not the dropout: the reason says so, and y
    never takes the address of the dropout's freed input (the trace holds that input until the forward ends)."""
    invact.GELU()(torch.randn(BIG, requires_grad=True))   # its first call's own allocations, before the measure
    model = FreedDropoutInput()
    report = invact.patch(model, example=torch.randn(BIG, requires_grad=True))
    assert len(report) == 0 and [e.path for e in report.left] == ["act"], str(report)
    assert "y not saved by its consumer" in report.left[0].reason and "dropout" not in report.left[0].reason
    assert not any(model.reused), model.reused


def test_a_freed_dropout_input_does_not_leave_an_unmeasured_site():
    """A site run in a reentrant checkpoint is kept unmeasured unless its output feeds a dropout: an output at
    the address of a freed dropout input left it."""
    invact.GELU()(torch.randn(BIG, requires_grad=True))
    model = FreedDropoutInput(hidden=True)
    report = invact.patch(model, example=torch.randn(BIG, requires_grad=True))
    assert [r.path for r in report.replaced] == ["act"] and not report.left, str(report)
    assert report.replaced[0].freed is None and "not measured" in report.replaced[0].note
    assert not any(model.reused), model.reused


class WatchedDropoutInput(nn.Module):
    """Records whether the storage of a dropout's input, dropped by the model, is still alive when the
    forward ends."""

    def __init__(self) -> None:
        super().__init__()
        self.act, self.alive = nn.SiLU(), []

    def forward(self, x):
        t = x + 1.0
        d = F.dropout(t, 0.5, self.training)
        ref = weakref.ref(t.untyped_storage())
        del t
        y = self.act(x) + d
        self.alive.append(ref() is not None)
        return y


def test_a_dropout_input_is_held_until_the_forward_ends():
    """Whatever the allocator: every storage whose key the trace compares stays alive through the forward, so
    no later storage can take its key (small tensors; the forwards of the measure only)."""
    model = WatchedDropoutInput()
    invact.patch(model, example=torch.randn(4, 16))
    assert model.alive and all(model.alive), model.alive


# -- generated models: the same report in every run ---------------------------------------------------------

D = 16


class FusedGLU(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.gate_up, self.down, self.act = nn.Linear(D, 2 * D), nn.Linear(D, D), act

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(up * self.act(gate))


class Shared(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.side, self.act = nn.Linear(D, D), act

    def forward(self, x):
        return self.act(x) + self.side(x)


class Scaled(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act

    def forward(self, x):
        return self.act(x) * 2.0 + 1.0


class InplaceAfter(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act

    def forward(self, x):
        y = self.act(x)
        y.mul_(0.5)
        return y


ACTS = [nn.GELU, nn.SiLU, nn.Mish, lambda: nn.GELU(approximate="tanh"), lambda: nn.LayerNorm(D), nn.ELU,
        nn.Softplus]


def _piece(rng: random.Random) -> nn.Module:
    k, act = rng.randrange(9), ACTS[rng.randrange(len(ACTS))]()
    wrapped = {0: FusedGLU, 1: Shared, 2: Scaled}
    if k in wrapped:
        return wrapped[k](act)
    if k == 4:
        return act if isinstance(act, nn.LayerNorm) else InplaceAfter(act)
    return nn.Dropout(0.1) if k == 3 else nn.Linear(D, D) if k == 5 else act   # a Linear only when chosen: torch's RNG


def _model(seed: int) -> nn.Sequential:
    """Linear, 2 to 8 random pieces, Linear; in 3 of 10 the pieces repeated as three blocks."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    layers = [nn.Linear(D, D)] + [_piece(rng) for _ in range(rng.randrange(2, 9))] + [nn.Linear(D, D)]
    if rng.random() < 0.3:
        block = layers[1:-1]
        layers = [nn.Linear(D, D)] + [nn.Sequential(*copy.deepcopy(block)) for _ in range(3)] + [nn.Linear(D, D)]
    return nn.Sequential(*layers)


def _patched(seed: int) -> tuple[str, nn.Sequential, invact.PatchReport]:
    model = _model(seed)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(seed))
    report = invact.patch(model, example=x, functional=seed % 5 == 0)
    text = f"{report}\n{report.replaced!r}\n{report.left!r}\n{report.measured!r}\n{model!r}"
    return text, model, report


def _feeds_dropout(model: nn.Module, path: str) -> bool:
    """Whether the module at ``path`` is followed by a dropout in its Sequential (its output is the dropout's input)."""
    parent, _, last = path.rpartition(".")
    seq = model.get_submodule(parent)
    return (isinstance(seq, nn.Sequential) and last.isdigit() and int(last) + 1 < len(seq)
            and isinstance(seq[int(last) + 1], nn.Dropout))


@pytest.mark.parametrize("seed", [13, 83, 84, 195])
def test_generated_models_give_one_report_and_blame_only_real_dropouts(seed):
    """Seeds whose reports differed between runs (a site's reason, dropout after it or not)."""
    runs = [_patched(seed) for _ in range(3)]
    assert runs[1][0] == runs[0][0] and runs[2][0] == runs[0][0]
    _, model, report = runs[0]
    blamed = [e.path for e in report.left if "dropout after it" in e.reason]
    assert all(_feeds_dropout(model, p) for p in blamed), str(report)
