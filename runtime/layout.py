"""Memory layout of the activation ops: kernels run over y's elements in storage order.

y keeps x's memory format, as torch.nn.functional's elementwise ops do (TensorIterator's output
strides), and the packed code covers y's elements in that order. Documented internals: :func:`order`,
:func:`dense_strides`, :func:`like`, :func:`flat`, :func:`empty_code`, :func:`as_packed`,
:func:`backward_views` and :func:`backward_buffers`; :func:`is_jagged` and :func:`on_jagged_values` run an
elementwise function on a jagged nested tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from . import bitpack

__all__ = ["order", "dense_strides", "like", "flat", "empty_code", "as_packed", "backward_views", "backward_buffers",
           "is_jagged", "on_jagged_values"]


def order(t: Tensor) -> list[int]:
    """Dimensions from outermost to innermost in memory, ordered as TensorIterator orders an
    elementwise op's output (so y gets PyTorch's strides): an insertion sort by stride, innermost
    first, where a comparison with a stride-0 (expanded) dimension is ambiguous and leaves the pair
    in place, and equal strides put the smaller size inside. For a dense t, t.permute(order) is
    contiguous. Cached per shape and strides (symbolic ones, under tracing, are sorted each time)."""
    return list(_per_layout(_order, t))


def _concrete(values: tuple) -> bool:
    """Whether sizes or strides are plain ints (not symbolic, as under tracing with dynamic shapes)."""
    return all(type(v) is int for v in values)


def _per_layout(fn, t: Tensor):
    """fn(shape, strides) of t, cached where they are concrete (symbolic ones: computed each time)."""
    shape, strides = tuple(t.shape), tuple(t.stride())
    return (fn if _concrete(shape + strides) else fn.__wrapped__)(shape, strides)


@functools.lru_cache(maxsize=1024)
def _order(shape: tuple, strides: tuple) -> tuple[int, ...]:
    def after(d0: int, d1: int) -> int:       # 1: d0 goes outside d1, -1: inside, 0: ambiguous
        s0, s1 = strides[d0], strides[d1]
        if s0 == 0 or s1 == 0:
            return 0
        if s0 != s1:
            return 1 if s0 > s1 else -1
        return 1 if shape[d0] > shape[d1] else 0
    perm = list(range(len(shape) - 1, -1, -1))
    for i in range(1, len(perm)):
        d1 = i
        for d0 in range(i - 1, -1, -1):
            c = after(perm[d0], perm[d1])
            if c > 0:
                perm[d0], perm[d1] = perm[d1], perm[d0]
                d1 = d0
            elif c < 0:
                break
    return tuple(perm[::-1])


def require_strided(x: Tensor, what: str) -> None:
    """Raise a TypeError naming ``what`` (e.g. "invact.functional.layer_norm: input") unless x is a dense
    (strided) tensor: nested and sparse tensors have no strides to lay y out by."""
    if x.layout is not torch.strided or x.is_nested:
        raise TypeError(f"{what} must be a dense (strided) tensor, got a {'nested' if x.is_nested else x.layout} "
                        "one (apply it to a nested tensor's .values(), or to a sparse one's .to_dense())")


def is_jagged(x: Tensor) -> bool:
    """x is a nested tensor of layout torch.jagged (its elements are a dense ``x.values()``)."""
    return x.is_nested and x.layout is torch.jagged


def on_jagged_values(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """An elementwise ``fn`` of a jagged nested tensor x: ``fn(x.values())`` rewrapped with x's offsets, lengths,
    ragged dimension and cached sequence lengths (the same nested size, so y + x works), as PyTorch runs
    its own unary pointwise ops on jagged tensors. The values are taken by :class:`_JaggedValues`, whose
    backward keeps x's structure only: ``x.values()``'s own backward saves x, which kept the input alive
    that invact's ops free."""
    values = _JaggedValues.apply(x) if x.requires_grad and torch.is_grad_enabled() else x.values()
    return _like_jagged(fn(values), x)


def _like_jagged(values: Tensor, x: Tensor) -> Tensor:
    """``values`` as a jagged nested tensor of x's structure."""
    return _wrap(values, _structure(x))


def _structure(x: Tensor) -> tuple:
    """What a jagged x's values need to be x again: offsets, lengths, ragged dimension, cached lengths."""
    return x.offsets(), x.lengths(), x._ragged_idx, x._maybe_min_seqlen, x._maybe_max_seqlen


def _wrap(values: Tensor, structure: tuple) -> Tensor:
    offsets, lengths, ragged, shortest, longest = structure
    return torch.nested.nested_tensor_from_jagged(values, offsets, lengths=lengths, jagged_dim=ragged,
                                                  min_seqlen=shortest, max_seqlen=longest)


class _JaggedValues(torch.autograd.Function):
    """``x.values()`` whose backward rewraps the gradient with x's structure: it keeps x's offsets and
    lengths (x's own, small), never x's values."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.structure = _structure(x)
        return x.values().detach()     # the same memory as x's values, as values() is

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _wrap(grad, ctx.structure)


def dense_strides(x: Tensor) -> tuple[int, ...]:
    """Strides of a dense tensor shaped like x in :func:`order`'s memory order (no allocation)."""
    return _per_layout(_dense_strides, x)


@functools.lru_cache(maxsize=1024)
def _dense_strides(shape: tuple, strides: tuple) -> tuple:
    out, step = [0] * len(shape), 1
    for d in reversed(_order.__wrapped__(shape, strides)):
        out[d] = step
        step *= max(shape[d], 1)
    return tuple(out)


def like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A new dense tensor shaped like x with x's memory order (what TensorIterator gives an output).
    Where x is dense already, those are x's strides, which ``torch.empty_like`` keeps (the faster call)."""
    if type(x) is Tensor and x.is_contiguous() and min(x.shape, default=2) > 1:  # (no fake or symbolic sizes)
        return torch.empty_like(x, dtype=dtype)  # every size > 1: the contiguous strides are the only dense ones
    strides = dense_strides(x)
    if _concrete(strides) and strides == x.stride():  # (symbolic strides are never compared: no guard)
        return torch.empty_like(x, dtype=dtype)
    return torch.empty_strided(x.shape, strides, dtype=dtype or x.dtype, device=x.device)


def flat(t: Tensor, dims: list[int]) -> Tensor:
    """t's elements in the order of ``dims`` (outermost first), as one dimension (a view where it can)."""
    return t.reshape(-1) if dims == list(range(t.dim())) else t.permute(dims).reshape(-1)


def empty_code(x: Tensor, bits: int) -> Tensor:
    """An uninitialised packed code of ``bits`` per element of x (no bytes for ``bits`` 0)."""
    return x.new_empty((bitpack.packed_bytes(x.numel(), bits) if bits else 0,), dtype=torch.uint8)


def as_packed(y: Tensor, strides: tuple[int, ...]) -> Tensor:
    """``y`` with the ``strides`` it had when the forward packed its code (in y's memory order, :func:`order`):
    y itself, or a copy laid out so where a saved-tensor hook gave y back in another layout
    (``torch.autograd.graph.save_on_cpu`` and offloading hooks return contiguous copies)."""
    if y.stride() == strides:
        return y
    return torch.empty_strided(y.shape, strides, dtype=y.dtype, device=y.device).copy_(y)


def backward_views(grad: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, flat grad (contiguous), flat y, flat grad_x): grad_x a new tensor laid out like y, the
    flat views in y's memory order, the order the code was packed in."""
    out = like(y)
    if y.is_contiguous() and grad.is_contiguous():  # y's memory order is the logical one
        return out, grad.view(-1), y.view(-1), out.view(-1)
    dims = order(y)
    return out, flat(grad, dims).contiguous(), flat(y, dims), flat(out, dims)


def backward_buffers(grad: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`backward_views` for kernels that take data pointers and element counts (the C kernels):
    every tensor contiguous, in y's memory order, but shaped as it comes where y and grad are
    contiguous already (no views made: ~1 us each, of a few-us kernel at small sizes)."""
    if y.is_contiguous() and grad.is_contiguous():
        out = like(y)
        return out, grad, y, out
    out, gf, yf, of = backward_views(grad, y)
    return out, gf, yf.contiguous(), of
