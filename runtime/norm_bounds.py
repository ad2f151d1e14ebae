"""The error bound the tests and benchmarks check the norms' gradients against: how far a backward that
recovers x_hat from the stored y (:mod:`invact.norms`) may be from float64 autograd of torch's own norm,
derived from the rounding of y, of the float32 forward and of the backward's sums (:func:`error_bound`),
and its sum over a module's gradients (:func:`relative_bound`, benchmarks/train.py's NormProbe)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .norm_recovery import default_eps, recovery_floor, weight_offset
from .norms import SavingNorm, style_dtypes

__all__ = ["error_bound", "relative_bound", "forward_error"]

_U32 = 2.0**-24


def _unit(dtype: torch.dtype | None) -> float:
    return 0.0 if dtype is None else torch.finfo(dtype).eps / 2


def _gamma_n(terms: int) -> float:
    """(8 + 2 log2 N) u: the relative error of a float32 sum of N terms (pairwise or blocked)."""
    return (8 + 2 * math.log2(max(terms, 2))) * _U32


def _xhat_error(xhat: Tensor, rstd: Tensor, mabs: Tensor) -> Tensor:
    """f = gamma_N u (|x_hat| + rstd mean|x|): how far a float32 forward's x_hat may be from float64's."""
    return _gamma_n(xhat.shape[-1]) * (xhat.abs() + rstd * mabs)


def forward_error(x: Tensor, rms: bool, eps: float) -> Tensor:
    """Per element of 2-d ``x``: how far a float32 forward's x_hat (any order of its row sums) may be from
    float64's (:func:`error_bound`'s f); an output y = gamma x_hat + beta moves by up to |gamma| times it."""
    return _xhat_error(*_stats64(x, rms, eps))


def _stats64(x: Tensor, rms: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(x_hat, rstd, mean|x|) of 2-d x in float64."""
    xd = x.detach().double()
    mean = torch.zeros_like(xd[..., :1]) if rms else xd.mean(-1, keepdim=True)
    rstd = torch.rsqrt(((xd - mean) ** 2).mean(-1, keepdim=True) + eps)
    return (xd - mean) * rstd, rstd, xd.abs().mean(-1, keepdim=True)


def _reference(x: Tensor, w: Tensor, b: Tensor | None, dy: Tensor, rms: bool, eps: float):
    """float64 autograd of torch's own norm on the same x, gamma, beta."""
    n = x.shape[-1]
    fn = torch.nn.functional
    with torch.enable_grad():                            # also inside backward hooks
        args = [t.detach().double().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
        bias = args[2] if b is not None else None
        y = fn.rms_norm(args[0], (n,), args[1], eps) if rms else fn.layer_norm(args[0], (n,), args[1], bias, eps)
        return torch.autograd.grad(y, args, dy.double())


def error_bound(x: Tensor, w: Tensor, b: Tensor | None, dy: Tensor, y: Tensor, rms: bool, eps: float,
                norm_dtype: torch.dtype | None = None,
                offset: float = 0.0) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
    """((dx, dgamma[, dbeta]) of float64 autograd of torch's norm on x, gamma = ``w`` + ``offset`` (Gemma:
    1 + w), beta ``b``; bounds on how far a backward from the stored ``y`` (2-d: rows, N) may be from them,
    per element; dgamma is rounded to w's dtype), for the tests and benchmarks/train.py. The bound does
    not grow as gamma shrinks (the kept columns' promise).

    The stored y's error is measured, not assumed (docs/floors.md: PyTorch's kernels need not round
    correctly; its bf16 layer_norm rounds more than once): k_y = max (|y - y_64| - |gamma| f) / (u_y
    (|gamma x_hat| + |beta|) + u_y floor), at least 1, with u_y y's unit roundoff, floor
    :func:`invact.norms.recovery_floor` (u_y floor: y's error near 0, with denormals kept or flushed) and f
    (below) the part the forward's float32 x_hat explains (x - mean cancels where x_hat is near 0).
    Recovered x_hat_j (x_hat rounded to norm_dtype first in the Hugging Face "llama" form; float32
    subtraction and division, 2 u): for a column with |gamma_j| >= |beta_j| + floor (the rule) the error
    is at most (k_y u_y + u_n + 2u)(|x_hat| + |beta|/|gamma| + floor/|gamma|)
    <= (k_y u_y + u_n + 2u)(|x_hat| + 1);
    a kept column's x_hat is stored in x's dtype: u_x |x_hat|. Both are within
        e = (k_y u_y + u_x + u_n + 2u)(|x_hat| + 1) + f,
    f = gamma_N u (|x_hat| + rstd mean|x|): the float32 forward's x_hat (sums of N terms, gamma_N =
    (8 + 2 log2 N) u for pairwise sums, or float32 blocks of at most 8 terms summed in double as
    invact.norm_cpu does; the mean's cancellation scales with mean|x| rstd).
    dx = rstd (dy gamma - mean(dy gamma) - x_hat c), c = mean(dy gamma x_hat):
        |err dx| <= rstd (|c| e + (|x_hat| + e) mean(|dy gamma| e) + gamma_N (|dy gamma| + mean|dy gamma| + |x_hat c|))
                    + gamma_N (1 + rstd mean|x|) |dx| (rstd's own float32 error: the variance of a row whose
                    mean is far from 0 cancels, as x_hat's does) + u_x |dx| (the final rounding);
    (|x_hat| + e) keeps the product of the two errors, x_hat's and c's, which matters where x_hat is ~0 (a
    row that rounds to nearly constant) and e is not.
    dgamma_j = sum_i dy x_hat: sum_i |dy| e + gamma_R sum_i |dy x_hat| + u_w |dgamma|; dbeta: gamma_R sum|dy| + u_w |dbeta|.
    """
    gd = w.double() + offset
    gx, gw, *gb = _reference(x, gd, b, dy, rms, eps)
    xhat, rstd, mabs = _stats64(x, rms, eps)
    rows = x.numel() // x.shape[-1]
    gn, gr = _gamma_n(x.shape[-1]), _gamma_n(rows)
    u_y, u_x, u_n, u_w = _unit(y.dtype), _unit(x.dtype), _unit(norm_dtype), _unit(w.dtype)
    dyd = dy.double()
    bd = 0.0 if b is None else b.double()
    f = _xhat_error(xhat, rstd, mabs)
    scale = u_y * ((gd * xhat).abs() + abs(bd) + recovery_floor(y.dtype))
    k_y = max(1.0, ((y.double() - (gd * xhat + bd)).abs() - gd.abs() * f).div(scale).max().item())
    e = (k_y * u_y + u_x + u_n + 2 * _U32) * (xhat.abs() + 1) + f
    c = (dyd * gd * xhat).mean(-1, keepdim=True)
    dxh = (dyd * gd).abs()
    tol_x = rstd * (c.abs() * e + (xhat.abs() + e) * (dxh * e).mean(-1, keepdim=True)
                    + gn * (dxh + dxh.mean(-1, keepdim=True) + (xhat * c).abs())) \
        + (gn * (1 + rstd * mabs) + u_x) * gx.abs()
    tol_w = (dyd.abs() * e).sum(0) + gr * (dyd * xhat).abs().sum(0) + u_w * gw.abs()
    tol_b = gr * dyd.abs().sum(0) + u_w * gb[0].abs() if gb else None
    return (gx, gw, *gb), (tol_x, tol_w, tol_b)


def relative_bound(module: nn.Module, x: Tensor, y: Tensor, grad_y: Tensor) -> float:
    """The relative gradient error :func:`error_bound` allows a norm module (torch.nn.LayerNorm / RMSNorm,
    or invact's) that was called on ``x``, whose output is stored as ``y`` (in the dtype the replacement
    stores it) and which received ``grad_y``: the sum over its gradients (dx, dgamma, dbeta) of
    ||bound|| / ||gradient||. Summed over layers it estimates a whole gradient's relative error
    (benchmarks/train.py's NormProbe, tests/test_distributed.py)."""
    if not isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        raise TypeError(f"relative_bound: module must be a torch.nn.LayerNorm or RMSNorm, got {type(module).__name__}")
    shape = module._shape_for(x) if isinstance(module, SavingNorm) else module.normalized_shape   # None: any size
    rms, n = isinstance(module, nn.RMSNorm), math.prod(shape)
    style = getattr(module, "style", "torch")
    w = module.weight.detach().reshape(n) if module.weight is not None else x.new_ones(n)
    bias = getattr(module, "bias", None)
    eps = module.eps if module.eps is not None else default_eps(x.dtype)
    norm_dtype = style_dtypes(style, x.dtype, w.dtype)[0]
    refs, tols = error_bound(x.reshape(-1, n), w, None if bias is None else bias.detach().reshape(n),
                             grad_y.reshape(-1, n), y.reshape(-1, n), rms, eps, norm_dtype,
                             weight_offset(style) if module.weight is not None else 0.0)
    return sum((tol.norm() / ref.norm().clamp_min(1e-30)).item() for ref, tol in zip(refs, tols) if tol is not None)
