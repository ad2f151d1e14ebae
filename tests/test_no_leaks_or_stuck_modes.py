"""Graphs freed and modes left: invact's saved-tensor hooks and its functional route.

- A pack hook that returns the tensor it is handed makes a saved output (invact's activations and norms,
  torch's tanh) a reference cycle, tensor -> grad_fn -> saved tensor, that Python's gc cannot collect
  (PyTorch issue #115255): the graph of a forward never backpropagated lived for good, after
  ``invact.patch(model, example=x)`` (its measured forward) and after a forward-only ``invact.memory``
  block. The hooks keep the tensor detached; autograd gives it its grad_fn back at unpack.
- With a saved-tensor hook, PyTorch does not check a saved tensor's version at backward: an in-place
  change of y inside an ``invact.memory`` block went unseen (a wrong gradient). The hooks check it.
- The route's forward hooks counted depth: a user's pre-hook that raised before the route's enter still ran
  its always-called leave (depth -1: calls in the model's forward no longer routed), and a
  KeyboardInterrupt, for which torch runs no always-called hook, left the route entered for good, even
  after unpatch (F.gelu in unrelated code then went to invact).
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invact


def _live_graph_tensors() -> int:
    """Non-leaf tensors alive (after a collection): activations nothing of the test's holds."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and o.grad_fn is not None)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.LayerNorm(16), nn.Tanh())


def test_patch_with_example_leaves_no_graph_alive():
    """Before: each patch left its measured forwards' graphs (their non-leaf tensors) alive, after unpatch
    and after the model was deleted."""
    model, x = _mlp(), torch.randn(8, 16)
    before = _live_graph_tensors()
    report = invact.patch(model, example=x, backend="eager")
    invact.unpatch(model)
    assert report.replaced and _live_graph_tensors() == before


@pytest.mark.parametrize("make", [lambda: invact.GELU(backend="eager"), lambda: invact.LayerNorm(16),
                                  nn.Tanh], ids=["invact.GELU", "invact.LayerNorm", "nn.Tanh"])
def test_a_forward_only_memory_block_frees_its_graph(make):
    """Each module saves its own output: without backward the block's graph was never freed. The count is
    the one of the same forward with a backward."""
    model, x = nn.Sequential(nn.Linear(16, 16), make()), torch.randn(8, 16)
    with invact.memory(model) as forward_only:
        out = model(x)
    gone = weakref.ref(out)
    del out
    gc.collect()
    with invact.memory(model) as trained:
        model(x).sum().backward()
    assert gone() is None and forward_only.total == trained.total > 8 * 16 * 4   # y and the Linear's x


def test_a_storage_kept_only_by_backward_is_counted_once():
    """A double backward saves y again (tanh's gradient formula reads it) after the script dropped y: the
    storage is the one saved at forward, kept by the graph only (detached), so it is not counted twice. The
    other storage is the gradient's seed, a float32 scalar expanded, that the multiply by 1 - y*y saves."""
    x = torch.randn(64, requires_grad=True)
    with invact.memory() as saved:
        y = torch.tanh(x)
        total = y.sum()
        del y
        (g,) = torch.autograd.grad(total, x, create_graph=True)
        g.sum().backward()
    assert saved.count == 2 and saved.total == 64 * 4 + 4


@pytest.mark.parametrize("backward", [False, True], ids=["forward-only", "trained"])
def test_each_step_of_a_loop_is_counted_whatever_addresses_the_allocator_reuses(backward):
    """A freed graph's storages go back to the allocator, and the next step's land on their addresses: the
    counter's entry for that address was replaced, its bytes lost (trained loops counted a random share of
    their steps; forward-only loops too, once their graphs were freed). Five steps save five times one
    step's storages, the input x (the same storage) once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), invact.GELU(backend="eager"), nn.Linear(1024, 256))
    x = torch.randn(64, 256)                  # 256 KiB activations: freed, their addresses come back
    with invact.memory(model) as one:
        model(x)
    with invact.memory(model) as steps:
        for _ in range(5):
            out = model(x)
            if backward:
                out.sum().backward()
            del out
    assert steps.total == 5 * one.total - 4 * x.numel() * 4 and steps.count == 5 * one.count - 4


@pytest.mark.parametrize("make", [lambda: invact.GELU(backend="eager"), lambda: invact.LayerNorm(8),
                                  nn.Tanh], ids=["invact.GELU", "invact.LayerNorm", "nn.Tanh"])
def test_an_inplace_change_of_a_saved_output_is_refused_inside_a_memory_block(make):
    """Without the block autograd refuses it; inside, backward ran on the changed y (a wrong gradient)."""
    for counted in (False, True):
        module, x = make(), torch.randn(4, 8, requires_grad=True)
        with invact.memory(module) if counted else contextlib.nullcontext():
            y = module(x)
            y.mul_(2)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()


def test_an_example_step_changing_a_saved_output_fails_as_it_does_alone():
    """The measured step backpropagates after writing into nn.Tanh's saved output: alone it raises
    autograd's error, and the measurement (which ran it under its hook, unchecked) went on as if it worked."""
    model, x = _mlp(), torch.randn(8, 16)

    def step(m: nn.Module) -> None:
        y = m(x)
        y.mul_(2)
        y.sum().backward()

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        step(model)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        invact.patch(model, example=step, backend="eager")


class _Block(nn.Module):
    """F.gelu between two Linears; ``seen`` records whether each call's F.gelu was routed; ``boom`` raises
    KeyboardInterrupt in the forward while set."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.seen: list[bool] = []
        self.boom = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        self.seen.append(type(h.grad_fn).__name__ != "GeluBackward0")
        if self.boom:
            raise KeyboardInterrupt
        return self.fc2(h)


def _modes() -> int:
    return torch._C._len_torch_function_stack()


def _unrelated_gelu_is_torchs() -> bool:
    return type(F.gelu(torch.randn(3, requires_grad=True)).grad_fn).__name__ == "GeluBackward0"


@pytest.mark.parametrize("where", ["root", "child"])
def test_a_user_pre_hook_that_raises_leaves_the_route_working(where):
    """A pre-hook registered before patch raises before the route's enter; its always-called leave ran all
    the same and took the depth below 0: the model's later forwards ran unrouted."""
    model, x = _Block(), torch.randn(4, 8, requires_grad=True)
    refuse = [False]

    def check(module: nn.Module, args: tuple) -> None:
        if refuse[0]:
            raise ValueError("refused input")

    (model if where == "root" else model.fc1).register_forward_pre_hook(check)
    invact.patch(model, functional=True, backend="eager")
    for _ in range(2):
        refuse[0] = True
        with pytest.raises(ValueError):
            model(x)
        refuse[0] = False
    model.seen.clear()
    model(x)
    assert model.seen == [True] and _modes() == 0 and _unrelated_gelu_is_torchs()


class _Recursive(nn.Module):
    """Calls itself once from its forward, catching a ValueError of that inner call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.depth, self.seen = nn.Linear(4, 4), 0, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.depth += 1
        try:
            if self.depth == 1:
                with contextlib.suppress(ValueError):
                    self(x)
            h = F.gelu(self.fc(x))
            self.seen.append(type(h.grad_fn).__name__ != "GeluBackward0")   # routed: not torch's own node
            return h
        finally:
            self.depth -= 1


def test_a_raising_inner_call_of_the_same_module_leaves_the_outer_call_routed():
    """The inner call's pre-hook raises (before the route's enter) and the outer forward catches it: the
    inner call's always-called leave matched the module only and took the outer call's entry, so the rest
    of the outer forward ran unrouted (review)."""
    model = _Recursive()
    model.register_forward_pre_hook(lambda module, args: _raise(ValueError()) if module.depth == 1 else None)
    invact.patch(model, functional=True, backend="eager")
    model(torch.randn(2, 4, requires_grad=True))
    assert model.seen == [True] and _modes() == 0


def _raise(error: BaseException) -> None:
    raise error


@pytest.mark.parametrize("then", ["forward", "unpatch"])
def test_a_keyboard_interrupt_mid_forward_does_not_leave_the_route_entered(then):
    """torch runs always-called forward hooks for an Exception only: the route stayed on the mode stack,
    through later forwards and unpatch, and routed F.gelu in code outside the model. The next forward drops
    the interrupted calls; unpatch exits the route."""
    model, x = _Block(), torch.randn(4, 8, requires_grad=True)
    invact.patch(model, functional=True, backend="eager")
    model.boom = True
    with pytest.raises(KeyboardInterrupt):
        model(x)
    model.boom = False
    if then == "forward":
        model(x)
        assert model.seen == [True, True]
    else:
        invact.unpatch(model)
    assert _modes() == 0 and _unrelated_gelu_is_torchs()
