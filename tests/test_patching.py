"""invact.patch / invact.unpatch on torch.nn models, tiny random-init Hugging Face models and timm.

Gradient tolerance for whole models (derivation). Each patched activation l changes the backward only
through f': per element |error| <= delta |grad_y_l| with delta the information floor at the y
PyTorch's forward stores on this CPU plus the table's certified error, the largest over a dense
sample (tests/tolerances.py, derivative_error: 4.8e-5 if y were correctly rounded, 1.45e-4 for gelu
on an AVX-512 EPYC, whose float32 GELU is up to 1.9 ulps off next to the minimum). The error reaching a
parameter is the sum over activations of a linear map of these errors; to first order its norm is at
most sum_l delta ||grad_y_l|| / ||grad_x_l|| times the parameter's gradient norm when the map does not
amplify (the unpatched run's own ratio carries the gradient from x_l to the parameter). So we assert
    ||g_patched - g|| <= (sum_l delta * ||grad_y_l|| / ||grad_x_l||) * ||g|| + 1e-6 ||g||
per parameter, the last term for float32 rounding of the forward. A gradient that is zero in exact
arithmetic (BERT's attention key bias: softmax is shift-invariant) is pure rounding noise, so every
parameter also gets an absolute allowance of 1e-6 times the largest gradient norm in its own module
(see _module_floor). It is an estimate, not a proof
(nonlinear layers between activations can amplify), but it is tight enough that a wrong table or
branch code (errors O(0.1) on whole branches) fails it by orders of magnitude.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import invact
import tolerances
from invact import ops

DELTA_TABLES = ("gelu", "gelu_tanh", "silu", "leaky_relu", "softplus")  # tolerances.derivative_error
BACKEND = "eager"       # no compilation per table and dtype; the default backend: test_..._compiles_fullgraph


def _delta() -> float:
    """The per-element f' error bound of the patched activations (module docstring)."""
    return max(tolerances.derivative_error(name) for name in DELTA_TABLES if name in ops.names())


def _need(*tables):
    missing = [t for t in tables if t not in ops.names()]
    if missing:
        pytest.skip(f"tables not generated: {missing}")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.SiLU()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(approximate="tanh"), nn.Linear(16, 8))
        self.drop_mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 8))
        self.relu = nn.ReLU()
        self.leaky = nn.LeakyReLU(0.2)
        self.prelu = nn.PReLU()
        self.sp = nn.Softplus()

    def forward(self, x):
        x = self.act(self.fc(x))
        x = self.mlp(x) + self.drop_mlp(x)
        return self.sp(self.prelu(self.leaky(self.relu(x))))


class MyGELU(nn.GELU):
    def forward(self, x):
        return super().forward(x) * 2


def test_patch_nn_model_report_and_state_dict():
    _need("silu", "gelu", "gelu_tanh", "leaky_relu", "softplus", "relu")
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    model[1].extra = MyGELU()
    keys, sd = list(model.state_dict()), copy.deepcopy(model.state_dict())
    originals = dict(model.named_modules())
    report = invact.patch(model)

    replaced = {r.path: r for r in report.replaced}
    left = {l.path: l for l in report.left}
    assert set(replaced) == {f"{i}.{p}" for i in (0, 1) for p in ("act", "mlp.1", "leaky", "sp")}
    assert replaced["0.act"].old == "torch.nn.SiLU" and replaced["0.act"].new == "invact.SiLU()"
    assert replaced["0.mlp.1"].new == "invact.GELU(approximate='tanh')"
    assert replaced["1.leaky"].new == "invact.LeakyReLU(negative_slope=0.2)"
    assert "already saves its output" in left["0.relu"].reason
    assert "Dropout" in left["0.drop_mlp.1"].reason and "heuristic" in left["0.drop_mlp.1"].reason
    assert "no invact table" in left["0.prelu"].reason
    assert "subclass of GELU" in left["1.extra"].reason
    assert len(report) == 8 and "replaced 8 module(s)" in str(report)
    assert isinstance(model[0].act, invact.SiLU) and isinstance(model[1].mlp[1], invact.GELU)

    # state_dict keys unchanged and loadable both ways
    assert list(model.state_dict()) == keys
    model.load_state_dict(sd)
    fresh = nn.Sequential(Block(), Block())
    fresh[1].extra = MyGELU()
    fresh.load_state_dict(model.state_dict())

    restored = invact.unpatch(model)
    assert sorted(restored) == sorted(replaced)
    for name, m in model.named_modules():
        assert m is originals[name]
    assert list(model.state_dict()) == keys
    assert invact.unpatch(model) == []


def test_patched_model_gradients_match():
    _need("silu", "gelu", "gelu_tanh", "leaky_relu", "softplus")
    torch.manual_seed(1)
    model = nn.Sequential(Block(), Block()).eval()        # eval: Dropout off, so runs are comparable
    x = torch.randn(32, 8)

    def grads():
        model.zero_grad()
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ratios, handles = _act_hooks(model, (nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Softplus))
    ref = grads()
    for h in handles:
        h.remove()
    report = invact.patch(model, backend=BACKEND)
    assert len(report) == 8 and len(ratios) == 10           # 2 GELUs before Dropout stay
    got = grads()
    tol = _delta() * sum(ratios) + 1e-6
    assert tol < 1e-2
    floor = _module_floor(ref)
    for n in ref:
        scale = ref[n].norm().item()
        assert (got[n] - ref[n]).norm().item() <= tol * scale + floor[n], n
    invact.unpatch(model)
    again = grads()
    for n in ref:
        assert torch.equal(again[n], ref[n])                 # unpatched model is bit-identical again


def test_force_only_exclude():
    _need("relu", "gelu", "silu")
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.GELU(), nn.SiLU(), nn.Dropout(0.5))
    r = invact.patch(copy.deepcopy(model), force=True)
    assert {x.path for x in r.replaced} == {"1", "2", "3"}    # SiLU before Dropout too, forced
    r = invact.patch(copy.deepcopy(model))
    assert {x.path for x in r.replaced} == {"2"}
    r = invact.patch(copy.deepcopy(model), only={"gelu"})
    assert {x.path for x in r.replaced} == {"2"}
    assert any(l.path == "3" and "only" in l.reason for l in r.left)
    r = invact.patch(copy.deepcopy(model), only=nn.GELU)
    assert {x.path for x in r.replaced} == {"2"}
    r = invact.patch(copy.deepcopy(model), exclude=["GELU"], force=True)
    assert {x.path for x in r.replaced} == {"1", "3"}
    r = invact.patch(copy.deepcopy(model), only=["relu", "gelu"], exclude={nn.GELU}, force=True)
    assert {x.path for x in r.replaced} == {"1"}


@pytest.mark.parametrize("arg", ["only", "exclude"])
def test_bad_only_exclude(arg):
    model = nn.Sequential(nn.GELU())
    with pytest.raises(ValueError, match=f"{arg}: unknown name 'gleu'"):
        invact.patch(model, **{arg: {"gleu"}})
    with pytest.raises(TypeError, match=arg):
        invact.patch(model, **{arg: 3})
    with pytest.raises(TypeError, match=arg):
        invact.patch(model, **{arg: [int]})
    with pytest.raises(TypeError, match=arg):
        invact.patch(model, **{arg: [1.5]})
    assert isinstance(model[0], nn.GELU)                     # nothing changed on a refused call
    with pytest.raises(TypeError, match="model"):
        invact.patch("not a model")


def test_shared_module_stays_shared():
    _need("gelu")
    act = nn.GELU()
    model = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act)
    report = invact.patch(model)
    assert model[1] is model[3] and isinstance(model[1], invact.GELU)
    assert len(report) == 2
    invact.unpatch(model)
    assert model[1] is act and model[3] is act


def test_parameters_outside_table_are_left():
    _need("softplus")
    model = nn.Sequential(nn.Softplus(beta=2.0))
    report = invact.patch(model)
    if ops.info("softplus").get("param_generic"):
        assert len(report) == 1 and model[0].beta == 2.0
    else:
        assert len(report) == 0 and "fitted for" in report.left[0].reason


def test_parameters_outside_domain_are_left():
    """LeakyReLU(-0.1) is not monotone: a table for negative_slope > 0 cannot serve it."""
    _need("leaky_relu")
    from invact.modules import named_params
    try:
        named_params("leaky_relu", {"negative_slope": -0.1})
        servable = True
    except ValueError:
        servable = False
    model = nn.Sequential(nn.LeakyReLU(-0.1))
    report = invact.patch(model)
    assert len(report) == int(servable)
    if not servable:
        assert isinstance(model[0], nn.LeakyReLU) and "negative_slope" in report.left[0].reason


@pytest.mark.slow
def test_patched_model_compiles_fullgraph():
    """The modules' table lookup (properties over torch.nn-style attributes) traces without graph breaks."""
    _need("gelu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    x = torch.randn(8, 16)
    ref = model(x)
    invact.patch(model)
    out = torch.compile(model, fullgraph=True)(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    assert model[0].weight.grad is not None


def test_training_flag_and_inplace_note():
    _need("silu")
    model = nn.Sequential(nn.Linear(3, 3), nn.SiLU(inplace=True)).eval()
    report = invact.patch(model)
    assert model[1].training is False
    assert "inplace=True not kept" in report.replaced[0].note
    model.train()
    invact.unpatch(model)
    assert isinstance(model[1], nn.SiLU) and model[1].training is True


# -- Hugging Face --------------------------------------------------------------------------------------

def _module_floor(grads):
    """1e-6 x the largest gradient norm among the parameters of the same module, per parameter."""
    best = {}
    for n, g in grads.items():
        owner = n.rpartition(".")[0]
        best[owner] = max(best.get(owner, 0.0), g.norm().item())
    return {n: 1e-6 * best[n.rpartition(".")[0]] for n in grads}


def _act_hooks(model, kinds):
    """Record ||grad_y|| / ||grad_x|| for every activation module (the ratio in the docstring)."""
    ratios, handles = [], []
    for m in model.modules():
        if isinstance(m, kinds):
            handles.append(m.register_full_backward_hook(
                lambda mod, gin, gout: ratios.append((gout[0].norm() / gin[0].norm().clamp_min(1e-30)).item())))
    return ratios, handles


@pytest.fixture
def hf_act():
    pytest.importorskip("transformers")
    from transformers import activations
    return activations


def _hf_case(kind):
    import transformers
    torch.manual_seed(0)
    common = dict(vocab_size=101, attn_implementation="eager", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
        return transformers.GPT2Model(cfg), "gelu_tanh", transformers.activations.NewGELUActivation, "mlp.act"
    if kind == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, **common)
        return (transformers.BertModel(cfg), "gelu", transformers.activations.GELUActivation,
                "intermediate.intermediate_act_fn")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64, **common)
    return transformers.LlamaModel(cfg), "silu", transformers.activations.SiLUActivation, "mlp.act_fn"


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_hugging_face_models(kind, hf_act):
    model, table, act_cls, act_path = _hf_case(kind)
    _need(table)
    model.eval()                                             # dropout off: deterministic forward
    ids = torch.randint(0, 101, (3, 17))
    weight = torch.randn(3, 17, 32)
    keys = list(model.state_dict())

    def grads():
        model.zero_grad()
        (model(input_ids=ids).last_hidden_state * weight).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ratios, handles = _act_hooks(model, act_cls)
    ref = grads()
    for h in handles:
        h.remove()
    n_act = sum(isinstance(m, act_cls) for m in model.modules())
    assert n_act == 2 and len(ratios) == 2

    report = invact.patch(model, backend=BACKEND, norms=False)      # activations only (norms: test_norms.py)
    paths = sorted(r.path for r in report.replaced)
    prefix = {"gpt2": "h", "bert": "encoder.layer", "llama": "layers"}[kind]
    assert paths == [f"{prefix}.{i}.{act_path}" for i in range(2)]
    assert all(r.old == f"transformers.activations.{act_cls.__name__}" for r in report.replaced)
    assert list(model.state_dict()) == keys
    got = grads()
    tol = _delta() * sum(ratios) + 1e-6
    floor = _module_floor(ref)
    for n in ref:
        scale = ref[n].norm().item()
        err = (got[n] - ref[n]).norm().item()
        assert err <= tol * scale + floor[n], (n, err, scale, tol)
    # the test can fail: a derivative off by 1e-2 on every element would exceed tol by far
    assert tol < 1e-2

    invact.unpatch(model)
    assert sum(isinstance(m, act_cls) for m in model.modules()) == 2
    again = grads()
    assert all(torch.equal(again[n], ref[n]) for n in ref)


def test_hugging_face_act2fn_coverage(hf_act):
    """Every ACT2FN entry is replaced by a table with the same forward, or left with a reason."""
    x = torch.linspace(-6, 6, 4001)
    seen = {}
    for key in hf_act.ACT2CLS:
        try:
            act = hf_act.ACT2FN[key]
        except Exception:                                    # e.g. optional kernels
            continue
        holder = nn.Sequential(nn.Identity(), act)
        report = invact.patch(holder, backend=BACKEND)
        assert len(report.replaced) + len(report.left) >= 1 or key == "linear" or key == "prelu", key
        if report.replaced:
            new = holder[1]
            with torch.no_grad():
                ours, theirs = new(x), act(x)
            # same function: float32 rounding only (FastGELU's truncated constant is ~1e-12 away)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-6, msg=key)
            seen[key] = new.name
        else:
            assert all(l.reason for l in report.left), key
    expected = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_python": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_accurate": "gelu_tanh", "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu",
                "silu": "silu", "swish": "silu", "mish": "mish", "relu2": "relu2", "hardswish": "hardswish",
                "leaky_relu": "leaky_relu"}
    expected = {k: v for k, v in expected.items() if v in ops.names() and k in hf_act.ACT2CLS}
    assert {k: seen.get(k) for k in expected} == expected
    for key in ("relu", "sigmoid", "tanh"):                  # no gain: left by default
        assert key not in seen


def test_llama_mlp_activation_is_reachable(hf_act):
    """Llama's MLP applies act_fn as a module: module patching reaches it (no functional call)."""
    model, table, act_cls, _ = _hf_case("llama")
    mlp = model.layers[0].mlp
    calls = []
    h = mlp.act_fn.register_forward_hook(lambda *a: calls.append(1))
    model(input_ids=torch.randint(0, 101, (1, 5)))
    h.remove()
    assert calls == [1]


# -- timm ----------------------------------------------------------------------------------------------

def _load_timm_activations():
    """timm's activation files, loaded by path: `import timm` needs torchvision, these files don't."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm not installed")
    mods = []
    for name in ("activations", "activations_me"):
        full = f"timm.layers.{name}"
        if full not in sys.modules:
            path = Path(spec.submodule_search_locations[0]) / "layers" / f"{name}.py"
            s = importlib.util.spec_from_file_location(full, path)
            mod = importlib.util.module_from_spec(s)
            sys.modules[full] = mod
            s.loader.exec_module(mod)
        mods.append(sys.modules[full])
    return mods


def test_timm_activations():
    a, me = _load_timm_activations()
    expected = {a.Swish: "silu", a.Mish: "mish", a.HardSwish: "hardswish", a.GELU: "gelu", a.GELUTanh: "gelu_tanh",
                a.QuickGELU: "quick_gelu", me.SwishMe: "silu", me.MishMe: "mish", me.HardSwishMe: "hardswish"}
    x = torch.linspace(-6, 6, 2001)
    for cls, table in expected.items():
        if table not in ops.names():
            continue
        model = nn.Sequential(nn.Linear(2, 2), cls())
        report = invact.patch(model, backend=BACKEND)
        assert len(report) == 1 and model[1].name == table, cls
        with torch.no_grad():
            torch.testing.assert_close(model[1](x), cls()(x), rtol=1e-5, atol=2e-6)
    r = invact.patch(nn.Sequential(a.Sigmoid(), a.HardSigmoid(), a.PReLU()))
    assert len(r) == 0 and len(r.left) == 3
