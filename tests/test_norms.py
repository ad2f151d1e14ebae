"""invact.LayerNorm / RMSNorm: the output-saving norms (runtime/norms.py).

Gradients are compared with float64 autograd of torch.nn.functional.layer_norm / rms_norm on the same x,
within the bound :func:`invact.norm_bounds.error_bound` derives from the rounding of the stored y, which does
not grow as gamma shrinks: that is what the small-gamma guard promises, and
:func:`test_unguarded_recovery_breaks_the_bound` shows the bound fails without it.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invact
from invact import cpu_kernel, norm_bounds, norm_cpu, norm_recovery, norms
from norm_cases import check, check_kernel_case, gammas, kernel_case, run_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["plain", "zeros", "tiny", "huge", "trained"])
def test_gradients_within_the_rounding_bound(kind, dtype, rms):
    g = torch.Generator().manual_seed(7)
    rows, n = 48, 67
    wd, bd = gammas(n, kind, g)
    x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    w, b = wd.to(dtype), (None if rms else bd.to(dtype))
    if dtype == torch.float16:
        w = w.clamp(-6e4, 6e4)
    dy = torch.randn(rows, n, generator=g).to(dtype)
    y, grads = run_norm(x, w, b, dy, rms, 1e-5)
    ref_y = F.rms_norm(x, (n,), w, 1e-5) if rms else F.layer_norm(x, (n,), w, b, 1e-5)
    assert torch.equal(y, ref_y)                       # the forward is torch's own, bit for bit
    refs, tols = norm_bounds.error_bound(x, w, b, dy, y, rms, 1e-5)
    for got, ref, tol, what in zip(grads, refs, tols, ("dx", "dgamma", "dbeta")):
        check(got, ref, tol, f"{kind} {dtype} {what}")


def test_relative_bound_sums_every_gradient():
    """invact.norm_bounds.relative_bound, what benchmarks/train.py's NormProbe and tests/test_distributed.py add
    up: ||bound|| / ||gradient|| summed over dx, dgamma and dbeta (LayerNorm's dbeta included), with a
    default nn.RMSNorm's eps=None read as F.rms_norm reads it (finfo(x.dtype).eps)."""
    g = torch.Generator().manual_seed(3)
    x, dy = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    ln, rms = nn.LayerNorm(8), nn.RMSNorm(8)
    for m, b, eps in ((ln, ln.bias.detach(), 1e-5), (rms, None, torch.finfo(torch.float32).eps)):
        y = m(x).detach()
        refs, tols = norm_bounds.error_bound(x, m.weight.detach(), b, dy, y, b is None, eps)
        shares = [(t.norm() / r.norm()).item() for r, t in zip(refs, tols) if t is not None]
        assert len(shares) == (3 if b is not None else 2)
        assert norm_bounds.relative_bound(m, x, y, dy) == pytest.approx(sum(shares), rel=1e-12)
    with pytest.raises(TypeError, match="module must be"):
        norm_bounds.relative_bound(nn.Linear(8, 8), x, x, dy)


def test_unguarded_recovery_breaks_the_bound():
    """The same bound fails when x_hat is recovered by division in every column (no kept columns):
    gamma with exact zeros gives NaN, tiny gamma next to a bias amplifies y's rounding."""
    g = torch.Generator().manual_seed(3)
    rows, n = 32, 40
    w, b = gammas(n, "tiny", g)
    w, b = w.float(), b.float()
    x = torch.randn(rows, n, generator=g)
    dy = torch.randn(rows, n, generator=g)
    y, rstd, extra, cols = torch.ops.invact.norm_forward(x, w, b, n, 1e-5, False, 0.0, None, torch.float32, "eager")
    assert cols.numel() > 0 and extra.shape == (rows, cols.numel())
    none = torch.zeros(0, dtype=torch.int64)
    dx, dw, _ = torch.ops.invact.norm_backward(dy, y, rstd, extra[:, :0], none, w, b, n, False, 0.0,
                                               torch.float32, "eager")
    refs, tols = norm_bounds.error_bound(x, w, b, dy, y, False, 1e-5)
    assert not ((dw.double() - refs[1]).abs() <= tols[1]).all()


def test_recovery_rule_and_fallback():
    w = torch.ones(10)
    assert norms.recovery(w).columns == () and not norms.recovery(w).fallback
    w[[2, 7]] = 0.0
    r = norms.recovery(w, torch.zeros(10))
    assert r.columns == (2, 7) and not r.fallback and "2 of 10" in r.reason
    b = torch.zeros(10)
    b[4] = 2.0                                          # |beta| > |gamma|: not recoverable
    assert norms.recovery(torch.ones(10), b).columns == (4,)
    assert norms.recovery(torch.full((10,), 1e-5), y_dtype=torch.float16).columns == tuple(range(10))
    r = norms.recovery(torch.zeros(10))
    assert r.fallback and r.columns == tuple(range(10)) and "every column" in r.reason
    m = invact.LayerNorm(10)
    with torch.no_grad():
        m.weight[:6] = 0
    assert m.recovery().fallback
    x = torch.randn(3, 10, requires_grad=True)
    y, rstd, extra, cols = torch.ops.invact.norm_forward(x, m.weight, m.bias, 10, 1e-5, False, 0.0, None,
                                                         torch.float32, "eager")
    assert cols.tolist() == list(range(10)) and extra.shape == (3, 10)
    m(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_saves_y_not_x():
    """What autograd keeps: y (the very output tensor), rstd (float32 per row), and the kept columns."""
    x = torch.randn(8, 33, requires_grad=True)
    m = invact.LayerNorm(33)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = m(x)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert y.untyped_storage().data_ptr() in ptrs and x.untyped_storage().data_ptr() not in ptrs
    kept = [t for t in saved if not isinstance(t, nn.Parameter) and t.untyped_storage().data_ptr()
            != y.untyped_storage().data_ptr()]
    assert sum(t.numel() * t.element_size() for t in kept) == 8 * 4     # rstd; no columns kept here


def test_modules_match_torch_nn():
    assert inspect.signature(invact.LayerNorm).parameters.keys() >= inspect.signature(nn.LayerNorm).parameters.keys()
    for ours, theirs, args in ((invact.LayerNorm, nn.LayerNorm, ((4, 6),)), (invact.RMSNorm, nn.RMSNorm, ((6,),))):
        a, b = ours(*args), theirs(*args)
        assert list(a.state_dict()) == list(b.state_dict()) and repr(a) == repr(b).replace(theirs.__name__, ours.__name__)
        a.load_state_dict(b.state_dict())
        x = torch.randn(3, 4, 6)
        assert torch.equal(a(x), b(x))
    assert list(invact.LayerNorm(5, bias=False).state_dict()) == ["weight"]
    assert list(invact.LayerNorm(5, elementwise_affine=False).state_dict()) == []
    assert "backend='eager'" in repr(invact.RMSNorm(4, backend="eager"))
    assert "style='gemma'" in repr(invact.RMSNorm(4, style="gemma"))


def test_bad_input():
    with pytest.raises(ValueError, match="normalized_shape"):
        invact.functional.layer_norm(torch.randn(3, 4), (5,))
    with pytest.raises(ValueError, match="weight"):
        invact.functional.rms_norm(torch.randn(3, 4), (4,), torch.ones(5))
    with pytest.raises(TypeError, match="input"):
        invact.functional.layer_norm(torch.ones(3, 4, dtype=torch.int64), (4,))
    with pytest.raises(ValueError, match="style"):
        invact.RMSNorm(4, style="bogus")
    with pytest.raises(ValueError, match="backend"):
        invact.functional.layer_norm(torch.randn(3, 4), (4,), backend="bogus")


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_gradcheck_float64(rms):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, generator=g, dtype=torch.float64)
    w[2] = 0.0                                          # a kept column on the way
    w.requires_grad_()
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    if rms:
        assert torch.autograd.gradcheck(lambda x, w: invact.functional.rms_norm(x, (9,), w, 1e-5), (x, w))
    else:
        assert torch.autograd.gradcheck(lambda x, w, b: invact.functional.layer_norm(x, (9,), w, b), (x, w, b))


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 11, generator=g, requires_grad=True)
    w = torch.randn(11, generator=g)
    w[3] = 0.0
    w.requires_grad_()
    b = torch.randn(11, generator=g, requires_grad=True)
    for args in [(x, w, b, 11, 1e-5, False, 0.0, None, torch.float32, "eager"),
                 (x, w, None, 11, 1e-5, True, 1.0, None, torch.bfloat16, "eager"),
                 (x.detach().bfloat16(), w.detach().bfloat16(), None, 11, 1e-6, True, 0.0, torch.bfloat16,
                  torch.bfloat16, "eager"),
                 (x, None, None, 11, 1e-5, True, 0.0, None, torch.float32, "eager")]:
        torch.library.opcheck(torch.ops.invact.norm_forward.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_tensors_give_torchs_shapes(dtype):
    """A model built on the meta device (shape inference, deferred init) runs forward and backward with
    the norms and activations swapped: torch's output shape and dtype, and gradients of the inputs'."""
    def build():
        with torch.device("meta"):
            return nn.Sequential(nn.Linear(12, 12), nn.LayerNorm(12), nn.SiLU(), nn.RMSNorm(12),
                                 nn.Linear(12, 3)).to(dtype)
    ref, model = build(), build()
    invact.patch(model)
    assert isinstance(model[1], invact.LayerNorm) and isinstance(model[3], invact.RMSNorm)
    outs = []
    for m in (ref, model):
        x = torch.randn(5, 7, 12, device="meta", dtype=dtype, requires_grad=True)
        y = m(x)
        y.sum().backward()
        outs.append((y.shape, y.dtype, y.device, x.grad.shape, m[0].weight.grad.shape))
    assert outs[0] == outs[1]


def test_compile_fullgraph():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 13, generator=g, requires_grad=True)
    ln, rms = invact.LayerNorm(13), invact.RMSNorm(13)
    with torch.no_grad():
        ln.weight[4] = 0.0

    def f(x):
        return rms(ln(x)).pow(2).sum()
    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(x)
    (gx,) = torch.autograd.grad(loss, x)
    loss_e = f(x)
    (ge,) = torch.autograd.grad(loss_e, x)
    # the same custom ops on the same values, compiled or not: the same bits, but for Inductor's order of the
    # loss's sum of N = 78 positive terms (any order within (N - 1) u of the exact sum, so 2 (N - 1) u apart);
    # its gradient 2 z is exact, so the backward ops see the same inputs
    assert abs(loss.item() - loss_e.item()) <= 2 * (x.numel() - 1) * 2.0**-24 * loss_e.item()
    assert torch.equal(gx, ge)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_half_layer_norm_forward_bits_and_float32_rstd(affine, dtype):
    """Half x on CPU: the forward runs torch's kernel with float32 parameters to get float32 rstd in the
    same pass; y must stay F.layer_norm's bits, and rstd float32 (a few ulps of a float32 var_mean)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(33, 300, generator=g) * 3 + 0.5).to(dtype)
    w = (1 + 0.1 * torch.randn(300, generator=g)).to(dtype) if affine in ("both", "weight") else None
    b = (0.1 * torch.randn(300, generator=g)).to(dtype) if affine in ("both", "bias") else None
    y, rstd, _, _ = torch.ops.invact.norm_forward(x, w, b, 300, 1e-5, False, 0.0, None, dtype, "compiled")
    assert torch.equal(y, F.layer_norm(x, (300,), w, b, 1e-5)) and rstd.dtype == torch.float32
    var = x.double().var(-1, correction=0)
    # float32 sums of 300 terms: (8 + 2 log2 N) u relative, as error_bound's gamma_N
    assert torch.allclose(rstd.double(), torch.rsqrt(var + 1e-5), rtol=(8 + 2 * math.log2(300)) * 2.0**-24, atol=0)


@pytest.mark.parametrize("backend", ["eager", "compiled"])    # compiled: invact.norm_cpu's kernel where it builds
@pytest.mark.parametrize("n", [1, 2, 7, 255, 4099])
def test_widths_and_non_contiguous(n, backend):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, 6, generator=g)
    x = base.t()                                        # non-contiguous rows
    w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    dy = torch.randn(6, n, generator=g)
    for rms in (False, True):
        y, grads = run_norm(x, w, None if rms else b, dy, rms, 1e-5, backend)
        refs, tols = norm_bounds.error_bound(x, w, None if rms else b, dy, y, rms, 1e-5)
        for got, ref, tol in zip(grads, refs, tols):
            check(got, ref, tol, f"n={n} rms={rms} {backend}")
        assert y.is_contiguous() and y.shape == x.shape


@pytest.mark.parametrize("style", ["llama", "t5", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hugging_face_forms_bit_for_bit(style, dtype):
    """The Hugging Face formulas, op for op (transformers' own code, copied: LlamaRMSNorm,
    T5LayerNorm, GemmaRMSNorm): the forward is the same bits; gradients within the bound."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 24, generator=g) * 3).to(dtype)
    w = (torch.randn(24, generator=g) * (0.1 if style == "gemma" else 1)).to(dtype)
    xf = x.to(torch.float32)
    if style == "llama":
        ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    elif style == "t5":
        h = x * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        ref = w * (h.to(w.dtype) if w.dtype in (torch.float16, torch.bfloat16) else h)
    else:
        ref = ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)) * (1.0 + w.float())).type_as(x)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = invact.functional.rms_norm(xs, (24,), ws, 1e-6, style=style)
    assert y.dtype == ref.dtype and torch.equal(y, ref)
    dy = torch.randn(8, 24, generator=g).to(y.dtype)
    gx, gw = torch.autograd.grad(y, (xs, ws), dy)
    gamma = (1.0 + w.double()) if style == "gemma" else w
    norm_dtype = dtype if style in ("llama", "t5") and dtype != torch.float32 else None
    refs, tols = norm_bounds.error_bound(x, gamma, None, dy, y, True, 1e-6, norm_dtype)
    check(gx, refs[0], tols[0], f"{style} dx")
    check(gw, refs[1], tols[1], f"{style} dw")


# ---------------------------------------------------------------------------------------------------
# sharing: the saved y is the next Linear's saved input

B, D, H = 16, 64, 96
F32, BF16 = 4, 2


class _Block(nn.Module):
    """A pre-norm block: one norm feeding three Linears (as q, k, v projections)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.q, self.k, self.v = nn.Linear(D, H), nn.Linear(D, H), nn.Linear(D, H)

    def forward(self, x):
        h = self.norm(x)
        return self.q(h) * self.k(h) + self.v(h)


def _saved(model, x, autocast=False):
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with invact.memory(model) as m, cast:
        out = model(x)
    return m, out


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_saved_bytes_float32(rms):
    """Unpatched: the norm saves x plus its per-row statistics (LayerNorm: mean and rstd; RMSNorm: the
    composite's intermediates), the Linears save y once (one storage). Patched: y (shared with the
    Linears) and rstd (B float32): the norm's own bytes drop to B * 4. The product q * k saves both
    (2 B H floats) in either run."""
    torch.manual_seed(0)
    model = _Block(nn.RMSNorm(D) if rms else nn.LayerNorm(D))
    x = torch.randn(B, D, requires_grad=True)
    base, out_b = _saved(model, x)
    invact.patch(model)
    assert isinstance(model.norm, invact.RMSNorm if rms else invact.LayerNorm)
    pat, out_p = _saved(model, x)
    assert torch.equal(out_b, out_p)
    # y is charged to the norm (first saved there) with rstd; the Linears' saves of y are the same storage
    assert pat.by_module["norm"] == B * D * F32 + B * F32 and not {"q", "k", "v"} & set(pat.by_module)
    assert pat.total == B * D * F32 + B * F32 + 2 * B * H * F32
    assert base.by_module["q"] == B * D * F32 and base.by_module["norm"] >= B * D * F32 + B * F32   # x, stats
    assert base.total - pat.total == base.by_module["norm"] - B * F32
    invact.unpatch(model)
    assert type(model.norm) is (nn.RMSNorm if rms else nn.LayerNorm)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_autocast_output_is_the_linears_input(rms):
    """bf16 autocast, float32 parameters: torch's norm returns float32 and each Linear saves its own bf16
    cast (three storages). Patched (a pre-norm, so autocast_output): the norm returns that bf16 tensor
    itself, bit for bit the Linears' cast of the unpatched output, and it is saved once."""
    torch.manual_seed(0)
    model = _Block(nn.RMSNorm(D) if rms else nn.LayerNorm(D))
    x = torch.randn(B, D, requires_grad=True)
    outs = {}
    hook = model.norm.register_forward_hook(lambda m, a, out: outs.__setitem__("base", out))
    base, out_b = _saved(model, x, autocast=True)
    hook.remove()                                 # (patch would move it to the replacement)
    report = invact.patch(model)
    assert "autocast output" in report.replaced[0].note
    model.norm.register_forward_hook(lambda m, a, out: outs.__setitem__("patched", out))
    pat, out_p = _saved(model, x, autocast=True)
    assert outs["base"].dtype == torch.float32 and outs["patched"].dtype == torch.bfloat16
    assert torch.equal(outs["patched"], outs["base"].to(torch.bfloat16))
    assert torch.equal(out_b, out_p)                              # the Linears saw the same bits
    # each Linear also saves autocast's bf16 copy of its weight (H * D), in both runs; unpatched, each
    # saves its own bf16 cast of the norm's output too
    assert all(base.by_module[k] == (B + H) * D * BF16 and pat.by_module[k] == H * D * BF16 for k in "qkv")
    assert pat.by_module["norm"] == B * D * BF16 + B * F32
    (out_p.float().pow(2).sum()).backward()
    assert torch.isfinite(x.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):             # autocast_output=False: torch's dtype
        invact.unpatch(model)
        invact.patch(model, autocast_output=False)
        assert model.norm(x).dtype == torch.float32


def test_pure_bfloat16_model_shares_y():
    """model.to(bfloat16): the norm's output is bf16 already; patched, the Linears save it and nothing else."""
    torch.manual_seed(0)
    model = _Block(nn.LayerNorm(D)).to(torch.bfloat16)
    x = torch.randn(B, D, dtype=torch.bfloat16, requires_grad=True)
    base, out_b = _saved(model, x)
    invact.patch(model)
    pat, out_p = _saved(model, x)
    assert torch.equal(out_b, out_p)
    assert base.by_module["q"] == B * D * BF16 and pat.by_module["norm"] == B * D * BF16 + B * F32


# ---------------------------------------------------------------------------------------------------
# patching Hugging Face norms

def _hf(kind):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=101, pad_token_id=0)
    configs = {
        "llama": ("LlamaConfig", "LlamaModel", small), "mistral": ("MistralConfig", "MistralModel", small),
        "qwen2": ("Qwen2Config", "Qwen2Model", small), "phi3": ("Phi3Config", "Phi3Model", small),
        "gemma": ("GemmaConfig", "GemmaModel", dict(small, head_dim=8)),
        "t5": ("T5Config", "T5EncoderModel", dict(d_model=32, d_ff=48, d_kv=8, num_layers=1, num_heads=4,
                                                  vocab_size=101)),
        "gpt2": ("GPT2Config", "GPT2Model", dict(n_embd=32, n_layer=1, n_head=4, vocab_size=101)),
        "bert": ("BertConfig", "BertModel", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                 num_attention_heads=4, vocab_size=101)),
    }
    config, model, fields = configs[kind]
    torch.manual_seed(0)
    m = getattr(transformers, model)(getattr(transformers, config)(**fields)).eval()
    with torch.no_grad():                                   # trained-like weights, not the init's ones/zeros
        for name, p in m.named_parameters():
            if "norm" in name.lower() or "ln" in name:
                p.copy_(torch.randn(p.shape) * 0.2 + (0.0 if kind == "gemma" or "bias" in name else 1.0))
    return m


STYLE = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "phi3": "llama", "gemma": "gemma", "t5": "t5"}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "phi3", "gemma", "t5", "gpt2", "bert"])
def test_patch_hugging_face_norms(kind):
    """Norms only (only=[] leaves the activations): every norm replaced, found by its probe; the same
    state_dict keys and forward output bit for bit; gradients close; unpatch restores the same objects."""
    model = _hf(kind)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    keys = list(model.state_dict())
    originals = {n: m for n, m in model.named_modules() if norm_is(m)}
    assert originals

    def run(model):
        model.zero_grad()
        out = model(input_ids=ids).last_hidden_state
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone().double() for n, p in model.named_parameters() if p.grad is not None}

    g_64 = run(copy.deepcopy(model).double())[1]
    out_b, g_b = run(model)
    report = invact.patch(model, only=[], backend="eager")
    assert {r.path for r in report.replaced} == set(originals)
    if kind in STYLE:
        assert all(f"style='{STYLE[kind]}'" in r.new and "probe" in r.note for r in report.replaced)
    assert list(model.state_dict()) == keys
    seen, shares, handles = {}, [], []
    for r in report.replaced:
        mod = model.get_submodule(r.path)
        handles += [mod.register_forward_hook(lambda m, args, out: seen.__setitem__(id(m), (args[0].detach(),
                                                                                            out.detach()))),
                    mod.register_full_backward_hook(lambda m, gin, gout: shares.append(
                        norm_bounds.relative_bound(m, *seen.pop(id(m)), gout[0])))]
    out_p, g_p = run(model)
    for h in handles:                             # (unpatch would leave them on the originals)
        h.remove()
    assert torch.equal(out_b, out_p) and len(shares) == len(originals)
    # against the float64 model: the norms' relative_bound shares summed over layers (as train.py), plus
    # twice the unpatched float32 model's own distance from it (the same float32 ops round the patched
    # run); a wrong formula is off by O(1). The floor matters where a gradient cancels to rounding noise
    # (BERT's key bias: softmax ignores it, its float32 gradient is 4e-9 of noise)
    for n in g_b:
        floor = 2 * (g_b[n] - g_64[n]).norm()
        assert (g_p[n] - g_64[n]).norm() <= sum(shares) * g_64[n].norm() + floor, n
    invact.unpatch(model)
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert torch.equal(run(model)[0], out_b)
    assert not any(isinstance(r.new, str) and "RMSNorm" in r.new for r in invact.patch(model, norms=False).replaced)


def norm_is(m):
    return type(m).__name__.endswith(("RMSNorm", "LayerNorm"))


def test_look_alike_left_with_the_probe_reason():
    class FakeRMSNorm(nn.Module):               # named like a norm, computes something else
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))
            self.eps = 1e-6

        def forward(self, x):
            return x * self.weight

    class NoEpsRMSNorm(FakeRMSNorm):
        def __init__(self, n):
            super().__init__(n)
            del self.eps

    model = nn.Sequential(FakeRMSNorm(8), NoEpsRMSNorm(8), nn.Linear(8, 8))
    report = invact.patch(model)
    assert len(report) == 0 and len(report.left) == 2
    assert "probe: no invact norm computes the same output" in report.left[0].reason
    assert "eps" in report.left[1].reason


# ---------------------------------------------------------------------------------------------------
# Triton kernels, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, conftest.py)

def _interpreter():
    from invact import backends
    import os
    if not backends.triton_importable() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs triton with TRITON_INTERPRET=1 (set in conftest.py)")


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 67, 1030])
def test_triton_within_the_bound(n, dtype, rms):
    """The Triton forward and backward against float64 autograd, with the bound of the eager tests: the
    kernels sum in another order (float32 reductions, inside gamma_N) and the interpreter truncates
    float32 -> bf16 (docs/floors.md): the measured k_y of the stored y covers it. Gamma with exact zeros and
    tiny values, so kept columns go through the kernels too."""
    _interpreter()
    x, w, b, dy = kernel_case(n, dtype, rms, rows=24)
    y, grads = run_norm(x, w, b, dy, rms, 1e-5, backend="triton")
    check_kernel_case(x, w, b, dy, y, grads, rms, 1e-5, f"triton {dtype} n={n}")


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_triton_forms_and_layouts(style):
    """A Hugging Face form (x_hat rounded to x's dtype before gamma; gamma = 1 + w) and a
    non-contiguous 3-d input: the Triton forward equals the eager one within a bf16 ulp per rounding
    (the interpreter truncates);
    the backward of the same saved tensors within float32 reduction order."""
    _interpreter()
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 3, 6, generator=g).to(torch.bfloat16)
    x = base.permute(2, 1, 0)                                 # (6, 3, 40), not contiguous
    w = (torch.randn(40, generator=g) * 0.3).to(torch.bfloat16)
    args = (w, None, 40, 1e-6, True, 1.0 if style == "gemma" else 0.0,
            torch.bfloat16 if style == "llama" else None, torch.bfloat16)
    ft = torch.ops.invact.norm_forward(x, *args, "triton")
    fe = torch.ops.invact.norm_forward(x, *args, "eager")
    assert ft[0].shape == x.shape and torch.equal(ft[3], fe[3])
    fi = torch.finfo(torch.bfloat16)
    # the llama form rounds twice (x_hat to bf16, then y), each a truncation in the interpreter
    assert ((ft[0].double() - fe[0].double()).abs() <= 2 * fi.eps * fe[0].double().abs() + fi.tiny).all()
    dy = torch.randn(x.shape, generator=g).to(torch.bfloat16)
    bt = torch.ops.invact.norm_backward(dy, *fe, w, None, 40, True, args[5], torch.bfloat16, "triton")
    be = torch.ops.invact.norm_backward(dy, *fe, w, None, 40, True, args[5], torch.bfloat16, "eager")
    assert bt[0].shape == x.shape
    # both backwards of the same saved tensors within the derived bound against float64 autograd (the
    # form's rounding of x_hat to bf16 and gamma = 1 + w included), so within twice it of each other
    refs, tols = norm_bounds.error_bound(x.reshape(-1, 40), w, None, dy.reshape(-1, 40), fe[0].reshape(-1, 40), True, 1e-6,
                                   args[6], args[5])
    for backend, got in (("triton", bt), ("eager", be)):
        for g, ref, tol, what in zip((got[0].reshape(-1, 40), got[1]), refs, tols, ("dx", "dgamma")):
            check(g, ref, tol, f"{style} {backend} {what}")


needs_norm_kernel = pytest.mark.skipif(norm_cpu.library() is None,
                                       reason="no C compiler, or the C kernels switched off")


@pytest.fixture(params=["kernel", "fallback"])
def cpu_path(request, monkeypatch):
    """The compiled backend's two CPU backwards: the C kernel (invact.norm_cpu; a list that records each
    call that did the work), or None: without it (ATen's fused LayerNorm backward on recovered x - mean for float32/float64 x; Inductor's
    code otherwise)."""
    if request.param == "fallback":
        monkeypatch.setattr(norm_cpu, "library", lambda: None)
        yield None
        return
    if norm_cpu.library() is None:
        pytest.skip("no C compiler, or the C kernels switched off")
    calls, original = [], norm_cpu.backward

    def counted(*args):
        out = original(*args)
        calls.extend([1] if out is not None else [])
        return out
    monkeypatch.setattr(norm_cpu, "backward", counted)
    yield calls


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("kind", ["zeros", "trained"])
def test_compiled_backend_within_the_bound(cpu_path, kind, dtype, rms):
    """The CPU default, with kept columns (zeros) and without (trained: none when beta < gamma), on a
    ragged shape (rows not a multiple of the kernel's 8-row blocks, n not of 16 lanes): the same bound
    against float64 autograd as the eager code. The C kernel takes every dtype but float64."""
    g = torch.Generator().manual_seed(11)
    rows, n = 43, 99
    wd, bd = gammas(n, kind, g)
    x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    w, b = wd.to(dtype), (None if rms else bd.to(dtype))
    dy = torch.randn(rows, n, generator=g).to(dtype)
    y, grads = run_norm(x, w, b, dy, rms, 1e-5, backend="compiled")
    refs, tols = norm_bounds.error_bound(x, w, b, dy, y, rms, 1e-5)
    for got, ref, tol, what in zip(grads, refs, tols, ("dx", "dgamma", "dbeta")):
        check(got, ref, tol, f"compiled {dtype} {what}")
    if cpu_path is not None:
        assert bool(cpu_path) == (dtype != torch.float64)   # the kernel ran (did the work), except for float64


X86_ISAS = ["DEFAULT", "AVX2", "AVX512"]     # torch.backends.cpu.get_cpu_capability(), each a superset of the last


@needs_norm_kernel
@pytest.mark.parametrize("isa", X86_ISAS)
def test_norm_kernel_every_isa_within_the_bound(isa, monkeypatch):
    """The kernel built for each vector width this CPU runs (16, 8 and 4 lanes: AVX-512, AVX2 with F16C,
    the compiler's baseline, whose 16-bit conversions are the compiler's _Float16 ones where it has
    them, else plain C), so a CPU without AVX-512 gets a
    kernel and no Inductor compile: every dtype of y and dx, ragged shapes (n below one vector, rows
    not a multiple of the 8-row blocks, tails in every loop), kept columns and not; within the bound
    of float64 autograd, and the kernel did the work."""
    here = torch.backends.cpu.get_cpu_capability()
    if isa != "DEFAULT" and (here not in X86_ISAS or X86_ISAS.index(isa) > X86_ISAS.index(here)):
        pytest.skip(f"this CPU runs {here} (as ATen sees it)")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    norm_cpu.library.cache_clear()
    try:
        assert norm_cpu.library() is not None
        g = torch.Generator().manual_seed(13)
        shapes = [(43, 99, "zeros"), (9, 3, "zeros"), (17, 1000, "trained"), (8, 64, "trained")]
        for (rows, n, kind), dtype, rms in itertools.product(shapes, DTYPES, (False, True)):
            wd, bd = gammas(n, kind, g)
            x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
            w, b = wd.to(dtype), (None if rms else bd.to(dtype))
            dy = torch.randn(rows, n, generator=g).to(dtype)
            calls = []
            with monkeypatch.context() as m:
                m.setattr(norm_cpu, "backward", lambda *a, f=norm_cpu.backward: calls.append(f(*a)) or calls[-1])
                y, grads = run_norm(x, w, b, dy, rms, 1e-5, backend="compiled")
            assert calls and calls[0] is not None, (isa, rows, n, dtype)
            refs, tols = norm_bounds.error_bound(x, w, b, dy, y, rms, 1e-5)
            for got, ref, tol, what in zip(grads, refs, tols, ("dx", "dgamma", "dbeta")):
                check(got, ref, tol, f"{isa} ({rows}, {n}) {kind} {dtype} rms={rms} {what}")
    finally:
        norm_cpu.library.cache_clear()


@needs_norm_kernel
def test_norm_kernel_autocast_output_and_threads():
    """float32 x whose y is bf16 (autocast_output): dy and y bf16, dx float32, within the bound; the rows
    split over threads (whole 8-row blocks each) give the same dx bit for bit, and dgamma / dbeta within
    one float32 rounding (only the order of their double sums differs)."""
    g = torch.Generator().manual_seed(5)
    rows, n = 300, 333
    x = torch.randn(rows, n, generator=g) * 3
    w, b = (1 + 0.2 * torch.randn(n, generator=g)).requires_grad_(), (0.1 * torch.randn(n, generator=g)).requires_grad_()
    xs = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = invact.functional.layer_norm(xs, (n,), w, b, autocast_output=True)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(rows, n, generator=g).bfloat16()
    grads = torch.autograd.grad(y, (xs, w, b), dy)
    refs, tols = norm_bounds.error_bound(x, w.detach(), b.detach(), dy, y, False, 1e-5)
    for got, ref, tol, what in zip(grads, refs, tols, ("dx", "dgamma", "dbeta")):
        check(got, ref, tol, f"autocast_output {what}")
    rstd = torch.rand(rows) + 0.5
    outs = []
    for threads in (1, 3):
        out = [torch.empty(rows, n), torch.empty(rows, 1), torch.empty(rows, 1), torch.empty(n), torch.empty(n)]
        args = [y, dy, rstd, w.detach(), w.detach(), b.detach(), None, out[0], *out[1:]]
        assert norm_cpu.library().invact_norm_backward(1, 0, 0, rows, n, *[None if t is None else t.data_ptr()
                                                                             for t in args], threads) == 0
        outs.append(out)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][2], outs[1][2])
    for a, c in zip(outs[0][3:], outs[1][3:]):                # one float32 rounding apart at most
        assert ((a - c).abs() <= torch.finfo(torch.float32).eps * a.abs()).all()


@needs_norm_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_kernel_recoverable_check_is_the_rule(dtype):
    """The forward's one-call check (norm_cpu.all_recoverable) answers as the torch rule
    (norm_recovery.recoverable on gamma = w + offset in float32) for every kind of gamma, with and without
    beta, Gemma's offset, each y dtype's floor (norms.recovery_floor), and a NaN gamma."""
    g = torch.Generator().manual_seed(2)
    for kind in ("plain", "zeros", "tiny", "huge", "trained"):
        wd, bd = gammas(64, kind, g)
        w, b = wd.to(dtype), bd.to(dtype)
        if kind == "plain":
            w[5] = math.nan
        for bias in (b, None):
            for offset in (0.0, 1.0):
                for y_dtype in DTYPES:
                    gamma = norm_recovery.gamma(w, offset, 64, torch.float32, w.device)
                    want = bool(norm_recovery.recoverable(gamma, bias, y_dtype).all())
                    floor = norm_recovery.floor_in(y_dtype, torch.float32)
                    got = norm_cpu.all_recoverable(w, bias, offset, norm_recovery.RATIO, floor)
                    assert got == want, (kind, bias is None, offset, y_dtype)
    assert norm_cpu.all_recoverable(w.double(), None, 0.0, 1.0, 1e-38) is None     # not taken: the torch rule


def test_norm_kernel_refusals_and_failed_build(monkeypatch, tmp_path):
    """What the kernel does not take (float64, mixed dtypes, non-contiguous) returns None; a compiler
    that fails warns once and leaves None (ATen's / Inductor's code)."""
    y, g = torch.randn(4, 8), torch.ones(8)
    rstd = torch.ones(4)
    assert norm_cpu.backward(y.double(), y.double(), rstd, g, g, None, None, True, torch.float64) is None
    assert norm_cpu.backward(y.bfloat16(), y, rstd, g, g, None, None, True, torch.float32) is None
    assert norm_cpu.backward(y.t().contiguous().t(), y, rstd, g, g, None, None, True, torch.float32) is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv(cpu_kernel.SWITCH_ENV, raising=False)
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path))
    norm_cpu.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="norms' CPU kernel could not be built"):
            assert norm_cpu.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert norm_cpu.library() is None and norm_cpu.backward(y, y, rstd, g, g, None, None, True,
                                                                    torch.float32) is None
    finally:
        norm_cpu.library.cache_clear()


# ---------------------------------------------------------------------------------------------------
# benchmarks/models.py's norm columns, worked out from the config

def test_models_bench_norm_columns():
    """Quick Llama (hidden H, L layers, B x S tokens; 2L + 1 RMSNorms). Per call the unpatched
    LlamaRMSNorm saves x, its float32 normalized copy and rsqrt's output (2 T H + T float32, T = B S),
    and the consumers save the output; invact keeps y (the consumers' tensor) and rstd (T float32):
    measured = (2L + 1) 2 T H 4 bytes, theory = (2L + 1)(T H - T) 4 (x freed, rstd kept). Under bf16 autocast each
    consumer Linear also saved its own bf16 cast of the float32 output (q, k, v: 3; gate, up: 2;
    lm_head: 1); invact's bf16 y replaces them: L (3 - 1 + 2 - 1) T H 2 bytes more."""
    import importlib.util
    import sys
    from pathlib import Path
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("invact_bench_models",
                                                  Path(__file__).parents[1] / "benchmarks" / "models.py")
    M = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(M)
    s = M.QUICK
    t, h, calls = s.batch * s.seq, s.hidden, 2 * s.layers + 1
    rows = {r["dtype"]: r for r in M.run(quick=True, models=["Llama"])}
    for dtype, r in rows.items():
        assert r["norms_replaced"] == calls and r["norm_calls"] == calls
        assert r["norms_theory_bytes"] == calls * (t * h - t) * 4
        extra = s.layers * 3 * t * h * 2 if dtype == "bfloat16" else 0
        assert r["norms_measured_bytes"] == calls * 2 * t * h * 4 + extra, dtype
        assert r["both_bytes"] == r["norms_bytes"] - r["measured_bytes"]     # the two savings add up
        assert any("intermediates" in why for why in r["norms_reasons"])
        # the accounting of what activations + norms still save: the parts add up; invact's own bytes are
        # SiLU's 1-bit codes (ceil(n / 8) a call, runtime/bitpack.py) and the rstd; under bf16 autocast
        # every Linear saves a bf16 copy of its weight (2 bytes an element, whatever the batch)
        parts = r["both_accounting"]
        assert sum(parts.values()) == r["both_bytes"]
        own = s.layers * math.ceil(t * s.gated / 8) + calls * t * 4
        assert parts[M.OWN] == own
        assert r["both_floor_ratio"] == pytest.approx((r["both_bytes"] - own) / r["baseline_bytes"])
        weights = s.layers * (4 * h * h + 3 * h * s.gated) + s.vocab * h
        casts = 2 * weights if dtype == "bfloat16" else 0
        assert parts.get(M.CASTS, 0) == casts
        assert r["both_ratio_casts_apart"] == pytest.approx((r["both_bytes"] - casts)
                                                            / (r["baseline_bytes"] - casts))
        assert f"{r['both_floor_ratio']:.3f}x" in M.format_accounting(r)


@pytest.mark.slow
def test_triton_kernels_build_for_sm90():
    """tests/norm_triton_offline.py compiles both kernels for sm_90 without a GPU (float32 LayerNorm with
    kept columns, bf16 RMSNorm with N = 4099, fp16 with N = 1): enable_fp_fusion=False on every launch,
    no FMA, no approximate division or square root (the interpreter's numpy arithmetic is what the GPU
    build computes); rstd by a correctly rounded square root; dx stored in x's dtype."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton.backends
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend")
    script = Path(__file__).with_name("norm_triton_offline.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900,
                          cwd=script.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert sorted(report) == ["backward", "forward"]
    for kernel, cases in report.items():
        assert len(cases) == 3, kernel
        for case, found in cases.items():
            assert found["options"] == {"enable_fp_fusion": False}, (kernel, case)
            bad = {i: found["ptx"][i] for i in ("fma.rn.f32", "div.full.f32", "sqrt.approx.f32") if found["ptx"][i]}
            assert not bad, (kernel, case, bad)
            assert found["ptx"]["div.rn.f32"] > 0, (kernel, case)
    assert all(c["ptx"]["sqrt.rn.f32"] > 0 for c in report["forward"].values())
    # a 16-bit x gets its dx stored in its own dtype, rounded to nearest once (no float32 buffer to cast)
    for case, to in (("bfloat16-rms", "bf16"), ("float16-layer-N1", "f16")):
        found = report["backward"][case]["ptx"]
        assert found[f"cvt.rn.{to}.f32"] + found[f"cvt.rn.{to}x2.f32"] > 0, (case, found)


@pytest.mark.parametrize("mode", ["autocast", "bfloat16"])
def test_hugging_face_llama_norm_outputs_are_the_linears_inputs(mode):
    """A Hugging Face Llama under bf16 autocast (float32 parameters) and converted to bf16: every patched
    norm returns, bit for bit, what the unpatched model's Linears received after their cast, and a loss
    of the bf16 last hidden state is the same."""
    model = _hf("llama")
    if mode == "bfloat16":
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    paths = [n for n, m in model.named_modules() if norm_is(m)]

    def outputs():
        got = {}
        hooks = [model.get_submodule(p).register_forward_hook(
            lambda m, a, out, p=p: got.__setitem__(p, out.detach())) for p in paths]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            # the final norm's output is last_hidden_state: the model's output, torch's dtype patched as unpatched
            loss = model(input_ids=ids).last_hidden_state.to(torch.bfloat16).float().pow(2).mean()
        for h in hooks:
            h.remove()
        return got, loss

    base, loss_b = outputs()
    invact.patch(model, only=[])
    patched, loss_p = outputs()
    for p in paths:   # the pre-norms' outputs are the bf16 their Linears cast to; the final norm's is torch's
        want = base[p] if p == "norm" else base[p].to(torch.bfloat16)
        assert patched[p].dtype == want.dtype and torch.equal(patched[p], want), p
    assert torch.equal(loss_b, loss_p)


@pytest.mark.parametrize("backend", ["compiled", "triton"])
@pytest.mark.parametrize("rms", [False, True])
def test_plain_path_equals_the_custom_ops_and_refuses_double_backward(rms, backend):
    """Plain eager calls run norms._Direct (no custom-op dispatch; every backend, Triton's under the
    interpreter here): y, the saved tensors and dx, dgamma, dbeta equal the custom ops' bit for bit; a
    graph-building backward still refuses to be differentiated. gamma has a zero column, so the
    kept-columns path is included."""
    from invact import backends, norms
    if backend not in backends.available("cpu"):
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1")
    torch.manual_seed(0)
    x = torch.randn(6, 32, requires_grad=True)
    w = (1 + 0.1 * torch.randn(32)).index_fill(0, torch.tensor([3]), 0.0).requires_grad_()
    b = None if rms else (0.1 * torch.randn(32)).requires_grad_()
    fn = invact.functional.rms_norm if rms else invact.functional.layer_norm
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fn(x, (32,), w, b, backend=backend) if not rms else fn(x, (32,), w, backend=backend)
    assert type(y.grad_fn).__name__ == "_DirectBackward"
    go = torch.randn(6, 32)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], go)
    args = (x.detach(), w.detach(), None if b is None else b.detach(), 32, float(torch.finfo(x.dtype).eps) if rms
            else 1e-5, rms, 0.0, None, torch.float32, backend)
    y_op, rstd, extra, cols = torch.ops.invact.norm_forward(*args)
    assert torch.equal(y, y_op) and cols.numel() == 1 and torch.equal(saved[1], rstd) and torch.equal(saved[2], extra)
    dx, dw, db = torch.ops.invact.norm_backward(go, y_op, rstd, extra, cols, w.detach(),
                                                None if b is None else b.detach(), 32, rms, 0.0, x.dtype, backend)
    assert all(torch.equal(a, r) for a, r in zip(grads, (dx, dw, db)))
    (gx,) = torch.autograd.grad((fn(x, (32,), w, b, backend=backend) if not rms else fn(x, (32,), w, backend=backend))
                                .pow(2).sum(), x,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        gx.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_rms_norm_default_eps_is_torchs(dtype):
    """eps=None is the epsilon of the type torch computes in (float32's for 16-bit x: bfloat16's own is
    6e4 times larger and changed y by 7x on a row of magnitude 0.01): the module's and the functional's
    y are F.rms_norm's bit for bit, on rows small enough for eps to matter."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 16, generator=g, dtype=torch.float64) * torch.tensor([1e-3, 1e-2, 0.1, 1, 10, 0])[:, None]).to(dtype)
    w = (1 + 0.1 * torch.randn(16, generator=g)).to(dtype)
    want = F.rms_norm(x, (16,), w)
    assert torch.equal(invact.functional.rms_norm(x, (16,), w), want)
    m = invact.RMSNorm(16, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(w)
    assert torch.equal(m(x.requires_grad_()), want)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("style", ["torch", "llama", "gemma"])
def test_norms_under_forward_mode_and_torch_func(rms, style):
    """Forward-mode AD (torch.func.jvp, dual tensors) and torch.func's grad and per-sample gradients
    (vmap of grad) give torch's derivatives: the custom op's autograd is reverse mode only, which gave a
    zero tangent under jvp and errors under the others. float64, where the two computations are the same
    operations: equal to 1e-12 (relative); the values are multiples of 2^-10 so that Gemma's float32
    weight (``1 + w.float()``) is exact. Llama's and Gemma's forms compute float64 x in float32, as Hugging
    Face's classes do: against their formula in float32 ops, to 16 float32 roundings (2^-20: a 12-term row
    sum and the products around it, each within 2^-24)."""
    from torch.func import functional_call, grad, jvp, vmap
    import torch.autograd.forward_ad as fwAD
    g = torch.Generator().manual_seed(9)
    x, t = ((torch.randn(5, 12, generator=g, dtype=torch.float64) * 1024).round() / 1024 for _ in range(2))
    w, b = ((torch.randn(12, generator=g, dtype=torch.float64) * s * 1024).round() / 1024 for s in (1, 0.1))
    kw = {"style": style}
    ours = (lambda z, w, b: invact.functional.rms_norm(z, (12,), w, 1e-6, **kw)) if rms else \
        (lambda z, w, b: invact.functional.layer_norm(z, (12,), w, b, 1e-5, **kw))
    ref = (lambda z, w, b: F.layer_norm(z, (12,), w + (style == "gemma"), b, 1e-5)) if not rms else \
        (lambda z, w, b: F.rms_norm(z, (12,), w, 1e-6)) if style == "torch" else \
        (lambda z, w, b: w * F.rms_norm(z.float(), (12,), None, 1e-6).to(z.dtype)) if style == "llama" else \
        (lambda z, w, b: (F.rms_norm(z.float(), (12,), None, 1e-6) * (1.0 + w.float())).to(z.dtype))

    def close(a, r, what):
        rel = 1e-12 if style == "torch" else 2.0 ** -20
        assert (a - r).abs().max() <= rel * r.abs().max(), what
    for name, f in (("jvp x", lambda fn: jvp(lambda z: fn(z, w, b), (x,), (t,))[1]),
                    ("jvp w", lambda fn: jvp(lambda v: fn(x, v, b), (w,), (t[0],))[1]),
                    ("grad", lambda fn: grad(lambda z: fn(z, w, b).pow(3).sum())(x)),
                    ("per-sample", lambda fn: vmap(grad(lambda v, z: fn(z, v, b).pow(3).sum()), (None, 0))(w, x))):
        r = f(ref)
        assert r.abs().max() > 0
        close(f(ours), r, name)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(ours(fwAD.make_dual(x, t), w, b)).tangent
    close(got, jvp(lambda z: ref(z, w, b), (x,), (t,))[1], "dual tensors")
    m = invact.RMSNorm(12, dtype=torch.float64) if rms else invact.LayerNorm(12, dtype=torch.float64)
    params = dict(m.named_parameters())
    per_sample = vmap(grad(lambda p, z: functional_call(m, p, (z,)).pow(2).sum()), (None, 0))(params, x)
    assert set(per_sample) == set(params) and all(v.shape == (5, 12) for v in per_sample.values())


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_norms_under_autograd_batching_and_functionalize(rms):
    """autograd's own batching (is_grads_batched, jacobian(vectorize=True)) sends cotangents without
    storage: the backward runs torch ops on them, which batch (the C kernel read their data pointer and
    raised); functionalize around a derivative runs torch's math like the other transforms. float64:
    each row of the batch is the unbatched backward to 4 ulps of its magnitude (the same operations,
    batched), the jacobian and the functionalized gradient torch's to 1e-12."""
    from torch.func import functionalize, grad
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    w, b = torch.randn(8, generator=g, dtype=torch.float64), 0.1 * torch.randn(8, generator=g, dtype=torch.float64)
    ours = (lambda z: invact.functional.rms_norm(z, (8,), w, 1e-6)) if rms else \
        (lambda z: invact.functional.layer_norm(z, (8,), w, b))
    ref = (lambda z: F.rms_norm(z, (8,), w, 1e-6)) if rms else (lambda z: F.layer_norm(z, (8,), w, b))
    xr = x.clone().requires_grad_()
    cot = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    (batched,) = torch.autograd.grad(ours(xr), xr, cot, is_grads_batched=True)
    rows = torch.stack([torch.autograd.grad(ours(xr), xr, c)[0] for c in cot])
    assert ((batched - rows).abs() <= 4 * torch.finfo(torch.float64).eps * rows.abs().max()).all()
    jac, want = (torch.autograd.functional.jacobian(f, x, vectorize=True) for f in (ours, ref))
    assert (jac - want).abs().max() <= 1e-12 * want.abs().max()
    got = functionalize(grad(lambda z: ours(z).pow(3).sum()))(x)
    want = grad(lambda z: ref(z).pow(3).sum())(x)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
