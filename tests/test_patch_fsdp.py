"""patch and unpatch of models sharded by FSDP2 (``fully_shard``): gloo, 2 processes on CPU.

Each test spawns two workers (``torch.multiprocessing.spawn``, rendezvous through a FileStore in the test's
temporary directory: no ports) that shard the same small model (Linear, GELU, LayerNorm, Linear) and run it
on their halves of one batch:

* ``patch(model, example=x)`` after sharding: its measuring forwards run without backward, which leaves
  FSDP2's root gathered; the next training step must give the gradients of the same model never patched,
  bit for bit (the LayerNorm is left, as sharded, and GELU excluded: the two run the same operations in the
  same order, with the same all-reduces);
* ``unpatch`` after sharding a patched model refuses, naming the sharded replacements, and changes nothing
  (the model still trains); under DDP it unpatches;
* ``patch`` after ``fully_shard`` of a norm or an activation reports it left, by its own class (not FSDP2's
  dynamic subclass ``FSDPLayerNorm``), with the sharding reason; so is a norm under a sharded root whose
  parameters are gathered (plain tensors) after a forward without backward.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch import nn

import invact
from gloo import spawn_gloo

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORLD = 2
REASON = "patch before fully_shard"


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 16))


def _shard(model: nn.Sequential, *children: int) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard
    for i in children:
        fully_shard(model[i])
    return fully_shard(model)


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(16, 16, generator=torch.Generator().manual_seed(7)).chunk(WORLD)[rank]


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """One training step's gradients, gathered to full tensors (then cleared)."""
    model(x).square().mean().backward()
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _left(report: invact.PatchReport) -> dict[str, tuple[str, str]]:
    return {entry.path: (entry.cls, entry.reason) for entry in report.left}


def _measured_patch_keeps_fsdp(rank: int) -> None:
    x = _batch(rank)
    for step in (lambda: x, lambda: (lambda m: m(x).square().mean().backward())):   # inputs, a callable step
        reference, model = _shard(_model(), 0, 3), _shard(_model(), 0, 3)
        report = invact.patch(model, example=step(), exclude=nn.GELU)
        assert report.replaced == [] and REASON in _left(report)["2"][1], str(report)
        assert all(p.grad is None for p in model.parameters())
        for _ in range(2):
            for got, want in zip(_grads(model, x), _grads(reference, x)):
                assert torch.equal(got, want)


def _unpatch_refuses_sharded(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel
    x = _batch(rank)
    model = _model()
    invact.patch(model)
    replacements = list(model)
    _shard(model, 0, 3)
    _grads(model, x)
    with pytest.raises(RuntimeError, match="unpatch before sharding") as refused:
        invact.unpatch(model)
    assert "module '2' (LayerNorm" in str(refused.value) and "'1'" not in str(refused.value)
    assert list(model) == replacements and isinstance(model[1], invact.GELU)
    assert all(torch.isfinite(g).all() for g in _grads(model, x))     # still trains
    plain = _model()
    invact.patch(plain)
    wrapped = DistributedDataParallel(plain)
    assert invact.unpatch(wrapped) == ["module.1", "module.2"]
    assert type(plain[1]) is nn.GELU and type(plain[2]) is nn.LayerNorm
    _grads(wrapped, x)


def _patch_reports_sharded_norm(rank: int) -> None:
    x = _batch(rank)
    model = _shard(_model(), 1, 2)
    report = invact.patch(model)
    left = _left(report)
    assert report.replaced == [] and set(left) == {"1", "2"}, str(report)
    assert left["1"][0] == "torch.nn.GELU" and left["2"][0] == "torch.nn.LayerNorm", str(report)
    assert all(why.startswith("sharded by FSDP2's fully_shard") and REASON in why for _, why in left.values())
    gathered = _shard(_model())
    gathered(x)                                  # no backward: the root keeps its parameters gathered
    assert not hasattr(gathered[2].weight, "full_tensor")
    report = invact.patch(gathered)
    assert [r.path for r in report.replaced] == ["1"] and REASON in _left(report)["2"][1], str(report)
    gathered(x).square().mean().backward()


def _spawn(case, tmp_path) -> None:
    spawn_gloo(tmp_path, case, world=WORLD)


def test_measured_patch_after_fully_shard_keeps_the_next_step_right(tmp_path):
    _spawn(_measured_patch_keeps_fsdp, tmp_path)


def test_unpatch_after_fully_shard_refuses_and_changes_nothing(tmp_path):
    _spawn(_unpatch_refuses_sharded, tmp_path)


def test_patch_after_fully_shard_reports_the_norm_left(tmp_path):
    _spawn(_patch_reports_sharded_norm, tmp_path)
