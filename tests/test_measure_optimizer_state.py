"""invact.measure, found by a bug hunt: routes removed from the whole tree, optimizer and LR-scheduler state
restored after a measured patch, lazy modules refused, internal errors never taken for the step's.

Every check is exact: byte counts are integers, parameters and optimizer state are compared bit for bit
(a measured patch restores them; after unpatch the original modules compute what they computed before,
deterministically on CPU), and routing is read from the ops a ``torch.jit.trace`` records.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invact
from invact import measure, save_trace


def _invact_ops(model: nn.Module, x: torch.Tensor) -> int:
    """How many invact calls a trace of ``model`` records (swapped modules plus routed functional calls)."""
    traced = torch.jit.trace(model, x, check_trace=False)
    return sum("invact" in n.kind() for n in traced.inlined_graph.nodes())


def _routes(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if "_invact_router" in vars(m)]


def _hooks(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


# ---------------------------------------------------------------------------------------------------
# 1. functional routes: unpatch removes every route in the tree; patches in any order route once

class Block(nn.Module):
    """A SiLU module and an F.gelu call, each followed by a Linear (which saves their output): both free bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.act = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 16), nn.SiLU()

    def forward(self, x):
        return self.c(F.gelu(self.b(self.act(self.a(x)))))


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2 = Block(), Block()

    def forward(self, x):
        return self.b2(self.b1(x))


def test_unpatch_of_the_model_removes_the_route_of_a_patched_submodule():
    torch.manual_seed(0)
    model, x = Two(), torch.randn(8, 16)
    hooks = _hooks(model)
    invact.patch(model.b1, functional=True)
    assert _invact_ops(model, x) == 2                  # b1's SiLU module and its F.gelu
    assert invact.unpatch(model) == ["b1.act"]
    assert _routes(model) == [] and _hooks(model) == hooks and _invact_ops(model, x) == 0


# (operations, then: invact calls in a trace, modules holding a route); 4 = both blocks' SiLU and F.gelu (a
# route also routes the F.silu of an nn.SiLU that unpatch(sub) put back: it spans the model's forward)
_ORDERS = {
    "sub, model": ([("patch", "b1"), ("patch", "")], 4, [""]),
    "model, sub": ([("patch", ""), ("patch", "b1")], 4, ["", "b1"]),
    "model, sub, unpatch sub": ([("patch", ""), ("patch", "b1"), ("unpatch", "b1")], 4, [""]),
    "sub, model, unpatch sub": ([("patch", "b1"), ("patch", ""), ("unpatch", "b1")], 4, [""]),
    "sub, unpatch sub": ([("patch", "b1"), ("unpatch", "b1")], 0, []),
    "model, model": ([("patch", ""), ("patch", "")], 4, [""]),
}


@pytest.mark.parametrize("order", list(_ORDERS))
@pytest.mark.parametrize("measured", [False, True])
def test_patches_of_model_and_submodule_in_any_order_route_each_call_once(order, measured):
    """A route covers the modules under it: a patch of the model replaces a submodule's route, a submodule's
    route inside the model's routes nothing twice, unpatch(sub) leaves the model's route (it spans the model's
    forward) and unpatch(model) leaves nothing."""
    torch.manual_seed(0)
    model, x = Two(), torch.randn(8, 16)
    ref, hooks = copy.deepcopy(model), _hooks(model)
    ops, calls, routes = _ORDERS[order]
    for op, path in ops:
        sub = model.get_submodule(path)
        if op == "unpatch":
            invact.unpatch(sub)
        else:
            invact.patch(sub, functional=True, **({"example": x} if measured and path == "" else {}))
    assert _invact_ops(model, x) == calls and _routes(model) == routes
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))           # invact's forward is exact (the gradient is not)
    invact.unpatch(model)
    assert _routes(model) == [] and _hooks(model) == hooks and _invact_ops(model, x) == 0


# ---------------------------------------------------------------------------------------------------
# 2. a step that runs an optimizer (and an LR scheduler): their state is as it was after the patch

def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.SiLU(),
                         nn.Linear(16, 4))


_OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "adamw-tensor-lr": lambda p: torch.optim.AdamW(p, lr=torch.tensor(1e-2)),
}
_SCHEDULERS = {
    "none": lambda o: None,
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1 / (i + 1)),
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=2),
        torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[2]),
}


def _trainer(model: nn.Module, optimizer: str, scheduler: str):
    opt = _OPTIMIZERS[optimizer](model.parameters())
    sched = _SCHEDULERS[scheduler](opt)
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))

    def step(m: nn.Module) -> None:
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()
        if sched is not None:
            sched.step()
    return opt, sched, step


def _same(a, b) -> bool:
    """Equal nested values; tensors bit for bit, with their dtype."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or callable(a)


@pytest.mark.parametrize("scheduler", list(_SCHEDULERS))
@pytest.mark.parametrize("optimizer", list(_OPTIMIZERS))
@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "after-one-step"])
def test_measured_patch_leaves_optimizer_and_scheduler_as_they_were(optimizer, scheduler, warm):
    model = _net()
    ref = copy.deepcopy(model)
    opt, sched, step = _trainer(model, optimizer, scheduler)
    opt_ref, sched_ref, step_ref = _trainer(ref, optimizer, scheduler)
    if warm:
        step(model)
        step_ref(ref)
    before = copy.deepcopy((opt.state_dict(), None if sched is None else sched.state_dict()))
    tensors = {id(v): v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)}
    report = invact.patch(model, example=step)
    assert report.replaced                            # something was measured and kept
    assert _same(opt.state_dict(), before[0])
    assert sched is None or _same(sched.state_dict(), before[1])
    assert all(v is tensors[id(v)] for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    invact.unpatch(model)
    step(model)                                       # the originals again: the same step as never patched
    step_ref(ref)
    assert _same(list(model.state_dict().values()), list(ref.state_dict().values()))
    assert _same(opt.state_dict(), opt_ref.state_dict())
    assert sched is None or _same(sched.state_dict(), sched_ref.state_dict())


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "after-one-step"])
def test_measured_patch_leaves_a_grad_scaler_as_it_was(warm):
    """A step through torch.amp.GradScaler (float16 autocast, init scale 2^40: the measuring runs overflow and
    back off): its scale and growth counter moved (2^40 -> 2^38), so the next real steps ran another scale;
    they are as before the patch (a fresh scaler keeps its lazily created tensors unmade), and one real
    step after unpatch gives a never-patched twin's parameters and scale bit for bit."""
    def trainer(model):
        opt, scaler = torch.optim.SGD(model.parameters(), lr=1e-2), torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
        x = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))

        def step(m):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = m(x).float().pow(2).sum()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return scaler, step

    model = _net()
    ref = copy.deepcopy(model)
    (scaler, step), (scaler_ref, step_ref) = trainer(model), trainer(ref)
    if warm:
        step(model)
        step_ref(ref)
    before = (scaler.state_dict(), scaler._scale is None)
    own = {name: torch.amp.GradScaler.__dict__[name] for name in ("scale", "update")}
    assert invact.patch(model, example=step).replaced
    assert scaler.state_dict() == before[0] and (scaler._scale is None) == before[1]
    assert all(torch.amp.GradScaler.__dict__[name] is f for name, f in own.items())   # the class's own again
    invact.unpatch(model)
    step(model)
    step_ref(ref)
    assert _same(list(model.state_dict().values()), list(ref.state_dict().values()))
    assert scaler.state_dict() == scaler_ref.state_dict()


class _OwnScaler(torch.amp.GradScaler):
    """A subclass with its own scale and update, calling no super() (as FSDP's ShardedGradScaler)."""

    def scale(self, outputs):
        self._scale = self._scale if self._scale is not None else torch.tensor(self._init_scale)
        return outputs * self._scale

    def update(self, new_scale=None):
        self._scale = self._scale / 2


def test_a_grad_scaler_subclass_and_other_threads_are_handled():
    """A subclass overriding scale/update without super() was not watched, so its scale stayed moved; a
    measurement snapshot and rolled back optimizers and scalers another thread was training with; and two
    overlapping measurements left the class's methods wrapped for good. Now: the subclass is restored,
    the other thread's state is kept, and the classes' own methods are back once both are closed."""
    from invact.snapshot import _Optimizers
    scaler, own = _OwnScaler("cpu", init_scale=1024.0), {n: torch.amp.GradScaler.__dict__[n] for n in ("scale", "update")}
    weight = nn.Parameter(torch.ones(2))
    other_opt, other_scaler = torch.optim.SGD([weight], lr=0.1, momentum=0.9), torch.amp.GradScaler("cpu", init_scale=8.0)
    first, second = _Optimizers(), _Optimizers()
    first.__enter__()
    second.__enter__()
    scaler.update(scaler.scale(torch.ones(1)))                 # this thread: 1024 -> 512

    def train():
        for _ in range(2):
            other_scaler.scale(weight.sum()).backward()
            other_scaler.step(other_opt)
            other_scaler.update()
    worker = threading.Thread(target=train)
    worker.start()
    worker.join()
    moved = (copy.deepcopy(other_opt.state_dict()), other_scaler.state_dict())
    first.__exit__(None, None, None)
    second.restore()
    second.__exit__(None, None, None)
    assert scaler._scale is None and scaler.get_scale() == 1024.0     # as before: its scale not made yet
    assert _same(other_opt.state_dict(), moved[0]) and other_scaler.state_dict() == moved[1]
    assert all(torch.amp.GradScaler.__dict__[n] is f for n, f in own.items())
    assert "__wrapped__" not in vars(_OwnScaler.scale) and "__wrapped__" not in vars(_OwnScaler.update)


def test_optimizer_hook_is_removed_after_the_measurement():
    from torch.optim.optimizer import _global_optimizer_pre_hooks
    model = _net()
    before = dict(_global_optimizer_pre_hooks)
    _, _, step = _trainer(model, "adam", "none")
    with pytest.raises(RuntimeError, match="boom"):
        invact.patch(model, example=lambda m: (step(m), (_ for _ in ()).throw(RuntimeError("boom"))))
    invact.patch(model, example=step)
    assert _global_optimizer_pre_hooks == before


# ---------------------------------------------------------------------------------------------------
# 3. uninitialised lazy modules: refused before anything changes

def test_measured_patch_refuses_uninitialised_lazy_modules_and_leaves_the_model():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.LazyLinear(16), nn.GELU(), nn.LazyLinear(4)), torch.randn(8, 5)
    with pytest.raises(ValueError, match=r"lazy module\(s\) 0 \(LazyLinear\), 2 \(LazyLinear\); run one forward"):
        invact.patch(model, example=x)
    assert type(model[1]) is nn.GELU and nn.parameter.is_lazy(model[0].weight)
    model(x)                                           # initialised: now it measures
    assert [r.path for r in invact.patch(model, example=x).replaced] == ["1"]


# ---------------------------------------------------------------------------------------------------
# 4. the measurement's own errors are never a reason "the example step fails"

class Bypass(nn.Module):
    """Calls its activation through a reference outside the module tree (as a torch.compile wrapper's forward,
    bound to the module it wraps, does): a replacement at ``act`` never runs. The original shares its hooks
    with the replacement, so the measurement's hooks see the original's calls."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)
        self.__dict__["direct"] = self.act

    def forward(self, x):
        return self.down(self.direct(self.up(x)))


def test_a_replacement_that_never_runs_is_left_with_the_reason():
    torch.manual_seed(0)
    model, x = Bypass(), torch.randn(8, 16)
    report = invact.patch(model, example=x)
    assert not report.replaced and type(model.act) is nn.GELU and model.act is model.direct
    assert [l.path for l in report.left] == ["act"] and "KeyError" not in report.left[0].reason
    assert report.left[0].reason.startswith("its replacement is never called with the swap in place: the original "
                                            "still runs")


@pytest.mark.parametrize("swallow", [False, True], ids=["raised", "caught-by-the-step"])
def test_an_internal_error_is_raised_as_measure_error_not_taken_for_the_step(monkeypatch, swallow):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)), torch.randn(8, 16)
    swapped, run, key = [False], measure.trace_example, save_trace.storage_key

    def failing_run(model, example, sites, active, *args):
        swapped[0] = bool(active)
        return run(model, example, sites, active, *args)

    def failing_key(t):
        if swapped[0]:
            raise KeyError(12345)
        return key(t)

    def step(m):
        try:
            m(x).sum().backward()
        except Exception:  # noqa: BLE001 - a step that hides errors
            if not swallow:
                raise

    monkeypatch.setattr(measure, "trace_example", failing_run)
    monkeypatch.setattr(save_trace, "storage_key", failing_key)     # where trace_example's hooks look it up
    with pytest.raises(RuntimeError, match=r"the measurement failed, not the example step \(KeyError: 12345\)") as info:
        invact.patch(model, example=step)
    assert type(info.value) is measure.MeasureError and type(model[1]) is nn.GELU
