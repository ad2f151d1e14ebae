"""A built-in refitted under a new name at other parameter values keeps PyTorch's forward only where
that forward reads the parameters: F.selu(x) holds scale and alpha at PyTorch's defaults, so a table of
selu at scale = 0.5 (`invact fit selu --param scale=0.5 --name NEW`, the runtime's own hint for it) must
compute y from its formula. It called F.selu at its fitted values: y(1) = 1.0507 instead of 0.5, and
g of that y from the scale-0.5 table, so gradient 0 at x = -1 (autograd: 0.5 * 1.6733 * e^-1 = 0.31)."""

from __future__ import annotations

import pytest
import torch

from helpers import CHEAP


@pytest.fixture
def selu_half(tmp_path, layered):
    import invact
    from invact.fitting import cli
    assert cli.main(["fit", "selu", "--param", "scale=0.5", "--name", "selu_half", "--root", str(tmp_path),
                     *CHEAP]) == 0
    invact.use_root(tmp_path)
    return invact


def test_selu_refitted_at_other_scale_computes_its_own_formula(selu_half):
    """y and the gradient against float64 autograd of scale * (x if x > 0 else alpha * (e^x - 1)) at
    scale 0.5: y within 2^-21 relative (expm1 within 1 ulp, 2^-23 relative, and at most two rounded
    products, 2^-24 each; y = 0 exactly at x = 0),
    the gradient within the table's certified error (relative to max(1, |f'|), as certified) plus the
    float32 y's rounding carried through g (|g'| <= 1 here: another 2^-21)."""
    invact = selu_half
    x = torch.linspace(-4, 4, 81)
    x32 = x.clone().requires_grad_()
    y = invact.activation("selu_half")(x32)
    y.sum().backward()
    x64 = x.double().requires_grad_()
    alpha = 1.6732632423543772848170429916717
    want = 0.5 * torch.where(x64 > 0, x64, alpha * torch.expm1(x64))
    want.sum().backward()
    assert torch.allclose(y.detach().double(), want.detach(), rtol=2.0**-21, atol=0), (y, want)
    cert = invact.ops.info("selu_half")["certificate"]
    bound = cert["approx_error"] + cert["float32_eval_error"] + 2.0**-21
    assert ((x32.grad.double() - x64.grad).abs() <= bound * x64.grad.abs().clamp(min=1)).all(), (x32.grad, x64.grad)
