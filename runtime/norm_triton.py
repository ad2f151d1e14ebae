"""Triton kernels of invact's norms (:mod:`invact.norms`): one program per row in the forward, a band of
rows per program in the backward (one pass over y and dy per row; dgamma and dbeta as per-program
partial sums, added by torch). Float32 arithmetic, no FMA contraction (launched with
enable_fp_fusion=False), correctly rounded division and square root (tl.div_rn, tl.sqrt_rn): the eager
formulas' roundings.

Forward, per row: ``mean = sum(x)/N`` (0 for RMSNorm), ``rstd = 1/sqrt(sum((x - mean)^2)/N + eps)``,
``x_hat = (x - mean) * rstd`` (rounded to x's or gamma's dtype first in the Hugging Face "llama" / "t5"
forms), ``y = gamma * x_hat + beta`` with ``gamma = offset + w``.
Backward, per row: ``x_hat = (y - beta) / gamma`` except in kept columns (``slot >= 0``: read from
``extra``); ``c2 = mean(dy * (y - beta))`` (kept columns: ``dy * gamma * x_hat``), ``c1 = mean(dy * gamma)``;
``dx = rstd * (dy * gamma - c1 - x_hat * c2)`` (RMSNorm: no c1).

A row is one block of next_power_of_2(N) elements, at most Triton's largest (2^20): longer rows
(:func:`fits`) are left to the torch code (:func:`forward` and :func:`backward` return None). The warps
of a launch grow with the block (:func:`warps`): 8 elements a thread in the backward, 16 in the forward
(:data:`WARPS`; beyond 8,192 columns the backward spills registers).

Triton launches on the current CUDA device: :mod:`invact.norms` calls :func:`forward` and
:func:`backward` through :func:`invact.impl_triton.launched`, which makes the tensors' device current
for the launch (and the caller's current again after it) and turns a failing kernel into one warning.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["forward", "backward", "fits", "warps", "MAX_BLOCK", "WARPS"]

_CAST_NONE, _CAST_X, _CAST_W = 0, 1, 2
MAX_BLOCK = tl.TRITON_MAX_TENSOR_NUMEL      # elements of one block: a row's longest
# (elements a thread, most warps) of each kernel, from ptxas -v for sm_90 (bf16 LayerNorm): the backward
# takes 128-144 registers at 8 elements a thread and spills at 16 (255), the forward 40 registers at 16; 32
# warps (64 registers a thread) spill less than 16 in the backward of 8,192 columns (332 against 544 bytes)
WARPS = {"forward": (16, 16), "backward": (8, 32)}


@triton.jit
def _forward_kernel(X, W, B, Y, MEAN, RSTD, N, eps, offset, RMS: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, CAST: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        mean = 0.0
        xc = x
    else:
        mean = tl.div_rn(tl.sum(x, axis=0), (N * 1.0))
        xc = tl.where(mask, x - mean, 0.0)
    var = tl.div_rn(tl.sum(xc * xc, axis=0), (N * 1.0))
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    xhat = xc * rstd
    if CAST == 1:
        xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
    if CAST == 2:
        xhat = xhat.to(W.dtype.element_ty).to(tl.float32)
    y = xhat
    if HAS_W:
        y = (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset) * xhat
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _backward_kernel(DY, Y, RSTD, W, B, EXTRA, SLOT, DX, DW, DB, rows, N, K, offset, rows_per_program,
                     RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.full((BLOCK,), 1.0, tl.float32) + offset
    if HAS_W:
        g = tl.load(W + cols, mask=mask, other=1.0).to(tl.float32) + offset
    b = tl.zeros((BLOCK,), tl.float32)
    if HAS_B:
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    slot = tl.load(SLOT + cols, mask=mask, other=-1)
    kept = slot >= 0
    safe_g = tl.where(kept | (~mask), 1.0, g)               # no division by a kept column's gamma
    nf = (N * 1.0)
    dw = tl.zeros((BLOCK,), tl.float32)
    db = tl.zeros((BLOCK,), tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, rows)
    offs = start * N + cols                                  # int64 offsets of the current row
    eoffs = start * K + slot
    for r in range(start, end):
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        t = y - b
        saved = tl.load(EXTRA + eoffs, mask=mask & kept, other=0.0).to(tl.float32)
        xhat = tl.where(kept, saved, tl.div_rn(t, safe_g))
        xhat = tl.where(mask, xhat, 0.0)
        dxhat = dy * g
        s = tl.where(kept, dxhat * xhat, dy * t)
        c2 = tl.div_rn(tl.sum(s, axis=0), nf)
        if RMS:
            dx = (dxhat - xhat * c2) * rstd
        else:
            c1 = tl.div_rn(tl.sum(dxhat, axis=0), nf)
            dx = (dxhat - c1 - xhat * c2) * rstd
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
        offs += N
        eoffs += K
    tl.store(DW + pid * N + cols, dw, mask=mask)
    tl.store(DB + pid * N + cols, db, mask=mask)


def _block(n: int) -> int:
    return max(triton.next_power_of_2(n), 16)


def fits(n: int) -> bool:
    """Whether a row of ``n`` elements fits the kernels' one block (:data:`MAX_BLOCK`)."""
    return _block(n) <= MAX_BLOCK


def warps(block: int, kernel: str) -> int:
    """The warps that launch ``kernel`` ("forward" or "backward") on rows of ``block`` elements:
    :data:`WARPS`' elements a thread, at least 4 warps and at most its most."""
    per_thread, most = WARPS[kernel]
    return min(most, max(4, block // (32 * per_thread)))


def _cast_mode(x: Tensor, weight: Tensor | None, norm_dtype: torch.dtype | None) -> int:
    if norm_dtype is None or norm_dtype == torch.float32:
        return _CAST_NONE
    if norm_dtype == x.dtype:
        return _CAST_X
    if weight is not None and norm_dtype == weight.dtype:
        return _CAST_W
    raise ValueError(f"norm_dtype {norm_dtype} must be x's ({x.dtype}) or the weight's dtype")


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool, offset: float,
            norm_dtype: torch.dtype | None, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor] | None:
    """(y, mean, rstd) for contiguous x of shape (rows, N); mean and rstd float32 of shape (rows,).
    None where a row does not fit a block (:func:`fits`: the caller runs the torch code)."""
    rows, n = x.shape
    if not fits(n):
        return None
    y = torch.empty((rows, n), dtype=out_dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows and n:
        w = weight.reshape(n).contiguous() if weight is not None else x
        b = bias.reshape(n).contiguous() if bias is not None else x
        block = _block(n)
        _forward_kernel[(rows,)](x, w, b, y, mean, rstd, n, float(eps), float(offset), RMS=rms,
                                 HAS_W=weight is not None, HAS_B=bias is not None,
                                 CAST=_cast_mode(x, weight, norm_dtype), BLOCK=block,
                                 num_warps=warps(block, "forward"), enable_fp_fusion=False)
    return y, mean, rstd


def _programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 4)         # the interpreter: about 0.5 ms per program


def backward(dy: Tensor, y: Tensor, rstd: Tensor, extra: Tensor, cols: Tensor, weight: Tensor | None,
             bias: Tensor | None, rms: bool, offset: float,
             dx_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor] | None:
    """(dx, dgamma, dbeta) for contiguous y, dy of shape (rows, N): dx of ``dx_dtype`` on a GPU (computed in float32,
    rounded once as it is stored; float32 on the CPU), dgamma and dbeta float32; None where a row does not fit a block
    (:func:`fits`: the caller runs the torch code)."""
    rows, n = y.shape
    if not fits(n):
        return None
    # Triton's interpreter (CPU tensors) truncates float32 -> 16-bit (docs/floors.md): there dx stays float32 and
    # the caller rounds
    dx = torch.empty((rows, n), dtype=torch.float32 if y.device.type == "cpu" else dx_dtype, device=y.device)
    programs = max(_programs(rows, y.device), 1)
    dw = torch.zeros((programs, n), dtype=torch.float32, device=y.device)
    db = torch.zeros((programs, n), dtype=torch.float32, device=y.device)
    if rows and n:
        k = cols.numel()
        slot = torch.full((n,), -1, dtype=torch.int32, device=y.device)
        slot[cols] = torch.arange(k, dtype=torch.int32, device=y.device)
        extra = extra.contiguous() if k else y
        w = weight.reshape(n).contiguous() if weight is not None else y
        b = bias.reshape(n).contiguous() if bias is not None else y
        per, block = triton.cdiv(rows, programs), _block(n)
        _backward_kernel[(programs,)](dy, y, rstd.contiguous(), w, b, extra, slot, dx, dw, db, rows, n, max(k, 1),
                                      float(offset), per, RMS=rms, HAS_W=weight is not None,
                                      HAS_B=bias is not None, BLOCK=block, num_warps=warps(block, "backward"),
                                      enable_fp_fusion=False)
    return dx, dw.sum(0), db.sum(0)
