"""Norm classes as found in the wild (hunt n3, 2026-12): what :func:`invact.patch` did with them before.

* A norm named like a pre-norm (``norm``, ``norm1``, ``ln_f``) was given ``autocast_output`` on its name
  alone, the report saying "a pre-norm: its consumers are Linears": a headless model's final ``norm``
  (LlamaModel's ``last_hidden_state``) and a post-norm block's ``norm1(x + lin(x))`` then returned bf16
  under autocast where the model returned float32 (on CPU too). The final norm of the patched model keeps
  torch's dtype now, and the note says when the name alone decided.
* A weight kept as ``(1, d)`` and broadcast (``weight * x_hat``) was swapped as normalized_shape
  ``(1, d)``, and the model's forward then raised ShapeError on its ``(n, d)`` input: it is left.
* A weight-less norm with ``eps=None`` (F.rms_norm's default: ``class QKRMSNorm(nn.RMSNorm)`` without
  affine parameters, ``F.rms_norm(x, shape, eps=self.eps)``) was left, its output's eps 1.192093e-07
  being "no decimal of up to 3 significant digits": it is swapped, eps=None.
* A subclass of nn.RMSNorm / nn.LayerNorm whose name lacks "RMSNorm" / "LayerNorm" (``class
  QKNorm(nn.RMSNorm)``) was neither swapped nor listed as left: it is probed.

Review of that change (r1, 2026-12), what it did before:

* A norm computing otherwise in training mode (a dropout on its output, ``y * 2 if self.training``) was
  swapped when patched in eval mode (``from_pretrained``'s mode): the probe ran in the current mode only.
* A weight-less RMSNorm adding float32's epsilon as a number (no eps attribute) was swapped as eps=None,
  2.7 relative off on float64 input.
* With ``example=``, a model returning a dataclass or another object (no tensor found), or a step failing
  under autocast, left every name's guess unchecked, yet the final norm lost the headless-output rule and
  the note said "checked by example=".
* ``patch(torch.compile(model))``, ``patch(DataParallel(model))`` and DDP cast the final norm (the rule
  compared the parent with the wrapper).
* A tied head (``F.linear(norm(h), embed.weight)``): the note called the final norm "the model's output".
* A weight-and-bias norm with an eps attribute of None was left with an empty reason.

Review r2 (2026-12): a model output holding itself (a dataclass with an ``owner`` field pointing back) hung
``patch(example=)`` in the output walk; a dataclass field never set (``field(init=False)``) was read as the
model failing under autocast; a weighted RMSNorm with an ``eps=None`` attribute whose forward adds float32's
epsilon was swapped as eps=None, off on float64 input (the float64 probe decided for weight-less norms only).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invact
from invact import norm_bounds
from norm_cases import check

N = 32


# ---------------------------------------------------------------------------------------------------
# autocast output: the model's final norm, and the note on a name's guess

class Block(nn.Module):
    """A pre-norm block: ``norm`` feeds a Linear only."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(N), nn.Linear(N, N)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.lin(self.norm(h))


class Headless(nn.Module):
    """LlamaModel's layout: embedding, layers, a final ``norm`` whose output the model returns (``head``:
    a Linear registered after it, as a model with its head)."""

    def __init__(self, head: bool = False) -> None:
        super().__init__()
        self.embed, self.layers = nn.Embedding(50, N), nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.LayerNorm(N)
        self.head = nn.Linear(N, 5) if head else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        return h if self.head is None else self.head(h)


def _autocast(model: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(*args)


HEADLESS = "torch's dtype under autocast: `{}`, a pre-norm's attribute name, has no Linear registered after it in " \
           "the patched model: taken for its output, torch's dtype kept"
NOT_CHECKED = "autocast output (a pre-norm by its attribute name `{}`, not checked: pass example= to check it, or " \
              "autocast_output=False)"


def test_final_norm_of_a_headless_model_keeps_torchs_dtype():
    """The final ``norm`` is the model's output: float32 under autocast as the unpatched model's, the same
    bits (the inner pre-norms' bf16 outputs are bit for bit what their Linears cast); the inner norms keep
    their autocast output, noted as a guess by name. With a head Linear after it, the final norm feeds
    that Linear and keeps its autocast output."""
    torch.manual_seed(0)
    ref, ids = Headless(), torch.randint(0, 50, (2, 7))
    model = copy.deepcopy(ref)
    report = invact.patch(model)
    notes = {r.path: r for r in report.replaced}
    assert not model.norm.autocast_output and notes["norm"].note == HEADLESS.format("norm"), str(report)
    assert model.layers[0].norm.autocast_output and notes["layers.0.norm"].note == NOT_CHECKED.format("norm")
    want, got = _autocast(ref, ids), _autocast(model, ids)
    assert want.dtype == got.dtype == torch.float32 and torch.equal(got, want)

    ref = Headless(head=True)
    model = copy.deepcopy(ref)
    invact.patch(model)
    assert model.norm.autocast_output
    want, got = _autocast(ref, ids), _autocast(model, ids)
    assert want.dtype == got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_llama_model_last_hidden_state_keeps_float32():
    """Hugging Face's LlamaModel returns its final ``norm``'s output (``last_hidden_state``): float32 under
    CPU autocast, bit for bit, patched as unpatched; LlamaForCausalLM's final norm feeds ``lm_head`` and
    returns bf16."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=N, intermediate_size=2 * N, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ids = torch.randint(1, 64, (2, 9))
    ref = transformers.LlamaModel(cfg).eval()
    model = copy.deepcopy(ref)
    invact.patch(model)
    assert isinstance(model.norm, invact.RMSNorm) and not model.norm.autocast_output
    assert model.layers[0].input_layernorm.autocast_output
    with torch.no_grad():
        want, got = _autocast(ref, ids).last_hidden_state, _autocast(model, ids).last_hidden_state
    assert want.dtype == got.dtype == torch.float32 and torch.equal(got, want)
    measured = copy.deepcopy(ref)
    report = invact.patch(measured, example=ids)         # a ModelOutput (a dict): its tensors are compared
    notes = {r.path: r.note for r in report.replaced}
    assert not measured.norm.autocast_output and notes["norm"].startswith("torch's dtype under autocast: measured")
    assert measured.layers[0].input_layernorm.autocast_output
    lm = transformers.LlamaForCausalLM(cfg)
    invact.patch(lm)
    assert lm.model.norm.autocast_output


class PostNorm(nn.Module):
    """A post-norm block (as tutorials write it): ``norm1``'s output is the residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.norm1 = nn.Linear(N, N), nn.LayerNorm(N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm1(x + self.lin(x))


def test_the_note_says_when_the_name_alone_decided():
    """A name's guess is noted as one; torch's layers' ``norm_first`` decides with the plain note; an
    explicit ``autocast_output=True`` says so; with an autocast ``example=``, the post-norm's guess is
    measured and refused, and the residual stream under autocast is the unpatched one's (float32)."""
    torch.manual_seed(0)
    ref, x = nn.Sequential(PostNorm(), PostNorm(), nn.Linear(N, 4)), torch.randn(3, 5, N)
    report = invact.patch(copy.deepcopy(ref))
    assert report.replaced[0].path == "0.norm1" and report.replaced[0].note == NOT_CHECKED.format("norm1"), str(report)
    layer = nn.TransformerEncoderLayer(N, 2, 64, dropout=0.0, batch_first=True, norm_first=True)
    notes = {r.path: r.note for r in invact.patch(layer).replaced}
    assert notes["norm1"] == notes["norm2"] == "autocast output (a pre-norm: its consumers are Linears)", notes
    forced = invact.patch(copy.deepcopy(ref), autocast_output=True)
    assert forced.replaced[0].note == "autocast output (autocast_output=True)", str(forced)

    def step(m: nn.Module) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x).float().square().mean()

    model = copy.deepcopy(ref)
    report = invact.patch(model, example=step)
    notes = {r.path: r.note for r in report.replaced}
    assert notes["0.norm1"].startswith("torch's dtype under autocast: measured"), str(report)
    want, got = _autocast(ref[:2], x), _autocast(model[:2], x)          # the residual stream
    assert want.dtype == got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(_autocast(model, x), _autocast(ref, x))


# ---------------------------------------------------------------------------------------------------
# a broadcast weight

class BroadcastRMSNorm(nn.Module):
    """Llama's RMSNorm with its weight kept as ``(1, d)`` (or ``(1, 1, d)``), broadcast over any input."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(*shape) * 0.3 + 1), 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class RowLayerNorm(nn.LayerNorm):
    """A subclass of nn.LayerNorm over ``(1, d)``: it takes only inputs ending in ``(1, d)`` itself."""


@pytest.mark.parametrize("shape", [(1, 16), (1, 1, 16)])
def test_a_broadcast_weight_is_left_and_the_model_runs(shape):
    """Swapped as normalized_shape ``(1, 16)``, the model's forward raised ShapeError on ``(8, 16)``; a ``(16,)``
    weight would change the state_dict: the norm is left, saying why, and the model computes as before."""
    torch.manual_seed(0)
    ref, x = nn.Sequential(nn.Linear(16, 16), BroadcastRMSNorm(*shape), nn.Linear(16, 4)), torch.randn(8, 16)
    model = copy.deepcopy(ref)
    report = invact.patch(model)
    assert len(report) == 0 and type(model[1]) is BroadcastRMSNorm, str(report)
    assert report.left[0].reason.startswith(f"its weight has shape {shape}, whose size-1 dimensions broadcast")
    assert torch.equal(model(x), ref(x))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_a_layer_norm_subclass_over_a_size_1_dimension_is_swapped():
    """A norm stating its ``(1, d)`` normalized shape takes only such inputs itself: it is swapped, keeping
    its Parameters (the same objects) and computing torch's output bit for bit."""
    torch.manual_seed(0)
    ref = RowLayerNorm((1, N))
    with torch.no_grad():
        ref.weight.copy_(torch.randn(1, N) * 0.3 + 1)
    model = nn.Sequential(copy.deepcopy(ref))
    weight = model[0].weight
    report = invact.patch(model)
    assert isinstance(model[0], invact.LayerNorm) and model[0].weight is weight, str(report)
    x = torch.randn(4, 1, N)
    assert torch.equal(model(x), ref(x))


# ---------------------------------------------------------------------------------------------------
# eps=None without weight

class QKRMSNorm(nn.RMSNorm):
    pass


class EpsNoneRMSNorm(nn.Module):
    def __init__(self, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], eps=self.eps)


class DefaultEpsRMSNorm(nn.Module):      # no eps attribute: F.rms_norm's default
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:])


@pytest.mark.parametrize("make, eps_note", [
    (lambda: QKRMSNorm(N, elementwise_affine=False), "eps=None attribute: F.rms_norm's default"),
    (EpsNoneRMSNorm, "eps=None attribute: F.rms_norm's default"),
    (DefaultEpsRMSNorm, "eps=None (F.rms_norm's default) inferred from its output"),
], ids=["rmsnorm-subclass", "eps-attribute-none", "no-eps-attribute"])
def test_weightless_eps_none_is_swapped(make, eps_note):
    """F.rms_norm's eps=None is the epsilon of the dtype it computes in: swapped as eps=None, the same output
    bit for bit on float32, bfloat16 and float16 (rows whose variance is below eps included), and dx within
    norm_bounds.error_bound of the float64 reference."""
    ref = make()
    model = nn.Sequential(copy.deepcopy(ref))
    report = invact.patch(model)
    assert len(report) == 1 and isinstance(model[0], invact.RMSNorm) and model[0].eps is None, str(report)
    assert eps_note in report.replaced[0].note, report.replaced[0].note
    g = torch.Generator().manual_seed(3)
    scales = torch.tensor([2.0, 1e-2, 3e-4], dtype=torch.float64).repeat(16).reshape(48, 1)   # 3e-4: var < eps
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = ((torch.randn(48, N, generator=g, dtype=torch.float64) + 0.2) * scales).to(dtype).requires_grad_()
        dy = torch.randn(48, N, generator=g).to(dtype)
        y = model(x)
        assert y.dtype == dtype and torch.equal(y, ref(x))
        (dx,) = torch.autograd.grad(y, x, dy)
        refs, tols = norm_bounds.error_bound(x.detach(), torch.ones(N), None, dy, y.detach(), True,
                                             torch.finfo(torch.float32).eps)
        check(dx, refs[0], tols[0], f"{type(ref).__name__} {dtype} dx")


# ---------------------------------------------------------------------------------------------------
# subclasses of torch's norms whatever their names

class QKNorm(nn.RMSNorm):
    pass


class Normalizer(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:      # overridden, computing the same
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class DoubledNorm(nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:      # overridden, computing something else
        return 2 * super().forward(x)


@pytest.mark.parametrize("make", [lambda: QKNorm(N), lambda: QKNorm(N, eps=1e-6), lambda: Normalizer(N)],
                         ids=["qknorm-eps-none", "qknorm", "normalizer"])
def test_subclasses_of_torchs_norms_of_any_name_are_swapped(make):
    """Probed and swapped: the same Parameters, the same output bit for bit on float32 and bfloat16, and
    the gradients within norm_bounds.error_bound of the float64 reference."""
    torch.manual_seed(0)
    ref = make()
    with torch.no_grad():
        ref.weight.copy_(torch.randn(N) * 0.3 + 1)
    model = nn.Sequential(copy.deepcopy(ref))
    report = invact.patch(model)
    assert len(report) == 1 and isinstance(model[0], (invact.RMSNorm, invact.LayerNorm)), str(report)
    assert report.replaced[0].note.startswith("probe: same output"), str(report)
    rms = isinstance(ref, nn.RMSNorm)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(24, N, dtype=torch.float64) * 2 + 0.3).to(dtype).requires_grad_()
        dy = torch.randn(24, N).to(dtype)
        y = model.to(dtype)(x)
        assert torch.equal(y, ref.to(dtype)(x))
        dx, dw = torch.autograd.grad(y, (x, model[0].weight), dy)[:2]
        eps = ref.eps if ref.eps is not None else torch.finfo(torch.float32).eps
        bias = getattr(model[0], "bias", None)
        refs, tols = norm_bounds.error_bound(x.detach(), model[0].weight.detach(),
                                             None if bias is None else bias.detach(), dy, y.detach(), rms, eps)
        check(dx, refs[0], tols[0], f"{type(ref).__name__} {dtype} dx")
        check(dw, refs[1], tols[1], f"{type(ref).__name__} {dtype} dw")


def test_a_subclass_computing_something_else_is_listed_as_left():
    """A subclass whose forward computes another function was not mentioned; it is left, saying why."""
    model = nn.Sequential(DoubledNorm(N))
    report = invact.patch(model)
    assert len(report) == 0 and type(model[0]) is DoubledNorm, str(report)
    assert report.left[0].path == "0" and report.left[0].reason.startswith("probe: no invact norm"), str(report)


# ---------------------------------------------------------------------------------------------------
# review r1: training mode, float32's epsilon as a number, the unchecked autocast guess, wrappers, eps=None

class DropoutLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(super().forward(x), 0.5, self.training)


class TrainScaledRMSNorm(nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y * 2 if self.training else y


class MyRMSNorm(nn.Module):
    """Llama's RMSNorm by name, with a dropout on its output."""

    def __init__(self, n: int = N) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(n)), 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return F.dropout(self.weight * y, 0.1, self.training)


class WeightlessTrainRMSNorm(nn.Module):
    normalized_shape = (N,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x, (N,), eps=1e-6)
        return y * 2 if self.training else y


@pytest.mark.parametrize("make", [lambda: DropoutLayerNorm(N), lambda: TrainScaledRMSNorm(N), MyRMSNorm,
                                  WeightlessTrainRMSNorm],
                         ids=["dropout-subclass", "train-branch", "named", "weightless"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_norm_computing_otherwise_in_training_mode_is_left(make, mode):
    """Patched in eval mode (as ``from_pretrained`` returns a model), such a norm was swapped and then
    computed its eval-mode function in training too: it is left in either mode, saying why, and the model
    computes what it did (eval mode: the same bits)."""
    torch.manual_seed(0)
    ref = nn.Sequential(make())
    model = copy.deepcopy(ref).train(mode == "train")
    report = invact.patch(model)
    assert len(report) == 0 and type(model[0]) is type(ref[0]), str(report)
    assert "computes differently in training mode" in report.left[0].reason, str(report)
    x = torch.randn(4, N)
    assert torch.equal(model.eval()(x), ref.eval()(x))


class Float32EpsRMSNorm(nn.Module):
    """Weight-less, float32's epsilon added as a number (no eps attribute), in float32 for 16-bit input."""

    normalized_shape = (64,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.element_size() < 4 else x
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1.1920928955078125e-07)).to(x.dtype)


def test_float32s_epsilon_as_a_number_is_kept_on_float64():
    """eps=None is F.rms_norm's default, the epsilon of the dtype it computes in: on float64 input 2.2e-16,
    not the module's 1.19e-7 (2.7 relative off on rows of variance 1e-8). The number and None compute the
    same on float32 and 16-bit input; the float64 probe chooses the number. float32: the same bits; float64:
    within 4 float64 ulps of each row's largest |y| (mean, rsqrt and a product, each rounded once, in
    another order: a few ulps)."""
    ref = Float32EpsRMSNorm()
    model = nn.Sequential(copy.deepcopy(ref))
    report = invact.patch(model)
    assert len(report) == 1 and model[0].eps == torch.finfo(torch.float32).eps, str(report)
    assert "eps 1.19209e-07 inferred from its output" in report.replaced[0].note, str(report)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g, dtype=torch.float64) * torch.logspace(0, -7, 8, dtype=torch.float64)[:, None]
    assert torch.equal(model(x.float()), ref(x.float()))
    want, got = ref(x), model(x)
    scale = want.abs().amax(-1, keepdim=True)
    assert ((got - want).abs() <= 4 * torch.finfo(torch.float64).eps * scale).all()


@dataclasses.dataclass
class Hidden:
    last_hidden_state: torch.Tensor


class Boxed:
    def __init__(self, h: torch.Tensor) -> None:
        self.h = h


class Wrapped(Headless):
    """:class:`Headless` returning its final norm's output in ``box`` (a dataclass or another object), or
    with ``lerp``, meeting float32 with a Linear's output (a step that fails under autocast whatever the norms)."""

    def __init__(self, box: type | None = None, lerp: bool = False) -> None:
        super().__init__()
        self.box, self.lerp, self.pre = box, lerp, nn.Linear(N, N)
        self.norm = self._modules.pop("norm")          # registered last again: no Linear after it

    def forward(self, ids: torch.Tensor) -> object:
        h = self.embed(ids)
        h = torch.lerp(h, self.pre(h), 0.5) if self.lerp else h
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        return h if self.box is None else self.box(h)


@pytest.mark.parametrize("box, lerp, why", [(Boxed, False, "returned no tensor to compare"),
                                            (None, True, "failed under bf16 autocast")], ids=["object", "fails"])
def test_an_unchecked_autocast_guess_keeps_the_rule_without_example(box, lerp, why):
    """Where the autocast check compares nothing, the final norm keeps torch's dtype as without example=
    (was bf16 ``last_hidden_state``, noted "checked by example="), and the notes say the guess was not
    checked, and why; the inner pre-norms keep their autocast output."""
    torch.manual_seed(0)
    ref, ids = Wrapped(box, lerp), torch.randint(0, 50, (2, 7))
    model = copy.deepcopy(ref)
    report = invact.patch(model, example=ids)
    notes = {r.path: r.note for r in report.replaced}
    assert not model.norm.autocast_output and notes["norm"].startswith(HEADLESS.format("norm")), str(report)
    assert f"not checked by example=, whose model {why}" in notes["norm"], str(report)
    assert model.layers[0].norm.autocast_output and "checked by example=:" not in str(report), str(report)
    assert f"not checked by example=, whose model {why}" in notes["layers.0.norm"], str(report)
    if box is not None:
        want, got = _autocast(ref, ids).h, _autocast(model, ids).h
        assert want.dtype == got.dtype == torch.float32 and torch.equal(got, want)


def test_a_dataclass_output_is_compared():
    """A model returning a dataclass: its tensors are the outputs the check compares (it compared none
    before, and kept the post-norm's bf16): the post-norm and the final norm keep torch's dtype, measured;
    the inner pre-norm's guess is noted as checked."""
    torch.manual_seed(0)

    class Post(Wrapped):
        def __init__(self) -> None:
            super().__init__(Hidden)
            self.layers[1] = nn.Sequential(PostNorm())

    ref, ids = Post(), torch.randint(0, 50, (2, 7))
    model = copy.deepcopy(ref)
    report = invact.patch(model, example=ids)
    notes = {r.path: r.note for r in report.replaced}
    assert not model.layers[1][0].norm1.autocast_output and not model.norm.autocast_output, str(report)
    assert notes["layers.1.0.norm1"].startswith("torch's dtype under autocast: measured"), str(report)
    assert model.layers[0].norm.autocast_output
    assert notes["layers.0.norm"].startswith("autocast output (a pre-norm by its attribute name `norm`, checked by "
                                             "example=: the model's outputs under bf16 autocast are the same"), notes
    want, got = _autocast(ref, ids).last_hidden_state, _autocast(model, ids).last_hidden_state
    assert want.dtype == got.dtype == torch.float32 and torch.equal(got, want)


def test_a_wrapped_models_final_norm_keeps_torchs_dtype(tmp_path):
    """``patch(torch.compile(model))`` / ``patch(DataParallel(model))`` / DDP (gloo, one process, where
    available): the final norm of the model inside keeps torch's dtype, as unwrapped (the rule compared its
    parent with the wrapper)."""
    dist = torch.distributed
    compiled, parallel = Headless(), Headless()
    cases = [("compile", torch.compile(compiled), compiled), ("dataparallel", nn.DataParallel(parallel), parallel)]
    if dist.is_available() and dist.is_gloo_available() and not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        inner = Headless()
        cases.append(("ddp", nn.parallel.DistributedDataParallel(inner), inner))
    try:
        for name, wrapper, inner in cases:
            report = invact.patch(wrapper)
            assert isinstance(inner.norm, invact.LayerNorm) and not inner.norm.autocast_output, (name, str(report))
            assert inner.layers[0].norm.autocast_output, name
            ids = torch.randint(0, 50, (2, 7))
            assert _autocast(inner, ids).dtype == torch.float32, name
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class TiedLM(Headless):
    """A head tied to the embedding: ``F.linear(norm(h), embed.weight)``, no Linear registered."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(super().forward(ids), self.embed.weight)


def test_a_tied_heads_final_norm_note_says_what_was_decided():
    """No Linear is registered after the final norm: it keeps torch's dtype (the logits are the same, the
    head casts it), and the note says so, not that it is the model's output."""
    torch.manual_seed(0)
    ref, ids = TiedLM(), torch.randint(0, 50, (2, 7))
    model = copy.deepcopy(ref)
    report = invact.patch(model)
    note = {r.path: r.note for r in report.replaced}["norm"]
    assert note == HEADLESS.format("norm") and "the model's output" not in note, note
    assert torch.equal(_autocast(model, ids), _autocast(ref, ids))


class EpsNoneBiasLayerNorm(nn.Module):
    """Weight and bias, an eps attribute of None; computes F.layer_norm's default eps 1e-5 (``zero``: eps 0)."""

    def __init__(self, zero: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(N) * 0.3 + 1), nn.Parameter(torch.randn(N) * 0.1)
        self.eps, self.zero = None, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (N,), self.weight, self.bias, 0.0) if self.zero else \
            F.layer_norm(x, (N,), self.weight, self.bias)


def test_a_weighted_norm_with_eps_none_infers_its_eps():
    """Left with an empty reason before: its eps is inferred from the output (weight 1, bias 0) as without
    weight, and it is swapped with eps 1e-5, the same bits; one without eps in its output is left, the
    reason naming the eps=None attribute and what the output showed."""
    torch.manual_seed(0)
    ref = EpsNoneBiasLayerNorm()
    model = nn.Sequential(copy.deepcopy(ref))
    report = invact.patch(model)
    assert len(report) == 1 and model[0].eps == 1e-5, str(report)
    assert "eps=None attribute: eps 1e-05 inferred from its output" in report.replaced[0].note
    x = torch.randn(4, N) * torch.tensor([2.0, 1e-2, 3e-3, 1e-4])[:, None]
    assert torch.equal(model(x), ref(x))
    left = invact.patch(nn.Sequential(EpsNoneBiasLayerNorm(zero=True))).left[0].reason
    assert "LayerNorm forms: no eps number, and no eps in its output" in left and "eps=None attribute" in left, left


@dataclasses.dataclass
class _Looped:
    h: torch.Tensor
    owner: object = None
    loss: torch.Tensor = dataclasses.field(init=False)   # never set


class _LoopedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x):
        out = _Looped(self.fc(self.norm(x)))
        out.owner = out
        return out


def test_an_output_holding_itself_is_walked_once():
    """The autocast check's walk of the model's outputs visits each object once (it looped forever) and
    reads an unset dataclass field as absent (it reported the model failing under autocast)."""
    model = _LoopedLayer()
    report = invact.patch(model, example=lambda m: m(torch.randn(2, 16)).h.sum())
    note = report.replaced[0].note
    assert isinstance(model.norm, invact.LayerNorm) and "checked by example=" in note and "failed" not in note, note


class _StatedEpsRMSNorm(nn.Module):
    """eps=None stated, float32's epsilon added: F.rms_norm's default only on float32 and 16-bit input."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.eps, self.weight = None, nn.Parameter(torch.randn(d))

    def forward(self, x):
        return F.rms_norm(x, x.shape[-1:], self.weight, eps=torch.finfo(torch.float32).eps)


def test_a_weighted_eps_none_norm_is_decided_on_float64():
    """Both candidates give the same bits on float32 and 16-bit input; on float64 only float32's epsilon
    as a number does: the swap must equal the original on float64 to its rounding (F.rms_norm's float64
    ops, a few ulps: 1e-13 relative), not 53 relative off on rows of small variance."""
    torch.manual_seed(0)
    norm = _StatedEpsRMSNorm(32)
    model = nn.Sequential(norm)
    invact.patch(model)
    assert isinstance(model[0], invact.RMSNorm)
    x = torch.randn(4, 32, dtype=torch.float64) * 1e-4
    want = norm.double()(x)
    got = model.double()(x)
    assert torch.allclose(got, want, rtol=1e-13, atol=0), (got - want).abs().max()
