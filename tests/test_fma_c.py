"""The FMA scheme where it runs: invact.table_c's build with FMA (fmaf for the generated INVACT_FMA steps)
and the Triton kernels' tl.fma (docs/table-format.md).

The C kernel with FMA must equal the fitter's exact emulation of the FMA scheme (invact.fitting's
CodeClass.evaluate(fma=True), fmaf emulated by invact.fitting.float32.fma32) bit for bit: no tolerance,
as the certificate's float32_fma_eval_error is measured on that emulation. Against the eager code (the
scheme without FMA) the bound comes from the two certified figures (derived in
:func:`test_fma_kernel_within_both_certified_figures_of_eager`).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from invact import bitpack, cpu_kernel, impl_compiled, ops, table_c
from invact.fitting.float32 import half_values
from invact.fitting.model import PolySegment, Table, segment_index
from invact.registry import module as _module

TABLES = Path(__file__).resolve().parents[1] / "generated" / "tables"
needs_fma = pytest.mark.skipif(cpu_kernel._compiler() is None or not cpu_kernel.enabled() or not table_c.fma(),
                               reason="no C compiler, INVACT_CPU_KERNEL=0, or no FMA build here (table_c.fma)")
FITTED = [n for n in ops.names() if "INVACT_FMA(" in table_c.source(_module(n)).read_text()]


def _table(name: str) -> Table:
    return Table.from_json(json.loads((TABLES / f"{name}.json").read_text()))


def _samples(seed: int) -> np.ndarray:
    """Every bf16 and fp16 value, random float32 bit patterns and N(0, 16) values, as float32: finite,
    not subnormal (the kernels may see those flushed)."""
    rng = np.random.default_rng(seed)
    with np.errstate(invalid="ignore"):   # (the random bit patterns' NaNs)
        y = np.concatenate([half_values("bf16"), half_values("fp16"),
                            rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32).view(np.float32),
                            rng.standard_normal(1 << 16) * 4]).astype(np.float32)
    return y[np.isfinite(y) & ((np.abs(y) >= np.finfo(np.float32).tiny) | (y == 0))]


def _poly_values(table: Table, cc, y: np.ndarray) -> np.ndarray:
    """The values of ``y`` in the y range of a branch of code class ``cc`` that it evaluates by a POLY
    row (the scheme's fused steps; outside the ranges the table promises nothing)."""
    inside = np.zeros(y.shape, dtype=bool)
    for b in table.branches:
        if b.code == cc.code:
            lo, hi = b.sample_range()
            inside |= (y >= lo) & (y <= hi)
    y = y[inside]
    poly = np.array([isinstance(s, PolySegment) for s in cc.segments])
    return y[poly[segment_index(cc.y_breaks, y, table.params)]]


def _c(name: str, y: np.ndarray, code: int, use_fma: bool) -> np.ndarray:
    """g(y, code) by the table's C kernel (g * 1: g itself)."""
    mod = _module(name)
    params = tuple(float(v) for v in ops.info(name)["params"].values())
    k = ops.module_constants(mod, torch.float32, torch.device("cpu"), params)
    yt = torch.from_numpy(y.copy())
    codes = torch.full(yt.shape, code, dtype=torch.int32)
    packed = bitpack.pack(codes, mod.CODE_BITS) if mod.CODE_BITS else torch.empty(0, dtype=torch.uint8)
    out = torch.empty_like(yt)
    assert table_c.run(mod, out, torch.ones_like(yt), yt, packed, k.y_thresholds, k.poly, params, use_fma)
    return out.numpy()


def _bits(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float32).view(np.uint32)


def test_fitted_tables_have_fused_steps():
    """The tables with POLY rows (every fitted one) have fused steps in their C code; closed forms none."""
    assert {"gelu", "silu", "gelu_tanh", "mish", "quick_gelu"} <= set(FITTED)
    assert "relu" not in FITTED and "elu" not in FITTED


@needs_fma
@pytest.mark.parametrize("name", FITTED)
def test_fma_kernel_equals_the_emulated_fma_scheme(name):
    """Bit for bit, on every code class: the build with FMA is the fitter's FMA emulation, the build
    without is the scheme without FMA; and the two differ somewhere (fmaf really is fused there)."""
    table = _table(name)
    y = _samples(len(name))
    differ = 0
    for cc in table.code_classes:
        v = _poly_values(table, cc, y)
        fused, plain = _c(name, v, cc.code, True), _c(name, v, cc.code, False)
        want_plain, want_fused = cc.evaluate_schemes(v, table.params)
        assert np.array_equal(_bits(fused), _bits(want_fused)), (name, cc.code)
        assert np.array_equal(_bits(plain), _bits(want_plain)), (name, cc.code)
        differ += int((_bits(fused) != _bits(plain)).sum())
    assert differ > 0, name


@needs_fma
@pytest.mark.parametrize("name", FITTED)
def test_fma_kernel_within_both_certified_figures_of_eager(name):
    """|C with FMA - eager| at every bf16 and fp16 value of each branch (where the certificate's figures
    are exhaustive): with g the float64 reference, e and e' the certified errors without and with FMA,
    |eager - g| <= e max(1, |g|) and |fma - g| <= e' max(1, |g|), so |fma - eager| <= (e + e') max(1, |g|);
    and max(1, |g|) <= max(1, |eager|) / (1 - e) (from the first), which the test uses as it has no g."""
    table, mod = _table(name), _module(name)
    cert = table.certificate
    k = ops.module_constants(mod, torch.float32, torch.device("cpu"), tuple(table.params.values()))
    for b in cert["branches"]:
        branch = table.branches[b["index"]]
        if branch.flat:
            continue
        cc = table.code_class_of(b["index"])
        lo, hi = branch.sample_range()
        for dtype in ("bf16", "fp16"):
            y = half_values(dtype)
            y = _poly_values(table, cc, y[(y >= lo) & (y <= hi)].astype(np.float32))
            owner = np.array([s.branch for s in cc.segments])[segment_index(cc.y_breaks, y, table.params)]
            y = y[owner == b["index"]]                       # ties at a break belong to one branch
            e, e_fma = b[f"{dtype}_eval_error"], b[f"{dtype}_fma_eval_error"]
            got = _c(name, y, cc.code, True).astype(np.float64)
            yt = torch.from_numpy(y)
            eager = mod.g_kernel(yt, torch.full(yt.shape, cc.code, dtype=torch.int32), k.y_thresholds, k.poly,
                                 **k.params).numpy().astype(np.float64)
            bound = (e + e_fma) * np.maximum(1.0, np.abs(eager)) / (1 - e)
            assert (np.abs(got - eager) <= bound).all(), (name, dtype, float(np.max(np.abs(got - eager) - bound)))


@needs_fma
def test_compiled_backend_without_avx512_runs_the_fma_kernel(monkeypatch):
    """Without AVX-512 kernels (invact.cpu_kernel declining), the compiled backend's float32 backward is
    the table's C kernel with FMA, bit for bit; INVACT_FMA=0 gives the eager backend's bits instead."""
    monkeypatch.setattr(cpu_kernel, "library", lambda: None)
    monkeypatch.setattr(impl_compiled, "kernels", lambda *a: pytest.fail("Inductor's code ran"))
    name = "gelu"
    x = torch.randn(40_001, generator=torch.Generator().manual_seed(5)) * 3
    y, code = torch.ops.invact.forward(x, name, [], "eager")
    go = torch.ones_like(y)
    got = torch.ops.invact.backward(go, y, code, name, [], "compiled")
    eager = torch.ops.invact.backward(go, y, code, name, [], "eager")
    table = _table(name)
    codes = bitpack.unpack(code, _module(name).CODE_BITS, y.numel()).numpy()
    want = np.empty(y.numel(), dtype=np.float32)
    for cc in table.code_classes:
        m = codes == cc.code
        want[m] = cc.evaluate(y.numpy()[m], table.params, fma=True)
    assert np.array_equal(_bits(got.numpy()), _bits(want))
    assert not torch.equal(got, eager)
    monkeypatch.setenv("INVACT_FMA", "0")
    assert torch.equal(torch.ops.invact.backward(go, y, code, name, [], "compiled").view(torch.int32),
                       eager.view(torch.int32))


def test_triton_interpreter_rounds_tl_fma_twice():
    """Triton's interpreter computes tl.fma as x * y + z in numpy float32 (two roundings): interpreted
    kernels give the scheme without FMA, and only a GPU build (tests/test_triton_offline.py: fma.rn.f32
    in the PTX) runs the fused one. If a later interpreter fuses, this fails: test the FMA scheme there."""
    from invact import backends
    if not backends.triton_importable():
        pytest.skip("needs triton")
    import triton
    import triton.language as tl

    @triton.jit
    def _fma(A, B, C, OUT, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        m = i < n
        r = tl.fma(tl.load(A + i, mask=m), tl.load(B + i, mask=m), tl.load(C + i, mask=m))
        tl.store(OUT + i, r, mask=m)

    from test_fma_emulation import _adversarial
    from invact.fitting.float32 import fma32
    a, b, c = _adversarial(np.random.default_rng(1), 1000)
    out = torch.empty(1000)
    _fma[(1,)](*(torch.from_numpy(v) for v in (a, b, c)), out, 1000, BLOCK=1024)
    twice = a * b + c                                              # numpy float32: rounded twice
    assert np.array_equal(_bits(out.numpy()), _bits(twice))
    assert not np.array_equal(_bits(out.numpy()), _bits(fma32(a, b, c)))
