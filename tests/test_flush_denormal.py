"""Gradients with denormals flushed (``torch.set_flush_denormal(True)``: x86 DAZ and FTZ).

Flushed arithmetic reads every subnormal operand as a zero of its sign. A branch test stored as the
threshold ``y >= nextafter(0)`` = 1.4e-45 (ReLU's, once) then reads ``y >= 0``: ReLU's gradient was 1
for every x < 0 and LeakyReLU's 1 where y is 0 or subnormal. Thresholds are now the breaks themselves
(``y > 0`` where the break belongs to the left), never subnormal (invact.bitpack.threshold), in the
generated torch and Triton code and in the C kernels.

Every activation, dtype and backend (eager; compiled with the C kernels on and off; the Triton
interpreter) is pinned against torch.nn.functional's gradient under the same setting, on subnormal
x and y, +-0, the specials, and x next to every forward-code break and every y break. The bound is
tests/tolerances.py's (information floor of the stored y + the certified table error + rounding of
the result, whose ``finfo.tiny`` term covers a result that flushing sends to 0), evaluated at x and
y as flushed arithmetic reads them: a subnormal reads as 0 there, so PyTorch's gradient at a
subnormal x is f'(0) (float16's subnormals are normal float32 numbers and stay).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

import tolerances as tol
from invact import backends, bitpack, cpu_kernel, impl_eager, ops
from invact.fitting.evaluate import number
from kernel_rows import POLY_ISAS
from triton_tolerances import needs_interpreter

NAMES = ops.names()
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}
pytestmark = pytest.mark.skipif(not NAMES, reason="no generated activations (run `invact generate`)")


@pytest.fixture
def flush_denormal():
    """A context manager switching flushing on; the caller's setting is restored after the test."""
    was = bitpack.denormals_flushed()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal returned False: no SSE3)")
    torch.set_flush_denormal(was)
    yield tol.flushed_denormals


# ------------------------------------------------------------------------------------------------
# inputs (made with flushing off: converting a subnormal into a narrower dtype flushes it)

def _neighbours(values: list[float], dtype: torch.dtype, k: int = 3) -> list[float]:
    """Each value rounded to dtype and its k representable neighbours on each side."""
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    return torch.cat([tol.ulps_moved(t, j) for j in range(-k, k + 1)]).tolist()


def _preimages(name: str, value: float) -> list[float]:
    """x (float64, by bisection on PyTorch's forward) on every monotone branch whose y range holds
    ``value``: where the stored y crosses a y break."""
    out = []
    for b in tol.table(name)["branches"]:
        lo, hi = (max(min(float(v), 1e4), -1e4) for v in b["x_range"])
        f = lambda x: float(tol.torch_reference(name, torch.tensor([x], dtype=torch.float64))[0]) - value  # noqa: E731
        if lo >= hi or f(lo) * f(hi) > 0:
            continue
        for _ in range(200):
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            lo, hi = (lo, mid) if f(lo) * f(mid) <= 0 else (mid, hi)
        out.append(lo)
    return out


def y_break_inputs(name: str) -> list[float]:
    """x where y crosses each y break of every code class (breaks as the table states them)."""
    t = tol.table(name)
    return [x for cc in t["code_classes"] for b in cc["y_breaks"]
            for x in _preimages(name, number(b["value"], t["params"]))]


def subnormals(dtype: torch.dtype) -> torch.Tensor:
    """The smallest, a middle and the largest subnormal of dtype, both signs, from their bits."""
    mantissa = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}[dtype]
    bits = torch.tensor([1, 1 << (mantissa // 2), (1 << mantissa) - 1], dtype=torch.int64)
    sign = torch.tensor(-(1 << (torch.finfo(dtype).bits - 1)), dtype=torch.int64)
    return torch.cat([bits, bits + sign]).to(INT_VIEW[dtype]).view(dtype)


def inputs(name: str, dtype: torch.dtype) -> torch.Tensor:
    """Subnormals, +-0, the specials, +-tiny, a body grid, and 3 neighbours of every forward-code
    break, branch end and y break crossing."""
    fi = torch.finfo(dtype)
    values = [0.0, -0.0, math.inf, -math.inf, math.nan, fi.tiny, -fi.tiny, 1.0, -1.0]
    values += np.linspace(-8, 8, 65).tolist()
    values += _neighbours(tol.break_points(name) + y_break_inputs(name), dtype)
    return torch.cat([subnormals(dtype), torch.tensor(values, dtype=torch.float64).to(dtype)])


# ------------------------------------------------------------------------------------------------
# the check

def _read_flushed(t: torch.Tensor) -> np.ndarray:
    """float64 values as flushed arithmetic reads them: a float32/float64 subnormal (bfloat16's are
    float32 subnormals) as the zero of its sign; float16 subnormals are normal in float32 arithmetic."""
    v = t.detach().double().numpy().copy()
    if t.dtype != torch.float16:
        tiny = torch.finfo(torch.float64 if t.dtype == torch.float64 else torch.float32).tiny
        small = (v != 0) & (np.abs(v) < tiny)
        v[small] = np.copysign(0.0, v[small])
    return v


def gradients(name: str, x: torch.Tensor, backend: str, flushed) -> tuple[torch.Tensor, ...]:
    """(y, go, PyTorch's gradient, invact's gradient), both computed with denormals flushed."""
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(x.numel()), dtype=torch.float64).to(x.dtype)
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    with flushed():
        y = ops.apply(ours_x, name, backend=backend)
        y.backward(go)
        tol.torch_reference(name, ref_x).backward(go)
    return y.detach(), go, ref_x.grad, ours_x.grad


def check(name: str, dtype: torch.dtype, backend: str, flushed) -> None:
    """invact's gradient against PyTorch's: its NaN/inf pattern, and float64 autograd within the
    bound (tolerances.compare, as the property tests). Where x or y reads as 0 (the elements that
    flushing changes) also against PyTorch's value directly, within the sum of both gradients' bounds
    (the triangle inequality through the exact value; elsewhere PyTorch's narrow-dtype gradient of a
    compound formula such as quick_gelu's rounds after every op and has no such bound)."""
    x = inputs(name, dtype)
    y, go, theirs, ours = gradients(name, x, backend, flushed)
    xs, ys = _read_flushed(x), _read_flushed(y)
    c = tol.compare(name, dtype, xs, ys, go.double().numpy(), theirs.double().numpy(), ours.double().numpy())
    if backend == "triton" and dtype == torch.bfloat16:  # the interpreter TRUNCATES float32 -> bfloat16
        with np.errstate(invalid="ignore"):            # (docs/floors.md): one ulp of the result, not half
            c.value_bad &= ~(np.abs(c.ours - c.exact) <= c.bound + torch.finfo(dtype).eps * np.abs(c.ours))
    assert not c.bad.any(), f"{backend}:\n" + c.describe(name, dtype)
    _, their_bound, _ = tol.gradient_bound(name, dtype, xs, ys, go.double().numpy(), theirs.double().numpy())
    zero = (xs == 0) | (ys == 0)
    with np.errstate(invalid="ignore"):
        bad = zero & ~c.documented & np.isfinite(c.theirs) & ~(np.abs(c.ours - c.theirs) <= c.bound + their_bound)
    assert not bad.any(), (backend, dtype, x[torch.from_numpy(bad)].tolist(), c.theirs[bad], c.ours[bad])


@pytest.fixture
def kernels_off(monkeypatch):
    """The compiled backend without the C kernels (INVACT_CPU_KERNEL=0: Inductor's code)."""
    monkeypatch.setenv(cpu_kernel.SWITCH_ENV, "0")
    cpu_kernel.library.cache_clear()
    yield
    monkeypatch.undo()
    cpu_kernel.library.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_eager(name, dtype, flush_denormal):
    check(name, dtype, "eager", flush_denormal)


@pytest.mark.skipif("compiled" not in backends.available("cpu"), reason="no C++ compiler for inductor")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_compiled(name, dtype, flush_denormal):
    """The C kernels where this CPU builds them (lookup tables for 16-bit y, the polynomial kernel,
    the packed forward code), Inductor's code elsewhere."""
    check(name, dtype, "compiled", flush_denormal)


@pytest.mark.slow
@pytest.mark.skipif("compiled" not in backends.available("cpu"), reason="no C++ compiler for inductor")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_compiled_without_c_kernels(name, dtype, flush_denormal, kernels_off):
    check(name, dtype, "compiled", flush_denormal)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES[:3])
@pytest.mark.parametrize("name", NAMES)
def test_triton_interpreter(name, dtype, flush_denormal):
    """Triton's interpreter computes in numpy on CPU tensors, under the same flags."""
    check(name, dtype, "triton", flush_denormal)


# ------------------------------------------------------------------------------------------------
# the pieces: lookup tables per setting, the C kernel's strict comparison

def test_lookup_tables_follow_the_setting(flush_denormal):
    """The 16-bit backward reads a table of g built once per setting: a subnormal bfloat16 y is 0 when
    flushed (LeakyReLU: the slope) and itself otherwise (1), whichever setting built a table first."""
    if "leaky_relu" not in NAMES:
        pytest.skip("no leaky_relu table")
    y = subnormals(torch.bfloat16)[:3]                          # positive subnormals
    code = torch.empty(0, dtype=torch.uint8)
    slope = ops.info("leaky_relu")["params"]["negative_slope"]
    impl_eager.lookup_table.cache_clear()
    for flushed, want in ((True, slope), (False, 1.0), (True, slope)):
        for backend in ("eager", "compiled"):
            with flush_denormal() if flushed else contextlib.nullcontext():
                g = torch.ops.invact.backward(torch.ones_like(y), y, code, "leaky_relu", [slope], backend)
            assert torch.equal(g, torch.full_like(g, want)), (flushed, backend, g)


@pytest.mark.parametrize("isa", POLY_ISAS)
def test_c_kernel_strict_thresholds(flush_denormal, isa):
    """A hand-made table: thresholds 0 (strict: `y > 0`), 1 (strict) and 2 (`y >= 2`) between four
    constant segments, against torch's comparisons in the same setting, at +-0, subnormals, the
    thresholds and their neighbours."""
    t = cpu_kernel.Table(n_classes=1, degree=1, n_transforms=1)
    t.class_code[0], t.class_first[0], t.class_count[0], t.class_threshold[0] = 0, 0, 4, 0
    t.transform_kind[0], t.transform_sign[0] = cpu_kernel.KINDS["identity"], 1.0
    thresholds, strict = (0.0, 1.0, 2.0), (True, True, False)
    for j, (v, s) in enumerate(zip(thresholds, strict)):
        t.thresholds[j], t.strict[j] = v, s
    for seg in range(4):
        t.columns[3][seg] = float(seg + 1)       # c0_hi: the segment's value; scale 0 leaves u = 0
    y = torch.cat([subnormals(torch.float32),
                   torch.tensor([-1.0, -0.0, 0.0, 1e-38, 1.0, 1.0000001, 0.99999994, 2.0, 1.9999999, 3.0])])
    for setting in (contextlib.nullcontext, flush_denormal):
        with setting():
            out = torch.empty_like(y)
            assert cpu_kernel.run(t, out, torch.ones_like(y), y, torch.zeros(0, dtype=torch.uint8), 0, isa=isa)
            want = 1.0 + sum((y > v if s else y >= v).float() for v, s in zip(thresholds, strict))
        assert torch.equal(out, want), (setting, y.tolist(), out.tolist(), want.tolist())
