"""The norm probe's verdict in ulps of each row's scale (2026-12-07, hunt B): Cohere's LayerNorm computes
``weight * x_hat`` in float32 torch ops, which rounds about an ulp of the row's largest output away from
torch's fused layer_norm; measured per element, an output near zero made that 38.9 "ulps" and every
Cohere norm was left, keeping its input saved. And a norm whose forward cannot take the probe's layout
(ConvNeXt's channels_first LayerNorm) said only that its forward raised."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import invact
from invact import norm_bounds, norm_patch
from norm_cases import check

transformers = pytest.importorskip("transformers")
from transformers.models.cohere.modeling_cohere import CohereLayerNorm  # noqa: E402
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm  # noqa: E402

N = 64


def _sandwich(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(N, N), norm, nn.Linear(N, N))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cohere_layer_norm_is_swapped(dtype):
    torch.manual_seed(0)
    ref = CohereLayerNorm(N, eps=1e-5, bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(N) * 0.5 + 1)
    ref = ref.to(dtype)
    model = _sandwich(copy.deepcopy(ref))
    report = invact.patch(model)
    assert len(report) == 1 and isinstance(model[1], invact.LayerNorm) and model[1].bias is None, report
    note = report.replaced[0].note
    assert "bit for bit" in note or "ulps of the row's largest output" in note, note
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(40, N, generator=g, dtype=torch.float64) * 2 + 0.3).to(dtype).requires_grad_()
    dy = torch.randn(40, N, generator=g).to(dtype)
    got = model[1](x)
    w = ref.weight.detach().double()
    _check_forward(got, x, w, None)
    (dx,) = torch.autograd.grad(got, x, dy)
    refs, tols = norm_bounds.error_bound(x.detach(), w, None, dy, got.detach(), False, 1e-5)
    check(dx, refs[0], tols[0], f"Cohere {dtype} dx")


def _check_forward(got: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None) -> None:
    """y against float64 LayerNorm within tests/norm_cases.check_kernel_case's bound (2 eps |y|, and
    |gamma| times each side's x_hat error, norm_bounds.forward_error): the probe's 2 row-ulps against the
    original held on the probe's rows, which is no bound for other rows."""
    want = torch.nn.functional.layer_norm(x.detach().double(), (N,), gamma, beta, 1e-5)
    fi = torch.finfo(got.dtype)
    bound = 2 * fi.eps * want.abs() + 2 * gamma.abs() * norm_bounds.forward_error(x.detach(), False, 1e-5) + fi.tiny
    assert ((got.double() - want).abs() <= bound).all()


def test_row_ulps_measures_against_the_rows_scale():
    want = torch.tensor([[4.0, 1e-6, -2.0], [2.0 ** -10, 2.0 ** -9, -(2.0 ** -10)]])   # sums below are exact
    ulp4 = torch.finfo(torch.float32).eps * 4.0
    got = want + torch.tensor([[0.0, ulp4, 0.0], [0.0, 0.0, 0.0]])
    assert norm_patch._row_ulps(want, got, 1) == pytest.approx(1.0)   # per element it is ~4e6 ulps
    got = want + torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 3 * torch.finfo(torch.float32).eps * 2.0 ** -9]])
    assert norm_patch._row_ulps(want, got, 1) == pytest.approx(3.0)   # a small row is its own scale


def test_channels_first_layer_norm_is_left_saying_why():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), ConvNextLayerNorm(16, eps=1e-6, data_format="channels_first"),
                          nn.Conv2d(16, 4, 1))
    x = torch.randn(2, 3, 5, 5)
    want = model(x)
    report = invact.patch(model)
    assert len(report) == 0 and type(model[1]) is ConvNextLayerNorm, report
    reason = report.left[0].reason
    assert "its forward raised" in reason and "channels_first, is left" in reason, reason
    assert torch.equal(model(x), want)


# Nemotron's LayerNorm1P: F.layer_norm(x, shape, w + 1, b), weight starting at zeros (hunt B: every one was
# left, "no invact form", keeping its input saved); invact.LayerNorm(style="gemma") computes gamma = 1 + w
from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nemotron_layer_norm_1p_is_swapped(dtype):
    torch.manual_seed(0)
    ref = NemotronLayerNorm1P(N, eps=1e-5)
    with torch.no_grad():
        ref.weight.normal_(0, 0.2)
        ref.bias.normal_(0, 0.1)
    ref = ref.to(dtype)
    model = _sandwich(copy.deepcopy(ref))
    report = invact.patch(model)
    assert len(report) == 1 and isinstance(model[1], invact.LayerNorm) and model[1].style == "gemma", report
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(40, N, generator=g, dtype=torch.float64) * 2 + 0.3).to(dtype).requires_grad_()
    dy = torch.randn(40, N, generator=g).to(dtype)
    got = model[1](x)
    w, b = ref.weight.detach(), ref.bias.detach()
    _check_forward(got, x, w.double() + 1, b.double())
    grads = torch.autograd.grad(got, (x, model[1].weight, model[1].bias), dy)
    refs, tols = norm_bounds.error_bound(x.detach(), w, b, dy, got.detach(), False, 1e-5, None, 1.0)
    for name, grad, r, t in zip(("dx", "dw", "db"), grads, refs, tols):
        check(grad, r, t, f"Nemotron {dtype} {name}")


def test_layer_norm_gemma_style_in_float64_is_torchs_formula():
    """style="gemma" for LayerNorm is Nemotron's F.layer_norm(x, shape, w + 1, b) in x's dtype: float64 x
    stays float64 (the RMSNorm forms compute it in float32, as Hugging Face's classes do)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, N, generator=g, dtype=torch.float64)
    w, b = torch.randn(N, generator=g, dtype=torch.float64) * 0.2, torch.randn(N, generator=g, dtype=torch.float64)
    y = invact.functional.layer_norm(x, (N,), w, b, 1e-5, style="gemma")
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (N,), w + 1, b, 1e-5))   # float64's defaults
