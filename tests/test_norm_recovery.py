"""Output-saving norms (runtime/norms.py): recovering x_hat from the saved y (the recoverability rule with
denormals flushed, columns y cannot give back), derivatives in dy, compile, vmap and nested input.

Found by a bug hunt, fixed with these tests:

1. The backward's derivative in dy (first order: torch.autograd.functional.jvp's double-vjp) runs and
   matches torch's; only a true second derivative (through x, the weight, the saved y) is refused.
2. The recoverability rule holds with denormals flushed (``torch.set_flush_denormal(True)``): its absolute
   term is :func:`invact.norms.recovery_floor`, and :func:`invact.norm_bounds.error_bound` stays a bound.
3. torch.compile under autocast traces no ``functools.lru_cache`` call (Dynamo warned on every norm).
4. (2026-12-07, hunt N/S) A bias without weight keeps the columns y cannot give back (|beta| beyond gamma = 1);
   a weight-less norm of style "gemma" has gamma 1, as its forward (its backward took 1 + offset = 2);
   vmap over stacked parameters (torch.func's model ensembling) whose kept columns differ per member; jagged
   nested input; LayerNorm style "llama" with 16-bit parameters (Cohere's, computed in float32).

Tolerances are derived where they are used, from the unit roundoff u of the dtypes involved.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import invact
from invact import backends, bitpack, norm_bounds, norm_cpu, norm_recovery, norms
from invact.arguments import ShapeError
from norm_cases import check

N, ROWS, EPS = 16, 6, 1e-5
U64 = 2.0**-53
# invact.norms.recovery_floor: tiny / u of float32 arithmetic for float32 and bfloat16 y (a y below float32's
# tiny is flushed to 0: off by tiny = u floor)
FLOORS = {torch.float32: 2.0**-126 / 2.0**-24, torch.bfloat16: 2.0**-126 / 2.0**-8}


def _gamma_n(n: int) -> float:
    """(8 + 2 log2 n) u: the relative error of a float64 sum of n terms, as norm_bounds' for float32."""
    return (8 + 2 * math.log2(max(n, 2))) * U64


def _case(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """float64 x, gamma (an exact zero and a tiny value: kept columns), beta, and tangents for each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, N, generator=g, dtype=torch.float64) * 2 + 0.5
    w = 1 + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    w[3], w[7] = 0.0, 1e-300
    b = 0.1 * torch.randn(N, generator=g, dtype=torch.float64)
    tangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, b)]
    return x, w, b, *tangents


def _call(mod, rms: bool, op: bool):
    """f(x, w, b) of torch's or invact's norm; ``op``: invact::norm_forward itself (the custom op's autograd,
    what torch.compile and dispatch modes take; plain calls take norms._Direct)."""
    if op:
        return lambda x, w, b: torch.ops.invact.norm_forward(x, w, None if rms else b, N, EPS, rms, 0.0, None,
                                                             x.dtype, "eager")[0]
    if rms:
        return lambda x, w, b: mod.rms_norm(x, (N,), w, EPS)
    return lambda x, w, b: mod.layer_norm(x, (N,), w, b, EPS)


def _tangent_bound(x, w, vx, vw, vb, ref, rms: bool) -> torch.Tensor:
    """How far invact's J (vx, vw, vb) may be from torch's, both in float64. invact recovers x_hat from y:
    off by at most e = (3 u + gamma_N (1 + rstd mean|x|)) (|x_hat| + 1) (y's rounding, y - beta and the
    division: u (|x_hat| + 1) under the rule |gamma| >= |beta| + floor, norm_bounds' docstring; the forward's
    row sums, whose mean cancels as mean|x| rstd; kept columns store x_hat exactly in float64). The
    tangent gamma rstd (v - mean(v) - x_hat c) + x_hat vw + vb, c = mean(v x_hat), then moves by
    |gamma| rstd (|c| e + (|x_hat| + e) mean(|v| e) + gamma_N (|v| + mean|v| + |x_hat c|)) + e |vw|
    + gamma_N (1 + rstd mean|x|) |ref| (rstd's and the final sums' rounding), as norm_bounds.error_bound's dx."""
    xhat, rstd, mabs = norm_bounds._stats64(x, rms, EPS)
    gn = _gamma_n(N)
    e = (3 * U64 + gn * (1 + rstd * mabs)) * (xhat.abs() + 1)
    c = (vx * xhat).mean(-1, keepdim=True)
    va = vx.abs()
    inner = c.abs() * e + (xhat.abs() + e) * (va * e).mean(-1, keepdim=True) \
        + gn * (va + va.mean(-1, keepdim=True) + (xhat * c).abs())
    return w.abs() * rstd * inner + e * vw.abs() + gn * (1 + rstd * mabs) * ref.abs() + gn * vb.abs()


@pytest.mark.parametrize("op", [False, True], ids=["direct", "op"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_derivative_in_dy_matches_torch(rms, op):
    """torch.autograd.functional.jvp (the double-vjp: the backward differentiated in dy) in float64 through
    invact's norm, in x, gamma and beta at once, and the same vjp-of-vjp by hand (the gradients of dx,
    dgamma, dbeta in dy), against torch's own norm within :func:`_tangent_bound`."""
    x, w, b, vx, vw, vb = _case()
    vb = torch.zeros_like(vb) if rms else vb
    ref = torch.autograd.functional.jvp(_call(F, rms, False), (x, w, b), (vx, vw, vb))[1]
    got = torch.autograd.functional.jvp(_call(invact.functional, rms, op), (x, w, b), (vx, vw, vb))[1]
    tol = _tangent_bound(x, w, vx, vw, vb, ref, rms)
    check(got, ref, tol, "jvp")
    xs = [t.clone().requires_grad_() for t in ((x, w) if rms else (x, w, b))]
    y = _call(invact.functional, rms, op)(xs[0], xs[1], None if rms else xs[2])
    dy = torch.zeros_like(y, requires_grad=True)
    grads = torch.autograd.grad(y, xs, dy, create_graph=True)
    (by_hand,) = torch.autograd.grad(grads, dy, (vx, vw) if rms else (vx, vw, vb))
    check(by_hand, ref, tol, "vjp of vjp")


@pytest.mark.parametrize("op", [False, True], ids=["direct", "op"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_true_second_derivatives_are_refused(rms, op):
    """A gradient through the saved y, the weight or the bias of the backward (x's Hessian, a gradient
    penalty, dgamma differentiated in gamma) still raises the norms' own error, whatever asks for it."""
    x, w, b, *_ = _case(1)
    for wrt in ("x", "w", "dw"):
        xs = [t.clone().requires_grad_() for t in (x, w, b)]
        y = _call(invact.functional, rms, op)(*xs)
        gx, gw = torch.autograd.grad(y.pow(2).sum(), xs[:2], create_graph=True)
        with pytest.raises(RuntimeError, match="invact norms have no second derivative"):
            if wrt == "x":
                gx.pow(2).sum().backward()
            elif wrt == "w":
                torch.autograd.grad(gx.sum(), xs[1])
            else:
                torch.autograd.grad(gw.sum(), xs[1])
    xs = [t.clone().requires_grad_() for t in (x, w, b)]
    (gx,) = torch.autograd.grad(_call(invact.functional, rms, op)(*xs).sum(), xs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="invact norms have no second derivative"):
        gx.pow(2).sum().backward()                       # dy constant: the refusal comes from y and w alone


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_torch_func_transforms_still_match(rms):
    """torch.func's jvp and hessian take the norms' torch-ops path (norms._apply's differentiating()) and give
    torch's values: the same formula in float64, rows of N terms in another order, so within
    gamma_N (|value| + mean |value| of its row) per element (sums of N products, each rounded)."""
    x, w, b, vx, *_ = _case(2)
    fr, fi = _call(F, rms, False), _call(invact.functional, rms, False)
    gn = 4 * _gamma_n(N)
    (_, want), (_, got) = (torch.func.jvp(lambda z: f(z, w, b), (x,), (vx,)) for f in (fr, fi))
    assert ((got - want).abs() <= gn * (want.abs() + want.abs().mean(-1, keepdim=True))).all()
    row = x[0]
    hr, hi = (torch.func.hessian(lambda z: f(z.reshape(1, N), w, b).pow(3).sum())(row) for f in (fr, fi))
    assert ((hi - hr).abs() <= gn * N * (hr.abs() + hr.abs().mean())).all()


# ----------------------------------------------------------------------------------------------
# 2. the rule with denormals flushed

@contextlib.contextmanager
def _flushing(on: bool):
    was = bitpack.denormals_flushed()
    if on and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal returned False)")
    torch.set_flush_denormal(on)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


def _edge_gammas(dtype: torch.dtype) -> tuple[torch.Tensor, set[int]]:
    """gamma of ones with columns at the rule's edge in ``dtype`` (beta 0 there): 1.5 and 2 times the floor
    (recovered), 0.75 times it and 4e-38 (normal, above the old rule's tiny: kept), negatives too; and the
    columns expected kept."""
    f = FLOORS[dtype]
    w = torch.ones(N, dtype=torch.float64)
    edge = {0: 4e-38, 1: 1.5 * f, 2: -2 * f, 3: 0.75 * f, 4: -0.75 * f, 5: 2 * f}
    for j, v in edge.items():
        w[j] = v
    w = w.to(dtype)
    assert all(w[j].item() == v for j, v in edge.items() if j), "the floor's multiples exact in the dtype"
    return w, {0, 3, 4}


@pytest.mark.parametrize("flush", [False, True], ids=["gradual", "flushed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_rule_edge_within_the_bound_flushed_or_not(rms, dtype, flush, backend):
    """Gammas at the rule's edge, denormals flushed or not while the norm runs forward and backward: the kept
    columns are those below :func:`invact.norms.recovery_floor` (4e-38 among them: recovered before, and
    dgamma off by 0.23 under flushing), and every gradient is within norm_bounds.error_bound (its
    floor term is y's error near 0 in both modes, so its measured k_y stays small)."""
    # the compiled backend exists for CPU tensors only where a C++ compiler is on PATH (or $CXX):
    # backends.resolve raises ValueError otherwise, which is the runtime's documented answer, not a fault
    if backend not in backends.available("cpu"):
        pytest.skip(f"backend {backend!r} not available for CPU tensors here (no C++ compiler for Inductor)")
    g = torch.Generator().manual_seed(5)
    w, kept = _edge_gammas(dtype)
    b = None if rms else (0.1 * torch.randn(N, generator=g)).to(dtype)
    if b is not None:
        b[:6] = 0.0
    x = (torch.randn(4 * ROWS, N, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(4 * ROWS, N, generator=g).to(dtype)
    xs = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    with _flushing(flush):
        _, _, _, cols = torch.ops.invact.norm_forward(x, w, b, N, EPS, rms, 0.0, None, dtype, backend)
        y = invact.functional.rms_norm(xs[0], (N,), xs[1], EPS, backend=backend) if rms else \
            invact.functional.layer_norm(xs[0], (N,), xs[1], xs[2], EPS, backend=backend)
        grads = torch.autograd.grad(y, xs, dy)
    refs, tols = norm_bounds.error_bound(x, w, b, dy, y.detach(), rms, EPS)
    for got, ref, tol, what in zip(grads, refs, tols, ("dx", "dgamma", "dbeta")):
        check(got, ref, tol, f"{dtype} flush={flush} {what}")
    assert set(cols.tolist()) == kept == set(invact.norms.recovery(w, b, dtype).columns)


def test_unguarded_recovery_breaks_the_bound_when_flushed():
    """The bound is tight enough to see the flushing bug: gamma_0 = 4e-38 (float32) recovered by division
    (no kept columns, as the old rule decided) with denormals flushed puts dgamma_0 outside error_bound."""
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    w = torch.ones(8)
    w[0] = 4e-38
    none = torch.zeros(0, dtype=torch.int64)
    with _flushing(True):
        y, rstd, extra, cols = torch.ops.invact.norm_forward(x, w, None, 8, EPS, False, 0.0, None,
                                                             torch.float32, "eager")
        _, dw, _ = torch.ops.invact.norm_backward(dy, y, rstd, extra[:, :0], none, w, None, 8, False, 0.0,
                                                  torch.float32, "eager")
    refs, tols = norm_bounds.error_bound(x, w, None, dy, y, False, EPS)
    assert not (dw[0].double() - refs[1][0]).abs() <= tols[1][0]
    assert cols.tolist() == [0]


@pytest.mark.skipif(norm_cpu.library() is None, reason="no C compiler, or the C kernels switched off")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_check_at_the_new_edge(dtype):
    """The forward's one-call C check (norm_cpu.all_recoverable, given the floor the forward passes) answers
    as norm_recovery.recoverable for gammas at each y dtype's edge, one column at a time."""
    for y_dtype in FLOORS:
        w, _ = _edge_gammas(y_dtype)
        for j in range(6):
            wj = torch.ones(N, dtype=dtype)
            wj[0] = w[j].item()
            gamma = norm_recovery.gamma(wj, 0.0, N, torch.float32, wj.device)
            want = bool(norm_recovery.recoverable(gamma, None, y_dtype).all())
            floor = norm_recovery.floor_in(y_dtype, torch.float32)
            got = norm_cpu.all_recoverable(wj, None, 0.0, norm_recovery.RATIO, floor)
            assert got == want, (dtype, y_dtype, j)


def test_recovery_floor_values():
    """The floor: y's tiny with gradual underflow, tiny / u of y's arithmetic (float32 for the 16-bit y)
    where flushing makes it larger: float16 keeps its own tiny."""
    for dtype, floor in FLOORS.items():
        assert norms.recovery_floor(dtype) == floor
    assert norms.recovery_floor(torch.float16) == torch.finfo(torch.float16).tiny
    assert norms.recovery_floor(torch.float64) == 2.0**-1022 / 2.0**-53


def test_float64_output_from_float32_weights_keeps_zero_gamma():
    """Llama's RMSNorm of float64 x with float32 weights stores a float64 y and decides in float32, where
    float64's floor (2e-292) is 0: a zero gamma passed ``0 >= 0`` and its gradients were NaN."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(ROWS, N, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.ones(N)
    w[2] = 0.0
    w.requires_grad_()
    assert 2 in invact.norms.recovery(w, None, torch.float64).columns
    y = invact.functional.rms_norm(x, (N,), w, EPS, style="llama")
    y.backward(torch.ones_like(y))
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


# ----------------------------------------------------------------------------------------------
# 3. torch.compile under autocast

def test_compile_under_autocast_traces_no_lru_cache(monkeypatch):
    """A compiled norm of bf16 x under CPU autocast asks norms._autocast_upcasts (a functools.cache) outside
    Dynamo's trace: no "lru_cache-wrapped function" warning (Dynamo's warn_once cache emptied first), and
    the output is eager's, bit for bit."""
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(ROWS, N, generator=g).to(torch.bfloat16)
    w, b = torch.randn(N, generator=g), torch.randn(N, generator=g)

    def fn(t):
        return invact.functional.layer_norm(t, (N,), w, b) + invact.functional.rms_norm(t, (N,), w).float()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = fn(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# 4. hunt N/S: affine parameters the rule missed, transforms and layouts

def test_bias_without_weight_keeps_the_columns_y_cannot_give_back():
    """layer_norm(x, shape, None, beta) with |beta| = 1000 (bf16): y = x_hat + beta is rounded at beta's scale,
    so x_hat = y - beta lost its bits (dx off by 0.72 where torch's is within 0.013); gamma = 1 fails the rule
    in every column, x_hat is kept, and every gradient is within norm_bounds.error_bound (gamma = 1)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(ROWS, N, generator=g).bfloat16()
    dy = torch.randn(ROWS, N, generator=g).bfloat16()
    b = torch.full((N,), 1000.0, dtype=torch.bfloat16)
    assert norms.recovery(None, b, torch.bfloat16).fallback
    xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
    y = invact.functional.layer_norm(xs, (N,), None, bs, EPS)
    grads = torch.autograd.grad(y, (xs, bs), dy)
    # gamma = 1 in bf16: error_bound rounds the parameters' gradients to w's dtype (dbeta is bf16)
    refs, tols = norm_bounds.error_bound(x, torch.ones(N, dtype=torch.bfloat16), b, dy, y.detach(), False, EPS)
    for got, ref, tol, what in zip(grads, refs[::2], tols[::2], ("dx", "dbeta")):
        check(got, ref, tol, f"bias without weight {what}")


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_gemma_style_without_weight_has_gamma_one(rms):
    """style="gemma" stores gamma - 1 in its weight; without one the forward computes y = x_hat (torch's norm,
    bit for bit), and the backward now uses that gamma = 1 (it took 1 + offset = 2: dx doubled)."""
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(ROWS, N, generator=g, dtype=torch.float64) * 2 + 0.5).float()
    dy = torch.randn(ROWS, N, generator=g)
    cls = invact.RMSNorm if rms else invact.LayerNorm
    norm = cls(N, EPS, elementwise_affine=False, style="gemma")
    xs = x.clone().requires_grad_()
    y = norm(xs)
    assert torch.equal(y, F.rms_norm(x, (N,), None, EPS) if rms else F.layer_norm(x, (N,), None, None, EPS))
    (dx,) = torch.autograd.grad(y, xs, dy)
    refs, tols = norm_bounds.error_bound(x, torch.ones(N), None, dy, y.detach(), rms, EPS)
    check(dx, refs[0], tols[0], "gemma style without weight dx")


def test_vmap_over_stacked_parameters_whose_kept_columns_differ():
    """torch.func's model ensembling (functional_call under vmap over stacked weights): one member keeps a
    column (|beta_2| = 3 > gamma_2), the others none; the custom op has no vmap rule and its per-member
    fallback could not stack kept columns of different sizes. Batched parameters take torch's math, the
    same operations as torch's LayerNorm under vmap: output and parameter gradients equal (float64)."""
    from torch.func import functional_call, vmap
    g = torch.Generator().manual_seed(13)
    ws = 0.5 + torch.rand(3, 6, generator=g, dtype=torch.float64)
    bs = torch.zeros(3, 6, dtype=torch.float64)
    bs[0, 2] = 3.0
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    dy = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    assert [len(norms.recovery(w, b, torch.float64).columns) for w, b in zip(ws, bs)] == [1, 0, 0]

    def ensemble(module):
        params = {"weight": ws.clone().requires_grad_(), "bias": bs.clone().requires_grad_()}
        out = vmap(lambda p, xx: functional_call(module, p, (xx,)), in_dims=(0, None))(params, x)
        return (out, *torch.autograd.grad(out, tuple(params.values()), dy))

    want = ensemble(torch.nn.LayerNorm(6, dtype=torch.float64, device="meta"))
    got = ensemble(invact.LayerNorm(6, dtype=torch.float64, device="meta"))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_jagged_nested_input_is_normalized_on_its_values(rms):
    """A jagged nested tensor (torch.nested, layout=torch.jagged) normalized over dimensions after its ragged
    one, as torch's norms take it: the output is nested with the input's structure, its values torch's (the
    same kernel, bit for bit), and dx reaches the input within norm_bounds.error_bound; a normalized shape
    reaching the ragged dimension is a ShapeError naming it."""
    g = torch.Generator().manual_seed(14)
    rows = [torch.randn(k, N, generator=g) * 2 + 0.5 for k in (2, 5)]
    w, b = torch.randn(N, generator=g), None if rms else 0.1 * torch.randn(N, generator=g)
    x = torch.nested.nested_tensor(rows, layout=torch.jagged, requires_grad=True)
    fn = (lambda t: invact.functional.rms_norm(t, (N,), w, EPS)) if rms else \
        (lambda t: invact.functional.layer_norm(t, (N,), w, b, EPS))
    y = fn(x)
    assert y.is_nested and torch.equal(y.offsets(), x.offsets())
    want = F.rms_norm(x.values(), (N,), w, EPS) if rms else F.layer_norm(x.values(), (N,), w, b, EPS)
    assert torch.equal(y.values(), want)
    dy = torch.randn(y.values().shape, generator=g)
    (dx,) = torch.autograd.grad(y.values(), x, dy)
    refs, tols = norm_bounds.error_bound(x.values().detach(), w, b, dy, y.values().detach(), rms, EPS)
    check(dx.values(), refs[0], tols[0], "jagged dx")
    with pytest.raises(ShapeError, match="after its ragged dimension 1"):
        invact.functional.layer_norm(x, (3, N))


def test_layer_norm_llama_style_computes_16_bit_parameters_in_float32():
    """Style "llama" is ``F.layer_norm(x.float(), shape, w.float(), b.float()).to(x.dtype)`` for parameters of
    any dtype (Cohere's LayerNorm casts its weight so; bf16 weights with float32 or bf16 x, fp16 weights with
    bf16 x raised torch's "mixed dtype"): bit for bit, and each gradient in its parameter's dtype."""
    g = torch.Generator().manual_seed(15)
    for w_dtype, x_dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                             (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64)):
        x = (torch.randn(ROWS, N, generator=g) * 2 + 0.5).to(x_dtype).requires_grad_()
        w, b = (torch.randn(N, generator=g).to(w_dtype).requires_grad_() for _ in range(2))
        y = invact.functional.layer_norm(x, (N,), w, b, EPS, style="llama")
        want = F.layer_norm(x.float(), (N,), w.float(), b.float(), EPS).to(x_dtype)
        assert y.dtype == x_dtype and torch.equal(y, want), (w_dtype, x_dtype)
        grads = torch.autograd.grad(y.float().sum(), (x, w, b))
        assert [t.dtype for t in grads] == [x_dtype, w_dtype, w_dtype]
