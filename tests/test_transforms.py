"""torch.func transforms and forward-mode AD (torch.autograd.forward_ad) over invact activations.

The activations are elementwise, so every first-order transform is ``tangent * g(y, code)``: the same
backward op as reverse mode. Each transform is checked two ways, in float64:
- bit for bit against invact's own plain autograd with the same tangent (both run invact::backward on
  the same y, code and tangent, and the product g * t is one correctly rounded float64 multiply);
- against the same transform of torch.nn.functional's activation, within the table's certified
  approximation error + 1e-9 (float64 evaluation of float32-rounded coefficients) + the float64
  information floor measured per element from the stored y (test_ops.test_float64_gradients derives
  the same bound; tests/tolerances.py computes the floor).
Second-order transforms are refused with an error naming invact; functionalize together with a
derivative too.
"""

import math

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functionalize, grad, hessian, jacfwd, jacrev, jvp, linearize, vjp, vmap

import tolerances as tol
from invact import ops

# (table, params, PyTorch's function): smooth, fitted, parameterised and piecewise ones
CASES = [
    ("gelu", {}, F.gelu),
    ("silu", {}, F.silu),
    ("softplus", {"beta": 1.5, "threshold": 30.0}, lambda v: F.softplus(v, beta=1.5, threshold=30.0)),
    ("leaky_relu", {"negative_slope": 0.2}, lambda v: F.leaky_relu(v, 0.2)),
    ("relu2", {}, lambda v: F.relu(v).square()),
    ("elu", {"alpha": 0.5}, lambda v: F.elu(v, 0.5)),
]
CASES = [c for c in CASES if c[0] in ops.names()]
pytestmark = pytest.mark.skipif(not CASES, reason="no generated activations (run `invact generate`)")
EAGER = "eager"


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    return request.param


def inputs(name: str, params: dict, n: int = 24) -> torch.Tensor:
    """float64 x over [-6, 6] away from kinks (x = 0, +-3, softplus's switch to x at beta x = threshold),
    where the one-sided derivatives differ and PyTorch picks one."""
    x = torch.linspace(-6, 6, n, dtype=torch.float64) + 0.0123
    kinks = torch.tensor([0.0, 3.0, -3.0, params.get("threshold", 20.0) / params.get("beta", 1.0)],
                         dtype=torch.float64)
    return x[(x[:, None] - kinks).abs().min(dim=1).values > 1e-2]


def invact_fn(name: str, params: dict, backend: str = EAGER):
    return lambda v: ops.apply(v, name, params or None, backend)


def plain_vjp(name: str, params: dict, x: torch.Tensor, t: torch.Tensor, backend: str = EAGER) -> torch.Tensor:
    """t * g(y, code) by plain reverse-mode autograd, outside any transform."""
    xr = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(ops.apply(xr, name, params or None, backend), xr, t)
    return gx


def assert_close_to_torch(name: str, params: dict, x: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor,
                          scale: torch.Tensor | None = None) -> None:
    """|ours - theirs| <= (approx_error + 1e-9 + floor) * |scale| per element (scale: the tangent)."""
    y = ops.apply(x, name, params or None, EAGER).numpy()
    floor = tol.information_floor(name, x.numpy(), y, params=params or None)
    atol = tol.table(name)["certificate"]["approx_error"] + 1e-9 + floor
    if scale is not None:
        atol = atol * np.abs(scale.numpy())
    err = np.abs(ours.detach().numpy() - theirs.detach().numpy())
    assert np.all(err <= atol), f"max excess {np.max(err - atol)}"


def diagonal_only(jac: torch.Tensor) -> torch.Tensor:
    assert torch.equal(jac, torch.diag(torch.diagonal(jac)))
    return torch.diagonal(jac)


def test_jvp_and_forward_ad(case):
    name, params, ref = case
    x = inputs(name, params)
    t = torch.linspace(-2, 3, x.numel(), dtype=torch.float64)
    want = plain_vjp(name, params, x, t)
    y, out = jvp(invact_fn(name, params), (x,), (t,))
    assert torch.equal(y, ops.apply(x, name, params or None, EAGER))
    assert torch.equal(out, want)
    assert_close_to_torch(name, params, x, out, jvp(ref, (x,), (t,))[1], t)
    with fwAD.dual_level():
        dual = ops.apply(fwAD.make_dual(x, t), name, params or None, EAGER)
        assert torch.equal(fwAD.unpack_dual(dual).tangent, want)


def test_grad_and_vjp(case):
    name, params, ref = case
    x = inputs(name, params)
    w = torch.linspace(3, -1, x.numel(), dtype=torch.float64)
    want = plain_vjp(name, params, x, w)
    ours = grad(lambda v: (invact_fn(name, params)(v) * w).sum())(x)
    assert torch.equal(ours, want)
    assert_close_to_torch(name, params, x, ours, grad(lambda v: (ref(v) * w).sum())(x), w)
    _, pullback = vjp(invact_fn(name, params), x)
    assert torch.equal(pullback(w)[0], want)


def test_jacobians_and_linearize(case):
    name, params, ref = case
    x = inputs(name, params)
    ones = torch.ones_like(x)
    g = plain_vjp(name, params, x, ones)
    for transform in (jacrev, jacfwd):
        assert torch.equal(diagonal_only(transform(invact_fn(name, params))(x)), g)
    assert_close_to_torch(name, params, x, torch.diagonal(jacrev(invact_fn(name, params))(x)),
                          torch.diagonal(jacrev(ref)(x)))
    y, lin = linearize(invact_fn(name, params), x)
    assert torch.equal(y, ops.apply(x, name, params or None, EAGER))
    assert torch.equal(lin(ones), g)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_vmap_composes(case, backend):
    """vmap runs the ops on the physical batch (the code covers all of it); per-sample gradients,
    vmap inside and outside grad and jvp all give the unbatched bits."""
    name, params, _ = case
    f = invact_fn(name, params, backend)
    xs = inputs(name, params).reshape(2, -1)
    ts = torch.linspace(-1, 1, xs.numel(), dtype=torch.float64).reshape(xs.shape)
    assert torch.equal(vmap(f)(xs), f(xs))
    xt = xs.T.contiguous()  # the same physical tensor (PyTorch's vector body and tail may round apart)
    assert torch.equal(vmap(f, in_dims=1, out_dims=1)(xt), f(xt))
    want = plain_vjp(name, params, xs, ts, backend)
    assert torch.equal(vmap(grad(lambda v, w: (f(v) * w).sum()))(xs, ts), want)
    assert torch.equal(grad(lambda v: (vmap(f)(v) * ts).sum())(xs), want)
    assert torch.equal(vmap(lambda v, w: jvp(f, (v,), (w,))[1])(xs, ts), want)
    assert torch.equal(jvp(vmap(f), (xs,), (ts,))[1], want)
    xr = xs.clone().requires_grad_()  # plain autograd around vmap (a batched x reports requires_grad False)
    assert torch.equal(torch.autograd.grad(vmap(vmap(f))(xr.unsqueeze(-1)).squeeze(-1), xr, ts)[0], want)
    _, pullback = vjp(f, xs[0])  # one y, a batch of cotangents (what jacrev does)
    assert torch.equal(vmap(pullback)(ts)[0], torch.stack([pullback(t)[0] for t in ts]))


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_autograd_batched_grads(case, backend):
    """torch.autograd's own batching (grad with is_grads_batched=True, which
    torch.autograd.functional.jacobian(vectorize=True) uses): the batched cotangents have no storage, so
    the backward takes the op's vmap rule; each row is plain autograd's bits. It raised 'Cannot access
    data pointer' (compiled) and a missing batching rule (eager)."""
    name, params, _ = case
    f = invact_fn(name, params, backend)
    x = inputs(name, params).float()[:12].reshape(3, 4)
    ts = torch.linspace(-1, 1, 5 * x.numel()).reshape(5, *x.shape)
    xr = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(f(xr), xr, ts, is_grads_batched=True)
    assert torch.equal(got, torch.stack([plain_vjp(name, params, x, t, backend) for t in ts]))
    jac = torch.autograd.functional.jacobian(f, x, vectorize=True)
    assert torch.equal(jac, torch.autograd.functional.jacobian(f, x))


def test_functionalize(case):
    name, params, _ = case
    x = inputs(name, params)
    f = invact_fn(name, params)
    assert torch.equal(functionalize(f)(x), f(x))
    xr = x.clone().requires_grad_()
    assert torch.equal(torch.autograd.grad(functionalize(f)(xr).sum(), xr)[0], plain_vjp(name, params, x, torch.ones_like(x)))
    with pytest.raises(NotImplementedError, match="invact.*functionalize"):
        functionalize(grad(lambda v: f(v).sum()))(x)


@pytest.mark.parametrize("transform", ["hessian", "jacrev(jacrev)", "jacfwd(jacrev)", "jvp(jvp)", "grad(grad)",
                                       "create_graph", "grad(jvp)", "jacrev(jacfwd)", "dual then backward"])
def test_second_order_refused_naming_invact(transform):
    name, params, _ = CASES[0]
    x = inputs(name, params)
    f = invact_fn(name, params)
    t = torch.ones_like(x)
    run = {
        "hessian": lambda: hessian(lambda v: f(v).sum())(x),
        "jacrev(jacrev)": lambda: jacrev(jacrev(f))(x),
        "jacfwd(jacrev)": lambda: jacfwd(jacrev(f))(x),
        "jvp(jvp)": lambda: jvp(lambda v: jvp(f, (v,), (t,))[1], (x,), (t,)),
        "grad(grad)": lambda: grad(lambda v: grad(lambda u: f(u).sum())(v).sum())(x),
        "create_graph": lambda: _forward_ad_then_double_backward(f, x),
        # reverse over forward: the jvp's y part is f''; these gave zeros (a Hessian-vector product of 0)
        "grad(jvp)": lambda: grad(lambda v: jvp(lambda u: f(u).sum(), (v,), (t,))[1])(x),
        "jacrev(jacfwd)": lambda: jacrev(jacfwd(lambda v: f(v).sum()))(x),
        "dual then backward": lambda: _tangent_then_backward(f, x, t),
    }[transform]
    with pytest.raises(RuntimeError, match="invact activations have no second derivative"):
        run()


def _tangent_then_backward(f, x, t):
    """Forward mode (dual tensors), then reverse mode through the tangent."""
    xr = x.clone().requires_grad_()
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(f(fwAD.make_dual(xr, t))).tangent
    tangent.sum().backward()


def _forward_ad_then_double_backward(f, x):
    """Reverse mode twice through the transform path (a dual level is open)."""
    xr = x.clone().requires_grad_()
    with fwAD.dual_level():
        (g,) = torch.autograd.grad(f(xr).sum(), xr, create_graph=True)
        g.sum().backward()


def test_transform_path_saves_only_output_and_code():
    """With a dual level open apply runs the autograd.Function path: it saves y and the packed code
    for backward, nothing else (what tests/test_ops.py checks for the ops' own autograd)."""
    name, params, _ = next((c for c in CASES if ops.info(c[0])["code_bits"]), CASES[0])
    x = torch.randn(64, 129, dtype=torch.float64, requires_grad=True)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with fwAD.dual_level(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.apply(x, name, params or None, EAGER)
    bits = ops.info(name)["code_bits"]
    assert sum(t.untyped_storage().nbytes() for t in kept) == y.numel() * 8 + math.ceil(y.numel() * bits / 8)
    assert any(t.data_ptr() == y.data_ptr() for t in kept)
    y.sum().backward()
    assert torch.equal(x.grad, plain_vjp(name, params, x.detach(), torch.ones_like(y)))


@pytest.mark.slow
@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_transforms_match_eager(fullgraph):
    """torch.compile of jvp and grad: the transform path runs eagerly (torch.compiler.disable: Dynamo
    would inline the autograd.Function's forward without its jvp, a zero tangent), so the answer is the
    eager one, and fullgraph=True is refused naming invact; plain compiled calls keep the custom ops in
    the graph (tests/test_ops.py)."""
    name, params, _ = CASES[0]
    f = invact_fn(name, params, None)
    x = inputs(name, params)
    t = torch.linspace(-2, 3, x.numel(), dtype=torch.float64)
    torch._dynamo.reset()
    compiled_jvp = torch.compile(lambda v: jvp(f, (v,), (t,))[1], fullgraph=fullgraph)
    compiled_grad = torch.compile(lambda v: grad(lambda u: (f(u) * t).sum())(v), fullgraph=fullgraph)
    want = jvp(f, (x,), (t,))[1]
    for fn in (compiled_jvp, compiled_grad):
        if fullgraph:  # one graph cannot hold it: Dynamo's error carries the reason, naming invact
            with pytest.raises(torch._dynamo.exc.Unsupported, match="invact activations under torch.func"):
                fn(x)
        else:
            assert torch.equal(fn(x), want)
    plain = torch.compile(f, fullgraph=fullgraph)  # compiled outside any transform, then called in one
    assert torch.equal(plain(x), f(x))
    if not fullgraph:
        assert torch.equal(jvp(plain, (x,), (t,))[1], want)
        with fwAD.dual_level():
            assert torch.equal(fwAD.unpack_dual(plain(fwAD.make_dual(x, t))).tangent, want)
    xr = x.clone().requires_grad_()  # vmap alone compiles into the graph, with the ops' own autograd
    y = torch.compile(vmap(f), fullgraph=fullgraph)(xr.view(2, -1))
    assert torch.equal(torch.autograd.grad(y.view(-1), xr, t)[0], want)
