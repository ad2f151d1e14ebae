"""invact's modules, functional API and activation(): torch.nn's signatures, reprs, values, gradients.

Gradient tolerances (tests/tolerances.py, gradient_bound) are built per element from the y that was
actually stored, never from an assumption about how PyTorch's forward rounds it: PyTorch's float32
GELU is not correctly rounded on every CPU (docs/floors.md, "Information floor" 3: 2.15 half-ulps next to
the minimum on an AVX-512 EPYC, where a half-ulp floor of 4.3e-5 becomes 9.65e-5). Per element
    |g~(y) - f'(x)| <= |g(y) - f'(x)|              [information floor, g the float64 inverse derivative
                                                   at the stored y: measures y's actual error]
                      + certified approximation + float32 evaluation error (scaled by max(1, |f'|))
                      + 4 float32 ulps of |f'| + 1  [libm differences between PyTorch and invact]
and the activation input's gradient by that times |grad_y| plus half an ulp for the product, against
grad_y f'(x) in float64 (so PyTorch's own float32 backward, whose error we do not bound, is not the
reference). Sums over a batch accumulate these (bounded elementwise with |.| matmuls) plus the usual
gamma_n = n eps rounding of a length-n float32 sum.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invact
import invact.functional as IF
import tolerances as tol
from invact import ops

EPS32 = torch.finfo(torch.float32).eps
# The per-table tests check the API, not the backends (tests/test_ops*.py do): they run the eager
# backend, which needs no compilation per table and dtype; the default backend is exercised by
# test_patching (Hugging Face models, torch.compile).
BACKEND = "eager"

# invact class -> (torch.nn class or None, table, constructor kwargs to try besides the defaults)
CASES = {
    invact.GELU: (nn.GELU, "gelu", [{"approximate": "tanh"}]),
    invact.SiLU: (nn.SiLU, "silu", [{"inplace": True}]),
    invact.Mish: (nn.Mish, "mish", [{"inplace": True}]),
    invact.Softplus: (nn.Softplus, "softplus", [{"beta": 2.0, "threshold": 18.0}, {"beta": 1.0, "threshold": 20.0}]),
    invact.ELU: (nn.ELU, "elu", [{"alpha": 0.5}, {"inplace": True}]),
    invact.CELU: (nn.CELU, "celu", [{"alpha": 2.0}, {"inplace": True}]),
    invact.SELU: (nn.SELU, "selu", [{"inplace": True}]),
    invact.Hardswish: (nn.Hardswish, "hardswish", [{"inplace": True}]),
    invact.LeakyReLU: (nn.LeakyReLU, "leaky_relu", [{"negative_slope": 0.2}, {"inplace": True}]),
    invact.ReLU: (nn.ReLU, "relu", [{"inplace": True}]),
    invact.Sigmoid: (nn.Sigmoid, "sigmoid", []),
    invact.Tanh: (nn.Tanh, "tanh", []),
    invact.QuickGELU: (None, "quick_gelu", []),
    invact.ReLU2: (None, "relu2", []),
}
# PyTorch's own forward for the two classes without a torch.nn counterpart
REFERENCE = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "relu2": lambda x: torch.square(F.relu(x))}


def _table_for(cls, kwargs):
    bound = inspect.signature(cls).bind(**kwargs)
    bound.apply_defaults()
    fields = {k: v for k, v in bound.arguments.items() if k != "backend"}
    return cls._table_of(**fields)


def _servable(cls, kwargs):
    if _table_for(cls, kwargs) not in ops.names():
        return False
    try:                                    # a table not parameter-generic serves its defaults only
        cls(**kwargs)
    except ValueError:
        return False
    return True


def _variants(cls):
    """[{}] and the case's extra kwargs, those a generated table serves."""
    return [kw for kw in [{}] + CASES[cls][2] if _servable(cls, kw)]


def _reference(cls, kwargs):
    torch_cls, table, _ = CASES[cls]
    if torch_cls is None:
        return REFERENCE[table]
    return torch_cls(**{k: v for k, v in kwargs.items() if k != "inplace"})


def _need(*tables):
    missing = [t for t in tables if t not in ops.names()]
    if missing:
        pytest.skip(f"tables not generated: {missing}")


@pytest.fixture(params=list(CASES), ids=lambda c: c.__name__)
def cls(request):
    table = CASES[request.param][1]
    if table not in ops.names():
        pytest.skip(f"no table {table!r} generated")
    return request.param


# -- signatures, reprs ---------------------------------------------------------------------------------

def _params(sig):
    return [(p.name, p.default, p.kind) for p in sig.parameters.values()]


def test_signature_matches_torch(cls):
    torch_cls = CASES[cls][0]
    sig = inspect.signature(cls)
    assert _params(sig)[-1] == ("backend", None, inspect.Parameter.KEYWORD_ONLY)
    ours = _params(sig)[:-1]
    if torch_cls is None:
        assert ours == []
    elif torch_cls in (nn.Sigmoid, nn.Tanh):        # torch.nn's are Module.__init__(*args, **kwargs)
        assert ours == []
        torch_cls()
    else:
        assert ours == _params(inspect.signature(torch_cls))


def test_extra_repr_matches_torch(cls):
    torch_cls = CASES[cls][0]
    for kwargs in _variants(cls):
        ours = cls(**kwargs)
        if torch_cls is not None:
            assert repr(ours) == repr(torch_cls(**kwargs))
        assert repr(cls(**kwargs, backend="eager")).endswith("backend='eager')")


def test_positional_arguments_like_torch():
    _need('elu', 'leaky_relu', 'silu')
    assert invact.ELU(0.5, True).alpha == 0.5 and invact.ELU(0.5, True).inplace is True
    assert repr(invact.LeakyReLU(0.2)) == repr(nn.LeakyReLU(0.2))
    with pytest.raises(TypeError):
        invact.ELU(0.5, True, 3)
    with pytest.raises(TypeError):
        invact.SiLU(bogus=1)


def test_bad_arguments_are_refused():
    _need('gelu', 'elu')
    with pytest.raises(ValueError, match="approximate"):
        invact.GELU(approximate="erf")
    with pytest.raises(ValueError, match="unknown activation"):
        invact.activation("no_such_activation")
    with pytest.raises(ValueError, match="unknown|known"):
        invact.Activation("no_such_activation")
    with pytest.raises(ValueError, match="not a parameter"):
        invact.Activation("elu", beta=1.0)
    with pytest.raises(ValueError, match="finite"):
        invact.Activation("elu", alpha=float("nan"))
    with pytest.raises(TypeError):
        invact.Activation(3)


def test_modules_have_no_state():
    """Nothing in state_dict: patched models keep their keys."""
    for cls in CASES:
        if CASES[cls][1] in ops.names():
            assert cls().state_dict() == {}


# -- activation() --------------------------------------------------------------------------------------

def test_activation_by_name_covers_every_table():
    for name in ops.names():
        m = invact.activation(name, backend=BACKEND)
        x = torch.randn(64, dtype=torch.float32)
        torch.testing.assert_close(m(x), ops.apply(x, name, None, BACKEND), rtol=0, atol=0)
    if "gelu_tanh" in ops.names():
        assert isinstance(invact.activation("gelu_tanh"), invact.GELU)
        assert invact.activation("gelu_tanh").approximate == "tanh"
    if "silu" in ops.names():
        assert type(invact.activation("silu")) is invact.SiLU
    assert ops.names(), "no tables generated"


def test_activation_unknown_name_lists_tables():
    _need('gelu')
    with pytest.raises(ValueError) as err:
        invact.activation("gleu")
    assert "gelu" in str(err.value)
    with pytest.raises(TypeError):
        invact.activation(nn.GELU)


def test_activation_with_parameters():
    _need('softplus')
    meta = ops.info("softplus")
    if meta.get("param_generic"):
        m = invact.activation("softplus", beta=2.0)
        assert isinstance(m, invact.Softplus) and m.beta == 2.0
    else:                                   # a table fitted for beta=1 only must refuse beta=2
        with pytest.raises(ValueError, match="fitted for"):
            invact.activation("softplus", beta=2.0)
    assert isinstance(invact.activation("softplus", beta=1.0), invact.Softplus)


# -- values and gradients ------------------------------------------------------------------------------

def test_forward_matches_torch(cls):
    for kwargs in _variants(cls):
        x = torch.randn(1000) * 4
        ours, ref = cls(**kwargs, backend=BACKEND)(x.clone()), _reference(cls, kwargs)(x.clone())
        # same forward (PyTorch's own expression or a kernel of it): a few ulps at most
        torch.testing.assert_close(ours, ref, rtol=4 * EPS32, atol=4 * EPS32)


def test_mlp_gradients_within_floor(cls):
    """Linear -> act -> Linear, (64, 256) input: grad of the activation input and of W1 stay within
    the elementwise bounds of the module docstring, from the y invact stored; a wrong table fails by
    orders of magnitude."""
    for kwargs in _variants(cls)[:2]:
        module = cls(**kwargs, backend=BACKEND)
        name, params = module.name, {k: float(v) for k, v in getattr(module, "params", {}).items()}
        torch.manual_seed(0)
        lin1, lin2 = nn.Linear(256, 512), nn.Linear(512, 256)
        x, w = torch.randn(64, 256), torch.randn(64, 256)
        results = []
        for act in (_reference(cls, kwargs), module):
            lin1.zero_grad()
            h = lin1(x)
            h.retain_grad()
            y = act(h)
            y.retain_grad()
            (lin2(y) * w).sum().backward()
            results.append((h.grad.clone(), y.grad.clone(), lin1.weight.grad.clone(), h.detach(), y.detach()))
        (gh0, gy0, gw0, h0, _), (gh1, gy1, gw1, h1, y1) = results
        torch.testing.assert_close(h1, h0, rtol=0, atol=0)
        torch.testing.assert_close(gy1, gy0, rtol=0, atol=0)     # lin2's backward does not read y
        exact, bound, _ = tol.gradient_bound(name, torch.float32, h1.double().numpy(), y1.double().numpy(),
                                             gy1.double().numpy(), gh1.double().numpy(), params)
        documented = tol.deviation_mask(name, torch.float32, h1.double().numpy(), y1.double().numpy(),
                                        gy1.double().numpy(), params)   # e.g. softplus's threshold jump
        exact, bound = torch.from_numpy(exact), torch.from_numpy(bound)
        bound[torch.from_numpy(documented)] = math.inf
        err = (gh1.double() - exact).abs()
        assert (err <= bound).all(), float((err - bound).max())
        n = x.shape[0]
        gamma = n * EPS32 / (1 - n * EPS32)
        xa = x.abs().double()
        bound_w = bound.T @ xa + gamma * (gh1.abs().double().T @ xa)
        assert ((gw1.double() - exact.T @ x.double()).abs() <= bound_w).all()


def test_functional_matches_modules():
    x = torch.randn(300) * 3
    cases = [("gelu", IF.gelu, invact.GELU),
             ("gelu_tanh", lambda t, **kw: IF.gelu(t, "tanh", **kw), lambda **kw: invact.GELU("tanh", **kw)),
             ("silu", IF.silu, invact.SiLU), ("mish", IF.mish, invact.Mish),
             ("softplus", IF.softplus, invact.Softplus), ("elu", IF.elu, invact.ELU), ("celu", IF.celu, invact.CELU),
             ("selu", IF.selu, invact.SELU), ("hardswish", IF.hardswish, invact.Hardswish),
             ("leaky_relu", IF.leaky_relu, invact.LeakyReLU), ("relu", IF.relu, invact.ReLU),
             ("relu2", IF.relu2, invact.ReLU2), ("sigmoid", IF.sigmoid, invact.Sigmoid),
             ("tanh", IF.tanh, invact.Tanh), ("quick_gelu", IF.quick_gelu, invact.QuickGELU),
             ("elu", lambda t, **kw: IF.apply(t, "elu", alpha=1.0, **kw), invact.ELU)]
    checked = 0
    for table, fn, module in cases:
        if table in ops.names():
            torch.testing.assert_close(fn(x, backend=BACKEND), module(backend=BACKEND)(x), rtol=0, atol=0)
            checked += 1
    assert checked >= 1


def test_functional_signatures_match_torch():
    for name in ("silu", "mish", "elu", "celu", "selu", "hardswish", "leaky_relu", "relu"):
        ours = _params(inspect.signature(getattr(IF, name)))
        assert ours[-1][0] == "backend"
        assert [p[:2] for p in ours[:-1]] == [p[:2] for p in _params(inspect.signature(getattr(F, name)))]
    assert [p[:2] for p in _params(inspect.signature(IF.softplus))[:-1]] == \
        [("input", inspect.Parameter.empty), ("beta", 1.0), ("threshold", 20.0)]
    assert [p[:2] for p in _params(inspect.signature(IF.gelu))[:-1]] == \
        [("input", inspect.Parameter.empty), ("approximate", "none")]


def test_functional_inplace_true_raises():
    x = torch.randn(8)
    for fn in (IF.silu, IF.mish, IF.elu, IF.celu, IF.selu, IF.hardswish, IF.leaky_relu, IF.relu):
        with pytest.raises(ValueError, match="inplace"):
            fn(x, inplace=True)
    with pytest.raises(ValueError, match="approximate"):
        IF.gelu(x, approximate="fast")


def test_module_inplace_is_ignored_and_input_untouched():
    _need('silu')
    x = torch.randn(100)
    x0 = x.clone()
    y = invact.SiLU(inplace=True, backend=BACKEND)(x)
    assert torch.equal(x, x0) and not torch.equal(y, x0)


def test_attribute_changes_follow_torch():
    """As on torch.nn, changing an attribute after construction changes the forward."""
    _need("gelu", "gelu_tanh")
    m = invact.GELU(backend=BACKEND)
    m.approximate = "tanh"
    assert m.name == "gelu_tanh"
    x = torch.randn(50)
    torch.testing.assert_close(m(x), F.gelu(x, approximate="tanh"), rtol=4 * EPS32, atol=4 * EPS32)


def test_pickle_and_deepcopy():
    import copy
    import pickle
    _need("gelu", "softplus")
    for m in (invact.GELU(), invact.Softplus(), invact.Activation("gelu", backend=None)):
        for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            assert type(clone) is type(m) and repr(clone) == repr(m)


def test_import_is_light():
    """`import invact` pulls in neither transformers/timm (recognised lazily) nor the offline fitter
    (sympy is not checked: torch itself imports it)."""
    import subprocess
    import sys
    code = ("import sys, invact; heavy = [m for m in ('transformers', 'timm', 'invact.fitting', 'scipy') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert invact.__version__ == "0.1.0"
    assert set(invact.__all__) <= set(dir(invact))


def test_docstring_examples():
    """The examples in the runtime's docstrings run and print what they show."""
    import doctest
    for module in (invact.modules, invact.patching, invact.functional, invact.saved):
        result = doctest.testmod(module, extraglobs={"invact": invact}, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_a_parameter_the_torch_forward_fixes_takes_the_formula():
    """F.selu holds alpha and scale at PyTorch's constants: with others the generated forward computes
    the formula (it ignored them, and the backward, which reads them, then differentiated another
    function); with the defaults it is F.selu bit for bit. float64: y within 4 ulps of
    scale * elu(x, alpha) (expm1 on both sides), the gradient within 8 ulps of its magnitude and of
    alpha * scale (g = y + alpha * scale below 0)."""
    x = torch.linspace(-6, 4, 2001, dtype=torch.float64)
    assert torch.equal(invact.activation("selu")(x), F.selu(x))
    # (scale >= 1: below it selu's table needs codes of its own for x <= 0 and x > 0, tests/test_fitter_generic_params.py)
    for alpha, scale in ((2.0, 1.0507009873554805), (1.6732632423543772, 1.5), (0.25, 3.0)):
        xr = x.clone().requires_grad_()
        y = invact.activation("selu", alpha=alpha, scale=scale)(xr)
        (g,) = torch.autograd.grad(y.sum(), xr)
        xt = x.clone().requires_grad_()
        want = scale * F.elu(xt, alpha)
        (gw,) = torch.autograd.grad(want.sum(), xt)
        eps = torch.finfo(torch.float64).eps
        assert ((y - want).abs() <= 4 * eps * want.abs()).all(), (alpha, scale)
        assert ((g - gw).abs() <= 8 * eps * (gw.abs() + alpha * scale)).all(), (alpha, scale)
