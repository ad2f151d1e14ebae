"""The C kernels' threads (csrc/invact_threads.h): OpenMP regions on PyTorch's own runtime where the
process runs libgomp.so.1, each worker with the calling thread's floating-point environment.

A subnormal y is read as 0 with denormals flushed (torch.set_flush_denormal sets only the calling
thread's MXCSR): a table whose segment changes at `y > 0` tells, element by element, which setting
the thread that computed it ran with. The answer is a choice between two constants, exact.
"""

import ctypes

import pytest
import torch

from invact import cpu_kernel, kernel_cache, norm_cpu

needs_kernel = pytest.mark.skipif(cpu_kernel.library() is None,
                                  reason="no AVX-512 CPU (as ATen sees it) or no C compiler")
SUBNORMAL = 1e-40
N = 8 * 32768              # at least 2 jobs of csrc/invact_threads.h's MIN_PER_THREAD each


def _libgomps() -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if "libgomp" in line}


def _step_table() -> cpu_kernel.Table:
    """One class, threshold 0 (strict: y > 0): g = 1 at y <= 0, 2 above."""
    rows = [[0.0, 0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0, 0.0, 0.0]]
    return cpu_kernel.table_of(((0, 0, 2, 0),), (("identity", 1.0, ()),), rows, (0.0,), (True,))


def _run(table, y: torch.Tensor, threads: int) -> torch.Tensor:
    out = torch.empty_like(y)
    go = torch.ones_like(y)
    done = cpu_kernel.library().invact_poly_grad(ctypes.byref(table), 0, y.numel(), y.data_ptr(), go.data_ptr(),
                                                 out.data_ptr(), None, 0, threads, 0)
    assert done == 0
    return out


@needs_kernel
def test_kernels_join_torchs_openmp_runtime():
    """Where PyTorch runs libgomp.so.1, the kernels are built with OpenMP and load no second runtime."""
    before = _libgomps()
    assert cpu_kernel.library() is not None and norm_cpu.library() is not None
    assert _libgomps() == before
    if any(path.endswith("/" + kernel_cache.OPENMP_RUNTIME) for path in before) \
            and kernel_cache._is_gcc(cpu_kernel._compiler()):
        assert kernel_cache.threading_flags(cpu_kernel._compiler())[0][0] == "-fopenmp"
        for lib in (cpu_kernel.library(), norm_cpu.library()):   # dlsym searches its dependencies
            assert hasattr(lib, "GOMP_parallel")


@needs_kernel
@pytest.mark.parametrize("flushed", [True, False])
def test_every_thread_runs_with_the_callers_denormal_setting(flushed):
    """Every element of a tensor split over threads is computed with the caller's setting, and the
    workers keep their own afterwards (an ATen op over threads then flushes nothing)."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    y = torch.full((N,), SUBNORMAL)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        torch.set_flush_denormal(flushed)
        got = _run(_step_table(), y, 4)
        torch.set_flush_denormal(False)
        assert torch.equal(got, torch.full_like(y, 1.0 if flushed else 2.0))
        bits = (y * 1.0).view(torch.int32)      # ATen's workers: not left flushing (bits: a compare
        assert torch.equal(bits, y.view(torch.int32))  # on a flushing worker would call 0 == y)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


@needs_kernel
def test_more_jobs_than_threads_all_run():
    """Jobs past the threads the runtime gives run on the threads it gave: every element is written."""
    y = torch.linspace(-1.0, 1.0, N)
    for threads in (1, 2, 3, 7):
        got = _run(_step_table(), y, threads)
        assert torch.equal(got, torch.where(y > 0, 2.0, 1.0)), threads


def test_only_gcc_builds_join_the_openmp_runtime(monkeypatch):
    """A compiler that is not GCC (clang's -fopenmp links LLVM's libomp, a second runtime) builds
    pthreads only; so does a process that runs no libgomp.so.1."""
    monkeypatch.setattr(kernel_cache, "_runs_libgomp", lambda: True)
    assert kernel_cache.threading_flags("/nonexistent/cc") == (("-pthread",),)   # --version fails: not GCC
    monkeypatch.setattr(kernel_cache, "_is_gcc", lambda compiler: compiler == "gcc-like")
    assert kernel_cache.threading_flags("clang-like") == (("-pthread",),)
    assert kernel_cache.threading_flags("gcc-like") == (("-fopenmp", "-pthread"), ("-pthread",))
    monkeypatch.setattr(kernel_cache, "_runs_libgomp", lambda: False)
    assert kernel_cache.threading_flags("gcc-like") == (("-pthread",),)


@needs_kernel
def test_a_threads_build_that_fails_falls_back_to_the_next(monkeypatch, tmp_path, unoptimised_kernel_build):
    """kernel_cache.load_first: where the preferred build does not compile (a flag this compiler
    lacks, as -fopenmp where no libgomp is installed), the next one is built and loaded, with no
    warning; the pthreads build does not link libgomp (dlsym on its handle searches its dependencies)."""
    import warnings
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(kernel_cache, "threading_flags", lambda compiler: (("-fno-such-flag",), ("-pthread",)))
    cpu_kernel.library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lib = cpu_kernel.library()
        assert lib is not None and not hasattr(lib, "GOMP_parallel")
        assert torch.equal(_run(_step_table(), torch.linspace(-1.0, 1.0, N), 3),
                           torch.where(torch.linspace(-1.0, 1.0, N) > 0, 2.0, 1.0))
    finally:
        cpu_kernel.library.cache_clear()
