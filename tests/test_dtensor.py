"""Patched models under tensor parallelism (DTensor): gloo, 2 processes on CPU (torch.multiprocessing.spawn,
rendezvous through a FileStore in tmp_path). Patched before sharding, as the README advises.

Activations: an MLP Linear -> GELU / SiLU -> Linear under ColwiseParallel(use_local_output=False) /
RowwiseParallel, so the activation receives a DTensor Shard(-1); loss = sum(out * g) for a fixed g. The
patched and unpatched models, sharded alike, run the same ops except f'(x) (invact's forward is PyTorch's
own, bitwise): the gradient G_y reaching the activation, the second Linear's gradients and everything
downstream are bitwise equal; the first Linear's dW = (G_y f')^T X and db = sum_rows(G_y f') differ by at
most, per element, delta |G_y|^T |X| (delta: tests/tolerances.py's derivative_error, the per-element bound
on |g(y) - f'(x)| of the dtype, the README's certified table errors plus the information floor) plus the
float rounding of both sides, (2 gamma_R + 2 u) |G_y f'|^T |X| (gamma_R = R u / (1 - R u) for the R rows
of the sum, u the unit roundoff). A gradient placement lost on the way (a missing all-reduce, a wrong
shard) is off by O(1).

Norms: LayerNorm and RMSNorm under SequenceParallel (x Shard(1), weight and bias Replicate): the gradients
of the patched model lie within invact.norm_bounds.error_bound of float64 autograd of torch's norm, per
element (the certified recovery bound from the stored y, which in float64 is float64 rounding), and the
unpatched model's gradients have the same placements (Partial dweight/dbias where x is sharded).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gloo import spawn_gloo
from tolerances import derivative_error

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

WORLD = 2
ROWS, DIM, HIDDEN = 12, 8, 10          # HIDDEN / 2 per rank; an odd per-rank width, so codes are uneven
DTYPES = (torch.float64, torch.float32)
ACTIVATIONS = (("gelu", nn.GELU), ("silu", nn.SiLU))


def _spawn(tmp_path, case, *args) -> None:
    """``case(rank, *args)`` in WORLD processes; a failure in either raises here with its traceback."""
    spawn_gloo(tmp_path, case, *args, world=WORLD)


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (WORLD,))


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _mlp(act: type, dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), act(), nn.Linear(HIDDEN, DIM)).to(dtype)


def _tp_mlp(act: type, dtype: torch.dtype, patched: bool, mesh) -> nn.Sequential:
    import invact
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    model = _mlp(act, dtype)
    if patched:
        invact.patch(model)
    return parallelize_module(model, mesh, {"0": ColwiseParallel(use_local_output=False), "2": RowwiseParallel()})


def _grads(model: nn.Module, x: torch.Tensor, g: torch.Tensor, compile: bool = False) -> list[torch.Tensor]:
    run = torch.compile(model, backend="aot_eager", fullgraph=True) if compile else model
    (_full(run(x)) * g).sum().backward()
    return [_full(p.grad) for p in model.parameters()]


def _mlp_bound(act: type, dtype: torch.dtype, x: torch.Tensor, g: torch.Tensor, delta: float):
    """Per-element bounds on |patched - unpatched| of the first Linear's (dW, db) (module docstring)."""
    model = _mlp(act, torch.float64)
    h = model[0](x.double()).detach().requires_grad_()
    (model[2](model[1](h)) * g.double()).sum().backward()
    gy = (g.double() @ model[2].weight).abs()                      # G_y, the gradient reaching the activation
    gh = h.grad.abs()                                              # G_y f'(x)
    u = torch.finfo(dtype).eps / 2
    gamma = ROWS * u / (1 - ROWS * u)
    xa = x.double().abs()
    ones = torch.ones(ROWS, 1, dtype=torch.float64)
    return [delta * gy.T @ a + (2 * gamma + 2 * u) * gh.T @ a for a in (xa, ones)]


def _check_mlp(rank: int, deltas: dict, compile: bool, dtypes: tuple, activations: tuple) -> None:
    mesh = _mesh()
    for dtype in dtypes:
        torch.manual_seed(1)
        x, g = torch.randn(ROWS, DIM, dtype=dtype), torch.randn(ROWS, DIM, dtype=dtype)
        for name, act in activations:
            ours = _grads(_tp_mlp(act, dtype, True, mesh), x, g, compile)
            theirs = _grads(_tp_mlp(act, dtype, False, mesh), x, g)
            bounds = _mlp_bound(act, dtype, x, g, deltas[name, dtype])
            for a, b, tol in zip(ours[:2], theirs[:2], bounds):
                excess = ((a.double() - b.double()).abs().reshape(tol.shape) - tol).max().item()
                assert excess <= 0, f"{name} {dtype}: the first Linear's gradient exceeds its bound by {excess}"
            for a, b in zip(ours[2:], theirs[2:]):                 # downstream of f': the same ops, bitwise
                assert torch.equal(a, b), f"{name} {dtype}: the second Linear's gradient differs"


def _check_dtensor_inputs(rank: int, delta: float) -> None:
    """SiLU of a DTensor Shard(0), Replicate (its gradient arriving Partial from a column-sharded Linear)
    and Partial (reduced first) input, float64: gradients within delta |G_y| of float64 autograd."""
    import invact.functional as IF
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    mesh = _mesh()
    torch.manual_seed(2)
    x, weight = torch.randn(ROWS, DIM, dtype=torch.float64), torch.randn(HIDDEN, DIM, dtype=torch.float64)
    ref = x.clone().requires_grad_()
    (nn.functional.silu(ref) @ weight.T).sum().backward()
    gy = weight.sum(0).abs()                                       # |G_y| of every row
    w = distribute_tensor(weight, mesh, [Shard(0)])                # ColwiseParallel's weight
    local = {"Shard(0)": (x.chunk(WORLD)[rank], Shard(0)), "Replicate": (x, Replicate()),
             "Partial": (x / WORLD, Partial())}
    for label, (part, placement) in local.items():
        xd = DTensor.from_local(part.clone(), mesh, [placement]).requires_grad_()
        y = IF.silu(xd)
        assert y.shape == x.shape and y.placements == ((Replicate(),) if label == "Partial" else (placement,))
        nn.functional.linear(y, w).full_tensor().sum().backward()
        err = ((xd.grad.full_tensor() - ref.grad).abs() - delta * gy).max().item()
        assert err <= 0, f"silu of a DTensor {label}: the gradient exceeds its bound by {err}"


def _deltas() -> dict:
    return {(name, dtype): derivative_error(name, dtype) for name, _ in ACTIVATIONS for dtype in DTYPES}


def test_tp_mlp_gradients_within_certified_bound(tmp_path):
    _spawn(tmp_path, _check_mlp, _deltas(), False, DTYPES, ACTIVATIONS)


def test_tp_mlp_compiled(tmp_path):
    """torch.compile(fullgraph=True) of the patched TP MLP: the DTensor path traces without a break."""
    _spawn(tmp_path, _check_mlp, _deltas(), True, (torch.float32,), ACTIVATIONS[:1])


def test_activation_of_sharded_replicate_and_partial_dtensors(tmp_path):
    _spawn(tmp_path, _check_dtensor_inputs, derivative_error("silu", torch.float64))


# -- norms under SequenceParallel ------------------------------------------------------------------

def _norm(rms: bool, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    norm = nn.RMSNorm(DIM) if rms else nn.LayerNorm(DIM)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(DIM))
        if not rms:
            norm.bias.copy_(0.1 * torch.randn(DIM))
    return norm.to(dtype)


def _sp_norm(rms: bool, dtype: torch.dtype, patched: bool, mesh) -> nn.Module:
    import invact
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module
    holder = nn.ModuleDict({"norm": _norm(rms, dtype)})
    if patched:
        invact.patch(holder)
    return parallelize_module(holder["norm"], mesh, SequenceParallel())


def _check_norms(rank: int, dtype: torch.dtype) -> None:
    from invact.norm_bounds import error_bound
    from torch.distributed.tensor import DTensor, Shard
    mesh = _mesh()
    for rms in (False, True):
        torch.manual_seed(3)
        x, g = torch.randn(3, 4, DIM, dtype=dtype), torch.randn(3, 4, DIM, dtype=dtype)
        runs = []
        for patched in (True, False):
            norm = _sp_norm(rms, dtype, patched, mesh)
            xd = DTensor.from_local(x.chunk(WORLD, 1)[rank].clone(), mesh, [Shard(1)]).requires_grad_()
            y = norm(xd)
            assert isinstance(y, DTensor) and y.placements == (Shard(1),)
            (y * DTensor.from_local(g.chunk(WORLD, 1)[rank], mesh, [Shard(1)])).sum().backward()
            grads = [xd.grad] + [p.grad for p in norm.parameters()]
            runs.append((y.full_tensor(), grads))
        (y, ours), (_, theirs) = runs
        assert [t.placements for t in ours] == [t.placements for t in theirs]
        w = _norm(rms, dtype)
        refs, tols = error_bound(x.reshape(-1, DIM), w.weight.detach(), None if rms else w.bias.detach(),
                                 g.reshape(-1, DIM), y.reshape(-1, DIM), rms, w.eps or torch.finfo(dtype).eps)
        for grad, ref, tol in zip(ours, refs, tols):
            excess = ((grad.full_tensor().double().reshape(ref.shape) - ref).abs() - tol).max().item()
            assert excess <= 0, f"{'RMSNorm' if rms else 'LayerNorm'} {dtype}: a gradient exceeds its bound"


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_parallel_norms_within_certified_bound(tmp_path, dtype):
    _spawn(tmp_path, _check_norms, dtype)


# -- what is refused --------------------------------------------------------------------------------

def _check_refusals(rank: int) -> None:
    import invact.functional as IF
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    mesh = _mesh()
    x = DTensor.from_local(torch.randn(2, 4, DIM // WORLD), mesh, [Shard(2)])  # sharded along the normalised dim
    w = distribute_tensor(torch.ones(DIM), mesh, [Replicate()])
    with pytest.raises(ValueError, match=r"layer_norm.*sharded only along dimensions it does not normalise"):
        IF.layer_norm(x, (DIM,), w)
    with pytest.raises(TypeError, match=r"rms_norm.*weight must be a DTensor with Replicate"):
        IF.rms_norm(DTensor.from_local(torch.randn(2, 4, DIM), mesh, [Shard(0)]), (DIM,), torch.ones(DIM))
    with pytest.raises(NotImplementedError, match=r"invact::forward has no DTensor sharding"):
        torch.ops.invact.forward(x, "gelu", [], "eager")
    y = torch.ops.invact.value(x, "gelu", [], "eager")                     # pointwise: x's placement
    assert y.placements == x.placements and torch.equal(y.to_local(), nn.functional.gelu(x.to_local()))


def test_refusals_name_invact_and_the_placement(tmp_path):
    _spawn(tmp_path, _check_refusals)
