"""Deploying a patched model: torch.compile with activation parameters Dynamo makes symbolic, forward-mode AD
through a graph compiled outside it, torch.export under no_grad / inference_mode / frozen parameters,
torch.jit.trace of the functional route, and state-dict hooks and parametrizations across patch/unpatch.

Everything is float64 on the "eager" invact backend (the implementation does not matter here: what is
checked is what Dynamo, export and the tracer record around the ops). ELU, CELU, Softplus and LeakyReLU
have exact closed-form tables (README "Exact route"), so invact and torch.nn.functional differ by float64
rounding only: a few ulps (2^-52 = 2.2e-16) of each value, or of the parameter where ELU's derivative
alpha + y cancels; EPS = 1e-14, relative and absolute (~45 ulps), is far below a wrong parameter (ELU
alpha 0.5 against 0.7 moves y by up to 0.2).
GELU's table is fitted: certified to 3.4e-8 relative to each element's derivative (README "Certified
errors"); a parameter's gradient sums such products over a batch, so TOL = 1e-6 (30x the certificate) is
taken relative to the gradient's largest entry, as in tests/test_patch_inplace_and_hooks.py.
"""

from __future__ import annotations

import gc
import pickle

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import invact
import invact.functional as IF

EPS = 1e-14                  # float64 rounding of the exact closed forms: see the module docstring
TOL = 1e-6                   # GELU's certificate, relative to the largest entry: see the module docstring
BACKENDS = ("aot_eager", "inductor")


def _y_and_grad(f, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = f(x)
    return y.detach(), torch.autograd.grad(y.square().sum(), x)[0]


def _assert_same(f, ref, x: torch.Tensor, eps: float = EPS) -> None:
    """f's y and gradient of sum(y^2) are ref's on x, within ``eps`` (relative and absolute)."""
    (y, g), (y0, g0) = _y_and_grad(f, x), _y_and_grad(ref, x)
    torch.testing.assert_close(y, y0, rtol=eps, atol=eps)
    torch.testing.assert_close(g, g0, rtol=eps, atol=eps)


# ---------------------------------------------------------------------------------------------------
# 1. a parameter Dynamo makes symbolic compiles (fullgraph), and follows the value it has at each call

# invact class, its parameter, torch.nn.functional's function, values set in turn (a second value makes the
# attribute symbolic under Dynamo's automatic dynamic; dynamic=True makes it symbolic from the first call)
PARAMETRISED = {"ELU": ("alpha", F.elu, (1.0, 0.5, 1.5)), "CELU": ("alpha", F.celu, (1.0, 0.5, 2.0)),
                "Softplus": ("beta", F.softplus, (1.0, 2.0, 0.5)),
                "LeakyReLU": ("negative_slope", F.leaky_relu, (0.01, 0.2, 0.3))}
COMPILES = [("aot_eager", True), ("aot_eager", None), ("inductor", True), ("inductor", None)]


def _x(seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(4, 8, dtype=torch.float64) * 3


@pytest.mark.parametrize("backend,dynamic", COMPILES)
@pytest.mark.parametrize("cls", ["ELU", "Softplus"])
def test_compiled_module_follows_a_changed_parameter(cls, backend, dynamic):
    """The attribute changes between calls of one compiled module: each call's y and gradient are
    torch.nn.functional's for the value it has then (the specialisation guards the value; an unguarded
    constant would keep the first value's graph)."""
    torch._dynamo.reset()
    attr, ref, values = PARAMETRISED[cls]
    module = getattr(invact, cls)(backend="eager")
    compiled = torch.compile(module, backend=backend, dynamic=dynamic, fullgraph=True)
    for value in values:
        setattr(module, attr, value)
        _assert_same(compiled, lambda t: ref(t, value), _x())


@pytest.mark.parametrize("cls", ["CELU", "LeakyReLU"])
def test_compiled_module_with_dynamic_shapes_takes_every_parametrised_activation(cls):
    torch._dynamo.reset()
    attr, ref, values = PARAMETRISED[cls]
    module = getattr(invact, cls)(backend="eager")
    compiled = torch.compile(module, backend="aot_eager", dynamic=True, fullgraph=True)
    for value in values:
        setattr(module, attr, value)
        _assert_same(compiled, lambda t: ref(t, value), _x())


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_compiled_one_by_one_with_different_parameters(backend):
    """Per-layer compilation (torchtitan, Hugging Face): the second block's ELU has another alpha, which
    Dynamo's automatic dynamic makes symbolic."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8, 8, dtype=torch.float64), invact.ELU(alpha, backend="eager"))
              for alpha in (1.0, 0.5, 0.25)]
    for block in blocks:
        ref = nn.Sequential(block[0], nn.ELU(block[1].alpha))
        _assert_same(torch.compile(block, backend=backend, fullgraph=True), ref, _x())


FUNCTIONS = {"elu": (lambda t, a: IF.elu(t, a, backend="eager"), F.elu),   # invact.functional's signature
             "apply": (lambda t, b: IF.apply(t, "softplus", beta=b, backend="eager"), F.softplus)}  # a keyword


@pytest.mark.parametrize("backend,dynamic", COMPILES)
@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_compiled_function_follows_a_float_argument(function, backend, dynamic):
    """A float passed as an argument that changes between calls."""
    torch._dynamo.reset()
    fn, ref = FUNCTIONS[function]
    compiled = torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)
    for value in (0.5, 0.7, 1.5):
        _assert_same(lambda t: compiled(t, value), lambda t: ref(t, value), _x())


def test_patched_norm_compiles_with_dynamic_shapes():
    """A norm's eps (a float attribute, symbolic under dynamic=True) compiles too; y and gradient are
    torch's LayerNorm's to float64 rounding (invact sums in another order: 1e-12 is ~4500 ulps)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, dtype=torch.float64), nn.LayerNorm(8, dtype=torch.float64))
    ref = nn.Sequential(model[0], nn.LayerNorm(8, dtype=torch.float64))
    invact.patch(model, backend="eager")
    _assert_same(torch.compile(model, backend="aot_eager", dynamic=True, fullgraph=True), ref, _x(), eps=1e-12)


# ---------------------------------------------------------------------------------------------------
# 5. forward-mode AD through a function compiled outside dual_level

def _jvp(f, x: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor | None:
    with fwAD.dual_level():
        return fwAD.unpack_dual(f(fwAD.make_dual(x, tangent))).tangent


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_activation_keeps_the_tangent_after_an_ordinary_call(backend):
    """The first call compiles without forward-mode AD (a training step); under ``dual_level`` the graph
    is not reused (Dynamo guards the dual level): the tangent is the eager one, the same code at this
    call, bit for bit. The old code dropped it (a zero jvp)."""
    torch._dynamo.reset()
    x, tangent = _x(), _x(1)
    compiled = torch.compile(invact.GELU(backend="eager"), backend=backend)
    compiled(x)
    expected = _jvp(invact.GELU(backend="eager"), x, tangent)
    assert expected is not None
    torch.testing.assert_close(_jvp(compiled, x, tangent), expected, rtol=0, atol=0)
    torch.testing.assert_close(compiled(x), invact.GELU(backend="eager")(x), rtol=0, atol=0)  # and back


def test_compiled_activation_under_dual_level_is_refused_by_fullgraph_after_an_ordinary_call():
    torch._dynamo.reset()
    compiled = torch.compile(invact.GELU(backend="eager"), backend="aot_eager", fullgraph=True)
    compiled(_x())
    with pytest.raises(Exception, match="invact activations under torch.func transforms or forward-mode AD"):
        _jvp(compiled, _x(), _x(1))


def test_compiled_norm_keeps_the_tangent_after_an_ordinary_call():
    """invact's norms run torch's own math under forward-mode AD (asked through the same guarded check):
    the compiled norm's tangent is torch LayerNorm's, to float64 rounding of values of order 10. Its
    parameters are frozen: with trainable ones AOTAutograd's compiled function has no jvp, and PyTorch
    raises so, for torch's LayerNorm too."""
    torch._dynamo.reset()
    norm = invact.LayerNorm(8, dtype=torch.float64, backend="eager").requires_grad_(False)
    compiled = torch.compile(norm, backend="aot_eager")
    compiled(_x())
    expected = _jvp(lambda t: F.layer_norm(t, (8,), norm.weight, norm.bias, norm.eps), _x(), _x(1))
    torch.testing.assert_close(_jvp(compiled, _x(), _x(1)), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# 2. torch.export records the trainable op whatever the grad mode at export

class MLP(nn.Module):
    """Linear, GELU (a module or F.gelu), LayerNorm, Linear."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.fc, self.act, self.norm, self.proj = nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4)
        self.functional = functional

    def forward(self, x):
        h = self.fc(x)
        return self.proj(self.norm(F.gelu(h) if self.functional else self.act(h)))


def _models(functional: bool = False) -> tuple[nn.Module, nn.Module]:
    """(original, patched copy) in float64."""
    torch.manual_seed(0)
    ref = MLP(functional).double()
    model = MLP(functional).double()
    model.load_state_dict(ref.state_dict())
    invact.patch(model, backend="eager", functional=functional)
    return ref, model


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    params = list(model.parameters())
    return list(torch.autograd.grad(model(x).square().sum(), params))


def _assert_trains_as(ref: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    for a, b in zip(_grads(ref, x), _grads(model, x), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=TOL * a.abs().max().item())


EXPORT_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "frozen": None}


@pytest.mark.parametrize("functional", [False, True], ids=["modules", "functional"])
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("mode", sorted(EXPORT_MODES))
def test_export_without_grad_records_the_trainable_ops(mode, strict, functional):
    """The exported program holds invact.forward (never invact.value, which has no backward) and the norm's
    op, and its module trains as the unpatched model does."""
    ref, model = _models(functional)
    x = _x()
    if mode == "frozen":
        model.requires_grad_(False)
        program = torch.export.export(model, (x,), strict=strict)
    else:
        with EXPORT_MODES[mode]():
            program = torch.export.export(model, (x,), strict=strict)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"invact.forward.default", "invact.norm_forward.default"} <= ops and "invact.value.default" not in ops
    exported = program.module()
    exported.requires_grad_(True)
    _assert_trains_as(ref, exported, x)


# ---------------------------------------------------------------------------------------------------
# 3. torch.jit.trace of the functional route passes the trace check (which reruns under no_grad)

@pytest.mark.parametrize("grad", [True, False])
def test_trace_of_the_functional_route_passes_its_check_and_trains(grad):
    ref, model = _models(functional=True)
    x = _x()
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(model, (x,))                  # check_trace=True: reruns under no_grad
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "invact::forward" in kinds and "aten::gelu" not in kinds
    _assert_trains_as(ref, traced, x)


@pytest.mark.parametrize("fullgraph", [True, False])
def test_compiled_autograd_over_an_eager_forward(fullgraph):
    """Compiled autograd traces each backward of an eager forward: the activations' refit check read the
    registry (os.stat), which Dynamo cannot trace, so fullgraph=True raised and fullgraph=False broke the
    graph in every activation's backward. Now no graph break, and the gradients of the eager backward
    (float64, the same ops: to float64 rounding, EPS of the module docstring)."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), invact.GELU(), nn.Linear(16, 16), invact.SiLU(), nn.LayerNorm(16),
                          nn.Linear(16, 4)).double()
    invact.patch(model, backend="eager")
    x = _x()
    want = _grads(model, x)
    torch._dynamo.reset()
    counters.clear()
    model.zero_grad()
    with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=fullgraph)):
        model(x).square().sum().backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=EPS, atol=EPS * w.abs().max().item())


def test_fx_symbolic_trace_records_the_calls_and_trains():
    """torch.fx.symbolic_trace of a patched model (an RMSNorm added: both norms' functional entries) raised
    "x must be a torch.Tensor, got Proxy"; it records one call each of invact.ops.apply / the norms'
    functional, which the GraphModule runs: the same output bits as the patched model, gradients as the
    unpatched model's (float64: TOL, see the module docstring), saving what the patched model saves."""
    ref, model = _models()
    ref.norm, model.norm = nn.Sequential(ref.norm, nn.RMSNorm(16)), nn.Sequential(model.norm, nn.RMSNorm(16))
    invact.patch(model, backend="eager")
    model.double()
    graph = torch.fx.symbolic_trace(model)
    targets = {getattr(n.target, "__qualname__", "") for n in graph.graph.nodes if n.op == "call_function"}
    assert {"apply", "layer_norm", "rms_norm"} <= targets, targets
    x = _x()
    assert torch.equal(graph(x), model(x))
    _assert_trains_as(ref.double(), graph, x)
    saved = []
    for m in (model, graph):
        with invact.memory(m) as report:
            m(x.requires_grad_()).sum().backward()
        saved.append(report.total)
    assert saved[0] == saved[1], saved


# ---------------------------------------------------------------------------------------------------
# 4a. state-dict hooks on a replaced module keep working, in both directions

def _rename_gamma(state_dict: dict, prefix: str) -> None:
    """What a load_state_dict pre-hook does to read an older checkpoint's names (gamma, beta)."""
    for old, new in (("gamma", "weight"), ("beta", "bias")):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def _hooks(calls: list[tuple[str, nn.Module]]) -> dict:
    """The four kinds of state-dict hook (registration method -> hook), each recording in ``calls`` its
    name and the module it was called with."""
    def load_pre(module, state_dict, prefix, *args):
        calls.append(("load pre", module))
        _rename_gamma(state_dict, prefix)

    def post(module, state_dict, prefix, local_metadata):
        calls.append(("post", module))
        state_dict[prefix + "version"] = torch.tensor(2)
    return {"register_load_state_dict_pre_hook": load_pre, "_register_state_dict_hook": post,
            "register_state_dict_pre_hook": lambda module, prefix, keep_vars: calls.append(("pre", module)),
            "register_load_state_dict_post_hook": lambda module, keys: calls.append(("load post", module))}


def _norm_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def _assert_hooks_work(model: nn.Module, calls: list) -> None:
    """state_dict has the post-hook's key, an older checkpoint loads (strict) through the pre-hook's
    renaming, and each hook was called once, with the module now in place."""
    calls.clear()
    state = model.state_dict()
    assert "1.version" in state and "1.weight" in state
    checkpoint = {k.replace("1.weight", "1.gamma").replace("1.bias", "1.beta"): v + 1
                  for k, v in state.items() if k != "1.version"}
    model.load_state_dict(checkpoint)
    torch.testing.assert_close(model[1].weight.detach(), checkpoint["1.gamma"], rtol=0, atol=0)
    assert calls == [(kind, model[1]) for kind in ("pre", "post", "load pre", "load post")]


def test_a_backward_hook_registered_on_the_original_while_patched_fires():
    """A reference to a module taken before patch: a full backward hook registered on it while patched
    lands in the shared dictionaries, but Module.__call__ runs it only by the replacement's own flag, which
    stayed unset (the hook silently never fired). It fires, changes the gradient as on the unpatched model,
    its handle removes it, and after unpatch the original runs it itself; the model still pickles."""
    def run(model):
        x = torch.linspace(-2, 2, 12, dtype=torch.float64).reshape(3, 4).requires_grad_()
        model(x).sum().backward()
        return x.grad

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)).double()
    act = model[1]
    want = run(model)
    invact.patch(model)
    assert model[1] is not act
    pickle.loads(pickle.dumps(model))
    calls = []
    handle = act.register_full_backward_hook(lambda m, gi, go: (calls.append(m), (gi[0] * 3,))[1])
    torch.testing.assert_close(run(model), 3 * want, rtol=1e-6, atol=1e-12)    # invact's g: float32-grade table
    assert len(calls) == 1
    handle.remove()
    torch.testing.assert_close(run(model), want, rtol=1e-6, atol=1e-12)
    act.register_full_backward_hook(lambda m, gi, go: (gi[0] * 3,))
    invact.unpatch(model)
    assert model[1] is act and "register_full_backward_hook" not in act.__dict__
    torch.testing.assert_close(run(model), 3 * want, rtol=1e-14, atol=1e-15)   # float64 rounding of the product


def test_state_dict_hooks_move_to_the_replacement_and_back():
    """Registered on the original: they run on the replacement; registered while patched: they run on the
    original after unpatch (the replacement gone); their handles remove them."""
    model, calls = _norm_model(), []
    handles = [getattr(model[1], register)(hook) for register, hook in _hooks(calls).items()]
    invact.patch(model)
    assert isinstance(model[1], invact.LayerNorm)
    _assert_hooks_work(model, calls)
    for h in handles:
        h.remove()
    handles = [getattr(model[1], register)(hook) for register, hook in _hooks(calls).items()]
    invact.unpatch(model)
    gc.collect()
    assert type(model[1]) is nn.LayerNorm
    _assert_hooks_work(model, calls)
    for h in handles:
        h.remove()
    calls.clear()
    assert "1.version" not in model.state_dict() and calls == []


def test_patch_takes_a_module_without_state_dict_hook_dictionaries():
    """An original lacking some hook dictionaries (as unpickled from an older torch before its setstate
    adds them, or built without ``nn.Module.__init__``'s): the replacement keeps its own, and the model
    pickles and unpatches."""
    model = _norm_model()
    for name in ("_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
        del model[1].__dict__[name]
    invact.patch(model)
    keys = list(model.state_dict())
    copy = pickle.loads(pickle.dumps(model))
    assert invact.unpatch(copy) == ["1"] and list(copy.state_dict()) == keys


# ---------------------------------------------------------------------------------------------------
# 4b. unpatch refuses to drop what was added to a replacement, changing nothing

class Double(nn.Module):
    def forward(self, w):
        return 2 * w


ADDITIONS = {
    "parametrization": (lambda m: parametrize.register_parametrization(m, "weight", Double()),
                        "a parametrization of weight"),
    "buffer": (lambda m: m.register_buffer("scale", torch.ones(8)), "buffer 'scale'"),
    "parameter": (lambda m: m.register_parameter("shift", nn.Parameter(torch.zeros(8))), "parameter 'shift'"),
    "submodule": (lambda m: m.add_module("extra", nn.Identity()), "submodule 'extra'")}


@pytest.mark.parametrize("added", sorted(ADDITIONS))
def test_unpatch_refuses_to_drop_what_was_added_while_patched(added):
    model = _norm_model()
    invact.patch(model, functional=True)
    add, what = ADDITIONS[added]
    add(model[1])
    before = (type(model[1]), list(model.state_dict()), dict(model._forward_pre_hooks))
    with pytest.raises(RuntimeError, match=rf"module '1' \(\w*LayerNorm\): {what}.*Nothing was unpatched"):
        invact.unpatch(model)
    assert (type(model[1]), list(model.state_dict()), dict(model._forward_pre_hooks)) == before  # router kept


def test_unpatch_after_removing_a_parametrization_keeps_the_weight():
    """remove_parametrizations (what the error advises) bakes the parametrized weight into a plain
    parameter, which the original takes back."""
    model = _norm_model()
    invact.patch(model)
    parametrize.register_parametrization(model[1], "weight", Double())
    weight = model[1].weight.detach().clone()
    parametrize.remove_parametrizations(model[1], "weight")
    assert invact.unpatch(model) == ["1"] and type(model[1]) is nn.LayerNorm
    torch.testing.assert_close(model[1].weight.detach(), weight, rtol=0, atol=0)
