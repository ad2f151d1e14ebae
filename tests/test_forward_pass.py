"""y and the code in one pass over x (invact.impl_cpu.one_pass_forward, csrc/cpu_kernels.c's
invact_forward_code, and csrc/cpu_avx2.c's where ATen's capability is AVX2) against PyTorch's own
forward and today's two-pass code.

The kernel reproduces ATen's vectorised AVX-512 (AVX2) kernels operation for operation (SLEEF's exp, which
ATen calls, inlined step for step), and PyTorch recomputes the elements ATen gives to its scalar loop, so y must
equal PyTorch's y bit for bit, NaN payloads included: no tolerance. Inputs: every 16-bit pattern, and
float32 samples with every exponent, signalling and quiet NaNs, infinities and signed zeros, at sizes
whose ATen ranges (1 and 2 threads) end in scalar tails and start off the vector pairs' phase.
"""

import ast
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import invact.ops  # noqa: F401 - registers torch.ops.invact
from invact import backends, bitpack, constants, cpu_kernel, impl_cpu, impl_table_c, registry

pytestmark = pytest.mark.skipif(cpu_kernel.forward_library() is None,
                                reason="neither AVX-512 nor AVX2 as ATen sees the CPU, or no C compiler")
needs_avx512 = pytest.mark.skipif(cpu_kernel.library() is None, reason="the AVX-512 kernels' routes")
AVX2 = cpu_kernel.forward_library() is not cpu_kernel.library()  # ATen's capability is AVX2
# with OMP_DYNAMIC on (in this process's environment: CI may export it) cpu_kernel.forward_kinds offers no
# kernel, by design (ATen's thread ranges are unknown): tests of the one-pass route itself skip then, and
# test_the_routes_taken / test_omp_dynamic_declines_the_one_pass_forward check the decline
needs_one_pass = pytest.mark.skipif(cpu_kernel.OMP_DYNAMIC, reason="OMP_DYNAMIC on: no one-pass forward, by design")
NATIVE = {"hardswish": F.hardswish, "silu": F.silu, "gelu": F.gelu,
          "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "mish": F.mish,
          "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}  # three ATen ops, each rounded to x's dtype
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [65536, 65536 + 37, 40001, 3 * 32768 + 75]  # 2 threads: chunks of 32768, 32787, 20001, 49190
INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    was = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(was)


def _inputs(dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    """The probe's patterns (every 16-bit one; float32: every exponent and NaN kind) repeated to n
    elements in a shuffled order, so that NaNs fall at every position of ATen's vector pairs."""
    p = impl_cpu.probe(dtype)
    g = torch.Generator().manual_seed(seed)
    return p[torch.randint(0, p.numel(), (n,), generator=g)]


def _two_pass_code(x: torch.Tensor, name: str) -> torch.Tensor:
    """Today's code: the generated forward's y, then the separate C pack over x (AVX2: the per-table
    kernel's, as without the one-pass route)."""
    if AVX2:
        return impl_table_c.TABLE_C.forward(x, name, [])[1]
    return impl_cpu.coded_forward(x, name, [], lambda m: True, impl_cpu._pack)[1]


def _assert_bitwise(y: torch.Tensor, ref: torch.Tensor) -> None:
    bad = y.view(INT[y.dtype]) != ref.view(INT[y.dtype])
    assert not bad.any(), f"{int(bad.sum())} elements differ, first at {bad.nonzero()[:5].flatten().tolist()}"


# Where PyTorch's gelu is oneDNN's (float32 and bfloat16 with torch.backends.mkldnn on, where ATen calls it),
# the code that runs is oneDNN's JIT code for this CPU and $ONEDNN_MAX_CPU_ISA: the kernel reproduces the
# versions measured (AVX-512 float32; bfloat16 stored by vcvtneps2bf16 or its emulation; avx2), but a CPU
# whose oneDNN emits other code (AMX / AVX10 parts, ONEDNN_MAX_CPU_ISA=AVX512_CORE) makes the probe decline
# rightly. For those the code guarantees only this: the route is the probe's answer, and either way y is
# PyTorch's bit for bit. Every other forward is ATen's ahead-of-time vector code, the same on every CPU
# of ATen's capability: its one-pass route is guaranteed.
CPU_DEPENDENT = {("gelu", torch.float32), ("gelu", torch.bfloat16)}


def test_the_routes_taken():
    """hardswish, silu, gelu_tanh, mish and quick_gelu run in one pass for every dtype, gelu in float16 too.
    With AVX2: hardswish, silu, quick_gelu, gelu_tanh and mish in float32 and bfloat16 (that library's
    dtypes), never float16. gelu in float32 and bfloat16 (see CPU_DEPENDENT): in one pass where the
    probe passes (as oneDNN's kernel: its float32 JIT code on the AVX-512 CPUs measured, its bfloat16
    store by vcvtneps2bf16 or oneDNN's emulation of it where the kernel has that store, bf16_store();
    with AVX2 where oneDNN runs its avx2 code), else in two passes, and y is PyTorch's either way.
    With OMP_DYNAMIC on, ATen's thread ranges are unknown: two passes for every forward."""
    kinds = {(n, d): impl_cpu.one_pass_kind(registry.module(n), d, torch.backends.mkldnn.enabled)
             for n in NATIVE for d in DTYPES}
    taken = {key for key, kind in kinds.items() if kind is not None}
    if cpu_kernel.OMP_DYNAMIC:     # cpu_kernel.forward_kinds offers nothing then
        assert taken == set()
        return
    dtypes = (torch.float32, torch.bfloat16) if AVX2 else DTYPES
    guaranteed = {(n, d) for n in NATIVE for d in dtypes} - CPU_DEPENDENT
    assert taken - CPU_DEPENDENT == guaranteed
    for name, dtype in CPU_DEPENDENT:           # either route: PyTorch's y, and the route the probe chose
        x = impl_cpu.probe(dtype)
        one_pass = impl_cpu.one_pass_forward(x, name, [])
        assert (one_pass is not None) == ((name, dtype) in taken), (name, dtype)
        if one_pass is not None:
            _assert_bitwise(one_pass[0], NATIVE[name](x))
        backend = "compiled" if "compiled" in backends.available("cpu") else "eager"  # C kernels: compiled's
        y = invact.ops.apply(x.clone().requires_grad_(), name, backend=backend)      # the route the runtime takes
        _assert_bitwise(y.detach(), NATIVE[name](x))
    if not torch.backends.mkldnn.enabled:       # ATen's own gelu then: its route is guaranteed
        assert CPU_DEPENDENT <= taken
    assert cpu_kernel.forward_kinds("x * torch.tanh(x)") == ()  # a forward no kernel reproduces: two passes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["hardswish", "silu", "quick_gelu", "gelu", "gelu_tanh", "mish"])
def test_exhaustive_16_bit_and_float32_probe(name, dtype, threads):
    if impl_cpu.one_pass_kind(registry.module(name), dtype, torch.backends.mkldnn.enabled) is None:
        pytest.skip("no kernel here reproduces the one PyTorch runs for this forward")  # see test_the_routes_taken
    x = impl_cpu.probe(dtype)
    y, code = impl_cpu.one_pass_forward(x, name, [])
    _assert_bitwise(y, NATIVE[name](x))
    assert torch.equal(code, _two_pass_code(x, name))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["hardswish", "silu", "gelu", "gelu_tanh", "quick_gelu", "mish"])
def test_ragged_sizes_and_thread_ranges(name, dtype, n, threads):
    if impl_cpu.one_pass_kind(registry.module(name), dtype, torch.backends.mkldnn.enabled) is None:
        pytest.skip("no kernel here reproduces the one PyTorch runs for this forward")
    x = _inputs(dtype, n, seed=n)
    y, code = impl_cpu.one_pass_forward(x, name, [])
    _assert_bitwise(y, NATIVE[name](x))
    assert torch.equal(code, _two_pass_code(x, name))
    assert code.numel() == bitpack.packed_bytes(n, registry.module(name).CODE_BITS)


@needs_one_pass
@pytest.mark.parametrize("name", ["hardswish", "silu"])
def test_steps_of_many_chunks(name, threads):
    """The kernel works in steps of FORWARD_CHUNK bytes of code (each plane's elements of a step
    contiguous, their code in a per-thread buffer; the AVX2 kernel's STEP_BYTES alike): a bfloat16 x
    whose every thread's range spans two steps and a ragged third, against PyTorch's y and the
    generated torch code_packed (the two-pass code runs the same steps); and, with AVX-512, the general
    route (8-bit codes, one byte an element) across steps."""
    chunk = cpu_kernel.forward_library().invact_forward_chunk()
    n = threads * 8 * (2 * chunk + 4099) + 13
    x = _inputs(torch.bfloat16, n, seed=threads)
    y, code = impl_cpu.one_pass_forward(x, name, [])
    _assert_bitwise(y, NATIVE[name](x))
    mod = registry.module(name)
    assert torch.equal(code, mod.code_packed(x, constants.module_constants(mod, x.dtype, x.device, ()).x_thresholds))
    if not AVX2:  # the general route: the AVX-512 library's (the AVX2 one takes one-bit codes of one threshold)
        _assert_codes_of_several_thresholds(x[: threads * (2 * chunk + 4099) + 13].float(), 8)


def _vector_scalar_differ(name: str) -> torch.Tensor:
    """float32 x where ATen's vector code and its scalar loop (a call on 1 element) give different y."""
    x = torch.linspace(-20, 20, 4096)
    scalar = torch.stack([NATIVE[name](v.reshape(1)) for v in x]).flatten()
    differ = x[scalar.view(torch.int32) != NATIVE[name](x).view(torch.int32)]
    assert differ.numel() > 50  # SLEEF's exp/tanh and glibc's part often: the tails below matter
    return differ


@pytest.mark.parametrize("name", ["silu", "quick_gelu", "gelu_tanh", "mish"])
def test_the_scalar_tails_are_pytorchs(name, threads):
    """x made only of values whose vector and scalar y differ: every tail and every range boundary that
    aten_tails got wrong would show."""
    if impl_cpu.one_pass_kind(registry.module(name), torch.float32, torch.backends.mkldnn.enabled) is None:
        pytest.skip("no kernel here reproduces the one PyTorch runs for this forward")
    differ = _vector_scalar_differ(name)
    tails = []
    kind = cpu_kernel.FORWARDS[registry.module(name).META["torch_forward"]]
    for n in SIZES:
        x = differ[torch.arange(n) % differ.numel()]
        y, _ = impl_cpu.one_pass_forward(x, name, [])
        _assert_bitwise(y, NATIVE[name](x))
        tails += cpu_kernel.aten_tails(n, torch.float32, kind, threads)
    assert len(tails) >= 3 and all(0 < hi - lo < 32 for lo, hi in tails)


def _specials(dtype: torch.dtype) -> torch.Tensor:
    """Quiet and signalling NaNs of both signs, both infinities (inf * 0 makes NaNs), -0.0 and 1.5."""
    if dtype == torch.float32:
        bits = [0x7FC00000, 0xFFC00000, 0x7F800001, 0x80000001 | 0x7F800000, 0x7F800000, 0xFF800000, 0x80000000,
                0x3FC00000]
        return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(dtype)  # wraps to int32's bits
    quiet, inf = (0x7E00, 0x7C00) if dtype == torch.float16 else (0x7FC0, 0x7F80)
    bits = [quiet, quiet | 0x8000, inf | 1, inf | 0x8001, inf, inf | 0x8000, 0x8000]
    return torch.cat([torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(dtype), torch.tensor([1.5], dtype=dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["hardswish", "silu", "gelu", "gelu_tanh", "quick_gelu", "mish"])
def test_nans_and_infinities_at_every_tail_position(name, dtype):
    """Sizes 1 .. 130 (ATen's vector pairs of 32 float32 / 64 16-bit elements, or 16 / 32 with AVX2, and every
    tail length after them), each special value at every position in turn: y bit for bit PyTorch's, NaN signs
    and payloads included. A tail of one element recomputed alone was a one-element tensor, whose product ATen
    forms as one with a scalar: float16 quick_gelu's NaN x gave the other sign (65 and 129 elements)."""
    if impl_cpu.one_pass_kind(registry.module(name), dtype, torch.backends.mkldnn.enabled) is None:
        pytest.skip("no kernel here reproduces the one PyTorch runs for this forward")
    specials = _specials(dtype)
    compared = 0
    for n in range(1, 131):
        for shift in range(specials.numel()):
            x = specials[(torch.arange(n) + shift) % specials.numel()]
            got = impl_cpu.one_pass_forward(x, name, [])
            if got is None:  # gelu by oneDNN takes two elements or more
                assert n == 1 and name == "gelu", n
                continue
            _assert_bitwise(got[0], NATIVE[name](x))
            compared += 1
    assert compared >= 129 * specials.numel()


@needs_one_pass
def test_gelu_without_onednn_runs_atens_kernel_in_one_pass():
    with torch.backends.mkldnn.flags(enabled=False):
        for dtype in DTYPES[:2] if AVX2 else DTYPES:  # AVX2: float32 and bfloat16
            x = impl_cpu.probe(dtype)
            assert impl_cpu.one_pass_kind(registry.module("gelu"), dtype, False) is not None
            y, code = impl_cpu.one_pass_forward(x, "gelu", [])
            _assert_bitwise(y, F.gelu(x))
            assert torch.equal(code, _two_pass_code(x, "gelu"))


@pytest.mark.skipif("compiled" not in backends.available("cpu"),
                    reason="no C++ compiler: no compiled backend (the C kernels are its CPU code)")
@pytest.mark.parametrize("name", ["hardswish", "silu"])
def test_the_op_returns_the_one_pass_results(name):
    """What users call: torch.ops.invact.forward on the compiled backend, y and code as today's."""
    x = _inputs(torch.float32, 7 * 5 * 1143).reshape(7, 5, -1)  # 40005 elements: 2 threads split it mid-pair
    y, code = torch.ops.invact.forward(x, name, [], "compiled")
    _assert_bitwise(y, NATIVE[name](x))
    mod = registry.module(name)
    assert torch.equal(code, mod.code_packed(x, constants.module_constants(mod, x.dtype, x.device, ()).x_thresholds))


@needs_avx512
def test_declined_where_it_would_not_be_pytorchs_y():
    x = torch.randn(64, 33)
    assert impl_cpu.one_pass_forward(x.t(), "silu", []) is None            # not contiguous: two passes
    assert impl_cpu.one_pass_forward(torch.empty(0), "silu", []) is None
    assert impl_cpu.one_pass_forward(x, "relu", []) is None                # no code: nothing to pack
    inf = torch.tensor([math.inf])  # ATen runs its own gelu on one element (inf), oneDNN's on more (NaN)
    assert impl_cpu.one_pass_forward(inf, "gelu", []) is None
    _assert_bitwise(impl_cpu.CPU.forward(inf, "gelu", [])[0], F.gelu(inf))
    if torch.set_flush_denormal(True):
        try:
            assert impl_cpu.one_pass_forward(x, "silu", []) is None        # ATen's threads keep their setting
        finally:
            torch.set_flush_denormal(False)
    y, code = impl_cpu.CPU.forward(x.t(), "silu", [])                      # the two-pass route
    _assert_bitwise(y, F.silu(x.t()))


def test_aten_ranges_split_as_at_parallel_for():
    gelu, silu = cpu_kernel.FORWARDS["F.gelu(x)"], cpu_kernel.FORWARDS["F.silu(x)"]
    assert cpu_kernel.aten_ranges(32767, silu, 2) == [(0, 32767)]         # under the grain: one range
    assert cpu_kernel.aten_ranges(65537, silu, 2) == [(0, 32769), (32769, 65537)]
    assert cpu_kernel.aten_ranges(40001, silu, 2) == [(0, 20001), (20001, 40001)]
    assert cpu_kernel.aten_ranges(20000, gelu, 2) == [(0, 10000), (10000, 20000)]  # GELU: any n > 16384
    assert cpu_kernel.aten_ranges(16384, gelu, 2) == [(0, 16384)]
    assert cpu_kernel.aten_tails(100, torch.bfloat16, silu, 1) == [(96 if AVX2 else 64, 100)]  # pairs of vectors


def _reference_code(x: torch.Tensor, t: float, strict: bool, codes: tuple[int, int], nan_code: int) -> torch.Tensor:
    """The one-bit code in torch ops, on this thread only (torch.set_flush_denormal sets this thread's
    reading of denormals, and the C kernel's threads inherit it; ATen's pool threads do not)."""
    tt, x = torch.tensor(t, dtype=torch.float32), x.float()  # the kernel compares in float32
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        passed = (x > tt) if strict else (x >= tt)
    finally:
        torch.set_num_threads(was)
    code = torch.where(passed, codes[1], codes[0])
    return bitpack.pack(torch.where(torch.isnan(x), nan_code, code), 1)


def _one_bit_code_maps():
    """(threshold, strict, codes, NaN's code) of one-bit codes: thresholds at 0, subnormals, the
    smallest normal, infinities and ordinary values, both compares, both code orders and NaN codes."""
    tiny = torch.finfo(torch.float32).tiny
    for t in (-1.5, 0.0, -0.0, 1e-40, -1e-40, tiny, 2 * tiny, -2.5 * tiny, math.inf, -math.inf, 3.0e38):
        for strict in (False, True):
            for codes, nan_code in (((0, 1), 0), ((0, 1), 1), ((1, 0), 0), ((1, 0), 1)):
                yield t, strict, codes, nan_code


@needs_avx512
@pytest.mark.parametrize("flush", [False, True], ids=["denormals", "flushed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_bit_codes_at_every_kind_of_threshold(dtype, flush):
    """The one-compare code (x > t as x >= the next float, NaN put on its code's side by the predicate)
    against torch's compares, with thresholds at 0, subnormals, the smallest normal, infinities and
    ordinary values, both code orders and both NaN codes; every 16-bit x, the float32 probe."""
    x = impl_cpu.probe(dtype)
    if flush and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        for t, strict, codes, nan_code in _one_bit_code_maps():
            got = cpu_kernel.pack_code(x, ((t,), int(strict), codes, nan_code), 1)
            assert torch.equal(got, _reference_code(x, t, strict, codes, nan_code)), (t, strict, codes, nan_code)
    finally:
        torch.set_flush_denormal(False)


@needs_avx512
@pytest.mark.skipif(cpu_kernel.poly_library("AVX2") is None, reason="no AVX2 kernel library here")
@pytest.mark.parametrize("flush", [False, True], ids=["denormals", "flushed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_avx2_kernel_codes_at_every_kind_of_threshold(dtype, flush):
    """csrc/cpu_avx2.c's one-pass forward called directly (an AVX-512 CPU runs it too, though ATen runs
    its AVX-512 kernel there): its one-bit code against torch's compares at the thresholds of
    test_one_bit_codes_at_every_kind_of_threshold, declined (two passes) only for a strict threshold
    at a non-finite or near-zero value, whose `x >= the next float` would not be `x > t`; its y against
    F.silu where x is not NaN (SLEEF's exp takes the same steps on 8 lanes as on 16; the NaNs' operand
    choices follow ATen's AVX2 loop, checked against it under ATEN_CPU_CAPABILITY=avx2 in
    tests/test_configurations.py). float16 and codes of several thresholds are declined."""
    lib = cpu_kernel.poly_library("AVX2")
    x = impl_cpu.probe(dtype)[:-3]  # ragged: the last plane ends 29 elements into a 32-element word
    tiny = torch.finfo(torch.float32).tiny
    silu = cpu_kernel.FORWARDS["F.silu(x)"]

    def run(xs: torch.Tensor, cmap) -> tuple[int, torch.Tensor, torch.Tensor]:
        y = torch.empty_like(xs)
        out, args = cpu_kernel._code_args(cmap, xs.numel(), 1)
        done = lib.invact_forward_code(silu, xs.numel(), cpu_kernel.DTYPE_IDS[xs.dtype], xs.numel(), xs.data_ptr(),
                                       y.data_ptr(), *args)
        return done, y, out

    if flush and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        for t, strict, codes, nan_code in _one_bit_code_maps():
            done, _, got = run(x, ((t,), int(strict), codes, nan_code))
            if strict and not (math.isfinite(t) and abs(t) >= 2 * tiny):
                assert done == -1, t
                continue
            assert done == 0 and torch.equal(got, _reference_code(x, t, strict, codes, nan_code)), \
                (t, strict, codes, nan_code)
    finally:
        torch.set_flush_denormal(False)
    number = ~x.isnan()
    _assert_bitwise(run(x, ((-1.5,), 0, (0, 1), 0))[1][number], F.silu(x)[number])  # denormals as ATen's: kept
    assert run(x.half(), ((-1.5,), 0, (0, 1), 0))[0] == -1
    assert run(x, ((-1.5, 0.0, 1.0), 0, (0, 1, 0, 1), 0))[0] == -1


@needs_avx512
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_codes_of_several_thresholds_every_width(dtype, bits):
    """The general route (several thresholds, or codes of more than one bit): count the thresholds
    passed, look the code up, NaN's own; ragged sizes so that the last planes are short."""
    for n in (1000, 65536 + 37):
        _assert_codes_of_several_thresholds(_inputs(dtype, n, seed=bits), bits)


def _assert_codes_of_several_thresholds(x: torch.Tensor, bits: int) -> None:
    """The C kernel's packed codes of x against torch's count of three thresholds passed (two strict)
    and a code map of ``bits`` bits, NaN's own code."""
    thresholds, strict = (-2.0, -0.0, 0.5), (True, False, True)
    codes, nan_code = ((1, 0, 1, 0), 1) if bits == 1 else ((3, 1, 0, 2), 2)
    xf = x.float()
    passed = sum(((xf > t) if s else (xf >= t)).to(torch.int64) for t, s in zip(thresholds, strict))
    ref = torch.where(torch.isnan(xf), nan_code, torch.tensor(codes)[passed])
    cmap = (thresholds, sum(1 << j for j, s in enumerate(strict) if s), codes, nan_code)
    assert torch.equal(cpu_kernel.pack_code(x, cmap, bits), bitpack.pack(ref, bits))


@needs_avx512
def test_omp_dynamic_declines_the_one_pass_forward():
    """With OMP_DYNAMIC on, OpenMP may run fewer threads than torch reports, so ATen's ranges (and which
    elements its scalar code computes) are unknown: the one-pass route must not be taken."""
    code = ("from invact import cpu_kernel; "
            "print([cpu_kernel.forward_kinds(f) for f in sorted(cpu_kernel.FORWARDS)])")

    def kinds(omp_dynamic: str | None) -> list:
        # both states in a child with OMP_DYNAMIC set explicitly: cpu_kernel reads it at import, and this
        # process's value is whatever CI exported (OMP_DYNAMIC=true would leave nothing to compare)
        env = {k: v for k, v in os.environ.items() if k != "OMP_DYNAMIC"}
        if omp_dynamic is not None:
            env["OMP_DYNAMIC"] = omp_dynamic
        # a hang guard: ~5 s here; the import of torch took up to 2 min on 2 cores at a load of 9
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stderr
        return ast.literal_eval(out.stdout.strip())

    assert kinds("true") == [()] * len(cpu_kernel.FORWARDS)
    assert all(kinds(None))                                    # on without it (this file needs AVX-512)


@needs_one_pass
@needs_avx512
def test_a_moment_without_the_library_is_not_remembered(monkeypatch):
    """The route asked while the kernels are unavailable (a test standing in for a CPU without
    AVX-512) answers None then, and the probe's answer once they are back: only the probe is cached."""
    mod = registry.module("silu")
    with monkeypatch.context() as m:
        m.setattr(cpu_kernel, "library", lambda: None)
        assert impl_cpu.one_pass_kind(mod, torch.float16, torch.backends.mkldnn.enabled) is None
    assert impl_cpu.one_pass_kind(mod, torch.float16, torch.backends.mkldnn.enabled) is not None
