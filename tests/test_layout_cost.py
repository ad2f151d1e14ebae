"""Layouts priced by the kernels that run them (issue 17): the C cost model (fit.C_COST, calibrated by
benchmarks/layout_cost.py), the fitter's choice of transforms, and the C segment index by compares."""

import ast
import ctypes
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from invact import cpu_kernel
from invact.fitting import ends, fit
from invact.fitting.branches import analyze
from invact.fitting.codegen.c_gen import _Translator
from invact.fitting.formulas import BUILTINS
from invact.fitting.reference import BranchReference

ROOT = Path(__file__).resolve().parents[1]
TOL = 5e-8


def _compile(tmp_path: Path, source: str) -> ctypes.CDLL:
    compiler = cpu_kernel._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    (tmp_path / "k.c").write_text(source)
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(tmp_path / "k.c"), "-o", str(tmp_path / "k.so")],
                   check=True)
    return ctypes.CDLL(str(tmp_path / "k.so"))


def _edge_values(thr: torch.Tensor) -> torch.Tensor:
    """Every threshold, the floats next to each, +-0, +-inf, NaN, +-the smallest subnormal, and normals."""
    near = torch.cat([thr, torch.nextafter(thr, torch.tensor(math.inf)), torch.nextafter(thr, torch.tensor(-math.inf))])
    specials = torch.tensor([math.nan, math.inf, -math.inf, 1e-45, -1e-45, 0.0, -0.0])
    return torch.cat([near, specials, torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 4])


@pytest.mark.parametrize("call", ["torch.bucketize(y, thr[1:7], out_int32=True, right={right})",
                                  "selection.passed(y, thr[1:7], right={right})"])
@pytest.mark.parametrize("right", [True, False])
def test_bucketize_is_counted_by_compares_as_torch_searches(tmp_path, right, call):
    """A class's segment count in generated torch code (torch.bucketize in tables generated before
    invact.selection.passed, which eager code calls now) becomes a count of compares in C
    (vectorised; the binary search was a scalar loop, ~36 ns an element). The count equals torch's
    search at every threshold, next to each, at repeated thresholds, at +-0, +-inf and NaN (which
    passes every threshold in both)."""
    text, kind = _Translator(()).expr(ast.parse(call.format(right=right), mode="eval").body)
    assert kind == "i" and "invact_bucketize" not in text
    lib = _compile(tmp_path, "#include <stdint.h>\n"
                   "void f(const float *ys, const float *thr, int32_t *out, int n) {\n"
                   f"    for (int i = 0; i < n; i++) {{ float y = ys[i]; out[i] = {text}; }}\n}}\n")
    thr = torch.tensor([-9.0, -1.0, -0.0, 0.0, 0.5, 0.5, 3.0, 8.0])
    y = _edge_values(thr)
    out = torch.empty(y.shape, dtype=torch.int32)
    lib.f(ctypes.c_void_p(y.data_ptr()), ctypes.c_void_p(thr.data_ptr()), ctypes.c_void_p(out.data_ptr()),
          ctypes.c_int(y.numel()))
    want = torch.bucketize(y, thr[1:7], out_int32=True, right=right)
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("right", [True, False])
def test_eager_segment_count_is_torch_bucketize(right, dtype):
    """invact.selection.passed, the eager code's segment count, is torch.bucketize's bit for bit (the
    same int32 indices) on the edge values, for sorted thresholds with repeats and signed zeros,
    for one threshold and for none, in float32 and float64 (the evaluation dtypes), the values repeated
    past COUNTED_FROM (below it, and on other devices: meta here, it is torch.bucketize's call)."""
    from invact import selection
    thr = torch.tensor([-9.0, -1.0, -0.0, 0.0, 0.5, 0.5, 3.0, 8.0], dtype=dtype)
    edges = _edge_values(thr.float()).to(dtype)
    y = edges.repeat(-(-selection.COUNTED_FROM // edges.numel()))
    assert y.numel() >= selection.COUNTED_FROM
    for part in (thr, thr[1:7], thr[3:4], thr[:0]):
        got = selection.passed(y.reshape(1, -1), part, right=right)
        want = torch.bucketize(y.reshape(1, -1), part, out_int32=True, right=right)
        assert got.dtype == torch.int32 and got.shape == want.shape
        assert torch.equal(got, want), part
    # off the CPU it searches, as torch does (reading the thresholds would wait for the device)
    meta = selection.passed(y.to("meta").reshape(1, -1), thr.to("meta"), right=right)
    assert meta.device.type == "meta" and meta.dtype == torch.int32 and meta.shape == (1, y.numel())


def test_cost_model_prices_what_the_c_kernel_runs():
    """The calibrated model's structure (values measured: benchmarks/layout_cost.py): the log transform
    costs every element more than several Horner steps, rows beyond 16 are gathered one at a time
    (dearer per column than a permute); a division has a (nominal) price for rational rows."""
    for isa in fit.C_COST:
        step = fit.c_time(9, 8, isa=isa) - fit.c_time(8, 8, isa=isa)
        log = fit.c_time(8, 8, 1, isa=isa) - fit.c_time(8, 8, isa=isa)
        assert step > 0 and log > 5 * step
        assert fit.c_time(8, 17, isa=isa) - fit.c_time(8, 16, isa=isa) > 5 * step
        assert fit.c_time(4, 8, 0, 4, isa=isa) > fit.c_time(8, 8, isa=isa)
    # a table pays the log once, whichever branches use it; a 3-tuple branch uses none
    assert fit.table_cost([(8, 0, 5, 1), (8, 0, 5, 0)], 2) == fit.table_cost([(8, 0, 5, 1), (8, 0, 5, 1)], 2)
    assert fit.table_cost([(8, 0, 5)], 1) == fit.table_cost([(8, 0, 5, 0)], 1)
    counts = fit.triton_instructions(8, 12, 1)
    assert counts["gathers"] == 13 and counts["arithmetic"] > fit.triton_instructions(8, 12)["arithmetic"]


@pytest.fixture(scope="module")
def gelu_left():
    b = analyze(BUILTINS["gelu"]).branches[0]
    ref = BranchReference(b, "derivative")
    y_lo, y_hi, origins, _, _ = ends.fit_range(b, ref, "derivative", TOL)
    return ref, y_lo, y_hi, origins


def test_fitter_prefers_pieces_in_y_to_the_log_transform(gelu_left):
    """GELU's left branch (y -> 0- as x -> -inf) fits in the log transform in 3 pieces of degree 12
    (the committed table before issue 17), or without it, in more pieces of low degree: cheaper to
    run by the model (and measured, C kernel: 2.9 -> 1.6 ns an element at one thread). The fitter
    takes the latter, every piece within the target it aims at."""
    ref, y_lo, y_hi, origins = gelu_left
    origin = {(kind, sign) for kind, _, sign in origins}
    assert origin == {("sqrt", 1), ("log", -1)}
    pieces = fit.fit_branch(ref, y_lo, y_hi, origins, TOL)
    assert {p.transform.kind for p in pieces} <= {"sqrt", "identity"}
    assert all(p.error <= fit.SAFETY * TOL for p in pieces)
    assert pieces[0].y_lo == y_lo and pieces[-1].y_hi == y_hi
    assert all(a.y_hi == b.y_lo for a, b in zip(pieces, pieces[1:]))
    degree, _, n, logs = fit.branch_layout(pieces)
    assert logs == 0 and fit.layout_cost(degree, n) < fit.layout_cost(12, 3, 0, 1)


@pytest.mark.slow
def test_calibration_harness_times_layouts(tmp_path):
    """benchmarks/layout_cost.py's timers build and time two synthetic layouts (the same with and
    without the log transform), and the model prices the log above 8 Horner steps. How the measured
    times compare is printed by the benchmark, not asserted here: timed asserts fail on a shared
    machine (this one measured the log's extra 0.70 ns against the model's 0.72 in one CI run and
    above it in the others)."""
    if cpu_kernel._compiler() is None:
        pytest.skip("no C compiler")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import layout_cost
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from invact.fitting.codegen.analysis import plan_table
    from invact.fitting.tables import load_table
    base = plan_table(load_table(ROOT / "generated/tables/gelu.json"), "generated/tables/gelu.json")
    layouts = [(8, 8, 2, 0), (8, 8, 1, 0)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # as the benchmark times; restored: later tests in this process (an
    try:                           # xdist worker runs many) expect torch's thread count unchanged
        timers = [layout_cost.Timer(layout_cost.synthetic_plan(base, *lay), tmp_path, f"l{k}")
                  for k, lay in enumerate(layouts)]
        ns = np.min([[t.once() for t in timers] for _ in range(8)][1:], axis=0)
    finally:
        torch.set_num_threads(threads)
    isa = torch.backends.cpu.get_cpu_capability()
    isa = isa if isa in fit.C_COST else "AVX2"
    step = fit.c_time(9, 8, isa=isa) - fit.c_time(8, 8, isa=isa)
    assert fit.c_time(8, 8, 1, isa=isa) - fit.c_time(8, 8, isa=isa) > 8 * step
    assert np.isfinite(ns).all() and (ns > 0).all(), ns
