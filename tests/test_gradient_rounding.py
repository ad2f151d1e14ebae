"""Gradients computed from rounded values (precision audit, 2026-12-07): a closed-form g(y) of a rounded y
keeps its branch's sign, and the norms' error bound holds where rows sit far from zero.

ELU's g = alpha + y (CELU's (alpha + y) / alpha, SELU's alpha * scale + y) is exact for the exact y, but a
16-bit y = alpha * (e^x - 1) rounds below -alpha where alpha is not a 16-bit number (bfloat16, alpha = 1.1:
y = -1.1015625), and g came out negative (-0.0016) where f' = alpha e^x > 0 and PyTorch gives ~1e-13: the
sign of every saturated input's gradient wrong. The generated code now clamps every closed form to its
branch's sign (``invact.fitting.codegen.analysis.signed``).
"""

from __future__ import annotations

import pytest
import torch

import invact


def _all(dtype: torch.dtype) -> torch.Tensor:
    """Every finite non-positive value of a 16-bit dtype (the branch where g is a closed form in y)."""
    x = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return x[x.isfinite() & (x <= 0)]


CASES = [("elu", {"alpha": a}) for a in (1.1, 0.3, 12345.678)] + [("celu", {"alpha": a}) for a in (0.3, 1.1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{p['alpha']}" for n, p in CASES])
@pytest.mark.parametrize("backend", ["compiled", "eager"])
def test_closed_form_gradient_keeps_its_sign_and_what_y_allows(name, params, dtype, backend):
    x = _all(dtype).requires_grad_()
    fn = getattr(invact.functional, name)
    y = fn(x, backend=backend, **params)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert (g >= 0).all(), g[g < 0][:4]                  # was -0.0016 (alpha 1.1) to -6.3 (alpha 12345.678)
    alpha = params["alpha"]
    x64 = x.detach().double()
    scale = 1.0 if name == "elu" else 1.0 / alpha       # CELU: y = alpha (e^(x/alpha) - 1), f' = (alpha + y) / alpha
    y_exact = alpha * torch.expm1(x64 * scale)
    exact = (alpha + y_exact) * scale                    # f'(x), float64
    # what the stored y allows: |y - y_exact| (its rounding, and PyTorch's forward error), times dg/dy = scale;
    # float32's rounding of alpha (PyTorch's own backward rounds it too) and of the sum, each 2^-24 relative
    alpha32 = abs(torch.tensor(alpha, dtype=torch.float32).double().item() - alpha)
    allowed = ((y.detach().double() - y_exact).abs() + alpha32 + 2.0**-23 * (alpha + y_exact.abs())) * scale
    # the gradient is rounded to the dtype (half an ulp, 2^-8 / 2^-11 relative) and may flush below its tiny
    fi = torch.finfo(dtype)
    allowed += g.double().abs() * fi.eps + fi.smallest_normal
    err = (g.double() - exact).abs()
    assert (err <= allowed).all(), (err - allowed).max()



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_bound_holds_where_rows_sit_far_from_zero(dtype):
    """invact.norm_bounds.error_bound, what the norm tests check against, took rstd's float32 error as
    gamma_N u; where a row's mean is 1e4 its std (1) cancels out of the variance and float32's rstd is
    7e-5 off (torch's own dx then broke the bound 3.4x; bf16/fp16 rows that round to nearly constant,
    139-384x, for want of the product of x_hat's and c's errors). Both torch's and invact's dx are
    within it now; LayerNorm without bias has a reference too (it raised IndexError)."""
    from invact import norm_bounds
    g = torch.Generator().manual_seed(0)
    rows, n = 32, 256
    x = (1e4 + torch.randn(rows, n, generator=g, dtype=torch.float64)).to(dtype)
    w = torch.ones(n, dtype=dtype)
    dy = torch.randn(rows, n, generator=g).to(dtype)
    for bias in (torch.zeros(n, dtype=dtype), None):
        ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = invact.functional.layer_norm(ours, (n,), w, bias, 1e-5)
        y.backward(dy)
        torch.nn.functional.layer_norm(theirs, (n,), w, bias, 1e-5).backward(dy)
        refs, tols = norm_bounds.error_bound(x, w, bias, dy, y.detach(), False, 1e-5)
        for got in (ours.grad, theirs.grad):
            assert ((got.double() - refs[0]).abs() <= tols[0]).all()
