"""invact.patch leaves what a swap by class would break, and never leaves a model half patched: a forward
overridden on the instance (accelerate's hooks), a weight computed by a hook (torch.nn.utils.prune,
weight_norm), extra parameters, buffers or submodules (a QAT observer), DTensor parameters (FSDP2), a child
torch.compile wraps itself; the norm probe's verdict is per configuration, not per class; a replacement keeps
its original's parameter order. The activation probe reports no identity (a DropPath with drop_prob 0, a pad
layer with nothing to remove) as an unrecognised activation, and compares an in-place module's output with
the references at the input it was given.

Most checks are exact: which modules are left (the same objects), the reason, parameter order, optimizer
state, state_dict keys, outputs of models whose swapped modules are all left (bit for bit). The FSDP2 test
compares a float64 model's loss and gradients with the unpatched model's; the only difference is then the
GELU table's certified error (3.4e-8 relative to each element's derivative, README "Certified errors"),
summed over a batch where terms cancel, so the bound is relative to the gradient's largest entry: 1e-6, as
in tests/test_patch_inplace_and_hooks.py, far below a real mismatch (a norm computing with a stale shard is O(1) off).
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invact
from invact import norm_patch, recognise

TOL = 1e-6                          # relative to the largest entry: see the module docstring


def _left(report: invact.PatchReport) -> dict[str, str]:
    return {entry.path: entry.reason for entry in report.left}


def _replaced(report: invact.PatchReport) -> list[str]:
    return [entry.path for entry in report.replaced]


# ---------------------------------------------------------------------------------------------------
# 1. a forward overridden on the instance

class GeluErf(nn.Module):
    """A model's own GELU class: the probe recognises it."""

    def forward(self, x):
        return 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))


def _add_hook(module: nn.Module, post) -> None:
    """accelerate.hooks.add_hook_to_module, as it sets the instance's forward (accelerate is not installed)."""
    old_forward = module.forward
    module._hf_hook = post
    module._old_forward = old_forward

    def new_forward(module, *args, **kwargs):
        return module._hf_hook(module._old_forward(*args, **kwargs))
    module.forward = functools.update_wrapper(functools.partial(new_forward, module), old_forward)


@pytest.mark.parametrize("measured", [False, True])
def test_a_forward_overridden_on_the_instance_is_left(measured):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), GeluErf(), nn.Linear(8, 8), nn.LayerNorm(8),
                          nn.Linear(8, 2))
    # an identity hook on GeluErf (accelerate's device-moving hooks keep values): the probe still sees gelu
    for i, post in ((1, lambda y: y * 2.0), (3, lambda y: y), (5, lambda y: y + 1.0)):
        _add_hook(model[i], post)
    originals = list(model)
    x = torch.randn(5, 4)
    want = model(x).detach()
    report = invact.patch(model, example=x if measured else None)
    assert _replaced(report) == []
    assert set(_left(report)) == {"1", "3", "5"}
    assert all("its forward is overridden on the instance" in r for r in _left(report).values()), str(report)
    assert all(a is b for a, b in zip(model, originals))
    assert torch.equal(model(x), want)


def test_a_module_without_an_instance_forward_is_still_swapped():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8))
    _add_hook(model[0], lambda y: y)           # hooks on other modules change nothing
    assert _replaced(invact.patch(model)) == ["1", "2"]


# ---------------------------------------------------------------------------------------------------
# 2. a weight computed by a hook; an error while swapping puts every swap back

def _mlp_with_norm(**norm) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.LayerNorm(8, **norm), nn.Linear(8, 2))


def _prune(m: nn.Module) -> None:
    import torch.nn.utils.prune as prune
    prune.l1_unstructured(m, "weight", amount=0.5)


def _weight_norm(m: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                      # deprecated for parametrizations.weight_norm
        torch.nn.utils.weight_norm(m, "weight", dim=0)


def _plain_weight(m: nn.Module) -> None:
    del m.weight
    m.weight = torch.full((8,), 2.0)


@pytest.mark.parametrize("how, held", [(_prune, "parameter 'weight_orig', buffer 'weight_mask'"),
                                       (_weight_norm, "parameter 'weight_g', parameter 'weight_v'"),
                                       (_plain_weight, None)])
def test_a_norm_whose_weight_is_no_parameter_is_left(how, held):
    model = _mlp_with_norm()
    how(model[3])
    norm = model[3]
    report = invact.patch(model)
    assert _replaced(report) == ["1"] and model[3] is norm
    reason = _left(report)["3"]
    assert "has no registered parameter 'weight' (a plain tensor here" in reason, reason
    assert held is None or f"holds {held}, which invact's LayerNorm would drop" in reason, reason


def test_a_parameter_on_a_norm_without_affine_parameters_is_left():
    model = _mlp_with_norm(elementwise_affine=False)
    model[3].weight = nn.Parameter(torch.full((8,), 2.0))      # F.layer_norm uses it: a swap would drop it
    report = invact.patch(model)
    assert _left(report)["3"] == "holds parameter 'weight', which invact's LayerNorm would drop"


def test_an_error_while_swapping_puts_every_swap_back(monkeypatch):
    model = _mlp_with_norm()
    model.append(nn.SiLU())
    originals = list(model)
    handle = model[1].register_full_backward_hook(lambda *a: None)

    def fails(*args, **kwargs):
        raise RuntimeError("replacement failed")
    monkeypatch.setattr(norm_patch, "replacement", fails)
    with pytest.raises(RuntimeError, match="replacement failed"):
        invact.patch(model)
    assert all(a is b for a, b in zip(model, originals))
    assert "register_full_backward_hook" not in vars(model[1])      # the swap's traces are gone too
    assert invact.unpatch(model) == []
    handle.remove()
    assert not model[1]._backward_hooks


# ---------------------------------------------------------------------------------------------------
# 3. the norm probe's verdict per configuration

class GroupRMSNorm(nn.Module):
    """transformers' Qwen4ExpTextRMSNorm, verbatim: ``group_size`` normalizes groups of the last dimension."""

    def __init__(self, hidden_size, group_size=None, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.group_size = group_size

    def _norm(self, x):
        if self.group_size is not None:
            x = x.reshape(*x.shape[:-1], -1, self.group_size)
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.flatten(-2) if self.group_size is not None else out

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class Block(nn.Module):
    def __init__(self, plain: int = 1, grouped_first: bool = False):
        super().__init__()
        norms = [GroupRMSNorm(64) for _ in range(plain)]
        grouped = GroupRMSNorm(64, group_size=16)
        self.norms = nn.ModuleList([grouped, *norms] if grouped_first else [*norms, grouped])


@pytest.mark.parametrize("grouped_first", [False, True])
def test_instances_of_one_norm_class_with_other_attributes_are_probed_apart(grouped_first):
    model = Block(grouped_first=grouped_first)
    grouped = next(m for m in model.norms if m.group_size is not None)
    report = invact.patch(model)
    at = str(list(model.norms).index(grouped))
    assert f"norms.{at}" in _left(report) and grouped in list(model.norms), str(report)
    assert _left(report)[f"norms.{at}"].startswith("probe: no invact norm computes the same output")
    assert len(report) == 1 and "style='gemma'" in report.replaced[0].new


class Grouping:
    """A config object (not a number or string): which groups the norm below normalizes."""

    def __init__(self, size):
        self.size = size


class ConfiguredRMSNorm(GroupRMSNorm):
    """GroupRMSNorm whose group size comes from an object attribute, as a module holding its config."""

    def __init__(self, hidden_size, grouping):
        super().__init__(hidden_size)
        self.grouping = grouping

    def _norm(self, x):
        self.group_size = self.grouping.size
        return super()._norm(x)


@pytest.mark.parametrize("grouped_first", [False, True])
def test_instances_whose_object_attributes_differ_are_probed_apart(grouped_first):
    plain, grouped = ConfiguredRMSNorm(64, Grouping(None)), ConfiguredRMSNorm(64, Grouping(16))
    model = nn.ModuleList([grouped, plain] if grouped_first else [plain, grouped])
    report = invact.patch(model)
    at = str(list(model).index(grouped))
    assert at in _left(report) and grouped in list(model), str(report)
    assert len(report) == 1 and "style='gemma'" in report.replaced[0].new


def test_norms_sharing_one_config_object_share_one_probe(monkeypatch):
    calls = []
    probe = norm_patch._probe
    monkeypatch.setattr(norm_patch, "_probe", lambda *a, **k: calls.append(a[1]) or probe(*a, **k))
    invact.patch(nn.ModuleList([ConfiguredRMSNorm(64, Grouping(None))]))
    one = len(calls)
    calls.clear()
    shared = Grouping(None)
    report = invact.patch(nn.ModuleList([ConfiguredRMSNorm(64, shared) for _ in range(20)]))
    assert len(report) == 20 and len(calls) == one


def test_identical_norms_share_one_probe(monkeypatch):
    calls = []
    probe = norm_patch._probe
    monkeypatch.setattr(norm_patch, "_probe", lambda *a, **k: calls.append(a[1]) or probe(*a, **k))
    invact.patch(Block(plain=1))
    one = len(calls)
    calls.clear()
    report = invact.patch(Block(plain=40))
    assert len(report) == 40 and len(calls) == one


# ---------------------------------------------------------------------------------------------------
# 4. parameter order

class BiasFirstLayerNorm(nn.Module):
    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n))
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def _bias_first() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), BiasFirstLayerNorm(8), nn.Linear(8, 2))


def test_a_replacement_keeps_its_originals_parameter_order():
    model = _bias_first()
    before = list(model.named_parameters())
    keys = list(model.state_dict())
    report = invact.patch(model)
    assert _replaced(report) == ["1"]
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in before]
    assert list(model.state_dict()) == keys
    assert invact.unpatch(model) == ["1"]
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in before]


def test_an_optimizer_state_saved_unpatched_loads_patched():
    model = _bias_first()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(16, 4)).pow(3).sum().backward()
    opt.step()
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = _bias_first()
    resumed.load_state_dict(saved["model"])
    invact.patch(resumed)
    opt2 = torch.optim.Adam(resumed.parameters())
    opt2.load_state_dict(saved["opt"])
    for name in ("weight", "bias"):
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt2.state[getattr(resumed[1], name)][moment],
                               opt.state[getattr(model[1], name)][moment])


# ---------------------------------------------------------------------------------------------------
# 5. what an exact torch.nn module holds beyond its class

def test_a_qat_observer_on_a_norm_is_kept():
    import torch.ao.quantization as tq
    torch.manual_seed(0)
    model = nn.Sequential(tq.QuantStub(), nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4),
                          tq.DeQuantStub())
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.prepare_qat(model.train(), inplace=True)
    x = torch.randn(4, 8)
    model(x)
    keys, norm = list(model.state_dict()), model[2]
    report = invact.patch(model)
    assert _left(report)["2"] == "holds submodule 'activation_post_process', which invact's LayerNorm would drop"
    assert model[2] is norm and list(model.state_dict()) == keys
    model(x)                                             # the observer's hook still finds its observer


@pytest.mark.parametrize("make", [lambda: nn.LayerNorm(4), lambda: nn.GELU(), lambda: nn.RMSNorm(4)])
def test_a_buffer_registered_on_an_instance_is_kept(make):
    model = nn.Sequential(nn.Linear(4, 4), make())
    model[1].register_buffer("calib", torch.ones(4))
    state = model.state_dict()
    report = invact.patch(model)
    assert _left(report)["1"].startswith("holds buffer 'calib', which invact's ")
    model.load_state_dict(state)                         # strict: the same keys


# ---------------------------------------------------------------------------------------------------
# 6. FSDP2

def _loss_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(x).square().sum()
    loss.backward()
    return loss.detach(), [p.grad.full_tensor().clone() for p in model.parameters()]


def test_a_norm_sharded_by_fully_shard_is_left(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 16)).double()
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        x = torch.randn(4, 16, dtype=torch.float64)
        loss0, grads0 = _loss_and_grads(model, x)
        norm = model[2]
        report = invact.patch(model, backend="eager")
        assert _replaced(report) == ["1"] and model[2] is norm
        assert "patch before fully_shard" in _left(report)["2"]
        loss1, grads1 = _loss_and_grads(model, x)
        torch.testing.assert_close(loss1, loss0, rtol=TOL, atol=0)
        for a, b in zip(grads0, grads1):
            torch.testing.assert_close(b, a, rtol=0, atol=TOL * a.abs().max().item())
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# 7. torch.compile

def _compiled_children() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), torch.compile(nn.GELU(), backend="eager"), nn.Linear(32, 16),
                         torch.compile(nn.LayerNorm(16), backend="eager"), nn.Linear(16, 4))


@pytest.mark.parametrize("measured", [False, True])
def test_a_child_compiled_by_itself_is_left(measured):
    model = _compiled_children()
    x = torch.randn(8, 16)
    wrapped = [model[1]._orig_mod, model[3]._orig_mod]
    report = invact.patch(model, example=x if measured else None)
    assert _replaced(report) == []
    assert set(_left(report)) == {"1._orig_mod", "3._orig_mod"}, str(report)
    assert all(r.startswith("wrapped by torch.compile: ") and "patch before compiling" in r
               for r in _left(report).values()), str(report)
    assert [model[1]._orig_mod, model[3]._orig_mod] == wrapped


@pytest.mark.parametrize("measured", [False, True])
def test_a_child_compiled_with_module_compile_is_left(measured):
    """``module.compile()`` compiles the module in place (no wrapper); a replacement would run uncompiled."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.LayerNorm(16), nn.SiLU(),
                          nn.Linear(16, 4))
    children = list(model)
    model[1].compile(backend="eager")
    model[3].compile(backend="eager")
    report = invact.patch(model, example=torch.randn(8, 16) if measured else None)
    assert _replaced(report) == ["4"], str(report)
    assert set(_left(report)) == {"1", "3"} and all(r.startswith("compiled on its own (module.compile())")
                                                    for r in _left(report).values()), str(report)
    assert list(model)[:4] == children[:4] and model[1]._compiled_call_impl is not None


def test_a_whole_compiled_model_is_still_patched():
    torch.manual_seed(0)
    compiled = torch.compile(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32)), backend="eager")
    report = invact.patch(compiled)
    assert _replaced(report) == ["_orig_mod.1", "_orig_mod.2"] and not report.left
    compiled(torch.randn(4, 16)).sum().backward()


# ---------------------------------------------------------------------------------------------------
# the activation probe: identities, in-place modules

class DropPath(nn.Module):
    """timm's and transformers' (PoolFormerDropPath) drop path: the identity at drop_prob 0."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[:1] + (1,) * (x.dim() - 1)).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


class PadLayer(nn.Module):
    """transformers' Data2VecAudioPadLayer: removes the last ``remove`` positions (none for an odd kernel)."""

    def __init__(self, remove: int = 0):
        super().__init__()
        self.remove = remove

    def forward(self, x):
        return x[..., :-self.remove] if self.remove > 0 else x


class TimesOne(nn.Module):
    def forward(self, x):
        return x * 1.0


class InPlaceReLU(nn.Module):
    def forward(self, x):
        return x.clamp_(min=0)


@pytest.mark.parametrize("measured", [False, True])
def test_an_identity_is_not_reported_as_an_unrecognised_activation(measured):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), DropPath(), PadLayer(), TimesOne(), nn.GELU(), nn.Linear(32, 4))
    report = invact.patch(model, example=torch.randn(8, 16) if measured else None)
    assert _replaced(report) == ["4"] and not report.left, str(report)
    assert all(recognise.probe(m) == (None, False) for m in (DropPath(), PadLayer(), TimesOne()))


def test_an_in_place_module_is_probed_at_the_input_it_was_given():
    """An in-place ReLU clamps the probe's x: compared at the clamped x, it matched ELU (the identity on x >= 0)."""
    if "relu" not in recognise.references():
        pytest.skip("no relu table")
    assert recognise.probe(InPlaceReLU()) == ("relu", True)
    model = nn.Sequential(nn.Linear(4, 8), InPlaceReLU(), nn.Linear(8, 2))
    report = invact.patch(model, example=torch.randn(3, 4))
    assert _replaced(report) == ["1"] and type(model[1]) is invact.ReLU, str(report)   # (invact.ELU before)
