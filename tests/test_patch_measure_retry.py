"""invact.patch(model, example=...) re-tries the sites it left for freeing nothing against the swaps it keeps
(runtime/measure.py: _retry), and reports unmeasured sites with ``freed=None``.

Truth is invact.memory's count of the bytes saved for backward by one training step; byte counts are exact
integer arithmetic on storages (no tolerance).
"""

from __future__ import annotations

import copy

import torch
import torch.utils.checkpoint as cp
from torch import nn

import invact
from invact import measure
from invact.saved import format_bytes

D, H = 32, 64


def _saved(model: nn.Module, x: torch.Tensor) -> int:
    model.train()
    torch.manual_seed(0)
    with invact.memory(model) as mem:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return mem.total


def _chain(middle: nn.Module) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, H), nn.GELU(), middle, nn.Dropout(0.1), nn.Linear(H, D))


def test_a_site_dropped_beside_its_consumer_is_kept_once_the_consumer_is_left():
    """GELU -> SiLU -> Dropout: both swaps together free nothing (SiLU's y feeds the dropout, GELU's y is then saved
    by GELU alone); the first round left both, and GELU, which frees bytes once SiLU is original, was never re-tried."""
    model, x = _chain(nn.SiLU()), torch.randn(16, D)
    gelu_alone = copy.deepcopy(model)
    invact.patch(gelu_alone, only=nn.GELU, norms=False)
    before = _saved(model, x)
    report = invact.patch(model, example=x)
    after = _saved(model, x)
    assert [r.path for r in report.replaced] == ["1"] and [l.path for l in report.left] == ["2"], report
    assert after == _saved(gelu_alone, x) < before
    assert report.replaced[0].freed == before - after and report.measured["patched_bytes"] == after


def test_a_site_is_tried_in_place_of_a_neighbour_that_frees_less():
    """GELU -> LayerNorm -> Dropout: the swapped LayerNorm saves its output, so GELU's swap frees nothing beside it;
    GELU swapped alone frees more than the LayerNorm alone. The better of the two is kept, and the norm's reason
    names GELU."""
    model, x = _chain(nn.LayerNorm(H)), torch.randn(16, D)
    gelu_alone, norm_alone = copy.deepcopy(model), copy.deepcopy(model)
    invact.patch(gelu_alone, only=nn.GELU, norms=False)
    invact.patch(norm_alone, only=nn.SiLU)           # `only` selects activations: the norm alone is swapped
    assert isinstance(norm_alone[2], invact.LayerNorm) and isinstance(gelu_alone[1], invact.GELU)
    before = _saved(model, x)
    report = invact.patch(model, example=x)
    after = _saved(model, x)
    assert after == _saved(gelu_alone, x) < _saved(norm_alone, x) < before, report
    assert [r.path for r in report.replaced] == ["1"] and report.replaced[0].freed == before - after
    (left,) = report.left
    assert left.path == "2" and "1 frees nothing" in left.reason, report


class _Block(nn.Module):
    """Linear -> GELU -> LayerNorm -> Dropout -> Linear, residual: the exchange above in every layer."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.norm, self.drop, self.down = (nn.Linear(D, H), nn.GELU(), nn.LayerNorm(H),
                                                              nn.Dropout(0.1), nn.Linear(H, D))

    def forward(self, x):
        return x + self.down(self.drop(self.norm(self.act(self.up(x)))))


def test_layers_that_do_not_interact_are_re_tried_in_one_run(monkeypatch):
    """24 layers, each with the exchange above: the re-try is one run for all layers, not one per layer."""
    runs = []
    trace = measure.trace_example
    monkeypatch.setattr(measure, "trace_example", lambda *a, **k: runs.append(1) or trace(*a, **k))
    torch.manual_seed(0)
    model, x = nn.Sequential(*[_Block() for _ in range(24)]), torch.randn(8, D)
    gelus = copy.deepcopy(model)
    invact.patch(gelus, only=nn.GELU, norms=False)
    report = invact.patch(model, example=x)
    assert sorted(r.path for r in report.replaced) == sorted(f"{i}.act" for i in range(24)), report
    assert _saved(model, x) == _saved(gelus, x) == report.measured["patched_bytes"]
    # baseline, the first round (all 48 swaps), the second (24 left), one run re-trying the 24 GELUs together
    assert len(runs) == 4, len(runs)


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.block, self.reentrant = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)), reentrant

    def forward(self, x):
        return cp.checkpoint(self.block, x, use_reentrant=self.reentrant)


def test_a_site_kept_unmeasured_has_freed_none():
    """A site the example runs only inside a checkpoint is kept unmeasured: ``freed`` is None (as Replaced
    documents), and the report claims no byte count for it."""
    for reentrant in (True, False):
        report = invact.patch(_Checkpointed(reentrant), example=(torch.randn(4, D, requires_grad=True),))
        (r,) = report.replaced
        assert r.note.startswith("not measured") and r.freed is None, report
        assert "frees 0 bytes" not in str(report), report


class _Gated(nn.Module):
    """Linear -> GELU -> LayerNorm -> Linear beside a data-dependent selection: how many rows ``side`` saves is set
    by ``gate.bias``, which the step's optimizer moves (as MoE routing)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.norm, self.down = nn.Linear(D, H), nn.GELU(), nn.LayerNorm(H), nn.Linear(H, D)
        self.gate, self.side = nn.Linear(D, 1), nn.Linear(D, D)
        with torch.no_grad():
            self.gate.weight.zero_()
            self.gate.bias.fill_(0.5)

    def forward(self, x):
        g = self.gate(x).squeeze(-1) + torch.linspace(-1, 1, x.shape[0])
        return self.down(self.norm(self.act(self.up(x)))).sum() + self.side(x[g > 0]).sum() + g.sum()


def test_a_step_running_an_optimizer_measures_every_run_from_the_same_parameters():
    """A callable step running SGD moves ``gate.bias`` in every measuring run; restored only at the end, the runs'
    totals drifted (fewer rows selected each run) and the re-try took the drift for a saving, keeping GELU in place
    of the LayerNorm, which frees more. Each run now starts from the same parameters and the try reads the bytes
    saved around the sites, so the report's bytes are the real step's and the better swap is kept."""
    torch.manual_seed(0)
    model, x = _Gated(), torch.randn(64, D)
    opt = torch.optim.SGD(model.gate.parameters(), lr=0.004)
    bias = model.gate.bias.detach().clone()
    norm_alone = copy.deepcopy(model)
    invact.patch(norm_alone, only=nn.SiLU)           # `only` selects activations: the norm alone is swapped
    step = lambda m: (m(x).backward(), opt.step(), opt.zero_grad())  # noqa: E731
    before = _saved(model, x)
    report = invact.patch(model, example=lambda m: step(m) and None)
    assert torch.equal(model.gate.bias, bias)
    after = _saved(model, x)
    assert [r.path for r in report.replaced] == ["norm"], report
    assert after == _saved(norm_alone, x) < before and report.measured["patched_bytes"] == after, report


def _block(drop: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.LayerNorm(H), nn.Dropout(0.1) if drop else nn.Identity(),
                         nn.Linear(H, D))


def test_a_group_re_try_keeps_each_layers_exchange_only_where_it_wins():
    """Block 0 (GELU -> LayerNorm -> Dropout) gains by swapping GELU in place of the norm; block 1 (no dropout) loses
    by it (the norm alone frees y and its statistics). Tried in one run, the two were kept or left together; each is
    now judged by the bytes saved around it, and its reason quotes that difference, not the run's total."""
    torch.manual_seed(0)
    model, x = nn.Sequential(_block(True), _block(False)), torch.randn(16, D)
    best, gelu_in_0, norm_in_0 = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    invact.patch(best[0], only=nn.GELU, norms=False)
    invact.patch(best[1], only=nn.SiLU)              # `only` selects activations: the norm alone is swapped
    invact.patch(gelu_in_0[0], only=nn.GELU, norms=False)
    invact.patch(norm_in_0[0], only=nn.SiLU)
    report = invact.patch(model, example=x)
    assert sorted(r.path for r in report.replaced) == ["0.1", "1.2"], report
    assert _saved(model, x) == _saved(best, x) == report.measured["patched_bytes"], report
    left = {l.path: l.reason for l in report.left}
    local = _saved(norm_in_0, x) - _saved(gelu_in_0, x)   # block 0's exchange alone
    assert f"saves {format_bytes(local)} less" in left["0.2"], report


def test_a_chain_of_repeated_blocks_is_re_tried_in_a_few_runs(monkeypatch):
    """GELU -> SiLU -> GELU -> SiLU -> Linear, 5 times: a failed group try settles the sites beside a swap freeing
    nothing, so the re-try does not run one forward per block (32 forwards before, now 8)."""
    runs = []
    trace = measure.trace_example
    monkeypatch.setattr(measure, "trace_example", lambda *a, **k: runs.append(1) or trace(*a, **k))
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.GELU(), nn.SiLU(), nn.GELU(), nn.SiLU(), nn.Linear(D, D)) for _ in range(5)]
    model, x = nn.Sequential(nn.Linear(D, D), *blocks), torch.randn(16, D)
    before = _saved(model, x)
    report = invact.patch(model, example=x)
    assert _saved(model, x) == report.measured["patched_bytes"] < before, report
    assert len(runs) <= 8, len(runs)
    left = {l.path: l.reason for l in report.left}
    assert left["1.1"].endswith("but with it swapped, 1.0 frees nothing"), report   # its neighbour, in a sentence
