"""Inputs and checks shared by the norm tests on CPU (tests/test_norms.py) and GPU (tests/test_cuda.py):
gamma and beta of a kind, the forward and backward through invact.functional, and the check of a
gradient against float64 autograd within :func:`invact.norm_bounds.error_bound`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import invact
from invact import norm_bounds


def gammas(n: int, kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma, beta) float64 of a kind: exact zeros, tiny, huge, or trained-like (most near 1, a few tiny,
    beta sometimes larger than gamma)."""
    w = 1 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "zeros":
        w[::5] = 0.0
    elif kind == "tiny":
        w[1::3] = torch.tensor([1e-3, 1e-8, 1e-30, -1e-12], dtype=torch.float64).repeat(n)[: len(w[1::3])]
    elif kind == "huge":
        w[::4] = 1e4
        b[1::4] = 1e3
    elif kind == "trained":
        w[torch.randperm(n, generator=g)[:3]] = torch.tensor([0.0, 2e-4, -1e-6], dtype=torch.float64)[: min(n, 3)]
        b[::7] = 2.0
    return w, b


def check(got, ref, tol, what):
    """got finite and within tol of the float64 reference ref, elementwise; what names it in a failure."""
    err = (got.double() - ref).abs()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    worst = (err / tol).max().item()
    assert (err <= tol).all(), f"{what}: error {err.max().item():.3g} exceeds the bound (worst ratio {worst:.3g})"


def run_norm(x, w, b, dy, rms, eps, backend="eager"):
    """(y, (dx, dgamma[, dbeta])) of invact's layer_norm (rms_norm where ``rms``) over the last dimension."""
    xs = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    n = x.shape[-1]
    y = invact.functional.rms_norm(xs[0], (n,), xs[1], eps, backend=backend) if rms else \
        invact.functional.layer_norm(xs[0], (n,), xs[1], xs[2], eps, backend=backend)
    return y, torch.autograd.grad(y, xs, dy)


def kernel_case(n: int, dtype: torch.dtype, rms: bool, rows: int):
    """(x, gamma, beta or None where ``rms``, dy) of the Triton kernels' tests: gamma with exact zeros and
    tiny values, so kept columns go through the kernels too."""
    g = torch.Generator().manual_seed(n)
    wd, bd = gammas(n, "tiny" if n > 1 else "plain", g)
    x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    w, b = wd.to(dtype), (None if rms else bd.to(dtype))
    w[::5] = 0.0
    dy = torch.randn(rows, n, generator=g).to(dtype)
    return x, w, b, dy


def check_kernel_case(x, w, b, dy, y, grads, rms: bool, eps: float, what: str) -> None:
    """A forward y and its gradients (CPU tensors) against float64 autograd of torch's norm. y: within 2
    eps |y| (the interpreter truncates, < 1 ulp; torch rounds to nearest, 1/2 ulp) plus |gamma| times
    norm_bounds.forward_error (each side's float32 x_hat, row sums in another order); gradients within
    norm_bounds.error_bound (the measured k_y of the stored y covers a truncating store)."""
    n = x.shape[-1]
    ref_y = F.rms_norm(x, (n,), w, eps) if rms else F.layer_norm(x, (n,), w, b, eps)
    fi = torch.finfo(x.dtype)
    f = norm_bounds.forward_error(x, rms, eps)
    assert ((y.double() - ref_y.double()).abs() <= 2 * fi.eps * ref_y.double().abs() + 2 * w.double().abs() * f
            + fi.tiny).all(), f"{what} y"
    refs, tols = norm_bounds.error_bound(x, w, b, dy, y, rms, eps)
    for got, ref, tol, name in zip(grads, refs, tols, ("dx", "dgamma", "dbeta")):
        check(got, ref, tol, f"{what} {name}")
