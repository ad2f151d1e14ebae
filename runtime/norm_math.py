"""Reference math of the output-saving norms (:mod:`invact.norms`), in eager torch (also the fallback): the
forward is PyTorch's / Hugging Face's own formula, op for op; the backward recovers x_hat from y.

Speed (CPU, ``benchmarks/activations.py --norms``): the forward is PyTorch's own kernel plus the kept
columns; on the "compiled" backend the backward is one C kernel (:mod:`invact.norm_cpu`: recovery, dx and
the column sums in one pass per row; float32 / bfloat16 / float16 y, built for the CPU's ISA). Without it,
float64 (and, where the kernel is missing: no C compiler, the kernels off, float32) LayerNorm recovers
``x - mean`` in one Inductor pass for ATen's fused LayerNorm backward, and the others read y and dy in two
Inductor-compiled passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, norm_cpu
from .norm_recovery import acc_dtype, gamma


def _stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, rstd) of each row in float32, (rows, 1)."""
    var, mean = torch.var_mean(x.to(torch.float32), -1, correction=0, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def forward_eager(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool, offset: float,
                  norm_dtype: torch.dtype | None, out_dtype: torch.dtype,
                  layout: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) for x of shape (rows, n): mean and rstd (rows, 1) in the accumulation dtype.
    ``layout``: the same x in the caller's shape and strides, where RMSNorm's mean of squares is reduced (in
    the order torch's rms_norm reduces it: a transposed x sums its rows in another order)."""
    n = x.shape[-1]
    if not rms and not offset and norm_dtype is None:
        acc = acc_dtype(x.dtype)
        w, b = (t if t is None or t.dim() == 1 else t.reshape(n) for t in (weight, bias))
        if x.dtype != acc and x.device.type == "cpu" and all(t is None or t.dtype in (x.dtype, acc) for t in (w, b)):
            # half x on CPU: with float32 parameters torch's kernel returns float32 mean and rstd, and the
            # same y bit for bit (it computes in float32 either way; tests/test_norms.py checks the bits)
            w = x.new_ones(n, dtype=acc) if w is None else w.to(acc)
            b = None if b is None else b.to(acc)
        y, mean, rstd = torch.native_layer_norm(x, (n,), w, b, eps)
        if y.dtype == out_dtype and rstd.dtype == acc:     # the usual case, with no further dispatch
            return y, mean, rstd
        if rstd.dtype != acc:               # a kernel that returns half x's statistics in x's dtype (CPU
            mean, rstd = _stats(x, eps)     # and CUDA do not: see above), recomputed in float32
        return y.to(out_dtype), mean, rstd
    xf = x.to(acc_dtype(x.dtype))
    if rms:
        mean = xf.new_zeros(())
        rstd = torch.rsqrt(_mean_square(xf if layout is None else layout.to(xf.dtype), n) + eps)
        xhat = xf * rstd
    else:
        var, mean = torch.var_mean(xf, -1, correction=0, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        xhat = (xf - mean) * rstd
    if norm_dtype is not None:
        xhat = xhat.to(norm_dtype)
    if weight is not None:
        w = weight.reshape(n)
        y = (w.to(xhat.dtype) + offset) * xhat if offset else w * xhat    # HF: weight * x_hat (Gemma: * (1 + w))
    else:
        y = xhat
    if bias is not None:
        y = y + bias.reshape(n)
    return y.to(out_dtype), mean, rstd


def _mean_square(x: Tensor, n: int) -> Tensor:
    """mean(x^2) over x's fewest trailing dimensions holding ``n`` elements, as (rows, 1)."""
    dims, size = [], 1
    while size != n or not dims:
        dims.append(-1 - len(dims))
        size *= x.shape[dims[-1]]
    return x.pow(2).mean(dims, keepdim=True).reshape(-1, 1)


def _backward_rows(dy: Tensor, y: Tensor, rstd: Tensor, g: Tensor, divisor: Tensor, b: Tensor | None,
                   c2_fix: Tensor, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, c1, c2) from y alone, in gamma's dtype. ``divisor`` is gamma with kept columns set to 1: their
    dx is meaningless and fixed by the caller, which also passes ``c2_fix`` (rows, 1), the kept columns'
    ``dy * gamma * x_hat - dy * (y - beta)`` for the row sum. Plain torch ops: eager, or compiled by
    Inductor (the "compiled" backend)."""
    dyf = dy.to(g.dtype)
    t = y.to(g.dtype) if b is None else y.to(g.dtype) - b          # y - beta = gamma * x_hat
    dxhat = dyf * g
    c2 = ((dyf * t).sum(-1, keepdim=True) + c2_fix) / y.shape[-1]  # mean(dxhat * x_hat), no division
    c1 = dxhat.sum(-1, keepdim=True) / y.shape[-1] if not rms else torch.zeros_like(c2)
    return (dxhat - c1 - t / divisor * c2) * rstd.reshape(-1, 1), c1, c2


def _backward_columns(dy: Tensor, y: Tensor, divisor: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """(dgamma, dbeta): sums over rows of dy * x_hat = dy * (y - beta) / gamma and of dy (a separate
    function: Inductor makes faster code for the row and the column reductions apart)."""
    dyf = dy.to(divisor.dtype)
    t = y.to(divisor.dtype) if b is None else y.to(divisor.dtype) - b
    return (dyf * t).sum(0) / divisor, dyf.sum(0)


_COMPILED = (backends.compiled(_backward_rows), backends.compiled(_backward_columns))


def _x_centered(y: Tensor, b: Tensor | None, divisor: Tensor, rstd: Tensor, dtype: torch.dtype) -> Tensor:
    """x_hat / rstd = (y - beta) / gamma / rstd (x - mean, recovered), rounded to ``dtype``: the input of
    ATen's LayerNorm backward, which multiplies it by rstd again (one pass, compiled by Inductor)."""
    t = y.to(divisor.dtype) if b is None else y.to(divisor.dtype) - b
    return (t / divisor / rstd).to(dtype)


_X_CENTERED = backends.compiled(_x_centered)
# x's dtypes that take ATen's path. Not half x: ATen would sum dgamma and dbeta in x's dtype (bf16: errors
# of 0.1 over 40 rows), and the two compiled passes are as fast there (benchmarks/activations.py --norms).
_ATEN_DTYPES = (torch.float32, torch.float64)


def _backward_aten(dy: Tensor, y: Tensor, rstd: Tensor, extra: Tensor, cols: Tensor, g: Tensor, b: Tensor | None,
                   x_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm's (dx, dgamma, dbeta) by ATen's fused CPU kernel on x - mean = x_hat / rstd recovered from y
    (kept columns: from their saved x_hat), with mean 0 and the saved rstd: it computes x_hat = (x - mean)
    rstd, dx = rstd (dy gamma - mean(dy gamma) - x_hat mean(dy gamma x_hat)), sum(dy x_hat), sum(dy).
    Rounding (x float32 or float64): a few operations in x's dtype, within error_bound's f (gamma_N >= 8 u);
    dx rounded once."""
    n = y.shape[-1]
    rstd = rstd.reshape(-1, 1)
    divisor = g.index_fill(0, cols, 1.0) if cols.numel() else g
    xc = _X_CENTERED(y, b, divisor, rstd, x_dtype)
    if cols.numel():
        xc.index_copy_(1, cols, (extra.to(g.dtype) / rstd).to(x_dtype))
    dx, dg, db = torch.ops.aten.native_layer_norm_backward(dy.to(x_dtype), xc, (n,), torch.zeros_like(rstd), rstd,
                                                           g, b, [True, True, b is not None])
    return dx, dg, db if db is not None else dy.new_empty(0)


def backward_torch(dy: Tensor, y: Tensor, rstd: Tensor, extra: Tensor, cols: Tensor, weight: Tensor | None,
                   bias: Tensor | None, rms: bool, offset: float, compiled: bool,
                   x_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dgamma, dbeta) in the accumulation dtype (C kernel and ATen's LayerNorm path: dx in x's), for
    y and dy of shape (rows, n). ``compiled``: the CPU fast paths (the C kernel of :mod:`invact.norm_cpu`;
    without it ATen's fused kernel for LayerNorm, else Inductor)."""
    n = y.shape[-1]
    acc = acc_dtype(rstd.dtype)
    g = gamma(weight, offset, n, acc, y.device)
    b = None if bias is None else bias.reshape(n).to(acc)
    rstd = rstd.to(acc)
    if compiled and not rms and x_dtype in _ATEN_DTYPES and y.numel() \
            and (y.dtype not in norm_cpu.DTYPE_IDS or norm_cpu.library() is None):
        return _backward_aten(dy, y, rstd, extra, cols, g, b, x_dtype)
    if cols.numel() == n:                                # every column kept: no division at all
        dyf, xhat = dy.to(acc), extra.to(acc)
        dxhat = dyf * g
        c2 = (dxhat * xhat).mean(-1, keepdim=True)
        inner = dxhat - xhat * c2 if rms else dxhat - dxhat.mean(-1, keepdim=True) - xhat * c2
        return inner * rstd.reshape(-1, 1), (dyf * xhat).sum(0), dyf.sum(0)
    kept = cols.numel() > 0
    divisor, c2_fix = g, None
    if kept:
        divisor = g.index_fill(0, cols, 1.0)
        xk = extra.to(acc)
        dyk = dy.index_select(1, cols).to(acc)
        gk = g.index_select(0, cols)
        tk = y.index_select(1, cols).to(acc) - (0.0 if b is None else b.index_select(0, cols))
        c2_fix = (dyk * gk * xk - dyk * tk).sum(-1, keepdim=True)
    out = norm_cpu.backward(dy, y, rstd, g, divisor, b, c2_fix, rms, x_dtype) if compiled else None
    if out is not None:
        dx, c1, c2, dg, db = out
    else:
        rows_fn, columns_fn = _COMPILED if compiled else (_backward_rows, _backward_columns)
        c2_fix = c2_fix if kept else rstd.new_zeros(y.shape[0], 1)
        dx, c1, c2 = rows_fn(dy, y, rstd, g, divisor, b, c2_fix, rms)
        dg, db = columns_fn(dy, y, divisor, b)
    if kept:                                             # the kept columns, from their saved x_hat
        dx.index_copy_(1, cols, ((dyk * gk - c1 - xk * c2) * rstd.reshape(-1, 1)).to(dx.dtype))
        dg.index_copy_(0, cols, (dyk * xk).sum(0))
    return dx, dg, db
