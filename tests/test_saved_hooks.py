"""Saved-tensor hooks and first-order uses of the backward that the bug hunts found wrong.

- A hook that hands y back in another layout (``torch.autograd.graph.save_on_cpu`` and offloading hooks
  copy into contiguous buffers): the code is packed in y's memory order at forward, so the backward must
  read y in that order whatever the hook returns. Before, a transposed or channels_last y gave gradients
  off by ~1 for every table with a code.
- The derivative of grad_output * f'(x) with respect to grad_output is f'(x): first order, used by
  ``torch.autograd.functional.jvp`` (the double-vjp trick). Only differentiating through y (a second
  derivative of f) is refused.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import invact.functional as IF
from invact import backends, ops
from invact.registry import module

NAMES = ops.names()
CODED = [n for n in NAMES if module(n).CODE_BITS]
pytestmark = pytest.mark.skipif(not CODED, reason="no generated activation with a code (run `invact generate`)")
BACKENDS = [b for b in ("eager", "compiled", "triton") if b in backends.available("cpu")]


def _layouts() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64) * 3
    return {"transposed": base[0, 0].t(), "channels_last": base.contiguous(memory_format=torch.channels_last),
            "permuted": base.permute(3, 1, 0, 2)}


def _grad(x: torch.Tensor, name: str, backend: str, hooks=None) -> torch.Tensor:
    xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    if hooks is None:
        y = IF.apply(xi, name, backend=backend)
    else:
        with hooks:
            y = IF.apply(xi, name, backend=backend)
    dy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    y.backward(dy)
    return xi.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", sorted(_layouts()))
@pytest.mark.parametrize("name", CODED)
def test_a_hook_that_returns_y_in_another_layout_keeps_the_gradient(name, where, backend):
    """With a hook that makes every saved tensor contiguous and with save_on_cpu, the gradient equals, bit for
    bit, the one without hooks: the same y values, the same code, read in the order they were packed."""
    for dtype in (torch.float32, torch.bfloat16):
        x = _layouts()[where].to(dtype)
        want = _grad(x, name, backend)
        for hooks in (torch.autograd.graph.saved_tensors_hooks(lambda t: t.contiguous(), lambda t: t),
                      torch.autograd.graph.save_on_cpu()):
            got = _grad(x, name, backend, hooks)
            assert got.stride() == want.stride()
            assert torch.equal(got, want), (name, where, backend, dtype, (got - want).abs().max().item())


def test_save_on_cpu_with_pinned_memory_where_it_runs():
    """torch's own offloading hook with pin_memory=True (it copies into a new contiguous tensor) on a
    channels_last input: the gradient is the hook-free one."""
    name = CODED[0]
    x = _layouts()["channels_last"].float()
    want = _grad(x, name, BACKENDS[0])
    try:
        got = _grad(x, name, BACKENDS[0], torch.autograd.graph.save_on_cpu(pin_memory=True))
    except RuntimeError as error:       # a build of torch that cannot pin memory without an accelerator
        pytest.skip(f"save_on_cpu(pin_memory=True) does not run here: {error}")
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gelu", "sigmoid", "softplus"])
def test_derivative_of_the_backward_by_grad_output_is_first_order(name, backend):
    """d(grad_output * f'(x)) / d(grad_output) = f'(x): torch.autograd.functional.jvp computes a jvp that
    way, and it equals torch's in float64 within a few ulps of f'(x)'s table error (certified ~1e-7 in
    float32; float64 tables evaluate in float64, README "Certified errors": bound 1e-6 relative covers both).
    A second derivative of f (through y) is still refused."""
    if name not in NAMES:
        pytest.skip(f"no {name} table")
    ref = {"gelu": F.gelu, "sigmoid": torch.sigmoid, "softplus": F.softplus}[name]
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    v = torch.linspace(1, -1, 101, dtype=torch.float64)
    _, got = torch.autograd.functional.jvp(lambda t: IF.apply(t, name, backend=backend), x, v)
    _, want = torch.autograd.functional.jvp(ref, x, v)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    # plain eager (invact's direct Function), and under a dispatch mode (the custom ops' own autograd)
    for mode in (contextlib.nullcontext, lambda: FlopCounterMode(display=False)):
        xi = x.clone().requires_grad_()
        go = torch.ones_like(x, requires_grad=True)
        with mode():
            (g,) = torch.autograd.grad(IF.apply(xi, name, backend=backend), xi, go, create_graph=True)
            (dgo,) = torch.autograd.grad(g.sum(), go, retain_graph=True)
            torch.testing.assert_close(dgo, g.detach(), rtol=0, atol=0)       # f'(x) itself
            with pytest.raises(RuntimeError, match="no second derivative"):
                torch.autograd.grad(g.sum(), xi)


@pytest.mark.parametrize("backend", BACKENDS)
def test_derivative_by_grad_output_under_a_hook_that_changes_the_layout(backend):
    """The first-order derivative by grad_output reads y again (saved once more by the backward's own
    autograd): under a hook that makes saved tensors contiguous, a transposed y must still be read in the
    order its code was packed. With grad_output = 1, d(grad_x)/d(grad_output) · 1 is f'(x), the gradient
    itself, bit for bit (the same table evaluation); before, it was off by up to 0.7."""
    name = CODED[0]
    hook = torch.autograd.graph.saved_tensors_hooks(lambda t: t.contiguous(), lambda t: t)
    for mode in (contextlib.nullcontext, lambda: FlopCounterMode(display=False)):
        x = _layouts()["transposed"].float().requires_grad_()
        go = torch.ones_like(x, requires_grad=True)
        with mode(), hook:
            (g,) = torch.autograd.grad(IF.apply(x, name, backend=backend), x, go, create_graph=True)
            (dgo,) = torch.autograd.grad(g, go, torch.ones_like(g))
        assert torch.equal(dgo, g.detach()), (backend, (dgo - g).abs().max().item())
        free = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        IF.apply(free, name, backend=backend).backward(torch.ones_like(free))
        assert torch.equal(g.detach(), free.grad)                           # the hook-free gradient
