"""invact.patch on models that write into a swapped module's output, carry hooks on the modules it swaps,
checkpoint their layers, are pickled or copied, or are built on the meta device: each trains as the
unpatched model does (or the measurement leaves the swap, saying why).

Models are float64 where gradients are compared: the only difference from the unpatched model is then the
fitted tables' certified error (GELU, SiLU: 3.4e-8 relative to each element's derivative, fp32-grade,
README "Certified errors"), and float64 rounding for the norms. A parameter's gradient sums such products
over a batch, where terms cancel, so the bound is relative to the terms, not to the sum: the tolerance is
1e-6 (30x the certificate) of the gradient's largest entry, far below any real mismatch (a hook or a
checkpoint that does not run changes gradients by O(1)).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import invact
from invact import recognise

TOL = 1e-6                          # relative to the largest entry: see the module docstring
INPLACE = "modified by an inplace operation"      # PyTorch's version-counter error at backward


def _step(model: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(loss, parameter gradients) of one training step, dropout masks drawn from ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(x).square().sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same_step(ref: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    (l0, g0), (l1, g1) = _step(ref, x), _step(model, x)
    torch.testing.assert_close(l1, l0, rtol=TOL, atol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=0, atol=TOL * a.abs().max().item())


# ---------------------------------------------------------------------------------------------------
# 1. a norm's output is a plain tensor: an in-place op on it fails at backward as after an activation

def _norm_args(rms: bool) -> tuple:
    n = 8
    weight = nn.Parameter(torch.rand(n) + 0.5)
    bias = None if rms else nn.Parameter(torch.randn(n) * 0.1)
    return weight, bias, n, 1e-5, rms, 0.0, None, torch.float32, "eager"


@pytest.mark.parametrize("rms", [False, True])
def test_norm_output_is_not_a_view_eager_and_custom_op(rms):
    x = torch.randn(3, 4, 8, requires_grad=True)
    norm = invact.RMSNorm(8) if rms else invact.LayerNorm(8)
    outputs = {"eager": norm(x), "custom op": torch.ops.invact.norm_forward(x, *_norm_args(rms))[0]}
    for path, y in outputs.items():
        assert not y._is_view() and y.shape == x.shape, path
        y.relu_()                                  # as ReLU(inplace=True) after the norm: allowed in the forward
        with pytest.raises(RuntimeError, match=INPLACE):
            y.sum().backward()


FIRST = {"LayerNorm": lambda: invact.LayerNorm(16), "GELU": invact.GELU}   # before ReLU(inplace=True)


def _relu_after(first: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), FIRST[first](), nn.ReLU(inplace=True), nn.Linear(16, 2))


@pytest.mark.parametrize("first", sorted(FIRST))
def test_inplace_relu_after_a_norm_behaves_as_after_an_activation(first):
    out = _relu_after(first)(torch.randn(4, 8))   # the forward runs
    with pytest.raises(RuntimeError, match=INPLACE):
        out.sum().backward()


@pytest.mark.parametrize("first", sorted(FIRST))
def test_inplace_relu_after_a_norm_under_torch_compile(first):
    """torch.compile runs the custom op (not the eager autograd.Function); AOTAutograd traces the backward
    when it compiles, so PyTorch's error comes from the first call, for a norm as for an activation."""
    compiled = torch.compile(_relu_after(first), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=INPLACE):
        compiled(torch.randn(4, 8, requires_grad=True)).sum().backward()


# ---------------------------------------------------------------------------------------------------
# 2. measured: a swap whose output is written in place later in the forward is left, with the reason

class ScaledMLP(nn.Module):
    """``h = act(fc(x)); h *= 0.5``: in place on the activation's output (PyTorch's GELU saves x)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.proj = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)

    def forward(self, x):
        h = self.act(self.fc(x))
        h *= 0.5
        return self.proj(h)


class PostNormBlock(nn.Module):
    """Gemma 4's audio layer: ``h = post_layer_norm(h); h *= scale; h += residual``."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 8)
        self.post_layer_norm = nn.RMSNorm(8)

    def forward(self, x):
        h = self.post_layer_norm(self.down(self.act(self.up(x))))
        h *= 0.5
        h += x
        return h


def _hooked_gelu() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    model[1].register_forward_hook(lambda m, args, out: out.mul_(2))     # in place, inside a forward hook
    return model


WRITTEN = {   # model, the path of the swap left, the path of a swap kept (or None)
    "dropout_inplace_after_gelu": (lambda: nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1, inplace=True),
                                                         nn.Linear(32, 8)), "1", None),
    "scaled_in_place_after_gelu": (ScaledMLP, "act", None),
    "relu_inplace_after_layernorm": (lambda: nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(inplace=True),
                                                           nn.Linear(32, 8)), "1", None),
    "scaled_in_place_after_rmsnorm": (PostNormBlock, "post_layer_norm", "act"),
    "in_place_in_a_forward_hook": (_hooked_gelu, "1", None),
}


@pytest.mark.parametrize("callable_step", [False, True])
@pytest.mark.parametrize("case", sorted(WRITTEN))
def test_measured_patch_leaves_a_swap_whose_output_is_written_in_place(case, callable_step):
    make, left, kept = WRITTEN[case]
    torch.manual_seed(0)
    ref = make().double()
    model = copy.deepcopy(ref)
    x = torch.randn(4, 8, dtype=torch.float64)
    # a callable step that runs backward: the swapped run raises PyTorch's error, and is not raised from patch
    example = (lambda m: m(x).square().sum().backward()) if callable_step else x
    report = invact.patch(model, example=example)
    reasons = {entry.path: entry.reason for entry in report.left}
    assert "modified in place later in the forward" in reasons.get(left, ""), str(report)
    assert [r.path for r in report.replaced] == ([kept] if kept else []), str(report)
    _assert_same_step(ref, model, x)


def test_unmeasured_patch_keeps_the_swap_and_backward_raises_pytorchs_error():
    """Without example= the class rules decide (README): the in-place op raises at backward."""
    model = ScaledMLP()
    assert [r.path for r in invact.patch(model).replaced] == ["act"]
    with pytest.raises(RuntimeError, match=INPLACE):
        model(torch.randn(4, 8)).sum().backward()


class ScaledFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = F.gelu(self.up(x))
        h.mul_(0.5)
        return self.down(h)


def test_measured_functional_route_is_left_where_a_routed_output_is_written_in_place():
    torch.manual_seed(0)
    ref = ScaledFunctional().double()
    model = copy.deepcopy(ref)
    x = torch.randn(4, 8, dtype=torch.float64)
    report = invact.patch(model, functional=True, example=x)
    assert report.functional.startswith("left") and "modified in place" in report.functional, report.functional
    _assert_same_step(ref, model, x)


# ---------------------------------------------------------------------------------------------------
# 3. functional=True: the model pickles, and a copy routes through its own router

class SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 32), nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _router(model: nn.Module) -> invact.routing.FunctionalRouter:
    return model.__dict__["_invact_router"][0]


def _no_hooks_left(model: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_functional_patch_pickles_and_copies_route_through_their_own_router(how):
    torch.manual_seed(0)
    ref = nn.Sequential(SwiGLU(), SwiGLU()).double()
    model = copy.deepcopy(ref)
    invact.patch(model, functional=True)
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        twin = copy.deepcopy(model)
    assert _router(twin) is not _router(model)
    x = torch.randn(4, 8, dtype=torch.float64)
    _assert_same_step(ref, twin, x)
    assert _router(twin).routed == {"silu": 2} and not _router(model).routed
    invact.unpatch(twin)
    assert _no_hooks_left(twin) and not _no_hooks_left(model)
    _assert_same_step(ref, twin, x)
    assert not _router(model).routed


# ---------------------------------------------------------------------------------------------------
# 4. functional=True with checkpointing inside the model: the recomputation is routed too

class Checkpointed(nn.Module):
    """Hugging Face's gradient checkpointing: each layer's ``__call__`` under torch.utils.checkpoint."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.layers, self.reentrant = nn.ModuleList([SwiGLU(), SwiGLU()]), reentrant

    def forward(self, x):
        for layer in self.layers:
            x = x + checkpoint(layer, x, use_reentrant=self.reentrant)
        return x


@pytest.mark.parametrize("reentrant", [False, True])
def test_functional_route_reaches_a_checkpointed_recomputation(reentrant):
    torch.manual_seed(0)
    ref = Checkpointed(reentrant).double()
    model = copy.deepcopy(ref)
    invact.patch(model, functional=True)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)   # reentrant checkpoint needs it
    _assert_same_step(ref, model, x)
    # each layer's F.silu: in the forward (grad on; reentrant runs it without grad: not routed) and in the
    # recomputation
    assert _router(model).routed == {"silu": 2 if reentrant else 4}


# ---------------------------------------------------------------------------------------------------
# 5. hooks on a replaced module move to its replacement

def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).double()


def _add_hooks(model: nn.Module, calls: list) -> list:
    """A forward hook changing the norm's output, a pre-hook, full backward hooks scaling the gradients."""

    def scale_gelu_grad(m, grad_in, grad_out):
        calls.append("bw")
        return (grad_in[0] * 3,)

    return [model[1].register_forward_hook(lambda m, args, out: out + 1),
            model[1].register_forward_pre_hook(lambda m, args: calls.append("pre")),
            model[3].register_forward_hook(lambda m, args, out: calls.append("post")),
            model[3].register_full_backward_hook(scale_gelu_grad),
            model[1].register_full_backward_hook(lambda m, grad_in, grad_out: (grad_in[0] * -2,))]


@pytest.mark.parametrize("measured", [False, True])
def test_hooks_on_a_replaced_module_keep_firing(measured):
    ref, model, ref_calls, calls = _mlp(), _mlp(), [], []
    ref_handles, handles = _add_hooks(ref, ref_calls), _add_hooks(model, calls)
    x = torch.randn(4, 8, dtype=torch.float64)
    report = invact.patch(model, example=x if measured else None)
    assert sorted(r.path for r in report.replaced) == ["1", "3"], str(report)
    assert all("moved to the replacement" in r.note for r in report.replaced), str(report)
    assert isinstance(model[1], invact.LayerNorm) and isinstance(model[3], invact.GELU)
    calls.clear()
    _assert_same_step(ref, model, x)
    assert calls == ["pre", "post", "bw"]
    handles[0].remove()                            # a handle still removes its hook while patched
    ref_handles[0].remove()
    _assert_same_step(ref, model, x)
    originals = invact.unpatch(model)
    assert originals == ["1", "3"] and type(model[1]) is nn.LayerNorm and type(model[3]) is nn.GELU
    calls.clear()
    _assert_same_step(ref, model, x)               # the originals fire the hooks as they are now
    assert calls == ["pre", "post", "bw"]


# ---------------------------------------------------------------------------------------------------
# 6, 7. probes: a copy without hooks, materialised where the module is on the meta device

class LlamaRMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm, in substance."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.variance_epsilon)).to(x.dtype)


class GeluErf(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))


def _probed() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), GeluErf(), LlamaRMSNorm(16), nn.Linear(16, 4))


@pytest.mark.parametrize("within", [False, True])
def test_patch_probes_a_model_built_on_the_meta_device(within):
    """Built on the meta device, patched after (``within``: while torch.device("meta") is the default)."""
    with torch.device("meta"):
        model = _probed()
        if within:
            report = invact.patch(model)
    if not within:
        report = invact.patch(model)
    assert sorted(r.path for r in report.replaced) == ["1", "2"], str(report)
    assert isinstance(model[2], invact.RMSNorm) and model[2].weight.is_meta
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    ref = _probed()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(4, 8)
    with torch.no_grad():   # float32: F.gelu against the erf formula written out differ by rounding
        torch.testing.assert_close(model(x), ref(x))


def test_probes_never_run_the_users_hooks():
    model, seen = _probed(), []
    for m in (model[1], model[2]):
        m.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    assert recognise.probe(model[1])[0] == "gelu" and not seen
    report = invact.patch(model)
    assert sorted(r.path for r in report.replaced) == ["1", "2"] and not seen, seen
    assert len(model[1]._invact_replaced[0]._forward_hooks) == 1       # the original keeps its hook
    model(torch.randn(2, 8))
    assert seen == ["GELU", "RMSNorm"]                                  # it fires on the replacement
