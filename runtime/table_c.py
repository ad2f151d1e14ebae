"""Per-table C kernels: the float32 backward of every table on CPU without torch.compile.

``invact generate`` writes ``generated/c_NAME.c`` next to each table's torch and Triton code: the
statements of the generated eager ``g_kernel`` in C (invact.fitting.codegen.c_gen), with
``csrc/invact_table.h``'s loop over elements, bit planes and threads. The first backward that needs
one builds it with the system C compiler into the kernel cache (:mod:`invact.kernel_cache`: manifest,
sha256 and ownership checks, as :mod:`invact.cpu_kernel`), typically in well under a second; later
processes load it. The compiler gets a private copy of the bytes checked here (the table's sha256),
with ``csrc``'s headers alone: never the file again by path, nor a header planted next to it.
Parameters, thresholds and POLY are arguments, so one build serves every parameter set.

Results: the eager backend's bits where the torch code is plain arithmetic (built with
``-ffp-contract=off``, no FMA); torch.exp/log/log1p/tanh are ``csrc/invact_libm.h``'s: SLEEF's u10
algorithms as ATen's vectorised kernels run them, ATen's bits in the build with FMA and within 1 ulp
(as ATen's) without; torch.erf/atan/sinh/cosh/asinh are the C library's scalar float functions, about
an ulp from ATen's (tests/test_c_tables.py bounds both).
The float32 backward (:func:`run`) runs a second build with FMA where ATen's CPU capability is AVX2 or
AVX-512 (both imply FMA hardware): the generated file's fused steps (``INVACT_FMA``) become ``fmaf``,
the FMA scheme that every table's certificate also covers (``float32_fma_eval_error``); it matches the
fitter's emulation bit for bit (tests/test_fma_c.py). ``INVACT_FMA=0`` keeps the build without FMA
there too (the eager backend's bits). The 16-bit lookup tables, the code packing and
:func:`g_kernel` always use the build without FMA.
A table without its C file (code generated before there were any), a file generated from another
table, or a failed build: one warning, and the compiled backend runs Inductor's code as before. A file
of the table now on disk, where this process still runs the code of the table before a refit (in
another process), warns so; the new code, read once the registry is read again
(:func:`invact.registry.refresh`: creating the activation again), loads it.
``INVACT_CPU_KERNEL=0`` switches these kernels off too.

The same library also packs the forward code (:func:`pack`) and gathers the 16-bit backward
(:func:`run_lookup`) in portable C, for CPUs where invact.cpu_kernel's AVX-512 kernels do not run;
:mod:`invact.impl_table_c` puts all three into the compiled backend. Where g is plain arithmetic with
no POLY column varying with the segment (:func:`direct16`), :func:`run` computes 16-bit y itself on
every CPU: the lookup's values, without its gathers.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import subprocess
from pathlib import Path
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from . import bitpack, cpu_kernel, kernel_cache, registry

__all__ = ["source", "library", "fma", "run", "direct16", "run_lookup", "pack", "g_kernel"]

CSRC = Path(__file__).with_name("csrc")
ABI_VERSION = 4
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # T_F32 .. in csrc/invact_table.h
# the C library's erff, atanf, ... (scalar); -z defs: a function the library lacks fails the link
# (nothing is cached), never the load
_LINK = ("-Wl,-z,defs", "-lm")


def fma() -> bool:
    """Whether :func:`run` uses the build with FMA: ATen's CPU capability is AVX2 or AVX-512 (whose
    CPUs have FMA: ATen requires it for both) and ``INVACT_FMA`` is on (:func:`cpu_kernel.fma_allowed`)."""
    return torch.backends.cpu.get_cpu_capability() in cpu_kernel.ISA_FLAGS and cpu_kernel.fma_allowed()


def _flags(use_fma: bool = False) -> tuple[str, ...]:
    """-O3 without FMA contraction (every operation rounded as torch's), vectorised for the ISA ATen
    uses here (honouring $ATEN_CPU_CAPABILITY); ``use_fma``: the generated INVACT_FMA steps as fmaf
    (-mfma: one instruction), still nothing else contracted. Neither errno nor the floating-point
    exception flags are read, so sqrtf vectorises and both sides of a select may be computed
    (-fno-math-errno, -fno-trapping-math: no value changes)."""
    isa = cpu_kernel.isa_flags() + (("-mfma", "-DINVACT_USE_FMA") if use_fma else ())
    return ("-O3", *isa, "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-shared", "-fPIC",
            f"-I{CSRC}")


def source(mod: ModuleType) -> Path:
    """The C file generated next to the torch module ``mod`` (generated/c_NAME.c)."""
    return _source(mod.__file__)


@functools.lru_cache(maxsize=256)
def _source(torch_file: str) -> Path:  # every backward asks: the path arithmetic took ~7 us a call
    path = Path(torch_file)
    return path.with_name("c_" + path.stem.removeprefix("torch_") + ".c")


def _warn_once(what: str, why: str) -> None:
    kernel_cache.warn_once(f"invact: {what} ({why}); the compiled backend runs torch.compile's code for it",
                           key=what, stacklevel=4)


def _other_table(path: Path, text: bytes) -> tuple[str, str]:
    """(what, why) of a warning for C file ``path`` (``text``) made from another table than the torch
    module in use: the table now on disk where the table was refitted since this process imported the
    module (the file is current, the process behind: the new module, read after a refresh, loads it),
    else a stale file."""
    name = path.stem[2:]
    made_from = re.search(rb'^#define TABLE_SHA256 "([0-9a-f]{64})"$', text, re.M)
    try:
        on_disk = registry.table_sha256(registry.table_of(path))[1]
    except registry.TABLE_READ_ERRORS:
        on_disk = None
    if made_from is not None and made_from.group(1).decode() == on_disk:
        return (f"no C kernel for the table of {name} in use",
                f"{name} was refitted on disk since this process imported it, and {path.name} is the new table's; "
                "create the activation again, or restart, to compute with the new table")
    return f"stale C kernel {path.name}", "generated from another table; run `invact generate`"


@functools.lru_cache(maxsize=None)
def _load(path: Path, sha256: str, use_fma: bool = False) -> ctypes.CDLL | None:
    compiler = cpu_kernel._compiler()
    if compiler is None:
        return None
    try:
        text = path.read_bytes()
    except OSError as error:
        _warn_once(f"no C kernel for {path.stem[2:]}", f"{error.strerror}: {path}; run `invact generate`")
        return None
    if f'#define TABLE_SHA256 "{sha256}"'.encode() not in text:
        _warn_once(*_other_table(path, text))
        return None
    if (refused := re.search(rb"^#error (.*)$", text, re.M)) is not None:   # what c_gen could not translate
        _warn_once(f"no C kernel for {path.stem[2:]}", refused.group(1).decode(errors="replace"))
        return None
    name = re.sub(r"[^A-Za-z0-9_]", "_", path.stem) + ("_fma" if use_fma else "")

    def check(lib: ctypes.CDLL) -> None:
        if lib.invact_table_abi() != ABI_VERSION:
            raise RuntimeError(f"ABI version {lib.invact_table_abi()}, expected {ABI_VERSION}")
        lib.invact_table_sha256.restype = ctypes.c_char_p
        if lib.invact_table_sha256().decode() != sha256:
            raise RuntimeError("built from another table")

    # OpenMP threads, else pthreads. The command compiles a copy of the bytes read and checked above
    # (kernel_cache.Source) in a private folder, headers from CSRC alone: never the file at ``path``
    # again, nor a header next to it; the key is of those bytes, the headers and the command, not of
    # where the file lies
    try:
        builds, headers = [], kernel_cache.headers_of(text, CSRC)
        for threads in kernel_cache.threading_flags(compiler):
            flags = [*_flags(use_fma), *threads]
            command = [compiler, *flags, kernel_cache.Source(path.name, text), *_LINK]
            parts = [text, *(h.read_bytes() for h in headers), " ".join([compiler, *flags, *_LINK]).encode()]
            builds.append((command, f"table-{name}-{hashlib.sha256(bytes(1).join(parts)).hexdigest()[:16]}"))
        lib = kernel_cache.load_first(builds, check)
    except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as error:
        _warn_once("the per-table C kernels could not be built", str(error))
        return None
    return bind(lib)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` (a built per-table kernel) with its functions' argument and result types set."""
    lib.invact_table_grad.restype = lib.invact_table_lut.restype = lib.invact_table_pack.restype = ctypes.c_int
    for flag in (lib.invact_table_eager_bits, lib.invact_table_direct16):
        flag.restype, flag.argtypes = ctypes.c_int, []
    lib.invact_table_grad.argtypes = [ctypes.c_int, ctypes.c_int64, *[ctypes.c_void_p] * 4,  # dtype, n, y, grad, out, code
                                      ctypes.c_int, *[ctypes.c_void_p] * 3, ctypes.c_int]  # bits, thr, poly, params, threads
    lib.invact_table_lut.argtypes = [ctypes.c_int, ctypes.c_int64, *[ctypes.c_void_p] * 4,  # dtype, n, y, grad, out, code
                                     ctypes.c_int, ctypes.c_void_p, ctypes.c_int]  # bits, lut, threads
    lib.invact_table_pack.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,  # dtype, n, x, n_thr
                                      ctypes.POINTER(ctypes.c_float), ctypes.c_int,  # thresholds, strict bits
                                      ctypes.POINTER(ctypes.c_int32), ctypes.c_int,  # codes, NaN's code
                                      ctypes.c_int, ctypes.c_void_p, ctypes.c_int]  # bits, out, threads
    return lib


def library(mod: ModuleType, use_fma: bool = False) -> ctypes.CDLL | None:
    """The built kernel of generated torch module ``mod`` (``use_fma``: the build with FMA, where
    :func:`fma` holds), or None where there is none (switched off, no C compiler, no or a stale C
    file, a failed build: those warn once)."""
    if not cpu_kernel.enabled():
        return None
    return _load(source(mod), mod.TABLE_SHA256, use_fma and fma())


def _cpu(*tensors: Tensor) -> bool:
    return all(t.is_cpu and t.is_contiguous() for t in tensors)


def run(mod: ModuleType, out: Tensor, grad: Tensor, y: Tensor, code: Tensor, thresholds: Tensor, poly: Tensor,
        params: tuple[float, ...], use_fma: bool = True) -> bool:
    """out = g(y, code) * grad for contiguous CPU tensors of one dtype (their elements in memory order,
    any shape), float32, or bfloat16 / float16 where :func:`direct16` (g of y as float32, the product
    rounded as torch.mul: the lookup's bits); code: invact.bitpack's planes of ``mod.CODE_BITS`` bits;
    the float32 ``thresholds`` and ``poly`` (POLY transposed) of invact.ops.module_constants and the
    parameter values in ``mod.PARAMS`` order. False (nothing done) where the kernel does not take them. ``use_fma``
    (float32 only): with FMA where :func:`fma` holds (the FMA scheme), else the eager code's arithmetic."""
    tensors = (out, grad, y, code, thresholds, poly)
    if (y.dtype not in DTYPES or not out.dtype == grad.dtype == y.dtype
            or not thresholds.dtype == poly.dtype == torch.float32 or not _cpu(*tensors)
            or len(params) != len(mod.PARAMS) or not cpu_kernel.sizes_fit(out, grad, y, code, mod.CODE_BITS)):
        return False
    lib = library(mod, use_fma and y.dtype == torch.float32)
    if lib is None or (y.dtype != torch.float32 and not direct16(mod)):
        return False
    values = (ctypes.c_double * max(len(params), 1))(*params)
    done = lib.invact_table_grad(DTYPES[y.dtype], y.numel(), y.data_ptr(), grad.data_ptr(), out.data_ptr(),
                                 code.data_ptr() if mod.CODE_BITS else None, mod.CODE_BITS, thresholds.data_ptr(),
                                 poly.data_ptr(), values, torch.get_num_threads())
    return done == 0


def direct16(mod: ModuleType) -> bool:
    """Whether :func:`run` computes ``mod``'s bfloat16 / float16 backward itself, faster than the
    lookup: g is the eager code's bit for bit (the lookup's entries) and no POLY column varies with
    the segment (the closed forms' few vector operations an element against a gather's ~1.7 cycles)."""
    return cpu_kernel.enabled() and _direct16(source(mod), mod.TABLE_SHA256)


@functools.lru_cache(maxsize=256)
def _direct16(path: Path, sha256: str) -> bool:  # every 16-bit backward asks twice: the library's answer, kept
    lib = _load(path, sha256, False)  # library(mod)'s call and cache entry
    return lib is not None and bool(lib.invact_table_direct16())


def run_lookup(mod: ModuleType, out: Tensor, grad: Tensor, y: Tensor, code: Tensor, lut: Tensor) -> bool:
    """out = lut[code << 16 | bits of y] * grad for contiguous bfloat16/float16 CPU tensors of one
    dtype (``lut``: invact.impl_eager.lookup_table's float32 table), rounded as torch.mul; False
    (nothing done) where the kernel does not take them. Portable C: where invact.cpu_kernel's AVX-512
    kernel does not run."""
    dtype = DTYPES.get(y.dtype)
    if (y.dtype not in (torch.bfloat16, torch.float16) or not (out.dtype == grad.dtype == y.dtype)
            or lut.dtype != torch.float32 or lut.numel() != 1 << (16 + mod.CODE_BITS)
            or not _cpu(out, grad, y, code, lut) or not cpu_kernel.sizes_fit(out, grad, y, code, mod.CODE_BITS)):
        return False
    lib = library(mod)
    return lib is not None and lib.invact_table_lut(
        dtype, y.numel(), y.data_ptr(), grad.data_ptr(), out.data_ptr(), code.data_ptr() if mod.CODE_BITS else None,
        mod.CODE_BITS, lut.data_ptr(), torch.get_num_threads()) == 0


def g_kernel(mod: ModuleType) -> Callable[..., Tensor] | None:
    """The generated ``mod.g_kernel`` (float32 work: 16-bit y upcast) computed by the table's C kernel,
    where that is the eager code's result bit for bit (EAGER_BITS: no exp, log, erf, ... call) and it builds,
    else None: what fills invact.impl_eager.lookup_table's 65,536-entry tables in milliseconds (torch
    ops on the autograd engine's thread took seconds on a busy machine)."""
    lib = library(mod)
    if lib is None or not lib.invact_table_eager_bits():
        return None

    def g(y: Tensor, code: Tensor | None, thr: Tensor, poly: Tensor, **params: float) -> Tensor:
        yf = y.to(torch.float32).contiguous()
        packed = bitpack.pack(code, mod.CODE_BITS) if mod.CODE_BITS else torch.empty(0, dtype=torch.uint8)
        out = torch.empty_like(yf)
        values = tuple(params[a] for a in mod.PARAM_ARGS)
        if run(mod, out, torch.ones_like(yf), yf, packed, thr.contiguous(), poly.contiguous(), values, False):
            return out  # g * 1: g itself (flushed denormals aside, where lookup_table maps subnormal y to 0)
        return mod.g_kernel(y, code, thr, poly, **params)

    return g


def pack(mod: ModuleType, x: Tensor, cmap: cpu_kernel.CodeMap) -> Tensor | None:
    """The packed forward code of flat contiguous float32/bfloat16/float16 CPU ``x`` (invact.bitpack's
    layout) from ``cmap`` (invact.cpu_kernel.code_map), or None where the kernel does not take it."""
    lib = library(mod) if x.dtype in (torch.float32, torch.bfloat16, torch.float16) and _cpu(x) else None
    if lib is None:
        return None
    thresholds, strict, codes, nan_code = cmap
    out = torch.empty(bitpack.packed_bytes(x.numel(), mod.CODE_BITS), dtype=torch.uint8)
    done = lib.invact_table_pack(DTYPES[x.dtype], x.numel(), x.data_ptr(), len(thresholds),
                                 (ctypes.c_float * max(len(thresholds), 1))(*thresholds), strict,
                                 (ctypes.c_int32 * (len(codes) or 1))(*codes), nan_code, mod.CODE_BITS,
                                 out.data_ptr(), torch.get_num_threads())
    return out if done == 0 else None
