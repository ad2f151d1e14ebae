"""Property-based tests (hypothesis) of every activation against PyTorch: shapes, layouts, dtypes, values.

For random tensors (shapes with zero, one and ragged element counts; contiguous, transposed,
channels-last, sliced and expanded layouts; float32, bfloat16, float16 and float64) whose values mix
NaN, +-inf, +-0, subnormals, the largest finite values, points next to every branch and kink, inputs
whose rounded y lies below the true minimum y_min, the body and the tails:

* the forward equals PyTorch's (torch.nn.functional) bit for bit, with PyTorch's strides;
* the backward is finite wherever PyTorch's is, NaN or the same infinity exactly where PyTorch's is
  (at NaN inputs: one of PyTorch's own answers, which depend on the element's position), and within
  tests/tolerances.py's bound of float64 autograd;
* except where tests/tolerances.py's DEVIATIONS documents a difference: each is pinned below, the
  fixable ones as xfail(strict=True) tests that fail once the fix lands.

Every test runs twice: as is, and with denormals flushed (``torch.set_flush_denormal(True)``, where
subnormal operands read as 0, so a subnormal x or y gets PyTorch's gradient at 0; test_flush_denormal.py
pins that case element by element).

Examples are derandomised (a fixed profile) and bounded so each pass runs in well under 90 s on 2 CPU
cores: every activation on the eager backend, and the compiled backend for the activations that
tests/test_ops.py compiles (one exact, one fitted), on float32 and bfloat16; compilation is once per
activation and dtype, so more examples there cost little, more activations cost ~10 s each.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tolerances as tol
from invact import backends, bitpack, ops

NAMES = ops.names()   # every table; a test taking `name` runs over each (the fixture in conftest.py)
pytestmark = pytest.mark.skipif(not NAMES, reason="no generated activations (run `invact generate`)")


@pytest.fixture(scope="module", autouse=True, params=[False, True], ids=["denormals", "flushed"])
def flush_denormal(request):
    """The module's tests with denormals kept, then flushed; the caller's setting restored after."""
    was = bitpack.denormals_flushed()
    if request.param and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal returned False: no SSE3)")
    if request.param:
        torch.set_flush_denormal(was)
        with tol.flushed_denormals():
            yield True
        return
    torch.set_flush_denormal(False)
    try:
        yield False
    finally:
        torch.set_flush_denormal(was)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}
LAYOUTS = ("contiguous", "scalar", "transposed", "channels_last", "sliced", "expanded")
MAX_DIM = 5                                     # sizes 0..5 per dimension: up to 625 elements


def profile(examples: int) -> settings:
    """Deterministic (derandomised, no example database) with a fixed number of examples."""
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------------
# values

def _nudge(value: float, k: int, dtype: torch.dtype) -> float:
    """The k-th representable neighbour of ``value`` (rounded to dtype) in dtype."""
    t = torch.tensor(value, dtype=torch.float64).to(dtype)
    toward = torch.tensor(math.inf if k > 0 else -math.inf, dtype=dtype)
    for _ in range(abs(k)):
        t = torch.nextafter(t, toward)
    return t.item()


def specials(dtype: torch.dtype) -> list[float]:
    fi = torch.finfo(dtype)
    sub = fi.tiny * fi.eps                      # smallest subnormal
    values = [math.nan, math.inf, -math.inf, 0.0, -0.0, fi.max, -fi.max, _nudge(fi.max, -1, dtype),
              fi.max / 2, -fi.max / 2, fi.tiny, -fi.tiny, sub, -sub, fi.tiny - sub, -(fi.tiny - sub),
              3 * sub, -3 * sub]
    return [torch.tensor(v, dtype=dtype).item() for v in values]


def below_true_minimum(name: str, dtype: torch.dtype, span: int = 4096) -> list[float]:
    """x of dtype next to a minimum x_min whose stored y (PyTorch's forward, rounded to dtype) lies
    below the true y_min (float64, from the table): rounding pushed y out of the branch's range."""
    out = []
    for b in tol.table(name)["branches"]:
        if b["lower_end"] != "sqrt" or b["direction"] != "increasing":
            continue
        y_min = float(b["y_range"][0])
        x_min = float(b["x_range"][0])
        centre = torch.tensor(x_min, dtype=torch.float64).to(dtype)
        steps = torch.arange(-span, span + 1, dtype=torch.float64)
        ulp = torch.finfo(dtype).eps * abs(x_min)
        x = (centre.double() + steps * ulp).to(dtype).unique()
        y = tol.torch_reference(name, x).double()
        out += x[y < y_min].double().tolist()
    return out


def elements(name: str, dtype: torch.dtype) -> st.SearchStrategy[float]:
    """One element: specials, neighbours of break points, near-minimum y, body, tails, anything."""
    width = {torch.float16: 16, torch.float64: 64}.get(dtype, 32)
    points = tol.break_points(name)
    neighbours = sorted({_nudge(p, k, dtype) for p in points for k in range(-6, 7)})
    sub = not bitpack.denormals_flushed()       # hypothesis refuses subnormals where they would flush
    strategies = [
        st.sampled_from([math.nan, math.inf, -math.inf]),             # as often as the rest
        st.sampled_from(specials(dtype)),
        st.floats(-12, 12, width=width, allow_subnormal=sub),
        st.floats(12, 1e4, width=width).map(lambda v: v * (1 if int(v) % 2 else -1)),
        st.floats(width=width, allow_nan=True, allow_infinity=True, allow_subnormal=sub),
    ]
    if points:
        strategies += [st.sampled_from(neighbours),
                       st.tuples(st.sampled_from(points), st.floats(-0.25, 0.25, allow_subnormal=sub)).map(sum)]
    low = below_true_minimum(name, dtype, span=256)
    if low:
        strategies.append(st.sampled_from(low))
    return st.one_of(strategies)


# ------------------------------------------------------------------------------------------------
# tensors

@st.composite
def tensors(draw, name: str, dtypes=DTYPES) -> torch.Tensor:
    """A tensor of a drawn dtype and layout whose elements come from :func:`elements`."""
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(LAYOUTS))
    dims = st.integers(0, MAX_DIM)
    if layout == "scalar":
        base_shape, arg = (), None
    elif layout == "contiguous":
        base_shape, arg = tuple(draw(st.lists(dims, min_size=1, max_size=3))), None
    elif layout == "transposed":
        base_shape, arg = tuple(draw(st.lists(dims, min_size=2, max_size=3))), None
    elif layout == "channels_last":                                          # stored N, H, W, C
        base_shape, arg = tuple(draw(st.lists(dims, min_size=4, max_size=4))), None
    elif layout == "sliced":
        shape = draw(st.lists(dims, min_size=1, max_size=3))
        arg = draw(st.sampled_from([(2, 0), (2, 1), (3, 2)]))                # step, start
        base_shape = (*shape[:-1], shape[-1] * arg[0] + arg[1])
    else:                                                                    # expanded: stride 0
        arg = draw(st.lists(dims, min_size=2, max_size=3))
        axis = draw(st.integers(0, len(arg) - 1))
        base_shape = tuple(1 if i == axis else s for i, s in enumerate(arg))
    n = math.prod(base_shape)
    values = draw(st.lists(elements(name, dtype), min_size=n, max_size=n))
    return _view(torch.tensor(values, dtype=torch.float64).to(dtype).reshape(base_shape), layout, arg)


def _view(base: torch.Tensor, layout: str, arg) -> torch.Tensor:
    """The tensor of ``layout`` over ``base`` (no copy: strides as drawn)."""
    if layout == "transposed":
        return base.permute(*reversed(range(base.dim())))
    if layout == "channels_last":
        return base.permute(0, 3, 1, 2)
    if layout == "sliced":
        return base[..., arg[1]::arg[0]]
    if layout == "expanded":
        return base.expand(*arg)
    return base


# ------------------------------------------------------------------------------------------------
# the check

def check(name: str, x: torch.Tensor, backend: str, seed: int = 0) -> None:
    """Forward bitwise and with PyTorch's strides; backward per tolerances.compare."""
    dtype = x.dtype
    ours_x, ref_x = x.detach().requires_grad_(), x.detach().requires_grad_()
    y = ops.apply(ours_x, name, backend=backend)
    ref = tol.torch_reference(name, ref_x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert torch.equal(y.detach().view(INT_VIEW[dtype]), ref.detach().view(INT_VIEW[dtype])), \
        f"{name} {dtype}: forward differs from PyTorch's"
    if x.numel():
        assert [s for s, n in zip(y.stride(), y.shape) if n > 1] == \
               [s for s, n in zip(ref.stride(), ref.shape) if n > 1], (y.stride(), ref.stride())
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    y.backward(go)
    ref.backward(go)
    assert ours_x.grad.shape == x.shape
    c = tol.compare(name, dtype, x.detach().double().numpy(), y.detach().double().numpy(), go.double().numpy(),
                    ref_x.grad.double().numpy(), ours_x.grad.double().numpy())
    assert not c.bad.any(), c.describe(name, dtype)


@pytest.mark.parametrize("act", NAMES)
@profile(examples=60)
@given(data=st.data())
def test_eager_matches_pytorch(act, data):
    x = data.draw(tensors(act), label="x")
    check(act, x, "eager")


def _compiled_names() -> list[str]:
    """One exact-route and one fitted activation (as test_ops compiles): compilation dominates."""
    exact = [n for n in NAMES if all(b["route"] in ("exact", "constant") for b in tol.table(n)["branches"])]
    fitted = [n for n in NAMES if n not in exact]
    return sorted(set(exact[:1] + fitted[:1]))


@pytest.mark.skipif("compiled" not in backends.available("cpu"), reason="no C++ compiler for inductor")
@pytest.mark.parametrize("act", _compiled_names())
@profile(examples=25)
@given(data=st.data())
def test_compiled_matches_pytorch(act, data):
    x = data.draw(tensors(act, dtypes=(torch.float32, torch.bfloat16)), label="x")
    check(act, x, "compiled")


# ------------------------------------------------------------------------------------------------
# fixed cases the strategies might draw rarely

@pytest.mark.parametrize("dtype", DTYPES)
def test_specials_and_break_points(name, dtype):
    """Every special value and every break point's +-6 neighbours, in one ragged tensor."""
    values = specials(dtype) + sorted({_nudge(p, k, dtype) for p in tol.break_points(name) for k in range(-6, 7)})
    check(name, torch.tensor(values, dtype=torch.float64).to(dtype), "eager")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounded_y_below_true_minimum(name, dtype):
    """Inputs whose stored y lies below the true y_min (the table clamps y - y_min >= 0): a finite
    gradient within the bound (the information floor is largest there). Every such input within
    4096 ulps of x_min (test_some_input_rounds_below_true_minimum: there are some)."""
    if not tol.table(name)["forward_code"]["x_breaks"]:
        pytest.skip("monotone: no minimum")
    low = below_true_minimum(name, dtype)
    if not low:
        pytest.skip(f"no {dtype} input rounds below y_min")
    check(name, torch.tensor(low, dtype=torch.float64).to(dtype), "eager")


def test_some_input_rounds_below_true_minimum():
    """The case above is not vacuous: SiLU's bf16, fp16 and fp32 inputs near x_min include such y
    (GELU's do in fp32 only: bf16 and fp16 round y_min = -0.16997 up, to -0.16992)."""
    if "silu" not in NAMES:
        pytest.skip("no silu table")
    assert all(below_true_minimum("silu", d) for d in (torch.bfloat16, torch.float16, torch.float32))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_layouts_on_larger_tensors(layout):
    """Layouts on tensors past one vector width and one eager chunk plane (bit planes of 1-bit codes)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 7, 9, 11, generator=g) * 3
    x = {"transposed": base.transpose(1, 3), "channels_last": base.to(memory_format=torch.channels_last),
         "sliced": base[:, :, ::2, 1::3]}[layout]
    for name in NAMES:
        check(name, x, "eager")


# ------------------------------------------------------------------------------------------------
# documented deviations: pinned, fixable ones as strict xfails

FIXABLE = [d for d in tol.DEVIATIONS if d.fixable and d.name in NAMES]
DOCUMENTED = [d for d in tol.DEVIATIONS if not d.fixable and d.name in NAMES]


def _grads(dev: tol.Deviation, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(x, y, PyTorch's gradient, invact's gradient) at the deviation's examples, grad_out =
    dev.grad_out; each example is element 0 of a 64-element tensor (PyTorch's vectorised path, where
    e.g. GELU's float32 forward overflows; its scalar path does not)."""
    x = torch.tensor(dev.examples(dtype), dtype=torch.float64).to(dtype)
    ys, theirs, ours = [], [], []
    for v in x:
        base = torch.full((64,), 0.5, dtype=dtype)
        base[0] = v
        go = torch.full((64,), dev.grad_out, dtype=dtype)
        a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
        tol.torch_reference(dev.name, a).backward(go)
        y = ops.apply(b, dev.name, backend="eager")
        y.backward(go)
        ys.append(y.detach()[0]), theirs.append(a.grad[0]), ours.append(b.grad[0])
    return x, torch.stack(ys), torch.stack(theirs), torch.stack(ours)


def _covered(dev: tol.Deviation, dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor) -> bool:
    go = np.full(x.shape, dev.grad_out)
    return bool(dev.where(x.double().numpy(), y.double().numpy(), go, dtype, ops.info(dev.name)["params"]).all())


@pytest.mark.parametrize("dev", FIXABLE, ids=lambda d: d.key)
@pytest.mark.xfail(strict=True, reason="documented deviation with a proposed fix (tests/tolerances.py "
                                       "DEVIATIONS): passes once the fix lands; then remove the entry")
def test_fixable_deviation_matches_pytorch(dev):
    for dtype in dev.dtypes:
        x, y, theirs, ours = _grads(dev, dtype)
        assert _covered(dev, dtype, x, y)
        msg = f"{dev.key} {dtype}: torch {theirs.tolist()}, invact {ours.tolist()}"
        assert not tol.parity_mismatch(theirs.double().numpy(), ours.double().numpy()).any(), msg
        # the fixed value: PyTorch's own (exact constants: 0, 1, negative_slope), to one ulp of dtype
        torch.testing.assert_close(ours, theirs, rtol=torch.finfo(dtype).eps, atol=0, msg=msg)


@pytest.mark.parametrize("dev", FIXABLE, ids=lambda d: d.key)
def test_fixable_deviation_is_still_there(dev):
    """The strict xfail above fails for the stated reason (the NaN/inf pattern), not another one."""
    for dtype in dev.dtypes:
        x, y, theirs, ours = _grads(dev, dtype)
        assert _covered(dev, dtype, x, y)
        assert tol.parity_mismatch(theirs.double().numpy(), ours.double().numpy()).all(), dev.key


# deviations that exist only where PyTorch's forward kernel reaches their condition: GELU's float32
# forward overflows to inf for finite x >= 1.7e38 in ATen's AVX-512 kernels; oneDNN's avx2 GELU
# (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, measured) keeps y = x finite there
FORWARD_DEPENDENT = {"gelu-overflow"}


def test_documented_deviations_behave_as_stated():
    """Each inherent deviation gives what its reason says: gelu NaN where PyTorch's overflowed forward
    gives 1 (as PyTorch at x = +inf); gelu_tanh and quick_gelu the limits 1/0 where PyTorch gives NaN; relu2 inf where PyTorch's 2x is finite; softplus (float64) 1 where PyTorch's
    1 - 2.06e-9."""
    for dev in DOCUMENTED:
        for dtype in dev.dtypes:
            x, y, theirs, ours = _grads(dev, dtype)
            if dev.key in FORWARD_DEPENDENT and not _covered(dev, dtype, x, y):
                # this CPU's forward kernel does not overflow there: no deviation, PyTorch's gradient
                assert torch.equal(ours, theirs), (dev.key, dtype, x, y, theirs, ours)
                continue
            assert _covered(dev, dtype, x, y), (dev.key, dtype, x, y)
            if dev.key in ("gelu_tanh-square-overflow", "quick_gelu-product-overflow"):
                limit = (x > 0).to(dtype) * dev.grad_out
                assert theirs.isnan().all() and torch.equal(ours, limit), (dev.key, dtype, theirs, ours)
            elif dev.key == "gelu-overflow":
                assert torch.equal(theirs, torch.ones_like(theirs)) and ours.isnan().all(), (dtype, theirs, ours)
            elif dev.key == "relu2-overflow":
                assert torch.isfinite(theirs).all() and torch.isposinf(ours).all(), (dtype, theirs, ours)
            elif dev.key == "softplus-threshold-overlap":
                assert (ours == 1).all() and ((1 - theirs).abs() - 2.0611536e-9).abs().max() < 1e-15
            else:
                raise AssertionError(f"no check for documented deviation {dev.key}")


@pytest.mark.parametrize("make", [lambda: torch.randn(3, 1, 5).expand(3, 4, 5),
                                  lambda: torch.randn(5, 1).expand(5, 6).t(),
                                  lambda: torch.randn(1, 4).expand(3, 4)[:, ::2],
                                  lambda: torch.randn(2, 3, 1, 1).expand(2, 3, 4, 5).permute(0, 2, 3, 1)],
                         ids=["middle", "transposed", "sliced", "channels_last"])
def test_expanded_input_strides(make):
    """y gets PyTorch's strides for expanded (stride-0) inputs too: TensorIterator leaves a broadcast
    dimension where it is (layout.order once moved it innermost)."""
    x = make()
    for name in NAMES[:3]:
        y, ref = ops.apply(x, name, backend="eager"), tol.torch_reference(name, x)
        assert y.stride() == ref.stride(), (name, y.stride(), ref.stride())


_NAN_Y_CASES = [("relu", {}, math.nan, lambda x: F.relu(x)),
                ("leaky_relu", {"negative_slope": 0.2}, math.nan, lambda x: F.leaky_relu(x, 0.2)),
                ("hardswish", {}, -math.inf, lambda x: F.hardswish(x))]


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("name, params, value, reference", _NAN_Y_CASES, ids=[c[0] for c in _NAN_Y_CASES])
def test_finite_pytorch_gradient_where_y_is_nan(name, params, value, reference, backend):
    """Where y is NaN but PyTorch's gradient is finite (relu and leaky_relu at x = NaN, hardswish at
    x = -inf), invact gives PyTorch's value: the generated code's per-code value at NaN y
    (codegen.analysis.Plan.nan_values), with parameters kept symbolic (slope 0.2, not the default)."""
    if name not in NAMES:
        pytest.skip(f"no {name} table")
    if backend not in backends.available("cpu"):
        pytest.skip(f"no {backend} backend")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.full((64,), 0.5, dtype=dtype)
        x[0], x[5] = value, -2.0
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        go = torch.linspace(0.5, 2.0, 64, dtype=dtype)
        reference(a).backward(go)
        y = ops.apply(b, name, params, backend=backend)
        assert y[0].isnan()
        y.backward(go)
        assert torch.isfinite(a.grad[0]) and torch.equal(b.grad[:1], a.grad[:1]), (dtype, a.grad[0], b.grad[0])


def test_layout_matches_tensor_iterator_on_random_layouts():
    """layout.like gives TensorIterator's output strides (torch.neg's; a size-1 dimension's stride
    means nothing, and may differ) and layout.flat its element order, for random permuted, sliced,
    expanded layouts with size-1 dimensions, asked twice (order is cached per shape and strides; flat
    skips the permute where the order is the dimensions')."""
    from invact import layout
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        dims = int(torch.randint(1, 5, (1,), generator=g))
        shape = [int(v) for v in torch.randint(1, 4, (dims,), generator=g)]
        x = torch.randn(*shape, generator=g)
        if trial % 3 == 1:
            x = x.expand(*[s if s > 1 or k % 2 else 3 for k, s in enumerate(shape)])
        if trial % 2:
            x = x.permute(*torch.randperm(dims, generator=g).tolist())
        if trial % 5 == 2 and x.size(-1) > 1:
            x = x[..., ::2]
        ref = torch.neg(x)
        for _ in range(2):
            out, dims_of = layout.like(x), layout.order(x)
            meaningful = [k for k, n in enumerate(x.shape) if n > 1]
            assert [out.stride(k) for k in meaningful] == [ref.stride(k) for k in meaningful], \
                (trial, x.shape, x.stride(), out.stride(), ref.stride())
            assert torch.equal(layout.flat(x, dims_of), x.permute(dims_of).reshape(-1)), trial
            assert torch.equal(layout.flat(ref, layout.order(ref)), torch.neg(layout.flat(x, dims_of))), trial


def test_backward_buffers_hold_the_backward_views_elements():
    """layout.backward_buffers (the C kernels' operands) holds backward_views' elements in the same
    order, every tensor contiguous, grad_x laid out alike; where y and grad are contiguous it makes no
    views (y and grad themselves). y is a forward's output (dense, maybe permuted); grad any layout."""
    from invact import layout
    g = torch.Generator().manual_seed(1)
    fast = 0
    for trial in range(200):
        dims = int(torch.randint(1, 5, (1,), generator=g))
        shape = [int(v) for v in torch.randint(1, 4, (dims,), generator=g)]
        x = torch.randn(*shape, generator=g)
        if trial % 2:
            x = x.permute(*torch.randperm(dims, generator=g).tolist())
        y = layout.like(x).copy_(x)
        grad = torch.randn(*y.shape, generator=g)
        if trial % 3 == 1:  # transposed
            grad = torch.randn(*reversed(y.shape), generator=g).permute(*reversed(range(dims)))
        if trial % 5 == 2:
            grad = torch.randn(1, generator=g).expand(y.shape)
        out_v, gf, yf, of = layout.backward_views(grad, y)
        out_b, gb, yb, ob = layout.backward_buffers(grad, y)
        assert all(t.is_contiguous() for t in (gb, yb, ob)), trial
        assert torch.equal(gb.reshape(-1), gf) and torch.equal(yb.reshape(-1), yf), trial
        assert ob.data_ptr() == out_b.data_ptr() and out_b.stride() == out_v.stride(), trial
        if y.is_contiguous() and grad.is_contiguous():
            fast += 1
            assert gb is grad and yb is y and ob is out_b, trial
    assert fast > 20  # the no-view path was exercised
