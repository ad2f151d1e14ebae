"""The norm probe's verdict in ulps of each row's scale (2026-12-07, hunt B): Cohere's LayerNorm computes
``weight * x_hat`` in float32 torch ops, which rounds about an ulp of the row's largest output away from
torch's fused layer_norm; measured per element, an output near zero made that 38.9 "ulps" and every
Cohere norm was left, keeping its input saved. And a norm whose forward cannot take the probe's layout
(ConvNeXt's channels_first LayerNorm) said only that its forward raised.

Hunt N (2026-12-07): the probe compared outputs only, so a norm whose gradient differs (statistics
detached, a weight read through ``.data``: never trained, trained after the swap) was swapped; it never ran
float16, nor bf16 weights with float32 input (Cohere's LayerNorm, swapped for torch's form, then raised
"mixed dtype" where it ran); a subclass of nn.RMSNorm with its default eps=None, or of nn.LayerNorm over
two dimensions, was left with an untrue reason."""

from __future__ import annotations

import copy
import math

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


# ----------------------------------------------------------------------------------------------
# hunt N: gradients, float16, mixed dtypes, subclasses of torch's norms

class DetachedStatsRMSNorm(nn.Module):
    """Llama's RMSNorm with its variance detached (as relevance-propagation LayerNorms do): same output."""

    def __init__(self, n: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(n)), eps

    def _xhat(self, h: torch.Tensor, detach: bool) -> torch.Tensor:
        hf = h.float()
        var = hf.pow(2).mean(-1, keepdim=True)
        return (hf * torch.rsqrt((var.detach() if detach else var) + self.variance_epsilon)).to(h.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.weight * self._xhat(h, True)


class FrozenWeightRMSNorm(DetachedStatsRMSNorm):
    """Reads its weight through ``.data`` (as transformers' ImageGPTLayerNorm does): the weight gets no gradient."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.weight.data * self._xhat(h, False)


class HalfEpsRMSNorm(DetachedStatsRMSNorm):
    """Another eps for float16 input only: the same output in every configuration the probe ran before."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        eps = 1e-3 if h.dtype == torch.float16 else self.variance_epsilon
        hf = h.float()
        return self.weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


class NaNGradientRMSNorm(DetachedStatsRMSNorm):
    """Llama's forward, NaN gradients (a hook on its output): a NaN difference is no match."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.weight * self._xhat(h, False)
        if out.requires_grad:
            out.register_hook(lambda g: torch.full_like(g, math.nan))
        return out


@pytest.mark.parametrize("cls, reason", [
    (DetachedStatsRMSNorm, "same output, but its input's gradient differs by"),
    (NaNGradientRMSNorm, "same output, but its input's gradient differs by inf ulps"),
    (FrozenWeightRMSNorm, "same output, but no gradient reaches its weight"),
    (HalfEpsRMSNorm, "llama: "),
])
def test_probe_leaves_a_norm_whose_gradient_or_float16_output_differs(cls, reason):
    """Each is left, saying why (the closest form's difference: gradients beyond norm_patch._GRAD_MATCH ulps,
    a weight without gradient, float16's output), and keeps computing its own gradients."""
    torch.manual_seed(0)
    model = _sandwich(cls(N))
    report = invact.patch(model)
    assert len(report) == 0 and type(model[1]) is cls, report
    assert reason in report.left[0].reason, report.left[0].reason
    if cls is HalfEpsRMSNorm:
        assert "llama: same output" not in report.left[0].reason


def test_probe_still_swaps_a_norm_without_gradient_differences():
    """The gradient comparison passes the form the backward of which matches: the same class without
    detaching (Llama's form) is swapped."""
    class PlainRMSNorm(DetachedStatsRMSNorm):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.weight * self._xhat(h, False)

    model = _sandwich(PlainRMSNorm(N))
    report = invact.patch(model)
    assert len(report) == 1 and model[1].style == "llama", report
    assert "float16, mixed, upcast" in report.replaced[0].note


@pytest.mark.parametrize("w_dtype, x_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64),
                                              (torch.float16, torch.bfloat16)])
def test_cohere_layer_norm_swap_runs_mixed_dtypes(w_dtype, x_dtype):
    """Cohere's LayerNorm casts x and its weight to float32: with bf16 weights and float32 x (float32 weights,
    float64 x; fp16 weights, bf16 x) it runs, and its swap (torch's form before) raised "mixed dtype". The
    probe's upcast configuration picks style "llama", F.layer_norm(x.float(), w.float()).to(x.dtype): the
    output within float64 LayerNorm's bound (_check_forward), dx within norm_bounds.error_bound, dw in w's dtype."""
    ref = CohereLayerNorm(N, eps=1e-5, bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(N, generator=torch.Generator().manual_seed(4)) * 0.5 + 1)
    model = _sandwich(copy.deepcopy(ref))
    report = invact.patch(model)
    assert len(report) == 1 and model[1].style == "llama" and model[1].bias is None, report
    norm = model[1].to(w_dtype)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(40, N, generator=g, dtype=torch.float64) * 2 + 0.3).to(x_dtype).requires_grad_()
    dy = torch.randn(40, N, generator=g).to(x_dtype)
    got = norm(x)
    assert got.dtype == ref.to(w_dtype)(x).dtype == x_dtype
    w = norm.weight.detach().double()
    _check_forward(got, x, w, None)
    dx, dw = torch.autograd.grad(got, (x, norm.weight), dy)
    assert dw.dtype == w_dtype
    # computed in float32: the bound for float32 x (y rounded to x's dtype: the measured k_y covers it)
    refs, tols = norm_bounds.error_bound(x.detach().float(), w.float(), None, dy.float(), got.detach(), False, 1e-5)
    check(dx, refs[0], tols[0] + torch.finfo(x_dtype).eps / 2 * refs[0].abs(), f"Cohere {w_dtype}/{x_dtype} dx")


class MyRMSNorm(nn.RMSNorm):
    pass


class My2dLayerNorm(nn.LayerNorm):
    pass


@pytest.mark.parametrize("make, shape", [(lambda: MyRMSNorm(N), (N,)), (lambda: My2dLayerNorm((4, N)), (4, N))],
                         ids=["rms-eps-none", "layer-2d"])
def test_subclasses_of_torchs_norms_are_swapped(make, shape):
    """A subclass of nn.RMSNorm with its default eps=None (F.rms_norm's dtype epsilon) was left, "no eps
    attribute"; one of nn.LayerNorm over two dimensions, "needs a 1-d weight". Both are swapped, computing
    torch's output bit for bit (the same kernels) on float32 and bfloat16."""
    ref = make()
    with torch.no_grad():
        ref.weight.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(6)) * 0.5 + 1)
    model = nn.Sequential(copy.deepcopy(ref))
    report = invact.patch(model)
    assert len(report) == 1 and isinstance(model[0], (invact.RMSNorm, invact.LayerNorm)), report
    assert model[0].eps == ref.eps and tuple(model[0].weight.shape) == shape
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(7)).to(dtype)
        assert torch.equal(model.to(dtype)(x), ref.to(dtype)(x))


class BertLikeLayerNorm(nn.LayerNorm):
    """A plain subclass (so a probe decides it) with BERT's eps of 1e-12."""


class T5LikeRMSNorm(DetachedStatsRMSNorm):
    """T5's RMSNorm (no mean, variance in float32) with eps 1e-12."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        variance = h.float().pow(2).mean(-1, keepdim=True)
        out = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * (out.to(self.weight.dtype) if self.weight.dtype in (torch.float16, torch.bfloat16) else out)


@pytest.mark.parametrize("make", [lambda: BertLikeLayerNorm(N, eps=1e-12), lambda: T5LikeRMSNorm(N, eps=1e-12)],
                         ids=["bert_layer_norm", "t5_rms_norm"])
def test_a_tiny_eps_is_probed_in_float16_at_rows_float16_holds(make):
    """float16 probe rows at sqrt(eps) = 1e-6 were subnormal: torch's own backward gave NaN there, and
    once a NaN on one side counted as no match, every probed norm with eps 1e-12 was left. The rows stay
    at or above sqrt of float16's smallest normal number; the norm is swapped."""
    torch.manual_seed(0)
    model = _sandwich(make())
    report = invact.patch(model)
    assert len(report) == 1, report
