"""When nothing will differentiate y, apply computes y only; non-finite grad_out against PyTorch.

- no_grad / inference_mode / an x that does not require grad: no branch code is computed or packed
  (invact::value runs instead of invact::forward), and y is the grad-enabled y bit for bit.
- grad_out with inf, -inf or NaN: invact's gradient is the IEEE product g(y, code) * grad_out, so it
  differs from PyTorch exactly where one of the two backward formulas forms 0 * inf or inf - inf
  (README, "Limitations"); every other element is PyTorch's bit for bit.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tolerances as tol
from invact import cpu_kernel, impl_compiled, impl_eager, ops
from triton_tolerances import default_params

NAMES = ops.names()
pytestmark = pytest.mark.skipif(not NAMES, reason="no generated activations (run `invact generate`)")


class OpLog(TorchDispatchMode):
    """Records the names of the ops that run below autograd."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_code_without_autograd(name, backend, dtype, monkeypatch):
    x = torch.randn(37, 129, dtype=dtype) * 4
    params = default_params(name)
    with_code = ops.apply(x.clone().requires_grad_(), name, backend=backend).detach()

    def no_code(*args, **kwargs):
        raise AssertionError("the branch code was computed")

    monkeypatch.setattr(impl_eager, "kernels", lambda *a: (no_code, no_code))  # the code: neither eager's
    monkeypatch.setattr(impl_compiled, "kernels", lambda *a: (no_code, no_code))  # nor Inductor's
    monkeypatch.setattr(cpu_kernel, "pack_code", no_code)
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with mode(), OpLog() as log:
            y = ops.apply(x, name, backend=backend)  # x does not require grad
        assert "invact.forward" not in log.names  # eager: the forward's own ops, without the op's dispatch
        assert torch.equal(y, with_code) and y.stride() == with_code.stride()
        assert torch.equal(torch.ops.invact.value(x, name, params, backend), with_code)
    xr = x.clone().requires_grad_()
    with torch.no_grad(), OpLog() as log:
        ops.apply(xr, name, backend=backend)
    assert "invact.forward" not in log.names


def test_no_grad_on_meta_and_fake_tensors():
    """Tensors without data take invact::value and its fake (the direct call needs real constants)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    with torch.no_grad():
        y = ops.apply(torch.zeros(4, 3, device="meta"), NAMES[0], backend="eager")
        assert y.device.type == "meta" and y.shape == (4, 3)
        with FakeTensorMode():
            y = ops.apply(torch.zeros(4, 3).T, NAMES[0], backend="eager")
        assert isinstance(y, FakeTensor) and y.shape == (3, 4) and y.stride() == (1, 3)


def test_value_op_passes_opcheck(name):
    params = default_params(name)
    torch.library.opcheck(torch.ops.invact.value.default, (torch.randn(3, 5), name, params, "eager"))


@pytest.mark.slow
def test_compiled_inference_has_no_code():
    """Under torch.compile (fullgraph) with no_grad the graph holds invact::value only."""
    from torch._dynamo.testing import EagerAndRecordGraphs
    backend = EagerAndRecordGraphs()
    x = torch.randn(8, 16)
    fn = torch.compile(lambda v: ops.apply(v, NAMES[0], backend="eager") * 2, backend=backend, fullgraph=True)
    with torch.no_grad():
        y = fn(x)
    code = "\n".join(g.code for g in backend.graphs)
    assert "invact.value" in code and "invact.forward" not in code
    assert torch.equal(y, ops.apply(x, NAMES[0], backend="eager") * 2)


# ------------------------------------------------------------------------------------------------
# non-finite grad_out

def _grid(dtype: torch.dtype) -> torch.Tensor:
    """x over the whole range that matters: saturated tails, the branch points, the kinks."""
    x = torch.cat([torch.linspace(-120, 120, 4801, dtype=torch.float64),
                   torch.tensor([-1e30, -3.0, -1.5, 0.0, 3.0, 1e30], dtype=torch.float64)])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_grad_out_against_pytorch(name, dtype):
    """ours == g * grad_out (IEEE), and differs from PyTorch only where one formula makes 0 * inf or
    inf - inf: (a) our g is exactly 0 (ReLU, ReLU2, Hardswish's flat pieces, where PyTorch's masked
    select gives 0; saturated tails of ELU, SELU, CELU, Softplus, SiLU, Mish, GELU, where y holds no
    more information and PyTorch's tiny f'(x) times inf gives inf) and ours is NaN; (b) PyTorch is NaN
    (its product rule for quick_gelu / gelu_tanh adds inf and -inf) and ours is the finite g times inf."""
    x = _grid(dtype)
    ref = tol.torch_reference(name, x)
    if ref is None:
        pytest.skip("user table without a PyTorch forward")
    xr = x.clone().requires_grad_()
    y = ops.apply(xr, name, backend="eager")
    (g,) = torch.autograd.grad(y, xr, torch.ones_like(y), retain_graph=True)
    for value in (math.inf, -math.inf, math.nan):
        go = torch.full_like(x, value)
        (ours,) = torch.autograd.grad(y, xr, go, retain_graph=True)
        xt = x.clone().requires_grad_()
        (theirs,) = torch.autograd.grad(tol.torch_reference(name, xt), xt, go)
        assert torch.equal(ours.isnan(), (g * go).isnan()) and torch.equal(ours.nan_to_num(), (g * go).nan_to_num())
        differ = ~((ours == theirs) | (ours.isnan() & theirs.isnan()))
        zero_g = differ & (g == 0) & ours.isnan()
        torch_nan = differ & theirs.isnan() & torch.isfinite(g) & (g != 0) & ours.isinf()
        assert torch.equal(differ, zero_g | torch_nan), x[differ & ~(zero_g | torch_nan)]


def test_data_mutation_of_saved_output_changes_gradient():
    """README, Limitations: y.data.mul_() bypasses autograd's version counter, and backward rebuilds g
    from the mutated y (native GELU saves x: unaffected); y.mul_() and y.detach().mul_() are refused."""
    name = "gelu" if "gelu" in NAMES else NAMES[0]
    x = torch.randn(64, requires_grad=True)
    (clean,) = torch.autograd.grad(ops.apply(x, name, backend="eager").sum(), x)
    y = ops.apply(x, name, backend="eager")
    y.data.mul_(3)
    (changed,) = torch.autograd.grad(y.sum(), x)
    assert not torch.equal(changed, clean)
    native = torch.nn.GELU()(x)
    native.data.mul_(3)
    assert torch.equal(torch.autograd.grad(native.sum(), x)[0], torch.autograd.grad(torch.nn.GELU()(x).sum(), x)[0])
    y = ops.apply(x, name, backend="eager")
    y.detach().mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_jacobian_of_an_empty_input_is_empty(name, transform):
    """jacrev / jacfwd over an empty x (a vmap over 0 entries) give torch's empty jacobian: shape y.shape +
    x.shape, no stack of nothing ("stack expects a non-empty TensorList" before)."""
    x = torch.randn(0, 5)
    jac = getattr(torch.func, transform)(lambda t: ops.apply(t, name, backend="eager"))(x)
    assert jac.shape == (0, 5, 0, 5) and jac.dtype == x.dtype


def test_vmapped_pullback_over_no_cotangents_is_empty(name):
    _, pullback = torch.func.vjp(lambda t: ops.apply(t, name, backend="eager"), torch.randn(4))
    (grads,) = torch.func.vmap(pullback)(torch.randn(0, 4))
    assert grads.shape == (0, 4) and grads.dtype == torch.float32
