"""The norm probe in both modes, and a float16 gradient that overflows (review fa).

``invact.patch`` probes a candidate norm in the mode the model is in (Hugging Face's ``from_pretrained``
returns eval mode); training mode was compared on float32 outputs only. A norm that detaches its statistics,
or returns another dtype, only while training gives the same float32 output bits in both modes, so it was
swapped, and the invact norm then computed other gradients (or another dtype) in training. The matched form's
whole probe (dtypes, outputs, gradients of input and parameters) now runs in the other mode too.

A weight-less RMSNorm written in the input's dtype (``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) +
eps)``, no upcast) was left with "gradient differs by inf ulps", in every dtype. bfloat16 (float32's range)
matches; on float16 input its own backward overflows (``rsqrt``'s derivative ``rms**-3`` passes float16's
65504 on rows of root mean square below 65504**(-1/3) = 0.0248) where invact's norms, computing in float32,
give finite gradients. No rounding turns a finite value into inf, so no tolerance takes it in; but the swap
gives finite gradients there and the same elsewhere, never worse than the module: a float16 gradient of the
module's that is inf or NaN where the form's is finite is now compared where it is finite, and the report
says so (fa2). A module whose output differs, whose finite gradient elements differ, or whose gradient is
not finite in float32 (float32's range: no overflow invact's norms avoid) is still left.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import invact
from invact import norm_patch

N = 64


class TrainDetachedRMSNorm(nn.Module):
    """Llama's RMSNorm, its variance detached in training mode only (``detach`` False: never)."""

    def __init__(self, n: int = N, eps: float = 1e-6, detach: bool = True) -> None:
        super().__init__()
        self.weight, self.variance_epsilon, self.detach = nn.Parameter(torch.ones(n)), eps, detach

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        hf = h.float()
        var = hf.pow(2).mean(-1, keepdim=True)
        var = var.detach() if self.detach and self.training else var
        return self.weight * (hf * torch.rsqrt(var + self.variance_epsilon)).to(h.dtype)


class TrainDetachedLayerNorm(nn.LayerNorm):
    """A subclass of nn.LayerNorm computing in float32 (OLMo's and Cohere's way), its mean and rstd detached
    in training mode only (``detach`` False: never). Detaching changes no value: the same bits in both modes."""

    def __init__(self, n: int = N, detach: bool = True) -> None:
        super().__init__(n)
        self.detach = detach

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        rstd = torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + self.eps)
        if self.detach and self.training:
            mean, rstd = mean.detach(), rstd.detach()
        return ((xf - mean) * rstd * self.weight.float() + self.bias.float()).to(x.dtype)


class TrainFloat32RMSNorm(TrainDetachedRMSNorm):
    """Llama's RMSNorm returning its float32 product in training mode (no cast back to the input's dtype):
    the same float32 output in both modes, another dtype for 16-bit input while training."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        hf = h.float()
        y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * (y if self.training else y.to(h.dtype))


def _patched(norm: nn.Module, training: bool) -> tuple[nn.Module, invact.PatchReport]:
    model = nn.Sequential(nn.Linear(N, N), norm, nn.Linear(N, N)).train(training)
    return model, invact.patch(model)


@pytest.mark.parametrize("make, differs", [
    (TrainDetachedRMSNorm, "same output, but its input's gradient differs by"),
    (TrainDetachedLayerNorm, "same output, but its input's gradient differs by"),
    (TrainFloat32RMSNorm, "returns torch.float32"),
], ids=["rmsnorm-detached", "layernorm-subclass-detached", "rmsnorm-float32"])
def test_a_norm_computing_otherwise_only_while_training_is_left_when_patched_in_eval_mode(make, differs):
    """Patched in eval mode, each was swapped (the same float32 output in both modes); now it is left, the
    reason naming the mode and what differs, and the model keeps its modes, parameters and outputs."""
    torch.manual_seed(0)
    norm = make()
    ref = copy.deepcopy(norm)
    model, report = _patched(norm, training=False)
    assert len(report) == 0 and model[1] is norm, str(report)
    reason = report.left[0].reason
    assert "computes differently in training mode (.train()) than in eval mode (.eval())" in reason, reason
    assert "computes what it does in eval mode; in training mode: " in reason and differs in reason, reason
    assert not model.training and not norm.training
    assert all(torch.equal(p, q) for p, q in zip(norm.parameters(), ref.parameters()))
    x = torch.randn(4, N)
    assert torch.equal(norm(x), ref.eval()(x))


@pytest.mark.parametrize("make", [TrainDetachedRMSNorm, TrainDetachedLayerNorm, TrainFloat32RMSNorm],
                         ids=["rmsnorm", "layernorm-subclass", "rmsnorm-float32"])
def test_a_norm_that_differs_while_training_is_left_when_patched_in_training_mode(make):
    """In training mode the probe itself sees the difference (as before)."""
    torch.manual_seed(0)
    model, report = _patched(make(), training=True)
    assert len(report) == 0 and type(model[1]) is make and model[1].training, str(report)


@pytest.mark.parametrize("make, kind", [
    (lambda: TrainDetachedRMSNorm(detach=False), invact.RMSNorm),
    (lambda: TrainDetachedLayerNorm(detach=False), invact.LayerNorm),
], ids=["rmsnorm", "layernorm-subclass"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_the_same_norms_without_the_training_branch_are_still_swapped(make, kind, training):
    """Detaching nothing, they compute one function: swapped in either mode, the report saying both modes
    were probed, the replacement in the model's mode."""
    torch.manual_seed(0)
    model, report = _patched(make(), training)
    assert len(report) == 1 and type(model[1]) is kind, str(report)
    assert "in eval and training mode" in report.replaced[0].note, report.replaced[0].note
    assert model[1].training is training


class RandomDrawWhileTrainingRMSNorm(TrainDetachedRMSNorm):
    """Llama's RMSNorm drawing (and discarding) a random number in training mode: one function, but a
    training-mode call moves torch's RNG."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            torch.rand(1)
        return super().forward(h)


def test_the_training_mode_probe_leaves_the_callers_rng_as_it_was():
    """The probe of the other mode runs on copies with torch's CPU RNG forked: the caller's next draws are
    those it would have had without patch (the module is swapped: it computes one function)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(N, N), RandomDrawWhileTrainingRMSNorm(detach=False), nn.Linear(N, N)).eval()
    state = torch.get_rng_state()
    report = invact.patch(model)
    assert len(report) == 1, str(report)
    assert torch.equal(torch.get_rng_state(), state)


class Float16OverflowRMSNorm(nn.Module):
    """Weight-less, computing in the input's dtype without upcasting (no eps attribute: inferred)."""

    normalized_shape = (N,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_a_norm_whose_own_float16_backward_overflows_is_swapped_saying_so():
    """bfloat16 has float32's range: the module matches there, gradients included. On float16 input its own
    backward is inf on rows of root mean square below 0.0248 (rms**-3 > 65504) where the form's is finite: the
    gradients are compared where the module's is finite, and the note says on which input, where and why.
    (Before: left, "gradient differs by inf ulps".)"""
    model, report = _patched(Float16OverflowRMSNorm(), training=False)
    assert len(report) == 1 and type(model[1]) is invact.RMSNorm, str(report)
    note = report.replaced[0].note
    assert "float32, bfloat16, float16; " in note, note
    assert "; on float16 input its own input gradient overflows (inf or NaN at " in note, note
    assert ") where invact's, computed in float32, is finite: the gradients compared where its is finite" in note
    rows = note.split("root mean square ")[1].split(")")[0]
    low, high = (float(v) for v in rows.split(" to "))
    assert 0 < low <= high < 65504 ** (-1 / 3), rows


def test_the_swapped_norms_gradients_are_the_modules_and_finite_where_its_overflow():
    """The swap, checked directly on rows of root mean square 2 down to 0.003. float32 and bfloat16: its
    gradient is the module's within the probe's own tolerance (norm_patch._GRAD_MATCH ulps of each row's
    largest |dx|: two backwards rounding in their own order). float16: the module's gradient is inf on the rows
    below 0.0248, the swapped norm's finite, equal to the module's elsewhere within that tolerance, and within
    float16's rounding of the float64 gradient of the same (float16) x and dy: half a float16 ulp of each
    element from rounding dx once, plus float32's arithmetic (~n * 2**-24 relative of the row's largest, 64x
    below): at most one float16 epsilon of the row's largest |dx| (bfloat16, 2**3 coarser, the same)."""
    model, report = _patched(Float16OverflowRMSNorm(), training=False)
    swapped = model[1]
    assert type(swapped) is invact.RMSNorm, str(report)
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([2.0, 0.1, 0.01, 0.003], dtype=torch.float64).reshape(-1, 1)
    x64, dy64 = torch.randn(4, N, generator=g, dtype=torch.float64) * scales, torch.randn(4, N, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, dy = x64.to(dtype), dy64.to(dtype)
        grads = {}
        for name, norm, at in (("module", Float16OverflowRMSNorm(), dtype), ("swapped", swapped, dtype),
                               ("float64", Float16OverflowRMSNorm(), torch.float64)):
            xi = x.to(at).requires_grad_()
            grads[name] = torch.autograd.grad(norm(xi), xi, dy.to(at))[0].double()
        ref, ours, theirs = grads["float64"], grads["swapped"], grads["module"]
        eps, largest = torch.finfo(dtype).eps, ref.abs().amax(-1, keepdim=True)
        finite = theirs.isfinite()
        assert ours.isfinite().all(), dtype
        assert ((ours - theirs).abs() <= norm_patch._GRAD_MATCH * eps * largest)[finite].all(), dtype
        if dtype == torch.float32:
            assert finite.all()
            continue
        assert ((ours - ref).abs() <= eps * largest).all(), dtype
        overflows = dtype == torch.float16
        assert finite.all(-1).tolist() == ([True, True, False, False] if overflows else [True] * 4), dtype


class Float16EpsRMSNorm(Float16OverflowRMSNorm):
    """Another eps (1e-5) on float16 input: its float16 output differs on rows of small variance, and its
    gradient overflows there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float16 else 1e-6
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class ReciprocalRMSNorm(Float16OverflowRMSNorm):
    """``x * sqrt(1 / (var + eps))`` in the input's dtype: on float16 input 1 / (var + eps) overflows on rows
    of root mean square below 65504**(-1/2) = 0.0039, its output inf or NaN there (its gradient too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sqrt(1 / (x.pow(2).mean(-1, keepdim=True) + 1e-6))


class DoubledFloat16GradientRMSNorm(Float16OverflowRMSNorm):
    """Its float16 gradient overflowing as Float16OverflowRMSNorm's, and doubled (a hook) where finite."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if y.requires_grad and x.dtype == torch.float16:
            y.register_hook(lambda dy: dy * 2)
        return y


class SmallRowsNaNRMSNorm(nn.Module):
    """Llama's weight-less RMSNorm (in float32), its gradient NaN (a hook) on rows of root mean square below
    1/30 in every dtype: in float32, whose range invact's norms share, that is no overflow the swap avoids."""

    normalized_shape = (N,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        y = (xf * r).to(x.dtype)
        if y.requires_grad:
            small = r > 30
            y.register_hook(lambda dy: dy.masked_fill(small, float("nan")))
        return y


@pytest.mark.parametrize("make, why", [
    (Float16EpsRMSNorm, r"t5: its output differs by [\d.e+]+ ulps of the row's largest output on float16 input"),
    (ReciprocalRMSNorm, r"t5, .*: its output differs by inf ulps of the row's largest output on float16 input"),
    (DoubledFloat16GradientRMSNorm, r"t5: same output, but its input's gradient differs by [\d.e+]+ ulps of the "
                                    r"largest where it is finite on float16 input: it is inf or NaN at "),
    (SmallRowsNaNRMSNorm, r"t5: same output, but its input's gradient differs by inf ulps of the largest on "
                          r"float32 input: it is inf or NaN at "),
], ids=["float16-output-differs", "float16-output-inf", "finite-gradient-differs", "float32-gradient-nan"])
def test_a_norm_whose_gradient_is_not_finite_where_the_forms_is_is_still_left(make, why):
    """Gradients compared where the module's is finite only where its output matched, its gradient is float16
    and the form's finite everywhere, and only if they then match: each of these is left, saying why and on
    which dtypes (the output's difference too, no longer a bare number)."""
    model, report = _patched(make(), training=False)
    assert len(report) == 0 and type(model[1]) is make, str(report)
    assert re.search(why, report.left[0].reason), report.left[0].reason
