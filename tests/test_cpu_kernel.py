"""The fused CPU backwards (invact.cpu_kernel: csrc/cpu_kernels.c, and csrc/cpu_avx2.c's float32 backward,
parametrized by ISA where this machine runs it) against the generated torch code.

The polynomial kernel evaluates docs/table-format.md's float32 scheme with the eager code's correctly
rounded operations in the same order; the 16-bit kernel gathers what the eager g_kernel computed for
every 16-bit y. So both must equal the eager backend bit for bit (NaN where it is NaN): no
tolerance. Sizes cover partial vectors, bit planes whose length is no multiple of 16, and the split
over threads.
"""

import errno
import hashlib
import json
import math
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from invact import bitpack, cpu_kernel, impl_compiled, impl_cpu, impl_eager, impl_table_c, ops, registry, table_c
from kernel_rows import POLY_ISAS, around

FUSED = [n for n in ops.names() if getattr(registry.module(n), "FUSED_CPU", False)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_kernel = pytest.mark.skipif(cpu_kernel.library() is None,
                                  reason="no AVX-512 CPU (as ATen sees it) or no C compiler")


def _inputs(name: str, dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    """Random x over both branches and the tails, led by NaN, +-inf, +-0, subnormals and huge values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 4
    x[torch.rand(n, generator=g) < 0.1] *= 10
    special = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-40, 1e30, -1e30]
    x[: min(n, len(special))] = torch.tensor(special[:n], dtype=torch.float64)
    return x.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN wherever the other is NaN (payloads may differ between conversions)."""
    nan = a.isnan()
    bits = {torch.float32: torch.int32}.get(a.dtype, torch.int16)
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(bits), b[~nan].view(bits))


def _both(name: str, y, code, go, use_fma: bool = False, isa: str = "AVX512"):
    """(the eager backward, the polynomial kernel's of ``isa``); with ``use_fma`` the per-table C kernel's
    FMA build (tests/test_fma_c.py: the fitter's exact emulation of the FMA scheme) instead of eager."""
    mod = registry.module(name)
    if use_fma:
        k = ops.module_constants(mod, torch.float32, torch.device("cpu"), ())
        want = torch.empty_like(y)
        assert table_c.run(mod, want, go, y, code, k.y_thresholds, k.poly, (), use_fma=True)
    else:
        want = torch.ops.invact.backward(go, y, code, name, [], "eager")
    fused = torch.empty_like(y)
    assert cpu_kernel.run(impl_cpu.fused_table(mod, ()), fused, go, y, code, mod.CODE_BITS, use_fma=use_fma, isa=isa)
    return want, fused


@pytest.mark.parametrize("isa", POLY_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUSED)
def test_fused_equals_eager_bitwise(name, dtype, isa):
    """Without FMA the eager backend's bits; with FMA (float32, as the compiled backend runs it) the
    per-table C kernel's FMA build's bits: both are the certified schemes, exactly. The AVX2 kernel
    declines 16-bit y (the lookup serves them)."""
    for n in (1, 15, 16, 17, 23, 24, 25, 64, 65, 1003, 40_001):
        x = _inputs(name, dtype, n, seed=n)
        y, code = torch.ops.invact.forward(x, name, [], "eager")
        go = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
        if isa == "AVX2" and dtype != torch.float32:
            table = impl_cpu.fused_table(registry.module(name), ())
            assert not cpu_kernel.run(table, torch.empty_like(y), go, y, code, registry.module(name).CODE_BITS, isa=isa)
            continue
        for use_fma in (False, True) if dtype == torch.float32 and table_c.fma() else (False,):
            want, fused = _both(name, y, code, go, use_fma, isa)
            assert _same(want, fused), (name, dtype, n, use_fma)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ops.names())
def test_compiled_16_bit_backward_equals_eager_bitwise(name, dtype):
    """Every table's compiled backward of 16-bit y is the lookup kernel: the eager result exactly."""
    params = [float(v) for v in ops.info(name)["params"].values()]
    for n in (1, 17, 1003, 40_001):
        x = _inputs(name, dtype, n, seed=n)
        y, code = torch.ops.invact.forward(x, name, params, "eager")
        go = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
        eager = torch.ops.invact.backward(go, y, code, name, params, "eager")
        assert _same(eager, torch.ops.invact.backward(go, y, code, name, params, "compiled")), (name, n)


@pytest.mark.parametrize("isa", POLY_ISAS)
@pytest.mark.parametrize("name", FUSED)
def test_fused_at_every_y_threshold(name, isa):
    """y at each threshold and its float32 neighbours, in every code class: the segment choice, and
    the ends of every segment, where u is extreme (the kernel leaves out u's clamp where no y reaches
    it: invact.u_clamp), with the infinities and the largest floats that end the first and last."""
    k = ops.module_constants(registry.module(name), torch.float32, torch.device("cpu"), ())
    y = around(k.y_threshold_values, [math.inf, -math.inf, 3.4028235e38, -3.4028235e38])
    n = y.numel()
    for c in range(registry.module(name).META["n_codes"]):
        code = bitpack.pack(torch.full((n,), c, dtype=torch.int32), registry.module(name).CODE_BITS)
        eager, fused = _both(name, y, code, torch.ones(n), isa=isa)
        assert _same(eager, fused)


@pytest.mark.parametrize("isa", POLY_ISAS)
def test_fused_threads_agree(isa):
    """The work is split over threads at 16-element boundaries, across bit planes: same bits."""
    name, n = FUSED[0], 3 * 32768 + 5
    x = _inputs(name, torch.float32, n)
    y, code = torch.ops.invact.forward(x, name, [], "eager")
    go = torch.randn(n)
    table = impl_cpu.fused_table(registry.module(name), ())
    outs = []
    for threads in (1, 3):
        out = torch.empty_like(y)
        assert cpu_kernel.poly_library(isa).invact_poly_grad(table, 0, n, y.data_ptr(), go.data_ptr(), out.data_ptr(),
                                                     code.data_ptr(), registry.module(name).CODE_BITS, threads, 1) == 0
        outs.append(out)
    assert _same(*outs)


@needs_kernel
@pytest.mark.parametrize("dtype, kernel", [(torch.float32, "run"), (torch.bfloat16, "run_lookup")])
def test_compiled_backend_runs_the_kernels(monkeypatch, dtype, kernel):
    """The compiled backend's backward calls the polynomial kernel for float32 y of FUSED_CPU
    tables and the lookup kernel for 16-bit y (no torch.compile, no Inductor code)."""
    calls = []
    original = getattr(cpu_kernel, kernel)
    monkeypatch.setattr(cpu_kernel, kernel, lambda *a: calls.append(1) or original(*a))
    y, code = torch.ops.invact.forward(torch.randn(100, dtype=dtype), FUSED[0], [], "eager")
    monkeypatch.setattr(impl_compiled, "kernels", lambda *a: pytest.fail("Inductor's backward ran"))
    grad = torch.ops.invact.backward(torch.ones_like(y), y, code, FUSED[0], [], "compiled")
    assert calls and torch.isfinite(grad).all()


@pytest.mark.skipif("AVX2" not in POLY_ISAS, reason="no AVX2 kernel here (CPU or compiler)")
def test_compiled_backend_without_avx512_runs_the_avx2_kernel(monkeypatch):
    """Where ATen's capability is AVX2, the compiled backend's float32 backward of a fitted table is
    csrc/cpu_avx2.c's kernel, not the per-table C: the per-table C FMA build's bits (the FMA scheme),
    or with INVACT_FMA=0 the eager backend's."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(cpu_kernel, "library", lambda: None)          # as there: no AVX-512 library
    per_table = table_c.run
    monkeypatch.setattr(impl_table_c, "run", lambda *a, **k: pytest.fail("the per-table C kernel ran"))
    monkeypatch.setattr(impl_compiled, "kernels", lambda *a: pytest.fail("Inductor's code ran"))
    name = FUSED[0]
    mod = registry.module(name)
    x = _inputs(name, torch.float32, 40_001)
    y, code = torch.ops.invact.forward(x, name, [], "eager")
    go = torch.randn(y.numel(), generator=torch.Generator().manual_seed(1))
    k = ops.module_constants(mod, torch.float32, torch.device("cpu"), ())
    want = torch.empty_like(y)
    assert per_table(mod, want, go, y, code, k.y_thresholds, k.poly, (), use_fma=True) and table_c.fma()
    assert _same(torch.ops.invact.backward(go, y, code, name, [], "compiled"), want)
    monkeypatch.setenv(cpu_kernel.FMA_ENV, "0")
    assert _same(torch.ops.invact.backward(go, y, code, name, [], "compiled"),
                 torch.ops.invact.backward(go, y, code, name, [], "eager"))


def test_kernel_table_only_for_fused_tables():
    for name in ops.names():
        mod = registry.module(name)
        table = impl_cpu.fused_table(mod, tuple(float(v) for v in mod.META["params"].values()))
        assert (table is not None) == bool(mod.FUSED_CPU), name


def test_kernel_refuses_what_it_does_not_take(monkeypatch):
    """Mixed dtypes, non-contiguous or float64 tensors: `run` says False and the caller runs the
    generated code."""
    if not FUSED:
        pytest.skip("no fused tables")
    table = impl_cpu.fused_table(registry.module(FUSED[0]), ())
    y = torch.zeros(32)
    code = torch.zeros(4, dtype=torch.uint8)
    assert not cpu_kernel.run(table, torch.empty(32), torch.zeros(32, dtype=torch.bfloat16), y, code, 1)
    assert not cpu_kernel.run(table, torch.empty(32), torch.zeros(64)[::2], y, code, 1)
    assert not cpu_kernel.run(table, torch.empty(32, dtype=torch.float64), torch.zeros(32, dtype=torch.float64),
                              y.double(), code, 1)
    lut = impl_eager.lookup_table(registry.module(FUSED[0]), torch.bfloat16, (), torch.device("cpu"))
    h = torch.zeros(32, dtype=torch.bfloat16)
    assert not cpu_kernel.run_lookup(lut, torch.empty(32), y, y, code, 1)           # float32: no table
    assert not cpu_kernel.run_lookup(lut[:-1], torch.empty_like(h), h, h, code, 1)  # a table of another size
    cpu_kernel.library.cache_clear()
    try:
        monkeypatch.setenv(cpu_kernel.SWITCH_ENV, "0")                 # switched off by the user
        assert cpu_kernel.library() is None and not cpu_kernel.run(table, torch.empty(32), y, y, code, 1)
        monkeypatch.delenv(cpu_kernel.SWITCH_ENV)
        cpu_kernel.library.cache_clear()
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # no AVX-512
        assert cpu_kernel.library() is None and cpu_kernel.poly_library() is cpu_kernel.poly_library("AVX2")
        assert not cpu_kernel.run(table, torch.empty(32, dtype=torch.bfloat16), h, h, code, 1)  # float32 only there
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # neither ISA
        assert cpu_kernel.poly_library() is None and cpu_kernel.poly_library("AVX2") is None
        assert not cpu_kernel.run(table, torch.empty(32), y, y, code, 1)
    finally:
        cpu_kernel.library.cache_clear()


@pytest.mark.parametrize("isa, cached, message", [("AVX512", cpu_kernel.library, "fused CPU kernel"),
                                                   ("AVX2", cpu_kernel._avx2_library, "AVX2 CPU kernel")])
def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path, isa, cached, message):
    """A compiler that fails: one RuntimeWarning naming the kernel, then None (the per-table C kernels
    or Inductor's code)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    monkeypatch.delenv(cpu_kernel.SWITCH_ENV, raising=False)   # the suite also runs with the kernels off
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path))
    cached.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=f"{message} could not be built"):
            assert cpu_kernel.poly_library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cpu_kernel.poly_library() is None  # cached: no second warning
        assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("tmp*"))  # no half-written file
    finally:
        cached.cache_clear()


@pytest.mark.parametrize("isa", POLY_ISAS)
def test_segment_choice_at_signed_zero_thresholds(isa):
    """The kernel counts thresholds by the sign of (y + 0) - t: y = -0.0 must pass t = +0.0 as `y >= t`
    does. A hand-made table: one class, thresholds (-0.0, +0.0, 1.0) between four constant segments."""
    t = cpu_kernel.Table(n_classes=1, degree=1, n_transforms=1)
    t.class_code[0], t.class_first[0], t.class_count[0], t.class_threshold[0] = 0, 0, 4, 0
    t.transform_kind[0], t.transform_sign[0] = cpu_kernel.KINDS["identity"], 1.0
    for j, v in enumerate((-0.0, 0.0, 1.0)):
        t.thresholds[j] = v
    for seg in range(4):
        t.columns[3][seg] = float(seg + 1)       # c0_hi: the segment's value; scale 0 leaves u = 0
    y = torch.tensor([-1.0, -0.0, 0.0, 0.5, 1.0, 2.0, -1e30, 1e30])
    out = torch.empty_like(y)
    assert cpu_kernel.run(t, out, torch.ones_like(y), y, torch.zeros(0, dtype=torch.uint8), 0, isa=isa)
    want = 1.0 + (y.unsqueeze(1) >= torch.tensor([-0.0, 0.0, 1.0])).sum(1).float()
    assert torch.equal(out, want), (out, want)


@pytest.mark.parametrize("isa", POLY_ISAS)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_kernels_read_every_code_width(bits, isa):
    """Codes of 1, 2, 4 and 8 bits (invact.bitpack's planes; the built-ins use 1 or none): random codes
    packed by bitpack.pack, read back by both kernels. The polynomial kernel against g_kernel with the
    unpacked codes (codes of no class take the first class, as in the generated code); the lookup
    kernel (AVX-512's library only) against a random table indexed in torch."""
    name = FUSED[0]
    mod = registry.module(name)
    g = torch.Generator().manual_seed(bits)
    for n in (1, 37, 1003, 40_001):
        y, _ = torch.ops.invact.forward(_inputs(name, torch.float32, n, seed=n), name, [], "eager")
        codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int32)
        packed = bitpack.pack(codes, bits)
        go = torch.randn(n, generator=g)
        k = ops.module_constants(mod, torch.float32, torch.device("cpu"), ())
        want = mod.g_kernel(y, codes, k.y_thresholds, k.poly) * go
        got = torch.empty_like(y)
        assert cpu_kernel.run(impl_cpu.fused_table(mod, ()), got, go, y, packed, bits, use_fma=False, isa=isa)
        assert _same(want, got), (bits, n)
        if isa != "AVX512":
            continue

        h = y.to(torch.bfloat16)
        lut = torch.randn(1 << (16 + bits), generator=g)
        index = (h.view(torch.int16).to(torch.int32) & 0xFFFF) | (codes << 16)
        want16 = (lut[index] * go.to(torch.bfloat16)).to(torch.bfloat16)
        got16 = torch.empty_like(h)
        assert cpu_kernel.run_lookup(lut, got16, go.to(torch.bfloat16), h, packed, bits)
        assert _same(want16, got16), (bits, n)


CODED = [n for n in ops.names() if registry.module(n).CODE_BITS]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CODED)
def test_packed_code_equals_generated_code_packed(name, dtype):
    """The compiled forward's code comes from the C kernel, read off the generated code_kernel at its
    thresholds: the same bytes as the generated code_packed, at the thresholds, their neighbours,
    NaN and the infinities, for counts that end mid-byte and mid-vector."""
    mod = registry.module(name)
    params = [float(v) for v in ops.info(name)["params"].values()]
    k = ops.module_constants(mod, dtype, torch.device("cpu"), tuple(params))
    t = torch.tensor(k.x_thresholds, dtype=dtype)
    below, above = (torch.nextafter(t, torch.full_like(t, v)) for v in (-math.inf, math.inf))
    edges = torch.cat([t, below, above, torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0], dtype=dtype)])
    for n in (0, 1, 9, 17, 129, 1003, 40_001):
        x = _inputs(name, dtype, n, seed=n)
        x[: min(n, edges.numel())] = edges[:n]
        _, packed = torch.ops.invact.forward(x, name, params, "compiled")
        assert torch.equal(packed, mod.code_packed(x, k.x_thresholds)), (name, dtype, n)


@needs_kernel
def test_compiled_forward_needs_no_inductor(monkeypatch):
    """On AVX-512 CPUs the compiled forward packs the code in C (no torch.compile at first use),
    also split over threads."""
    monkeypatch.setattr(impl_compiled, "kernels", lambda *a: pytest.fail("Inductor's code ran"))
    name = CODED[0]
    x = _inputs(name, torch.float32, 3 * 32768 * 8 + 5)
    packs = []
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        packs.append(torch.ops.invact.forward(x, name, [], "compiled")[1])
    assert torch.equal(*packs)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_on_the_kernels(dtype):
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) with the
    compiled backend's C kernels behind both ops."""
    name = FUSED[0]
    x = torch.randn(3, 5, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.invact.forward.default, (x, name, [], "compiled"))
    y, code = torch.ops.invact.forward(x.detach(), name, [], "compiled")
    torch.library.opcheck(torch.ops.invact.backward.default, (torch.randn_like(y), y, code, name, [], "compiled"))


# -- the kernel cache: a trust boundary (invact.kernel_cache) ----------------------------------------

PLANTED_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { FILE *f = fopen(MARKER, "w"); if (f) fclose(f); }
int invact_abi_version(void) { return ABI; }
"""


def _plant(tmp_path, so_path):
    """A shared object whose constructor creates tmp_path/PWNED and which passes the ABI check."""
    marker = tmp_path / "PWNED"
    src = tmp_path / "planted.c"
    src.write_text(PLANTED_C)
    compiler = cpu_kernel._compiler()
    done = subprocess.run([compiler, "-shared", "-fPIC", f'-DMARKER="{marker}"', f"-DABI={cpu_kernel.ABI_VERSION}",
                           str(src), "-o", str(so_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return marker


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path, unoptimised_kernel_build):
    """$INVACT_CACHE = tmp_path/cache (not created yet); library() rebuilt from it (unoptimised), cleared
    after."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # the private fallback cache, if a test reaches it
    cpu_kernel.library.cache_clear()
    yield cache
    cpu_kernel.library.cache_clear()


def _load_quietly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib = cpu_kernel.library()
    cpu_kernel.library.cache_clear()
    return lib


def _key():
    """The cache key of the build tried first (OpenMP threads where the process runs libgomp.so.1)."""
    return cpu_kernel.builds("cpu_kernels", cpu_kernel.SOURCE, cpu_kernel.HEADERS, cpu_kernel._compiler())[0][1]


@needs_kernel
def test_cache_is_created_private_and_verified(fresh_cache):
    """A new cache directory is 0700; the build records the .so's sha256 in a manifest that names
    it; a second process loads that file without rebuilding."""
    assert _load_quietly() is not None
    assert stat.S_IMODE(fresh_cache.stat().st_mode) == 0o700
    entry = json.loads((fresh_cache / f"{_key()}.json").read_text())
    so = fresh_cache / entry["so"]
    assert entry["sha256"] == hashlib.sha256(so.read_bytes()).hexdigest()
    assert _load_quietly()._name == str(so)


@needs_kernel
def test_planted_library_with_the_predictable_name_is_not_loaded(fresh_cache, tmp_path):
    """A .so at the name the cache key predicts is never loaded (its constructor would run): only a
    manifest written by a build names a file, and the file must have the recorded sha256."""
    fresh_cache.mkdir(mode=0o700)
    marker = _plant(tmp_path, fresh_cache / f"{_key()}.so")
    assert _load_quietly() is not None and not marker.exists()
    # the same file behind a manifest with a wrong hash is refused too (one warning), and replaced
    (fresh_cache / f"{_key()}.json").write_text(json.dumps({"so": f"{_key()}.so", "sha256": "0" * 64}))
    with pytest.warns(RuntimeWarning, match="sha256 differs"):
        assert cpu_kernel.library() is not None
    cpu_kernel.library.cache_clear()
    assert not marker.exists()
    assert _load_quietly() is not None                     # the manifest now names the fresh build


@needs_kernel
@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_cache_writable_by_others_is_refused(fresh_cache, tmp_path, mode):
    """A cache directory others can write (where anyone could plant a manifest and its .so): one
    warning, the kernel is built privately (still the C kernel), nothing is loaded or written there."""
    fresh_cache.mkdir()
    fresh_cache.chmod(mode)
    so = fresh_cache / f"{_key()}-planted.so"
    marker = _plant(tmp_path, so)
    (fresh_cache / f"{_key()}.json").write_text(
        json.dumps({"so": so.name, "sha256": hashlib.sha256(so.read_bytes()).hexdigest()}))
    before = sorted(fresh_cache.iterdir())
    with pytest.warns(RuntimeWarning, match="not using the kernel cache.*writable by group or others"):
        lib = cpu_kernel.library()
    assert lib is not None and lib.invact_abi_version() == cpu_kernel.ABI_VERSION and not marker.exists()
    assert sorted(fresh_cache.iterdir()) == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernel.library() is lib                  # cached: warned once


@needs_kernel
def test_cached_file_writable_by_others_is_not_loaded(fresh_cache, tmp_path):
    """A manifest-named .so that others could have rewritten (mode o+w) is refused and rebuilt."""
    assert _load_quietly() is not None
    so = fresh_cache / json.loads((fresh_cache / f"{_key()}.json").read_text())["so"]
    so.chmod(0o666)
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        assert cpu_kernel.library() is not None
    cpu_kernel.library.cache_clear()
    assert json.loads((fresh_cache / f"{_key()}.json").read_text())["so"] != so.name


@needs_kernel
@pytest.mark.parametrize("damage", ["changed after its build", "unloadable"])
def test_corrupt_library_is_rebuilt_under_a_fresh_name(fresh_cache, damage):
    """A cached .so whose bytes changed after its sha256 was recorded, or one that matches its record
    but does not load: one warning, rebuilt under a new name and recorded, so the next process loads
    the new build without a warning. (Files are replaced, never rewritten in place: a library
    mapped by a running process would fault.)"""
    fresh_cache.mkdir(mode=0o700)
    manifest = fresh_cache / f"{_key()}.json"
    bad = fresh_cache / f"{_key()}-bad.so"
    bad.write_bytes(b"\x7fELF" + bytes(1000))
    manifest.write_text(json.dumps({"so": bad.name, "sha256": hashlib.sha256(bad.read_bytes()).hexdigest()}))
    if damage == "changed after its build":
        bad.write_bytes(b"\x7fELF" + bytes(999) + b"!")
    with pytest.warns(RuntimeWarning, match="does not load|sha256 differs"):
        assert cpu_kernel.library() is not None
    cpu_kernel.library.cache_clear()
    new = json.loads(manifest.read_text())["so"]
    assert new != bad.name and _load_quietly()._name == str(fresh_cache / new)


@needs_kernel
def test_read_only_cache_still_gives_the_c_kernel(fresh_cache, monkeypatch):
    """An empty cache that cannot be written (mode 0500; root ignores modes, so file creation there
    is also made to fail as it would for another user): one warning naming it, the kernel is built in
    the private per-user cache (so later processes load it), and nothing is left in the cache."""
    from invact import kernel_cache
    fresh_cache.mkdir(mode=0o700)
    fresh_cache.chmod(0o500)
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == fresh_cache:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(kernel_cache.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(tempfile, "tempdir", str(fresh_cache.parent))   # the private fallback's parent
    try:
        with pytest.warns(RuntimeWarning, match="not using the kernel cache .*(read-only|cannot be written)"):
            lib = cpu_kernel.library()
        cpu_kernel.library.cache_clear()
        assert lib is not None and lib.invact_abi_version() == cpu_kernel.ABI_VERSION
        assert list(fresh_cache.iterdir()) == [] and Path(lib._name).parent == kernel_cache.private_cache_dir()
    finally:
        fresh_cache.chmod(0o700)


CONCURRENT_SCRIPT = r"""
import sys, ctypes
from concurrent.futures import ThreadPoolExecutor
from invact import kernel_cache
command, key = sys.argv[1:-1], sys.argv[-1]
check = lambda lib: None if lib.answer() == 42 else (_ for _ in ()).throw(RuntimeError("wrong library"))
with ThreadPoolExecutor(4) as pool:
    names = set(pool.map(lambda _: kernel_cache.load(command, key, check)._name, range(4)))
print(len(names))
"""


@pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C compiler")
def test_concurrent_first_loads_build_once(fresh_cache, tmp_path):
    """Three processes of four threads each load one kernel from an empty cache at once (ranks on one
    node starting together): the compiler runs once, every load gets that build, and the cache holds
    it and its manifest alone (each caller built and kept its own copy before the cache's lock)."""
    source, log = tmp_path / "answer.c", tmp_path / "builds.log"
    source.write_text("int answer(void) { return 42; }\n")
    wrapper = tmp_path / "cc"
    wrapper.write_text(f"#!/bin/sh\necho built >> {log}\nsleep 1\nexec {cpu_kernel._compiler()} \"$@\"\n")
    wrapper.chmod(0o755)
    command = [str(wrapper), "-shared", "-fPIC", str(source)]
    runs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_SCRIPT, *command, "answer-0123"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-1000:] for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["1"] * 3
    assert log.read_text().count("built") == 1
    files = sorted(p.name for p in fresh_cache.iterdir())
    manifest = json.loads((fresh_cache / "answer-0123.json").read_text())
    assert files == sorted(["answer-0123.json", manifest["so"]])


@pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C compiler")
def test_a_rebuild_removes_the_keys_stale_builds(fresh_cache, tmp_path):
    """An interrupted build's file and the replaced build are removed when a build is recorded; other
    keys' files stay."""
    from invact import kernel_cache
    source = tmp_path / "answer.c"
    source.write_text("int answer(void) { return 42; }\n")
    command = [cpu_kernel._compiler(), "-shared", "-fPIC", str(source)]
    fresh_cache.mkdir(mode=0o700)
    stale, other = fresh_cache / "answer-0123-interrupted.so", fresh_cache / "other-0123-x.so"
    for path in (stale, other):
        path.write_bytes(b"\x7fELF")
    first = kernel_cache.load(command, "answer-0123", lambda lib: None)._name
    assert not stale.exists() and other.exists()
    (fresh_cache / "answer-0123.json").write_text(json.dumps({"so": Path(first).name, "sha256": "0" * 64}))
    with pytest.warns(RuntimeWarning, match="sha256 differs"):
        second = kernel_cache.load(command, "answer-0123", lambda lib: None)._name
    assert second != first and not Path(first).exists() and Path(second).exists() and other.exists()


FORK_SCRIPT = r"""
import fcntl, os, sys, threading, time
from pathlib import Path
from invact import kernel_cache
directory = Path(sys.argv[1])
locked = threading.Event()

def hold():
    with kernel_cache._locked(directory):
        locked.set()
        time.sleep(1)

thread = threading.Thread(target=hold)
thread.start()
locked.wait()
child = os.fork()                  # while the lock is held, as a DataLoader worker may be
if child == 0:
    time.sleep(4)
    os._exit(0)
thread.join()                      # the parent released it
fd = os.open(directory, os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("held by the child")
os.waitpid(child, 0)
"""


def test_a_child_forked_during_a_build_does_not_keep_the_cache_locked(tmp_path):
    # a hang guard (a lock never released), 600 s: 4.5 s here, 4 of them the child's sleep, the rest an
    # import of invact and torch; starting a process that imports torch took up to 2 min on this 2-core
    # machine at a load of 9 (measured: pytest's start with two test files)
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "free"


@pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C compiler")
def test_a_cache_without_locks_still_builds(fresh_cache, tmp_path, monkeypatch):
    """Where the file system refuses locks (ENOLCK on some NFS mounts) the build goes on unlocked."""
    import fcntl

    from invact import kernel_cache

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    source = tmp_path / "answer.c"
    source.write_text("int answer(void) { return 42; }\n")
    lib = kernel_cache.load([cpu_kernel._compiler(), "-shared", "-fPIC", str(source)], "answer-0123", lambda lib: None)
    assert lib.answer() == 42 and (fresh_cache / "answer-0123.json").exists()
