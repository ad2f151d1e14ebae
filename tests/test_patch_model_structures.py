"""Model structures a bug hunt found patch mishandling (2026-12-07), written as their libraries write them.

* Hugging Face's gated RMSNorms (Mamba2, Bamba, Zamba2, ...: ``forward(hidden_states, gate=None)``, called
  ``norm(h, gate)``) compute Llama's RMSNorm without a gate, and were swapped for a norm that takes one
  tensor: the model's next forward raised TypeError. The same for a probed activation class.
* A norm adding eps outside the square root (or clamping) matched Llama's form on the probe's rows of
  variance ~4, and changed the output by 35% on rows of RMS 1e-4.
* In float64 models, Hugging Face's norms compute in float32; the swaps computed in float64 (1e-7 apart).
* A norm whose forward raised on the probe was reported as "differs in dtype or fails".
* Inside activation checkpointing, a forward shows no saves, so ``example=`` dropped every swap there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import invact

torch.manual_seed(0)
N = 64


class LlamaRMSNorm(nn.Module):  # transformers' LlamaRMSNorm (Mistral, Qwen2, Phi-3, ...)
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(nn.Module):  # transformers' GemmaRMSNorm: (1 + weight), all in float32
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class T5LayerNorm(nn.Module):  # transformers' T5LayerNorm: float32 variance, x kept in its dtype
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class Mamba2RMSNormGated(nn.Module):  # transformers' MambaRMSNormGated: Llama's RMSNorm when gate is None
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states, gate=None):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        if gate is not None:
            hidden_states = hidden_states * F.silu(gate.to(torch.float32))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GatedMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(N, 2 * N)
        self.norm = Mamba2RMSNormGated(N)
        self.out_proj = nn.Linear(N, N)

    def forward(self, x):
        h, gate = self.in_proj(x).chunk(2, -1)
        return self.out_proj(self.norm(h, gate))


def _randomise(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def test_gated_norm_is_left_and_the_model_still_runs():
    model = _randomise(GatedMixer())
    x = torch.randn(2, 5, N)
    want = model(x)
    report = invact.patch(model)
    assert [r.path for r in report.left] == ["norm"]
    assert "gate=None" in report.left[0].reason and "takes more than the input" in report.left[0].reason
    assert type(model.norm) is Mamba2RMSNormGated
    assert torch.equal(model(x), want)                  # raised TypeError after the swap
    report = invact.patch(GatedMixer(), example=torch.randn(2, 5, N))
    assert "norm" in [r.path for r in report.left]


def test_probed_activation_taking_more_than_the_input_is_left():
    class ScaledGELU(nn.Module):                        # computes GELU when called with one tensor
        def forward(self, x, scale=None):
            return F.gelu(x) if scale is None else F.gelu(x) * scale

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.act, self.down = nn.Linear(N, N), ScaledGELU(), nn.Linear(N, N)

        def forward(self, x):
            return self.down(self.act(self.up(x), 2.0))

    model = Block()
    x = torch.randn(3, N)
    want = model(x)
    report = invact.patch(model)
    assert len(report) == 0 and "scale=None" in report.left[0].reason and "computes gelu" in report.left[0].reason
    assert torch.equal(model(x), want)


class EpsOutsideRMSNorm(LlamaRMSNorm):  # Llama's, but x / (rms + eps): the same at variance ~4
    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        rms = hidden_states.pow(2).mean(-1, keepdim=True).sqrt()
        return self.weight * (hidden_states / (rms + self.variance_epsilon)).to(input_dtype)


class ClampedRMSNorm(LlamaRMSNorm):  # Llama's, but rsqrt(max(mean square, eps)): the same where it is >> eps
    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True).clamp_min(self.variance_epsilon)
        return self.weight * (hidden_states * torch.rsqrt(variance)).to(input_dtype)


@pytest.mark.parametrize("cls", [EpsOutsideRMSNorm, ClampedRMSNorm])
def test_norm_with_another_eps_rule_is_left(cls):
    model = nn.Sequential(nn.Linear(N, N), cls(N, eps=1e-8), nn.Linear(N, N))
    report = invact.patch(model)
    assert len(report) == 0 and "probe: no invact norm computes the same output" in report.left[0].reason
    assert type(model[1]) is cls                        # 35% off on rows of RMS 1e-4 when it was swapped


def test_llama_norm_still_recognised_with_tiny_rows():
    """The probe's rows of variance ~eps must not refuse the forms that do match (bit for bit)."""
    model = nn.Sequential(nn.Linear(N, N), LlamaRMSNorm(N, eps=1e-5), nn.Linear(N, N))
    report = invact.patch(model)
    assert len(report) == 1 and "bit for bit" in report.replaced[0].note


@pytest.mark.parametrize("cls", [LlamaRMSNorm, GemmaRMSNorm, T5LayerNorm])
def test_float64_hugging_face_norms_compute_as_theirs(cls):
    ref = _randomise(nn.Sequential(nn.Linear(N, N), cls(N), nn.Linear(N, N))).double()
    model = _randomise(nn.Sequential(nn.Linear(N, N), cls(N), nn.Linear(N, N))).double()
    model.load_state_dict(ref.state_dict())
    report = invact.patch(model)
    assert len(report) == 1, report
    x = torch.randn(3, 7, N, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    want, got = ref(x_ref), model(x)
    assert got.dtype == torch.float64 and torch.equal(got, want)    # was 3e-8 to 8e-8 relative apart
    want.square().sum().backward()
    got.square().sum().backward()
    # both backwards run in float32 where the forms do (Llama, Gemma): a row sum of N products, each within
    # float32's unit roundoff, so N * 2^-24 of the largest gradient (x4 for the two sides and the products)
    for g_ref, g in [(x_ref.grad, x.grad)] + [(a.grad, b.grad) for a, b in zip(ref.parameters(), model.parameters())]:
        tol = 4 * N * 2.0 ** -24 * g_ref.abs().max().item()
        assert (g - g_ref).abs().max().item() <= tol


def test_norm_whose_forward_raises_on_the_probe_says_so():
    class LayerNorm2d(nn.LayerNorm):  # timm's: channels first, permutes a 4-d input (the probe's is 3-d)
        def forward(self, x):
            x = x.permute(0, 2, 3, 1)
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)

    LayerNorm2d.__module__ = "timm.layers.norm"
    report = invact.patch(nn.Sequential(nn.Conv2d(3, 8, 1), LayerNorm2d(8)))
    assert len(report) == 0 and "its forward raised RuntimeError" in report.left[0].reason, report.left


class Block(nn.Module):
    def __init__(self, reentrant: bool | None):
        super().__init__()
        self.norm, self.up, self.act, self.down = LlamaRMSNorm(N), nn.Linear(N, 4 * N), nn.SiLU(), nn.Linear(4 * N, N)
        self.reentrant = reentrant

    def inner(self, x):
        return x + self.down(self.act(self.up(self.norm(x))))

    def forward(self, x):
        if self.reentrant is None:
            return self.inner(x)
        return checkpoint(self.inner, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_example_keeps_swaps_inside_checkpointing(reentrant):
    model = _randomise(nn.Sequential(nn.Linear(N, N), Block(reentrant), Block(reentrant)))
    ref = _randomise(nn.Sequential(nn.Linear(N, N), Block(None), Block(None)))
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 8, N)
    report = invact.patch(model, example=x)
    kept = {r.path for r in report.replaced}
    assert kept == {"1.norm", "1.act", "2.norm", "2.act"}, report     # all left before: "frees 0 B, adds 0 B"
    cause = "under another saved-tensor hook" if not reentrant else "without grad (a reentrant checkpoint"
    assert all(r.note.startswith(f"not measured: the example runs it {cause}") for r in report.replaced), report
    # the same swaps without checkpointing free bytes: measured as usual
    assert {r.path for r in invact.patch(ref, example=x).replaced} == kept
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(xa).square().sum().backward()
    ref(xb).square().sum().backward()
    # the same swaps, with and without checkpointing: the same float32 operations in the same order
    assert torch.equal(xa.grad, xb.grad)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_no_grad_site_inside_a_step_is_not_dropped_as_freeing_nothing():
    """A site that only runs without grad in the example saves nothing either way: kept, not measured."""
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.teacher = nn.Sequential(nn.Linear(N, N), nn.GELU())
            self.student = nn.Sequential(nn.Linear(N, N), nn.GELU(), nn.Linear(N, N))

        def forward(self, x):
            with torch.no_grad():
                t = self.teacher(x)
            return self.student(x) - t

    report = invact.patch(Frozen(), example=torch.randn(4, N))
    notes = {r.path: r.note for r in report.replaced}
    assert notes["teacher.1"].startswith("not measured") and not notes["student.1"].startswith("not measured")


def test_clip_layer_norm_is_swapped_where_its_forward_runs():
    """CLIP's LayerNorm (x cast to float32, output cast back) cannot run bfloat16 weights with a float32 x,
    so the probe's all-bfloat16 configuration raised and the class was left; the configurations it runs
    (float32, and float32 weights with a 16-bit x, as CLIP keeps them) decide."""
    class LayerNorm(nn.LayerNorm):
        def forward(self, x):
            orig_type = x.dtype
            ret = super().forward(x.type(torch.float32))
            return ret.type(orig_type)

    LayerNorm.__module__ = "clip.model"
    model = _randomise(nn.Sequential(nn.Linear(N, N), LayerNorm(N), nn.Linear(N, N)))
    x = torch.randn(3, N)
    want, original = model(x), model[1]
    report = invact.patch(model)
    assert len(report) == 1 and "bit for bit (float32, mixed;" in report.replaced[0].note, report
    assert torch.equal(model(x), want)
    # CLIP's half model: 16-bit x, float32 norm weights, the probe's "mixed" configuration (bfloat16), where a
    # match is within 2 ulps of the output (norm_patch._verdict's acceptance), per element
    xh = x.to(torch.bfloat16)
    got, want = model[1](xh).double(), original(xh).double()
    fi = torch.finfo(torch.bfloat16)
    assert ((got - want).abs() <= 2 * fi.eps * want.abs() + fi.tiny).all()


class _Written(nn.Module):             # an in-place op on the activation's output: invact's saved y would change
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(N, N), nn.GELU(), nn.Linear(N, N)

    def forward(self, x):
        h = self.act(self.up(x))
        h.mul_(2)
        return self.down(h)


class _Dropped(nn.Module):             # BART's feed-forward: a dropout after the activation
    def __init__(self):
        super().__init__()
        self.up, self.act, self.drop, self.down = nn.Linear(N, 4 * N), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * N, N)

    def forward(self, x):
        return self.down(self.drop(self.act(self.up(x))))


class _Checkpointed(nn.Module):
    def __init__(self, inner, reentrant):
        super().__init__()
        self.inner, self.reentrant = inner, reentrant

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("inner,why", [(_Written, "modified in place"), (_Dropped, "dropout after it")])
def test_unmeasured_checkpointed_sites_still_get_the_checks_that_need_no_saves(inner, why, reentrant):
    """Kept unmeasured inside a checkpoint, a site must still be left where its output is written in place
    (backward then fails: a reentrant checkpoint's forward runs without grad, whose outputs were not
    watched) or feeds a dropout (y is an extra tensor: the swap adds the code and frees nothing)."""
    model = _Checkpointed(inner(), reentrant)
    x = torch.randn(4, N, requires_grad=True)
    report = invact.patch(model, example=x)
    assert len(report) == 0 and why in report.left[0].reason, report
    model(x).sum().backward()                           # raised with the GELU swapped (in place, reentrant)
