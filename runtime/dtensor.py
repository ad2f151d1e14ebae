"""DTensor inputs (tensor parallelism): invact's activations and norms run on each rank's local shard.

An activation is elementwise: each rank computes y = f(x) and the packed code of its own shard, and y is
x's placements again (the code stays a per-rank local tensor: packed over the local elements, it is no
shard of a global code). A norm of x sharded along dimensions it does not normalise (Shard(d) with d
before ``normalized_shape``, as SequenceParallel shards the sequence) works on the local rows; its
weight and bias must be Replicate, and their gradients on a mesh dimension where x is sharded are each
rank's sum over its rows: Partial, as torch's own norm gives them (reduced where they are used, never
dropped). Partial x is reduced first (neither is linear in x). Gradients of y come back through
``DTensor.from_local``'s backward in y's placements (a Partial gradient of a Replicate y is reduced).

The custom ops themselves see local tensors only. Called directly with DTensors, ``invact::value`` has
a pointwise sharding strategy; the others, whose extra outputs (packed code, per-row statistics, kept
columns) are per-rank tensors with no global placement, raise an error saying to call them through
invact's functions and modules (:func:`register`, run once ``torch.distributed.tensor`` is imported).

torch.distributed is never imported here: a DTensor can only exist once it is.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor
from torch._prims_common import make_contiguous_strides_for

from .common.after_import import after_import

__all__ = ["is_dtensor", "pointwise", "norm", "register", "register_when_imported"]

_DTENSOR_MODULE = "torch.distributed.tensor"
_PENDING: list[str] = []   # ops to register once torch.distributed.tensor is imported


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (False, without importing torch.distributed, while it is not imported)."""
    module = sys.modules.get(_DTENSOR_MODULE)
    return module is not None and isinstance(t, module.DTensor)


def _not_partial(x):
    """x with every Partial placement reduced to Replicate (an activation or a norm is not linear in x)."""
    from torch.distributed.tensor import Replicate
    if not any(p.is_partial() for p in x.placements):
        return x
    return x.redistribute(x.device_mesh, [Replicate() if p.is_partial() else p for p in x.placements])


def _wrapped(local: Tensor, x, stride: tuple[int, ...]):
    """``local`` (this rank's result for x's local shard, x's shape) as a DTensor with x's mesh and placements."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=stride)


def pointwise(x: Tensor, run: Callable[[Tensor], Tensor]) -> Tensor:
    """``run`` (an elementwise activation of a plain tensor) on each rank's shard of DTensor ``x``: y in
    x's placements (Partial reduced first) and layout."""
    x = _not_partial(x)
    return _wrapped(run(x.to_local()), x, x.stride())


def _check_rows_sharded(x, normalized: int, op: str) -> None:
    """A ValueError unless every Shard of x is along a dimension before the last ``normalized`` ones."""
    for p in x.placements:
        if p.is_shard() and p.dim % x.dim() >= x.dim() - normalized:
            raise ValueError(
                f"invact.functional.{op} (invact::norm_forward) on a DTensor: input must be sharded only along "
                f"dimensions it does not normalise (Shard(d) with d < {x.dim() - normalized} for an input of "
                f"{x.dim()} dimensions, or Replicate), got placements {tuple(x.placements)}; redistribute it "
                "first (e.g. SequenceParallel shards the sequence dimension)")


def _local_param(p: Tensor | None, name: str, x, op: str) -> Tensor | None:
    """This rank's copy of a Replicate weight or bias whose gradient is this rank's part of the sum over
    rows: Partial on the mesh dimensions where x is sharded, Replicate on the others."""
    from torch.distributed.tensor import Partial, Replicate
    if p is None:
        return None
    if not is_dtensor(p) or p.device_mesh != x.device_mesh or not all(q.is_replicate() for q in p.placements):
        got = f"placements {tuple(p.placements)} on {p.device_mesh}" if is_dtensor(p) else "a plain torch.Tensor"
        raise TypeError(f"invact.functional.{op} on a DTensor input: {name} must be a DTensor with Replicate "
                        f"placements on the input's mesh {x.device_mesh} (as parallelize_module's "
                        f"SequenceParallel makes it), got {got}")
    grads = tuple(Partial() if q.is_shard() else Replicate() for q in x.placements)
    return p.to_local(grad_placements=grads)


def norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, normalized: int, op: str,
         run: Callable[[Tensor, Tensor | None, Tensor | None], Tensor]) -> Tensor:
    """``run(x, weight, bias)`` (a norm over the last ``normalized`` dimensions, of plain tensors) on
    each rank's rows of DTensor ``x``, with Replicate DTensor ``weight`` and ``bias``: y in x's
    placements. ``op`` names the function in errors."""
    if not is_dtensor(x):
        raise TypeError(f"invact.functional.{op}: input must be a DTensor where weight or bias is one, got a "
                        "plain torch.Tensor (DTensor takes no mix of both)")
    x = _not_partial(x)
    _check_rows_sharded(x, normalized, op)
    y = run(x.to_local(), _local_param(weight, "weight", x, op), _local_param(bias, "bias", x, op))
    return _wrapped(y, x, make_contiguous_strides_for(x.shape))


# ----------------------------------------------------------------------------------------------
# the custom ops called directly with DTensors

def _refuse(op: str) -> Callable[..., list]:
    def strategy(*args, **kwargs) -> list:
        raise NotImplementedError(
            f"invact::{op} has no DTensor sharding of its own: its packed code / per-row statistics are per-rank "
            "tensors with no global placement. Call it through invact's functions and modules (invact.functional, "
            "invact.GELU, invact.LayerNorm, patched models), which run it on each rank's local shard and return "
            "DTensors in the input's placements")
    return strategy


def _value_strategy(x, name, params, backend) -> list:
    """invact::value is elementwise: y in x's placement, Replicate or Shard along any dimension (Partial
    x is reduced first: DTensor redistributes to one of these)."""
    from torch.distributed.tensor import Replicate, Shard
    return [([p], [p, None, None, None]) for p in (Replicate(), *(Shard(d) for d in range(x.ndim)))]


def register(ops: list[str] | tuple[str, ...]) -> None:
    """Register invact's ``ops`` (names in torch.ops.invact) with DTensor: a pointwise strategy for
    ``value``, a clear refusal for the others (where torch.distributed is available)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor.experimental import register_sharding
    for op in ops:
        overload = getattr(torch.ops.invact, op).default
        register_sharding(overload)(_value_strategy if op == "value" else _refuse(op))


def register_when_imported(*ops: str) -> None:
    """:func:`register` ``ops`` now if torch.distributed.tensor is imported, else right after its import
    (one import hook for every call)."""
    if _DTENSOR_MODULE in sys.modules:
        register(ops)
        return
    if not _PENDING:
        after_import(_DTENSOR_MODULE, lambda: register(_PENDING))
    _PENDING.extend(ops)
