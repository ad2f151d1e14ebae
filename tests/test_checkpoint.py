"""invact ops under torch.utils.checkpoint, both modes: the same gradients as without checkpointing."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import invact


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("name", ["gelu", "silu", "hardswish"])
def test_checkpoint_gives_the_same_gradients(name, use_reentrant):
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 64), invact.activation(name), torch.nn.Linear(64, 16))
    x = torch.randn(8, 16, requires_grad=True)

    block(x).square().sum().backward()
    plain = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None

    checkpoint(block, x, use_reentrant=use_reentrant).square().sum().backward()
    again = [p.grad for p in block.parameters()] + [x.grad]
    # recomputation runs the same deterministic ops on the same inputs: bitwise equal
    for a, b in zip(plain, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
