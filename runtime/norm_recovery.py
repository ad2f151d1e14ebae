"""The recoverability rule of the output-saving norms (:mod:`invact.norms`): which columns' x_hat can be
recovered from the saved ``y = gamma * x_hat + beta``, and which the norm keeps instead.

Small gamma. ``y`` is rounded to its dtype (unit roundoff ``u``), so the recovered ``x_hat_j`` is off by
up to ``u * (|x_hat_j| + |beta_j| / |gamma_j|) + u * floor / |gamma_j|`` (plus float32 arithmetic): the
division amplifies beta's share and a y near 0, which is off by up to ``u * floor`` (:func:`recovery_floor`: y's
``tiny`` with gradual underflow; ``tiny / u`` of the dtype y is computed in where denormals are flushed to 0,
``torch.set_flush_denormal(True)``, for either mode). A column is *recoverable* when
``|gamma_j| >= |beta_j| + floor`` (:data:`RATIO` = 1), which bounds that error by
``u * (|x_hat_j| + 1)``: never more than one unit of y's rounding beyond the information floor
``u |x_hat_j|`` of any output-saving norm. The other columns (exact zeros, tiny gamma, beta larger than
gamma) keep their ``x_hat`` (in x's dtype, a ``(rows, k)`` tensor); when more than half the columns are
such, the layer keeps ``x_hat`` for every column (x's bytes, as PyTorch keeps x). :func:`recovery`
says which, and why.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

RATIO = 1.0             # recoverable column: |gamma_j| * RATIO >= |beta_j| + floor(y's dtype)


def weight_offset(style: str) -> float:
    """gamma = offset + w: 1 for the "gemma" style (weights stored as w = gamma - 1), else 0."""
    return 1.0 if style == "gemma" else 0.0


@dataclass(frozen=True)
class Recovery:
    """What a norm keeps for backward besides ``y`` and ``rstd``: ``columns`` (indices whose x_hat is
    kept), ``fallback`` (x_hat kept for every column), ``reason`` (one sentence)."""

    columns: tuple[int, ...]
    fallback: bool
    reason: str


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype invact computes in for tensors of ``dtype``: float64 for float64, else float32 (a norm's
    statistics, and an activation's g: :mod:`invact.constants`)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_eps(dtype: torch.dtype) -> float:
    """F.rms_norm's eps=None: the epsilon of its accumulation type (ATen's opmath_type: float32 for the
    16-bit types)."""
    return torch.finfo(acc_dtype(dtype)).eps


@functools.cache
def recovery_floor(y_dtype: torch.dtype) -> float:
    """The recoverability rule's absolute term: a y of this dtype near 0 is off by at most ``u * floor`` (u its
    unit roundoff) with denormals kept (y's ``tiny``) or flushed (``tiny / u`` of y's arithmetic, float32 or
    float64 for float64 y: flushing sends a result below that tiny to 0). One rule for both modes: flushing is
    set per thread (ATen's workers compute y), and it keeps only gamma below 2e-31 (float32 y), 3e-36
    (bfloat16) or 2e-292 (float64) more; float16's is its tiny, 6.1e-5, in both."""
    fy = torch.finfo(y_dtype)
    return max(fy.tiny, torch.finfo(acc_dtype(y_dtype)).tiny / (fy.eps / 2))


@functools.cache
def floor_in(y_dtype: torch.dtype, gamma_dtype: torch.dtype) -> float:
    """:func:`recovery_floor`, never below the smallest normal of the dtype the rule computes in (float64
    y's floor is 0 in float32: a zero gamma of float32 weights would pass ``0 >= 0``)."""
    return max(recovery_floor(y_dtype), torch.finfo(gamma_dtype).tiny)


def recoverable(gamma: Tensor, beta: Tensor | None, y_dtype: torch.dtype) -> Tensor:
    """True where x_hat_j can be recovered from y within the bound (False for NaN gamma)."""
    limit = floor_in(y_dtype, gamma.dtype) + (beta.abs().to(gamma.dtype) if beta is not None else 0.0)
    return (gamma.abs() if RATIO == 1 else gamma.abs() * RATIO) >= limit


def _bad_mask(gamma: Tensor, beta: Tensor | None, y_dtype: torch.dtype) -> Tensor:
    """True where x_hat_j cannot be recovered from y within the bound (NaN gamma counts as bad)."""
    return ~recoverable(gamma, beta, y_dtype)


def kept_columns(bad: Tensor) -> Tensor:
    """Indices of the columns whose x_hat is kept: the bad ones, or all when more than half are bad."""
    n = bad.numel()
    cols = bad.nonzero().reshape(-1)
    if 2 * cols.numel() > n:
        return torch.arange(n, device=bad.device)
    return cols


def gamma(weight: Tensor | None, offset: float, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """gamma = offset + w in ``dtype``; 1 without a weight (the forward computes y = x_hat + beta: the
    offset belongs to a stored weight)."""
    if weight is None:
        return torch.ones(n, dtype=dtype, device=device)
    g = weight.reshape(n).to(dtype)
    return g + offset if offset else g


def recovery(weight: Tensor | None, bias: Tensor | None = None, y_dtype: torch.dtype = torch.float32,
             offset: float = 0.0) -> Recovery:
    """Which columns a norm with these parameters keeps x_hat for, when its output is ``y_dtype``."""
    if weight is None and bias is None:
        return Recovery((), False, "no affine parameters: x_hat = y exactly")
    param = weight if weight is not None else bias
    if param.is_meta:
        return Recovery((), False, "weights on the meta device: no values yet (each call decides from its weights)")
    with torch.no_grad():
        acc = torch.promote_types(acc_dtype(param.dtype), acc_dtype(y_dtype))  # as the forward: float64 y, float64 rule
        g = gamma(None if weight is None else weight.detach(), offset, param.numel(), acc, param.device)
        bad = _bad_mask(g, None if bias is None else bias.detach().reshape(-1), y_dtype)
        cols = kept_columns(bad)
    k, n = int(bad.sum()), bad.numel()
    rule = f"|gamma_j| < |beta_j| + {floor_in(y_dtype, g.dtype):.3g} ({y_dtype}'s floor: invact.norms.recovery_floor)"
    if cols.numel() == n and k:
        return Recovery(tuple(range(n)), True, f"{k} of {n} columns have {rule}: x_hat kept for every column "
                        "(x's bytes, no saving)")
    if k:
        return Recovery(tuple(cols.tolist()), False, f"{k} of {n} columns have {rule}: their x_hat kept "
                        f"({k}/{n} of x's bytes)")
    return Recovery((), False, "every column recoverable from y")
