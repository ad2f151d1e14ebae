"""``invact.memory`` and ``invact.patch(example=...)`` beside other saved-tensor machinery, as the bug hunts found.

- A counter opened inside an offloading hook replaced it (PyTorch calls the innermost hook only): the hook
  saw no tensor and nothing was offloaded. The counter now chains to it.
- Inside a non-reentrant checkpoint a counter kept (and counted) what checkpointing drops; it now hands the
  tensors on to checkpointing's hook, which recomputes them in backward.
- Selective activation checkpointing keeps op outputs in its own cache: the count missed them silently.
- ``patch(example=...)`` under ``disable_saved_tensors_hooks`` raised only the user's message.
"""

import functools
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

import invact


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), invact.GELU(), torch.nn.Linear(256, 64))


class _Offload:
    """A user's offloading hook (a stand-in for save_on_cpu): packs to numpy, records what it is handed."""

    def __init__(self) -> None:
        self.packed: list[tuple] = []
        self.unpacked = 0

    def pack(self, t: torch.Tensor):
        self.packed.append((tuple(t.shape), t.dtype))
        return t.detach().numpy().copy(), t.requires_grad

    def unpack(self, p) -> torch.Tensor:
        self.unpacked += 1
        return torch.from_numpy(p[0]).requires_grad_(p[1])

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _step(model: torch.nn.Module, forward) -> list[torch.Tensor]:
    """One forward (``forward(model, x)``) and backward on fixed data: the gradients of x and the parameters."""
    model.zero_grad()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    (forward(model, x) * w).sum().backward()
    return [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]


def _offloaded_alone(model: torch.nn.Module) -> tuple[_Offload, list[torch.Tensor]]:
    """The user's hook alone, no counter: what it was handed, and the gradients."""
    hook = _Offload()
    with hook.hooks():
        grads = _step(model, lambda m, x: m(x))
    return hook, grads


def _counted(model: torch.nn.Module) -> int:
    """Bytes the counter reports for the model with no other hook: the reference count."""
    with invact.memory(model) as mem:
        _step(model, lambda m, x: m(x))
    return mem.total


def test_counter_inside_an_offloading_hook_keeps_it_offloading():
    """The user's hook is handed every tensor it is handed without the counter (7 here: it was 0), unpacks
    as often in backward, the gradients are the same bits, and the count is the hook-free one, complete."""
    model = _mlp()
    alone, expected = _offloaded_alone(model)
    outer = _Offload()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with outer.hooks(), invact.memory(model) as mem:
            got = _step(model, lambda m, x: m(x))
    assert outer.packed == alone.packed and len(outer.packed) == 7      # x, weights, y (twice), code, w
    assert outer.unpacked == alone.unpacked
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert mem.incomplete is None and mem.total == _counted(model) > 0


def test_nested_counters_around_an_offloading_hook_all_count_and_it_still_offloads():
    """A counter, the user's hook inside it, a second counter inside that: the hook sees every tensor and
    both counters count them all (the outer one through the inner one's hook)."""
    model = _mlp()
    hook = _Offload()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with invact.memory(model) as outer, hook.hooks(), invact.memory(model) as inner:
            _step(model, lambda m, x: m(x))
    alone, _ = _offloaded_alone(model)
    assert hook.packed == alone.packed and hook.unpacked == alone.unpacked
    assert outer.incomplete is None and inner.incomplete is None
    assert outer.total == inner.total == _counted(model)


def test_two_counters_inside_an_offloading_hook_chain_to_it_once():
    """Two counters inside the user's hook: each tensor reaches the hook once (not once per counter)."""
    model = _mlp()
    hook = _Offload()
    with hook.hooks(), invact.memory(model) as outer, invact.memory(model) as inner:
        _step(model, lambda m, x: m(x))
    alone, _ = _offloaded_alone(model)
    assert hook.packed == alone.packed and hook.unpacked == alone.unpacked
    assert outer.total == inner.total == _counted(model)


def test_counter_inside_a_non_reentrant_checkpoint_leaves_checkpointing_on():
    """A counter inside the checkpointed function: the tensors go on to checkpointing's hook, so backward
    recomputes the forward (2 forwards; it was 1, the counter having kept everything) and the counter counts
    nothing kept (it drops them, as for a checkpoint inside a counter). Gradients: the same bits."""
    model = _mlp()
    counters, forwards = [], []
    model.register_forward_pre_hook(lambda m, a: forwards.append(torch.is_grad_enabled()))

    def counted(m, x):
        with invact.memory(m) as mem:
            out = m(x)
        counters.append(mem)
        return out

    expected = _step(model, lambda m, x: checkpoint(m, x, use_reentrant=False))
    forwards.clear()
    got = _step(model, lambda m, x: checkpoint(counted, m, x, use_reentrant=False))
    assert len(forwards) == 2, "backward did not recompute: the counter kept what checkpointing drops"
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert counters[0].total == 0 and counters[0].incomplete is None


@pytest.mark.parametrize("where", ["around", "inside"])
def test_selective_checkpointing_is_reported_incomplete(where):
    """SAC saving invact's forward op keeps y and the code in its cache, outside saved-tensor hooks: the
    count (only the region's input, as for plain checkpointing) is flagged incomplete, with a warning, for a
    counter around the checkpoint and one inside the checkpointed function."""
    model = _mlp()
    ctx = functools.partial(create_selective_checkpoint_contexts, [torch.ops.invact.forward.default])
    counters = []

    def counted(m, x):
        with invact.memory(m) as mem:
            out = m(x)
        counters.append(mem)
        return out

    with pytest.warns(RuntimeWarning, match="selective checkpointing keeps op outputs outside saved-tensor hooks"):
        if where == "around":
            with invact.memory(model) as mem:
                _step(model, lambda m, x: checkpoint(m, x, use_reentrant=False, context_fn=ctx))
            counters.append(mem)
        else:
            _step(model, lambda m, x: checkpoint(counted, m, x, use_reentrant=False, context_fn=ctx))
    assert "selective" in counters[0].incomplete and "incomplete" in str(counters[0])


def test_patch_with_example_where_saved_tensor_hooks_are_disabled_says_why():
    """The error names example= and the way out (patch without example=), keeps the user's message, and
    leaves the model unpatched; patch without example= works in the same region."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    with torch.autograd.graph.disable_saved_tensors_hooks("hooks off (my framework)"):
        with pytest.raises(RuntimeError, match=r"example=.*saved-tensor hooks.*hooks off \(my framework\).*"
                                               r"without example="):
            invact.patch(model, example=torch.randn(4, 16))
        assert type(model[1]) is torch.nn.GELU
        invact.patch(model)
    assert type(model[1]) is invact.GELU


@pytest.mark.parametrize("with_model", [True, False])
def test_counter_refused_where_hooks_are_disabled_leaves_no_module_hooks(with_model):
    """A counter cannot open where saved-tensor hooks are disabled (torch raises the user's message); it
    raises before registering its module hooks, so none stays behind on the model or globally."""
    from torch.nn.modules import module as module_mod
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    before = (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks),
              len(model[0]._forward_pre_hooks), len(model[0]._forward_hooks))
    with torch.autograd.graph.disable_saved_tensors_hooks("hooks off"):
        with pytest.raises(RuntimeError, match="hooks off"):
            with invact.memory(model if with_model else None):
                pass
    after = (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks),
             len(model[0]._forward_pre_hooks), len(model[0]._forward_hooks))
    assert after == before
