"""Norms without parameters (OLMo's LayerNorm, Llama 4's weight-less RMSNorm, look-alikes), which
:func:`invact.patch` left as "not a recognised norm: needs a 1-d weight" before (2026-12-07).

They are probed against invact's norms without affine parameters; eps comes from the attribute or, where
there is none (OLMo's), from the module's output, and only a full probe that matches bit for bit (or
within 2 ulps) swaps. A module that states no normalized size (Llama 4's), left before (2026-12-07),
is probed on several sizes and becomes an invact norm with ``normalized_shape=None`` (any last dimension).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invact
from invact import norm_bounds
from norm_cases import check

transformers = pytest.importorskip("transformers")
from transformers import OlmoConfig, OlmoForCausalLM  # noqa: E402
from transformers.models.llama4.modeling_llama4 import Llama4TextWeightlessRMSNorm  # noqa: E402
from transformers.models.olmo.modeling_olmo import OlmoLayerNorm  # noqa: E402

N = 64


def _saved_bytes(model: nn.Module, *args, **kwargs) -> tuple[torch.Tensor, int]:
    """(output, bytes saved for backward), each storage counted once."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(*args, **kwargs)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return out, sum(storages.values())


def _olmo(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    cfg = OlmoConfig(vocab_size=97, hidden_size=N, intermediate_size=2 * N, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return OlmoForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_olmo_model_norms_are_swapped(dtype):
    ref = _olmo(dtype)
    model = copy.deepcopy(ref)
    report = invact.patch(model, exclude="silu")                      # the norms alone
    norms = {r.path: r for r in report.replaced}
    assert len(norms) == 5, report                                   # 2 x (input, post-attention) + final
    assert all(r.reason == "matched exclude" for r in report.left), report
    for r in norms.values():
        assert r.old.endswith("OlmoLayerNorm") and "style='llama'" in r.new and "elementwise_affine=False" in r.new
        assert "bit for bit" in r.note and "eps 1e-05 inferred from its output" in r.note
    assert isinstance(model.model.norm, invact.LayerNorm) and model.model.norm.eps == 1e-5
    ids = torch.randint(0, 97, (2, 9))
    want, base = _saved_bytes(ref, input_ids=ids)
    got, patched = _saved_bytes(model, input_ids=ids)
    assert torch.equal(got.logits, want.logits)
    # each norm saved x (a float32 copy of it in bfloat16: OLMo computes in float32), the mean and rstd;
    # it now saves y, which its Linears save anyway, and rstd: x's and the mean's float32 bytes go
    rows = ids.numel()
    assert base - patched == 5 * (rows * N * 4 + rows * 4)
    if dtype != torch.float32:
        return
    want.logits.square().sum().backward()
    got.logits.square().sum().backward()
    # the bound of tests/test_patch_model_structures.py's float64 test (a row sum of N float32 products, each within
    # float32's unit roundoff, x4 for the two sides and the products), applied to every parameter's
    # gradient; measured: at most 0.11 of it (the norms' own dx is checked against norm_bounds below)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        tol = 4 * N * 2.0 ** -24 * a.grad.abs().max().item()
        assert (b.grad - a.grad).abs().max().item() <= tol, name


class SizedWeightlessRMSNorm(Llama4TextWeightlessRMSNorm):  # Llama 4's, told its size
    def __init__(self, hidden_size, eps=1e-5):
        super().__init__(eps)
        self.normalized_shape = (hidden_size,)


def _sandwich(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(N, N), norm, nn.Linear(N, N))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [lambda: OlmoLayerNorm(N), lambda: SizedWeightlessRMSNorm(N)], ids=["olmo", "sized"])
def test_swapped_norm_gradients_within_the_rounding_bound(make, dtype):
    """dx of the swapped norm within norm_bounds.error_bound of the float64 reference (the bound
    tests/test_norms.py holds invact's norms to, gamma = 1), and the same output as the original."""
    norm = make()
    rms = isinstance(norm, SizedWeightlessRMSNorm)
    model = _sandwich(copy.deepcopy(norm))
    report = invact.patch(model)
    assert len(report) == 1 and isinstance(model[1], invact.RMSNorm if rms else invact.LayerNorm), report
    assert model[1].style == "llama" and model[1].weight is None
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(48, N, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).requires_grad_()
    dy = torch.randn(48, N, generator=g).to(dtype)
    y = model[1](x)
    assert torch.equal(y, norm(x))
    (dx,) = torch.autograd.grad(y, x, dy)
    refs, tols = norm_bounds.error_bound(x.detach(), torch.ones(N), None, dy, y.detach(), rms, 1e-5)
    check(dx, refs[0], tols[0], f"{type(norm).__name__} {dtype} dx")


def test_swapped_rms_norm_saves_y_and_rstd():
    """Llama 4's form with a size: the norm keeps y (the next Linear's input) and a float32 rstd per row,
    not x (saved by pow and mul) and the rsqrt per row."""
    ref = _sandwich(SizedWeightlessRMSNorm(N))
    model = copy.deepcopy(ref)
    report = invact.patch(model)
    assert "'llama' without weight bit for bit" in report.replaced[0].note
    assert "inferred" not in report.replaced[0].note and model[1].eps == 1e-5    # from variance_epsilon
    x = torch.randn(4, 6, N, requires_grad=True)
    want, base = _saved_bytes(ref, x)
    got, patched = _saved_bytes(model, x)
    assert torch.equal(got, want)
    # unpatched: x (the first Linear's output) and rsqrt (24 rows); patched: rstd; y is the Linear's either way
    assert base - patched == 24 * N * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama4_weightless_norm_without_size_is_swapped_for_any_size(dtype):
    """Llama 4's qk_norm normalizes the last dimension of whatever size it gets: it becomes an invact
    RMSNorm with normalized_shape=None, the same output bit for bit on every size (its probe's sizes and
    others), dx within norm_bounds.error_bound, and y and rstd saved instead of x."""
    ref = Llama4TextWeightlessRMSNorm(1e-5)
    model = _sandwich(copy.deepcopy(ref))
    report = invact.patch(model)
    assert len(report) == 1 and isinstance(model[1], invact.RMSNorm), report
    new = model[1]
    assert new.normalized_shape is None and new.weight is None and new.style == "llama" and new.eps == 1e-5
    assert "any size kept" in report.replaced[0].note and "bit for bit" in report.replaced[0].note
    g = torch.Generator().manual_seed(4)
    for n in (1, 7, 64, 128, 200):
        x = (torch.randn(2, 3, n, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).requires_grad_()
        dy = torch.randn(2, 3, n, generator=g).to(dtype)
        y = new(x)
        assert torch.equal(y, ref(x)), n
        (dx,) = torch.autograd.grad(y, x, dy)
        refs, tols = norm_bounds.error_bound(x.detach().reshape(-1, n), torch.ones(n), None, dy.reshape(-1, n),
                                             y.detach().reshape(-1, n), True, 1e-5)
        check(dx.reshape(-1, n), refs[0], tols[0], f"size {n} {dtype} dx")
        x = torch.randn(6, n, requires_grad=True)
        _, base = _saved_bytes(ref, x)
        _, patched = _saved_bytes(new, x)
        # torch's: x (pow's and mul's input) and the float32 rsqrt per row; invact's: y and the rstd per row
        assert (base, patched) == (6 * n * 4 + 6 * 4, 6 * n * 4 + 6 * 4) and _saved_y(new, x)
    assert invact.unpatch(model) and type(model[1]) is Llama4TextWeightlessRMSNorm


def _saved_y(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``norm`` saves its output (the storage of what it returns) and not its input."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = norm(x)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    return y.untyped_storage().data_ptr() in ptrs and x.untyped_storage().data_ptr() not in ptrs


class BlockRMSNorm(nn.Module):
    """No size stated; rows of 64 or more are normalized whole, shorter ones in blocks of 8: Llama 4's
    form on size 64, another on smaller sizes."""

    variance_epsilon = 1e-6

    def forward(self, x):
        n = x.shape[-1]
        blocks = x.float().reshape(*x.shape[:-1], -1, n if n >= 64 else min(8, n))
        y = blocks * torch.rsqrt(blocks.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return y.reshape(x.shape).type_as(x)


def test_a_norm_without_size_whose_form_depends_on_the_size_is_left():
    model = _sandwich(BlockRMSNorm())
    x = torch.randn(5, N)
    want = model(x)
    report = invact.patch(model)
    assert len(report) == 0 and type(model[1]) is BlockRMSNorm, report
    reason = report.left[0].reason
    assert "not one form on every size: on size 64 form 'llama', on size 24 probe: no invact norm" in reason, reason
    assert torch.equal(model(x), want)


def test_any_size_norm_arguments():
    with pytest.raises(TypeError, match="normalized_shape=None .* needs elementwise_affine=False"):
        invact.RMSNorm(None)
    with pytest.raises(TypeError, match="normalized_shape=None .* needs elementwise_affine=False"):
        invact.LayerNorm(None, elementwise_affine=True)
    norm = invact.LayerNorm(None, elementwise_affine=False, bias=False)
    with pytest.raises(ValueError, match="at least one"):
        norm(torch.tensor(1.0))
    x = torch.randn(3, 11, dtype=torch.float64)
    assert norm.state_dict() == {} and torch.equal(norm(x), F.layer_norm(x, (11,)))


class _LookAlike(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.normalized_shape = (hidden_size,)


class EpsOutsideLayerNorm(_LookAlike):   # x_c / (std + eps): its output gives eps 1e-10, which the probe refuses
    def forward(self, x):
        xc = x - x.mean(-1, keepdim=True)
        return xc / (xc.pow(2).mean(-1, keepdim=True).sqrt() + 1e-5)


class ClampedLayerNorm(_LookAlike):      # rsqrt(max(var, eps)): eps 1e-05 inferred exactly, wrong above it
    def forward(self, x):
        xc = x - x.mean(-1, keepdim=True)
        return xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True).clamp_min(1e-5))


class OddEpsLayerNorm(_LookAlike):       # an eps that is no short decimal
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, eps=1.2345678e-5)


class NoEpsRMSNorm(_LookAlike):          # x / rms(x): nothing added
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))


class OtherAxisLayerNorm(_LookAlike):    # normalizes dim -2, with an eps attribute
    eps = 1e-5

    def forward(self, x):
        xc = x - x.mean(-2, keepdim=True)
        return xc * torch.rsqrt(xc.pow(2).mean(-2, keepdim=True) + self.eps)


class OtherAxisRMSNorm(_LookAlike):      # the same without eps attribute: an eps inferred from the wrong axis
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-2, keepdim=True) + 1e-6)


@pytest.mark.parametrize("cls, reason", [
    (EpsOutsideLayerNorm, "eps inferred from its output: 1e-10"),
    (ClampedLayerNorm, "eps inferred from its output: 1e-05 (RMSNorm)"),
    (OddEpsLayerNorm, "its output gives eps 1.234568e-05, no decimal of up to 3 significant digits"),
    (NoEpsRMSNorm, "no eps in its output"),
    (OtherAxisLayerNorm, "probe: no invact norm computes the same output"),
    (OtherAxisRMSNorm, "probe: no invact norm computes the same output"),
])
def test_look_alikes_computing_something_else_are_left(cls, reason):
    model = _sandwich(cls(N))
    x = torch.randn(5, 3, N)
    want = model(x)
    report = invact.patch(model)
    assert len(report) == 0 and type(model[1]) is cls, report
    assert report.left[0].reason.startswith("probe: ") and reason in report.left[0].reason, report.left[0].reason
    assert torch.equal(model(x), want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_layer_norm_llama_style_computes_in_float32(dtype):
    """invact.LayerNorm(style="llama") is ``F.layer_norm(x.float(), ...).to(x.dtype)`` (OLMo's), bit for bit
    (torch's bfloat16 kernel rounds differently where x - mean cancels; float64 is computed in float32)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(15, N, generator=g, dtype=torch.float64) * 2 + 0.3).to(dtype).requires_grad_()
    m = invact.LayerNorm(N, elementwise_affine=False, bias=False, style="llama")
    y = m(x)
    assert y.dtype == dtype and torch.equal(y, F.layer_norm(x.float(), (N,), eps=1e-5).to(dtype))
    assert torch.equal(invact.functional.layer_norm(x, (N,), style="llama"), y)
    assert torch.autograd.grad(y.sum(), x)[0].dtype == dtype
    assert "style='llama'" in repr(m)
    with pytest.raises(ValueError, match="style must be one of torch, llama"):
        invact.LayerNorm(N, style="t5")


def test_layer_norm_llama_style_computes_its_parameters_in_float32():
    """Style "llama" computes ``F.layer_norm(x.float(), w.float(), b.float())``: weights of another
    dtype got torch's "mixed dtype (CPU)" RuntimeError from inside the op, then a ValueError; Cohere's
    LayerNorm (taken for this style) runs them, so they are computed in float32 as it does: bit for
    bit the float32 formula, for float32, bfloat16 and float64 parameters."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, N, generator=g).bfloat16().requires_grad_()
    w, b = torch.randn(N, generator=g), torch.randn(N, generator=g)
    for wd, bd in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.bfloat16)):
        wc, bc = w.to(wd), b.to(bd)
        y = invact.functional.layer_norm(x, (N,), wc, bc, style="llama")
        assert torch.equal(y, F.layer_norm(x.float(), (N,), wc.float(), bc.float()).bfloat16()), (wd, bd)


def test_any_size_norm_traces_and_compiles():
    """The size comes from the input at each call: under fx.symbolic_trace (a node of the graph) and
    torch.compile(fullgraph=True, dynamic=True), the same bits as eager on each size."""
    norm = invact.RMSNorm(None, 1e-6, elementwise_affine=False, style="llama")
    model = nn.Sequential(nn.Linear(8, 16), norm)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 8)
    assert torch.equal(traced(x), model(x))
    compiled = torch.compile(norm, fullgraph=True, dynamic=True)
    for n in (5, 9):
        x = torch.randn(3, n, requires_grad=True)
        y = compiled(x)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert torch.equal(y, norm(x)) and torch.equal(dx, torch.autograd.grad(norm(x), x, torch.ones_like(y))[0])
