"""invact.patch / unpatch leave the model as they found it: no state moved by the measuring forwards,
no post-norm turned into a pre-norm, no module swapped for one that computes something else, and no
assignment made while patched lost by unpatch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invact


# ---------------------------------------------------------------------------------------------------
# measuring forwards (example=) leave every parameter and buffer as it was

class Counting(nn.Module):
    """Changes its state in forward: a buffer in place, another reassigned, a parameter in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros(8))

    def forward(self, x):
        self.calls += 1
        self.seen = self.seen + x.detach().mean(0)
        with torch.no_grad():
            self.lin.bias.mul_(0.5)
        return self.lin(x)


def _snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {k: (t, t.detach().clone()) for k, t in [*model.named_parameters(), *model.named_buffers()]}


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert set(now) == set(before)
    for k, (obj, value) in before.items():
        assert now[k] is obj, f"{k}: another object"
        assert now[k].dtype == value.dtype and torch.equal(now[k], value), f"{k}: value changed"
        assert getattr(now[k], "grad", None) is None, f"{k}: grad set"


@pytest.mark.parametrize("training", [False, True])
def test_measuring_leaves_batchnorm_statistics_alone(training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 3))
    model.train(training)
    x = torch.randn(2, 3, 8, 8) * 5 + 3
    before = _snapshot(model)
    with torch.no_grad():
        y0 = model(x) if not training else None
    report = invact.patch(model, example=x)
    assert [r.path for r in report.replaced] == ["2"], str(report)     # measured, and kept
    _assert_unchanged(model, before)
    assert all(m.training == training for m in model.modules())
    if not training:
        with torch.no_grad():
            assert torch.equal(model(x), y0)


def test_measuring_restores_state_a_forward_or_step_changes():
    torch.manual_seed(0)
    model = nn.Sequential(Counting(), nn.GELU(), nn.Linear(8, 2))
    before = _snapshot(model)
    x = torch.randn(4, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(m):                                     # a custom step: backward and an optimizer step
        m(x).sum().backward()
        opt.step()

    report = invact.patch(model, example=step)
    assert [r.path for r in report.replaced] == ["1"], str(report)
    _assert_unchanged(model, before)


def test_measuring_restores_state_when_the_step_raises():
    model = nn.Sequential(Counting(), nn.GELU(), nn.Linear(8, 2))
    before = _snapshot(model)

    def step(m):
        m(torch.randn(4, 8))
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        invact.patch(model, example=step)
    _assert_unchanged(model, before)
    assert isinstance(model[1], nn.GELU)             # the swaps undone: the model as it was


def test_measuring_restores_gradients_a_step_accumulates_into():
    """A step that runs backward adds into an existing .grad in place: the values are put back."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)), torch.randn(5, 8)
    model(x).sum().backward()
    grads = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters()}
    report = invact.patch(model, example=lambda m: m(x).sum().backward())
    assert [r.path for r in report.replaced] == ["1"], str(report)
    for n, p in model.named_parameters():
        assert p.grad is grads[n][0] and torch.equal(p.grad, grads[n][1]), n


def test_measuring_a_model_with_an_inference_tensor_buffer():
    """A buffer made under inference_mode has no version counter: measuring must not need one."""
    class WithShift(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)
            with torch.inference_mode():
                self.register_buffer("shift", torch.ones(8))

        def forward(self, x):
            return self.out(self.act(self.fc(x) + self.shift))
    model = WithShift()
    report = invact.patch(model, example=torch.randn(4, 8))
    assert [r.path for r in report.replaced] == ["act"], str(report)
    assert torch.equal(model.shift, torch.ones(8))


# ---------------------------------------------------------------------------------------------------
# post-norm layers keep torch's dtype under autocast; pre-norms return the autocast dtype

def _layer(decoder: bool, norm_first: bool) -> nn.Module:
    cls = nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer
    return cls(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)


def _autocast_outputs(model: nn.Module, args: tuple) -> tuple[torch.Tensor, dict[str, torch.dtype]]:
    """The model's output and each norm's output dtype under bf16 autocast (grad on: torch's slow path)."""
    dtypes: dict[str, torch.dtype] = {}
    handles = [m.register_forward_hook(lambda m, a, out, n=n: dtypes.__setitem__(n, out.dtype))
               for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(*args)
    for h in handles:
        h.remove()
    return y, dtypes


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_torch_transformer_layers_read_norm_first(decoder, norm_first):
    torch.manual_seed(0)
    ref = _layer(decoder, norm_first)
    model = copy.deepcopy(ref)
    report = invact.patch(model)
    norms = [r for r in report.replaced if r.path.startswith("norm")]
    assert len(norms) == (3 if decoder else 2), str(report)
    assert all(("autocast_output=True" in r.new) == norm_first for r in norms), str(report)
    args = (torch.randn(2, 5, 16),) + ((torch.randn(2, 7, 16),) if decoder else ())
    want, want_dtypes = _autocast_outputs(ref, args)
    got, got_dtypes = _autocast_outputs(model, args)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if not norm_first:                           # post-norm: every norm keeps torch's dtype
        assert got_dtypes == want_dtypes


def test_torch_transformer_stack_final_norm_keeps_its_dtype():
    stack = nn.TransformerEncoder(_layer(False, True), 2, norm=nn.LayerNorm(16), enable_nested_tensor=False)
    report = invact.patch(stack)
    cast = {r.path: "autocast_output=True" in r.new for r in report.replaced}
    assert cast == {"layers.0.norm1": True, "layers.0.norm2": True, "layers.1.norm1": True,
                    "layers.1.norm2": True, "norm": False}, str(report)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stack(torch.randn(2, 5, 16)).dtype == torch.float32


class NamedLikePreNorm(nn.Module):
    """Attribute names of pre-norms, but ``ln_1`` is a post-norm: its output feeds the residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.lin2, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.ln_1, self.ln_f = nn.LayerNorm(16), nn.LayerNorm(16)

    def forward(self, x):
        h = self.ln_1(x + self.lin(x))
        h = h + self.lin2(h)
        return self.head(self.ln_f(h))


def test_measured_autocast_output_only_where_the_output_is_unchanged():
    torch.manual_seed(0)
    ref, x = NamedLikePreNorm(), torch.randn(2, 5, 16)
    model = copy.deepcopy(ref)
    report = invact.patch(model, example=x)
    replaced = {r.path: r for r in report.replaced}
    assert set(replaced) == {"ln_1", "ln_f"}, str(report)
    assert not model.ln_1.autocast_output and "autocast_output=True" not in replaced["ln_1"].new
    assert "changes the model's output" in replaced["ln_1"].note
    assert model.ln_f.autocast_output                      # feeds the head only: kept
    want, _ = _autocast_outputs(ref, (x,))
    got, dtypes = _autocast_outputs(model, (x,))
    assert dtypes == {"ln_1": torch.float32, "ln_f": torch.bfloat16}
    assert got.dtype == want.dtype and torch.equal(got, want)
    invact.unpatch(model)
    assert invact.patch(model, example=x, autocast_output=True).replaced[0].new.endswith("autocast_output=True)")


# ---------------------------------------------------------------------------------------------------
# the probe recognises a class only where it computes the activation everywhere, in both modes

class LerpsWithItsNorm(nn.Module):
    """A norm named like a pre-norm whose output meets float32 in an op that needs equal dtypes."""

    def __init__(self):
        super().__init__()
        self.input_layernorm, self.proj = nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, h):
        return self.proj(torch.lerp(self.input_layernorm(h), h, 0.5))


def test_an_autocast_output_that_breaks_the_step_is_refused_not_raised():
    model, x = nn.Sequential(LerpsWithItsNorm()), torch.randn(8, 16)
    report = invact.patch(model, example=x)
    assert not model[0].input_layernorm.autocast_output and "the step fails" in str(report), str(report)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)                                         # runs, as with torch's norm


def test_the_autocast_check_starts_every_run_from_the_same_weights():
    """A step with an optimizer: each autocast run starts from the original parameters, so pre-norms
    keep their autocast output (every run differed before, and each was refused)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm, self.proj = nn.LayerNorm(32), nn.Linear(32, 32)

        def forward(self, x):
            return x + self.proj(self.input_layernorm(x))
    torch.manual_seed(0)
    model, x = nn.Sequential(Block(), Block(), nn.Linear(32, 4)), torch.randn(64, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(m):
        m(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    invact.patch(model, example=step)
    assert model[0].input_layernorm.autocast_output and model[1].input_layernorm.autocast_output


class Lambda(nn.Module):
    """A parameter-free class computing ``fn(x, training)``."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x, self.training)


LOOK_ALIKES = {                                 # gelu on [-8, 8], in eval mode; something else elsewhere
    "clipped at 10": lambda x, t: torch.clip(F.gelu(x), -10.0, 10.0),
    "clipped at 1e4": lambda x, t: torch.clip(F.gelu(x), -1e4, 1e4),
    "clipped at 1e30": lambda x, t: torch.clip(F.gelu(x), -1e30, 1e30),
    "wrong below -100": lambda x, t: torch.where(x < -100, x, F.gelu(x)),
    "NaN at zero": lambda x, t: torch.where(x == 0, torch.nan, F.gelu(x)),
    "NaN at -0": lambda x, t: torch.where((x == 0) & x.signbit(), torch.nan, F.gelu(x)),
    "dropout in training": lambda x, t: F.dropout(F.gelu(x), 0.5, t),
    "scaled in training": lambda x, t: F.gelu(x) * (2.0 if t else 1.0),
}


@pytest.mark.parametrize("case", list(LOOK_ALIKES))
def test_probe_refuses_a_look_alike(case):
    act = Lambda(LOOK_ALIKES[case])
    model = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 1)).train()
    rng = torch.get_rng_state()
    report = invact.patch(model)
    assert model[1] is act and not report.replaced, str(report)
    assert torch.equal(torch.get_rng_state(), rng) and act.training       # the probe runs a copy, RNG forked


def test_probe_still_recognises_gelu_written_out():
    gelu = Lambda(lambda x, t: 0.5 * x * (1 + torch.erf(x / 2 ** 0.5)))
    model = nn.Sequential(nn.Linear(4, 4), gelu, nn.Linear(4, 1)).train()
    report = invact.patch(model)
    assert isinstance(model[1], invact.GELU) and "computes gelu" in report.replaced[0].note
    assert invact.unpatch(model) == ["1"] and model[1] is gelu and gelu.training


# ---------------------------------------------------------------------------------------------------
# unpatch keeps what was assigned while patched

class MyRMSNorm(nn.Module):
    """A Hugging Face style RMSNorm (Llama's formula), recognised by the norm probe."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(n)), 1e-6

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 4), MyRMSNorm(4),
                         nn.RMSNorm(4), nn.SiLU())


def _assign_load(model):
    model.load_state_dict({k: torch.full_like(v, 3.0) for k, v in model.state_dict().items()}, assign=True)


def _assign_attribute(model):
    for m in (model[1], model[4], model[5]):
        m.weight = nn.Parameter(torch.full((4,), 5.0))


def _swap_to_float64(model):
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


@pytest.mark.parametrize("change", [_assign_load, _assign_attribute, _swap_to_float64, lambda m: m.double()],
                         ids=["load_state_dict_assign", "attribute", "to_swap", "double"])
def test_unpatch_keeps_what_was_assigned_while_patched(change):
    model = _model()
    originals = list(model)
    report = invact.patch(model)
    assert {r.path for r in report.replaced} == {"1", "2", "4", "5", "6"}, str(report)
    change(model)
    while_patched = dict(model.state_dict(keep_vars=True))
    invact.unpatch(model)
    assert list(model) == originals                              # the original modules back
    after = dict(model.state_dict(keep_vars=True))
    assert after.keys() == while_patched.keys()
    for k, t in while_patched.items():
        assert after[k] is t, k                                  # the same objects, so values and dtypes
    x = torch.randn(2, 4, dtype=model[0].weight.dtype)
    model(x).sum().backward()                                    # and they are the ones trained
    assert all(p.grad is not None for p in while_patched.values())
