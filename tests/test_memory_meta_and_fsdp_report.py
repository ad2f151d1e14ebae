"""invact.memory on the meta device, and patch's report of a user's activation class under FSDP2.

* Meta storages all have data pointer 0: counted by pointer, two saved storages of one size were one. A
  Linear -> GELU -> Linear on meta must give the per-module bytes of the same model on the CPU (same shapes
  and dtypes: exact equality), and views of one meta storage still count once.
* ``fully_shard`` applied to a user's own activation class (``MyGELU``: ``F.gelu`` in its forward, found by
  :mod:`invact.recognise`'s probe) turns it into FSDP2's dynamic subclass, defined in torch.distributed.fsdp:
  ``patch`` must still see the user's class and report it left as sharded, as it does torch.nn.GELU.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import invact
from gloo import spawn_gloo


def _by_module(device: str) -> tuple[dict[str, int], int, int]:
    """(bytes per module, parameter bytes, storages) saved by one forward of a small MLP on ``device``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).to(device)
    with invact.memory(model) as saved:
        model(torch.randn(8, 16, device=device))
    return saved.by_module, saved.parameters, saved.count


def test_meta_counts_as_cpu():
    cpu = _by_module("cpu")
    assert cpu[0] == {"0": 8 * 16 * 4, "1": 8 * 32 * 4, "2": 8 * 32 * 4}    # x; GELU's input; GELU's output
    assert _by_module("meta") == cpu


def test_meta_views_of_one_storage_count_once():
    a = torch.empty(1000, device="meta", requires_grad=True)
    with invact.memory() as saved:
        b = a.exp()                      # saves its output b
        b[:500].sin()                    # saves a view of b: the same storage
        (b * 2).exp()                    # saves its output: another storage of b's size
    assert saved.total == 2 * 1000 * 4 and saved.count == 2


class MyGELU(nn.Module):
    """A user's own activation class: no rule names it, the probe finds it computes gelu."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


def _sharded_user_activation_left(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 64), MyGELU(), nn.Linear(64, 16))
    model = nn.Sequential(nn.Linear(16, 64), MyGELU(), nn.Linear(64, 16))
    assert [r.path for r in invact.patch(plain).replaced] == ["1"]    # recognised when not sharded
    fully_shard(model[1])
    fully_shard(model)
    report = invact.patch(model)
    left = {entry.path: (entry.cls, entry.reason) for entry in report.left}
    assert report.replaced == [] and set(left) == {"1"}, str(report)
    cls, why = left["1"]
    assert cls.endswith("MyGELU") and why.startswith("sharded by FSDP2's fully_shard"), str(report)
    assert "patch before fully_shard" in why


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_sharded_user_activation_reported_left(tmp_path):
    spawn_gloo(tmp_path, _sharded_user_activation_left, world=2)
