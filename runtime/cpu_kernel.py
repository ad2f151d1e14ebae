"""The compiled CPU backend's C kernels: ``csrc/cpu_kernels.c``, built once with the system C compiler
and called through ctypes, on CPUs where ATen itself runs AVX-512 code; and where it runs AVX2 code,
``csrc/cpu_avx2.c``: the float32 polynomial backward (:func:`poly_library`: the same scheme on 8-lane
vectors, bit for bit) and the one-pass forward of hardswish, silu, quick_gelu, gelu (both forms) and
mish in float32 and bfloat16 (:func:`forward_library`, ATen's AVX2 kernels and oneDNN's avx2 gelu
reproduced).

* Backward, float32 y of tables made only of polynomial pieces (generated ``FUSED_CPU``): Inductor's
  code for the generated ``grad_kernel`` selects each element's table row with a chain of blends per
  coefficient (see :mod:`invact.selection`); the C kernel selects it with one permute per coefficient
  and otherwise performs the generated code's float32 operations in the same order.
* Backward, bfloat16 and float16 y, every table: g of each of the 65,536 values of y and each code,
  computed once by the generated eager ``g_kernel`` (:func:`lookup_table`), then one gather per element.
* Forward: the packed branch code (:func:`pack_code`), from the thresholds and the codes that the
  generated ``code_kernel`` gives at them (:func:`code_map`). So the fitted tables need no
  torch.compile at all (their first call takes milliseconds, not seconds). Where the table's y is
  PyTorch's own hardswish, silu, gelu (both forms) or mish, or quick_gelu's x * sigmoid(1.702 x) (three ATen ops, each
  rounded to x's dtype), y and the code in one pass over x (:func:`forward_code`): ATen's vectorised
  kernels reproduced operation for operation (SLEEF's exp, which ATen calls, inlined step for step),
  the elements ATen computes with its scalar code recomputed by PyTorch (:func:`aten_tails`).

Codes and 16-bit gradients equal the eager backend's bit for bit; float32 gradients are the FMA
scheme's (certified like the scheme without it; the per-table C kernels' FMA build bit for bit), or
with ``INVACT_FMA=0`` the eager backend's bits. Elsewhere, or when the build fails
(one warning), the compiled backend runs Inductor's code. The shared library is cached under
``$INVACT_CACHE`` (default ``$XDG_CACHE_HOME/invact``, else ``~/.cache/invact``; where that cannot
serve, a private per-user fallback: :mod:`invact.kernel_cache`), keyed by a hash of the source,
compiler and flags, and loaded only after :mod:`invact.kernel_cache`'s ownership and sha256 checks;
``$CC`` chooses the compiler (default: gcc, cc or clang); ``INVACT_CPU_KERNEL=0``
switches the kernels off (the compiled backend then runs Inductor's code). The CPU test is ATen's
own, so ``ATEN_CPU_CAPABILITY=avx2`` (set before torch is imported) runs everything, PyTorch's kernels
included, as on a CPU without AVX-512.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from collections.abc import Callable, Iterator
from types import ModuleType

import torch
from torch import Tensor

from . import backends, bitpack, fastmath, kernel_cache, u_clamp
from .common.float32_scheme import ROW_C1, TINY32  # POLY rows' c1 column; the log transform's floor
from .common import slots
from .common.slots import SearchLayout, passed_from_each, search_layout  # noqa: F401 - SearchLayout re-exported

__all__ = ["CACHE_ENV", "SWITCH_ENV", "FMA_ENV", "POLY_ISAS", "Table", "builds", "enabled", "fma_allowed", "library",
           "poly_library", "forward_library", "kernel_table",
           "table_of", "search_layout", "sizes_fit", "run", "lookup_table", "run_lookup", "code_map", "pack_code",
           "FORWARDS", "ONEDNN_FORWARDS", "bf16_store", "forward_kinds", "aten_ranges", "aten_tails", "aten_threads",
           "forward_code",
           "forward_call"]

CACHE_ENV = kernel_cache.CACHE_ENV
SWITCH_ENV = "INVACT_CPU_KERNEL"
FMA_ENV = "INVACT_FMA"
SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
HEADERS = kernel_cache.headers_of(SOURCE.read_bytes(), SOURCE.parent)  # in the key
# the -m flags of each vector ISA ATen may use (torch.backends.cpu.get_cpu_capability()); C built for
# any other runs on the compiler's baseline target
ISA_FLAGS = {"AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mf16c"), "AVX2": ("-mavx2", "-mf16c")}
FLAGS = ("-O3", *ISA_FLAGS["AVX512"], "-ffp-contract=off", "-shared", "-fPIC")  # and kernel_cache.threading_flags()
AVX2_SOURCE = SOURCE.with_name("cpu_avx2.c")  # the polynomial backward and a one-pass forward, AVX2 + FMA
AVX2_HEADERS = kernel_cache.headers_of(AVX2_SOURCE.read_bytes(), AVX2_SOURCE.parent)
AVX2_FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-shared", "-fPIC")
POLY_ISAS = ("AVX512", "AVX2")  # torch.backends.cpu.get_cpu_capability() values with a polynomial kernel
ABI_VERSION = 8
MAX_SEGMENTS, MAX_COLUMNS, MAX_CLASSES, MAX_TRANSFORMS, LOG_TERMS = slots.MAX_SLOTS, 48, 16, 4, 9
MAX_LEVELS, BY_CODE = slots.MAX_LEVELS, slots.BY_CODE  # the search's (invact.common.slots)
MAX_X_THRESHOLDS = 15
KINDS = {"identity": 0, "sqrt": 1, "log": 2}
DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class Table(ctypes.Structure):
    """Mirror of ``invact_table`` in csrc/cpu_kernels.c."""

    _fields_ = [
        ("n_classes", ctypes.c_int32), ("degree", ctypes.c_int32), ("n_transforms", ctypes.c_int32),
        ("class_code", ctypes.c_int32 * MAX_CLASSES), ("class_first", ctypes.c_int32 * MAX_CLASSES),
        ("class_count", ctypes.c_int32 * MAX_CLASSES), ("class_threshold", ctypes.c_int32 * MAX_CLASSES),
        ("transform_kind", ctypes.c_int32 * MAX_TRANSFORMS), ("transform_sign", ctypes.c_float * MAX_TRANSFORMS),
        ("transform_origin", (ctypes.c_float * 3) * MAX_TRANSFORMS),
        ("thresholds", ctypes.c_float * MAX_SEGMENTS), ("strict", ctypes.c_int32 * MAX_SEGMENTS),
        ("columns", (ctypes.c_float * MAX_SEGMENTS) * MAX_COLUMNS),
        ("log_poly", ctypes.c_float * LOG_TERMS), ("ln2_hi", ctypes.c_float), ("ln2_lo", ctypes.c_float),
        ("sqrt2", ctypes.c_float), ("tiny", ctypes.c_float),
        ("search_levels", ctypes.c_int32), ("slot_of_code", ctypes.c_int32 * BY_CODE),
        ("level_thr", (ctypes.c_float * MAX_SEGMENTS) * MAX_LEVELS), ("clamp_sides", ctypes.c_int32),
    ]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def builds(stem: str, source: Path, headers: tuple[Path, ...], compiler: str,
           isa_flags: tuple[str, ...] | None = None) -> list[tuple[list[str], str]]:
    """(command, cache key) of each way to build ``source`` with ``isa_flags`` (default: :data:`FLAGS` as
    it is at the call, AVX-512), best first (:func:`invact.kernel_cache.threading_flags`); the key is
    ``stem`` and a hash of the source, its headers, the compiler's path and the flags. The command
    compiles the very bytes hashed (:class:`invact.kernel_cache.Source`), its headers from ``source``'s
    folder (``-I``)."""
    out, text = [], source.read_bytes()
    for threads in kernel_cache.threading_flags(compiler):
        flags = (*(FLAGS if isa_flags is None else isa_flags), *threads)
        parts = [text, *(h.read_bytes() for h in headers), compiler.encode(), " ".join(flags).encode()]
        out.append(([compiler, *flags, f"-I{source.parent}", kernel_cache.Source(source.name, text)],
                    f"{stem}-{hashlib.sha256(bytes(1).join(parts)).hexdigest()[:16]}"))
    return out


def isa_flags() -> tuple[str, ...]:
    """:data:`ISA_FLAGS` of the ISA ATen uses here (honouring ``$ATEN_CPU_CAPABILITY``), else none."""
    return ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ())


def flags_for(isa: tuple[str, ...]) -> tuple[str, ...]:
    """:data:`FLAGS` as it is at the call (a test's -O0 reaches it) with ``isa`` for its AVX-512 flags."""
    return (*isa, *(f for f in FLAGS if f not in ISA_FLAGS["AVX512"]))


def _check_abi(lib: ctypes.CDLL) -> None:
    if lib.invact_abi_version() != ABI_VERSION:
        raise RuntimeError(f"ABI version {lib.invact_abi_version()}, expected {ABI_VERSION}")


def fma_allowed() -> bool:
    """Whether the float32 backwards may run the FMA scheme (where the hardware has FMA): ``INVACT_FMA``
    is on (the default). ``INVACT_FMA=0`` (or false/no/off) keeps the scheme without FMA, the eager
    backend's bits; another value raises ValueError (:func:`invact.backends.env_flag`)."""
    return backends.env_flag(FMA_ENV, True)


def enabled() -> bool:
    """Whether the C kernels may run: ``INVACT_CPU_KERNEL`` is on (the default); ``0`` (or
    false/no/off) switches them off, the per-table kernels of :mod:`invact.table_c` too; another value
    raises ValueError (:func:`invact.backends.env_flag`)."""
    return backends.env_flag(SWITCH_ENV, True)


_PACK_ARGS = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,  # dtype, n, x, n_thr
              ctypes.POINTER(ctypes.c_float), ctypes.c_int,  # thr, strict (a bit each)
              ctypes.POINTER(ctypes.c_int32),  # codes
              ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]  # nan code, bits, out, threads
_FORWARD_ARGS = [ctypes.c_int, ctypes.c_int64, *_PACK_ARGS[:3], ctypes.c_void_p, *_PACK_ARGS[3:]]  # kind, chunk, ..., y
_TENSOR_ARGS = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_int, ctypes.c_int]  # dtype, n, y, grad, out, code, bits, threads


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with the signatures of what both kernel libraries export: the polynomial backward and the
    one-pass forward."""
    lib.invact_poly_grad.restype = lib.invact_forward_code.restype = ctypes.c_int
    lib.invact_poly_grad.argtypes = [ctypes.POINTER(Table), *_TENSOR_ARGS, ctypes.c_int]  # ..., fused
    lib.invact_forward_code.argtypes = _FORWARD_ARGS
    lib.invact_forward_chunk.restype, lib.invact_forward_chunk.argtypes = ctypes.c_int64, []
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where this CPU or machine cannot run it (warning once when a
    build that should work fails)."""
    if not enabled():
        return None
    if torch.backends.cpu.get_cpu_capability() != "AVX512":  # also honours $ATEN_CPU_CAPABILITY
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        lib = kernel_cache.load_first(builds("cpu_kernels", SOURCE, HEADERS, compiler), _check_abi)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"invact: the fused CPU kernel could not be built ({error}); the compiled backend "
                      "runs torch.compile's code for every activation", RuntimeWarning, stacklevel=2)
        return None
    lib.invact_lut_grad.restype = lib.invact_pack_code.restype = ctypes.c_int
    lib.invact_lut_grad.argtypes = [ctypes.c_void_p, *_TENSOR_ARGS]
    lib.invact_pack_code.argtypes = _PACK_ARGS
    return _bind(lib)


def poly_library(isa: str | None = None) -> ctypes.CDLL | None:
    """The library whose ``invact_poly_grad`` runs the float32 backward of polynomial tables for ``isa``
    (one of :data:`POLY_ISAS`; default: ATen's CPU capability): :func:`library` for AVX-512, the AVX2 +
    FMA build of ``csrc/cpu_avx2.c`` for AVX2 (float32 y only), which an AVX-512 CPU runs too (the
    tests compare both builds there). None where the kernels are switched off, the CPU lacks the ISA
    or no compiler builds it (warning once)."""
    here = torch.backends.cpu.get_cpu_capability()
    isa = here if isa is None else isa
    if isa == "AVX512":
        return library()
    if isa != "AVX2" or here not in POLY_ISAS or not enabled():
        return None
    return _avx2_library()


@functools.cache
def _avx2_library() -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        lib = kernel_cache.load_first(builds("cpu_avx2", AVX2_SOURCE, AVX2_HEADERS, compiler, AVX2_FLAGS), _check_abi)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"invact: the AVX2 CPU kernel could not be built ({error}); the float32 backward of the "
                      "fitted tables runs their per-table C, and every forward packs its code in a second pass",
                      RuntimeWarning, stacklevel=2)
        return None
    return _bind(lib)


def forward_library() -> ctypes.CDLL | None:
    """The library whose ``invact_forward_code`` writes y and the code in one pass for ATen's CPU
    capability, each taking every kind of :data:`FORWARDS` and :data:`ONEDNN_FORWARDS`: :func:`library`
    for AVX-512, ``csrc/cpu_avx2.c``'s build for AVX2; None elsewhere: the same library as
    :func:`poly_library`'s."""
    return poly_library()


def kernel_table(mod: ModuleType, thresholds: tuple[float, ...], strict: tuple[bool, ...]) -> Table | None:
    """The C table of a generated torch module (float32 ``thresholds``: its y thresholds as the
    float32 evaluation compares them, passed where ``y > t`` if ``strict`` else ``y >= t``), or None
    where the kernel does not cover it."""
    rows, classes = mod.POLY, mod.CLASSES
    transforms = getattr(mod, "TRANSFORMS", ())
    degree = len(rows[0]) - ROW_C1 if rows else 0
    if not (getattr(mod, "FUSED_CPU", False) and len(rows) <= MAX_SEGMENTS and len(classes) <= MAX_CLASSES
            and 1 <= degree and len(rows[0]) <= MAX_COLUMNS and 1 <= len(transforms) <= MAX_TRANSFORMS
            and all(len(origin) <= 3 for _, _, origin in transforms)
            and all(math.isfinite(v) for v in thresholds)):  # the kernel compares by subtracting
        return None
    return table_of(tuple(classes), tuple(transforms), rows, thresholds, strict)


def table_of(classes: tuple, transforms: tuple, rows, thresholds: tuple[float, ...], strict: tuple[bool, ...],
             search: bool = True) -> Table:
    """The C table of a generated module's CLASSES, TRANSFORMS and POLY rows (``kernel_table``'s
    checks passed), its segment index by binary search where :func:`search_layout` applies and
    ``search``, else by counting thresholds."""
    t = Table(n_classes=len(classes), degree=len(rows[0]) - ROW_C1, n_transforms=len(transforms))
    for c, (code, first, count, first_thr) in enumerate(classes):
        t.class_code[c], t.class_first[c], t.class_count[c], t.class_threshold[c] = code, first, count, first_thr
    for i, (kind, sign, origin) in enumerate(transforms):
        t.transform_kind[i], t.transform_sign[i] = KINDS[kind], sign
        for k, o in enumerate(origin):
            t.transform_origin[i][k] = o
    for j, (v, s) in enumerate(zip(thresholds, strict, strict=True)):
        t.thresholds[j], t.strict[j] = v, int(s)
    layout = search_layout(classes, thresholds, strict) if search else None
    order = range(len(rows))
    if layout is not None and layout.levels > 0:  # columns by slot
        t.search_levels, order = layout.levels, layout.row_of_slot
        t.slot_of_code[:] = layout.slot_of_code
        for l, thr in enumerate(layout.level_thr):
            t.level_thr[l][:] = thr
    for s, r in enumerate(order):
        for j, v in enumerate(rows[r]):
            t.columns[j][s] = v
    t.clamp_sides = u_clamp.clamp_sides(classes, transforms, rows, passed_from_each(thresholds, strict))
    for k, v in enumerate(fastmath.LOG_POLY):
        t.log_poly[k] = v
    t.ln2_hi, t.ln2_lo, t.sqrt2, t.tiny = fastmath.LN2_HI, fastmath.LN2_LO, fastmath.SQRT2_F32, TINY32
    return t


def sizes_fit(out: Tensor, grad: Tensor, y: Tensor, code: Tensor, bits: int) -> bool:
    """Whether a backward kernel over y's elements stays within the buffers: ``out`` and ``grad`` have as
    many elements as y, and ``code`` is uint8 with the packed bytes of y's elements (:mod:`invact.bitpack`;
    not read without a code, ``bits`` 0)."""
    n = y.numel()
    return out.numel() == grad.numel() == n and (
        not bits or (code.dtype == torch.uint8 and code.numel() == bitpack.packed_bytes(n, bits)))


def _call(fn_name: str, table, out: Tensor, grad: Tensor, y: Tensor, code: Tensor, bits: int, *extra,
          lib: ctypes.CDLL | None = None) -> bool:
    lib = lib or library()
    dtype = DTYPE_IDS.get(y.dtype)
    if (lib is None or dtype is None or not (grad.dtype == out.dtype == y.dtype)
            or not all(t.is_cpu and t.is_contiguous() for t in (out, grad, y, code))
            or not sizes_fit(out, grad, y, code, bits)):
        return False
    done = getattr(lib, fn_name)(table, dtype, y.numel(), y.data_ptr(), grad.data_ptr(), out.data_ptr(),
                                 code.data_ptr() if bits else None, bits, torch.get_num_threads(), *extra)
    return done == 0


def run(table: Table, out: Tensor, grad: Tensor, y: Tensor, code: Tensor, bits: int,
        use_fma: bool | None = None, isa: str | None = None) -> bool:
    """out = g(y, code) * grad by the polynomial kernel of ``isa`` (:func:`poly_library`), on contiguous
    CPU tensors of one dtype (their elements in memory order, any shape; AVX2: float32 only); False
    (nothing done) where the kernel does not take them. ``use_fma`` (default :func:`fma_allowed`): the
    FMA scheme, certified as the scheme without it (every CPU with AVX-512, or with ATen's AVX2
    capability, has FMA), else the eager backend's bits."""
    lib = poly_library(isa)
    fused = fma_allowed() if use_fma is None else use_fma
    return lib is not None and _call("invact_poly_grad", ctypes.byref(table), out, grad, y, code, bits, int(fused),
                                     lib=lib)


@contextlib.contextmanager
def _denormals(flushed: bool) -> Iterator[None]:
    """This thread's torch.set_flush_denormal(flushed) for the block, the caller's setting after it."""
    was = bitpack.denormals_flushed()
    if was != flushed:
        torch.set_flush_denormal(flushed)
    try:
        yield
    finally:
        if was != flushed:
            torch.set_flush_denormal(was)


def lookup_table(g_kernel: Callable[..., Tensor], dtype: torch.dtype, bits: int, *args, flushed: bool = False,
                 **params) -> Tensor:
    """float32 g of every ``dtype`` (bfloat16/float16) value of y for every code: entry
    ``code << 16 | bits of y``. ``g_kernel(y, code, *args, **params)`` is the generated eager one.
    ``flushed``: g as computed with denormals flushed (torch.set_flush_denormal(True)), where a y that
    is subnormal in float32 (bfloat16's are) reads as the zero of its sign: its entry is that zero's,
    whichever thread computed it (each thread has its own setting)."""
    y = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)  # every bit pattern
    with _denormals(flushed):
        rows = [g_kernel(y, torch.full(y.shape, c, dtype=torch.int32) if bits else None, *args, **params)
                for c in range(1 << bits)]
    lut = torch.cat(rows).to(torch.float32).view(1 << bits, 1 << 16)
    if flushed:
        b32 = y.to(torch.float32).view(torch.int32)  # bfloat16 -> float32 moves bits: no flushing
        subnormal = ((b32 & 0x7F800000) == 0) & ((b32 & 0x7FFFFF) != 0)
        zero = torch.where(b32 < 0, 0x8000, 0)      # the index of -0.0 or +0.0 (both 16-bit formats)
        lut = lut[:, torch.where(subnormal, zero, torch.arange(1 << 16))]
    return lut.reshape(-1).contiguous()


def run_lookup(lut: Tensor, out: Tensor, grad: Tensor, y: Tensor, code: Tensor, bits: int) -> bool:
    """out = lut[code << 16 | bits of y] * grad for bfloat16/float16 tensors (as :func:`run`)."""
    if y.dtype not in (torch.bfloat16, torch.float16) or lut.numel() != 1 << (16 + bits):
        return False
    return _call("invact_lut_grad", lut.data_ptr(), out, grad, y, code, bits)


CodeMap = tuple[tuple[float, ...], int, tuple[int, ...], int]


def _probes(thresholds: tuple[float, ...], strict: tuple[bool, ...], dtype: torch.dtype) -> Tensor:
    """x of dtype passing exactly k of the ascending thresholds, k = 0 .. len: -inf, then each
    threshold (``x >= t``) or its upper neighbour (``x > t``); a subnormal neighbour of 0 becomes the
    smallest normal float32, so that the probes mean the same with denormals flushed."""
    t = torch.tensor(thresholds, dtype=dtype)
    up = torch.nextafter(t, torch.full_like(t, math.inf))
    tiny = torch.finfo(torch.float32).tiny
    up = torch.where((t == 0) & (up < tiny), torch.full_like(t, tiny), up)
    after = torch.where(torch.tensor(strict, dtype=torch.bool), up, t)
    return torch.cat([t.new_full((1,), -math.inf), after])


def code_map(code_kernel: Callable[..., Tensor], thresholds: tuple[float, ...], strict: tuple[bool, ...],
             dtype: torch.dtype) -> CodeMap | None:
    """(thresholds, their strict flags as bits, the code where k of them are passed for k = 0 .. len,
    the code of NaN) of a generated ``code_kernel(x, thresholds)``, read off it where k are passed and
    at NaN: the kernel needs no other description of the code. Threshold j is passed where ``x > t``
    (``strict[j]``) or ``x >= t``. None where there are too many thresholds or they are not ascending."""
    if len(thresholds) > MAX_X_THRESHOLDS or len(strict) != len(thresholds) or list(thresholds) != sorted(thresholds):
        return None
    x = _probes(tuple(thresholds), tuple(strict), dtype)
    t = torch.tensor(thresholds, dtype=dtype)
    passed = sum(((x > v) if s else (x >= v)).to(torch.int64) for v, s in zip(t, strict))
    if not torch.equal(torch.as_tensor(passed).expand(x.shape), torch.arange(x.numel())):
        return None  # neighbouring thresholds leave no x between them: no probe for some count
    codes = code_kernel(torch.cat([x, x.new_full((1,), math.nan)]), thresholds).tolist()
    bits = sum(1 << j for j, s in enumerate(strict) if s)
    return tuple(float(v) for v in thresholds), bits, tuple(codes[:-1]), codes[-1]


def pack_code(x: Tensor, cmap: CodeMap, bits: int) -> Tensor | None:
    """The packed forward code of flat contiguous CPU ``x`` (invact.bitpack's layout), or None
    where the kernel does not take it."""
    lib = library()
    dtype = DTYPE_IDS.get(x.dtype)
    if lib is None or dtype is None or not x.is_contiguous() or not x.is_cpu:
        return None
    out, args = _code_args(cmap, x.numel(), bits)
    done = lib.invact_pack_code(dtype, x.numel(), x.data_ptr(), *args)
    return out if done == 0 else None


@functools.lru_cache(maxsize=256)
def _map_args(cmap: CodeMap, flushed: bool) -> tuple:
    """A code map as the C kernels take it (n_thr .. nan code; built once: a few µs a call). Kept per
    denormal setting: with denormals flushed the conversion to float32 flushes a subnormal threshold
    to 0 (as the kernel, reading it, would then), which the array for calls without must not carry."""
    thresholds, strict, codes, nan_code = cmap
    thr = (ctypes.c_float * max(len(thresholds), 1))(*thresholds)
    return len(thresholds), thr, strict, (ctypes.c_int32 * 16)(*codes), nan_code


def _code_args(cmap: CodeMap, n: int, bits: int) -> tuple[Tensor, tuple]:
    """A new packed code for n elements and the C kernels' arguments that describe it (n_thr .. threads)."""
    out = torch.empty(bitpack.packed_bytes(n, bits), dtype=torch.uint8)
    return out, (*_map_args(cmap, bitpack.denormals_flushed()), bits, out.data_ptr(), torch.get_num_threads())


# ---- y and the code in one pass: PyTorch's forwards whose ATen kernel csrc/cpu_kernels.c (AVX-512) and
# csrc/cpu_avx2.c (AVX2) reproduce

FORWARDS = {"F.hardswish(x)": 1, "F.silu(x)": 2, "F.gelu(x)": 3,  # META torch_forward -> the C kernel's kind
            "x * torch.sigmoid(1.702 * x)": 4,                   # reproducing ATen's kernel
            "F.gelu(x, approximate='tanh')": 6, "F.mish(x)": 7}
ONEDNN_FORWARDS = {"F.gelu(x)": 5}  # ... reproducing oneDNN's, which ATen calls instead where it may
ONEDNN_KINDS = frozenset(ONEDNN_FORWARDS.values())  # vector code on every element, more than one element
GELUS = (FORWARDS["F.gelu(x)"], FORWARDS["F.gelu(x, approximate='tanh')"])  # ATen's GeluKernelImpl
GRAIN_SIZE = 32768            # at::internal::GRAIN_SIZE: TensorIterator's elements per thread, at least
GELU_SERIAL_MOST = 16384      # ATen's GELU splits any larger tensor over all threads (grain n / threads)
# With OMP_DYNAMIC on, OpenMP may run fewer threads than torch.get_num_threads(), so ATen's ranges (and
# the elements its scalar code computes) are not known here: the one-pass forward is then not taken.
OMP_DYNAMIC = os.environ.get("OMP_DYNAMIC", "").strip().lower() in ("1", "true", "yes", "on")


def _thread_limit(text: str | None) -> int | None:
    """OMP_THREAD_LIMIT as OpenMP reads it (a positive integer), else None (unset or not one)."""
    try:
        limit = int((text or "").strip())
    except ValueError:
        return None
    return limit if limit > 0 else None


# OpenMP runs at most OMP_THREAD_LIMIT threads in a team, whatever torch.set_num_threads asked for
OMP_THREAD_LIMIT = _thread_limit(os.environ.get("OMP_THREAD_LIMIT"))


def aten_threads() -> int:
    """The threads ATen's parallel_for splits a tensor over: torch.get_num_threads(), within OpenMP's
    OMP_THREAD_LIMIT (each thread's range is then ``omp_get_num_threads()``'s share)."""
    threads = torch.get_num_threads()
    return threads if OMP_THREAD_LIMIT is None else max(1, min(threads, OMP_THREAD_LIMIT))


def bf16_store() -> bool:
    """Whether the kernel stores bfloat16 as oneDNN's gelu does here: by vcvtneps2bf16 (the compiler
    knew the instruction and the CPU has it) or by oneDNN's emulation of it (a CPU without it);
    oneDNN's bfloat16 gelu runs in one pass only then."""
    lib = library()
    return lib is not None and lib.invact_bf16_store() == 1


def forward_kinds(torch_forward: str | None) -> tuple[int, ...]:
    """The C kernel's kinds that may reproduce ``torch_forward`` (a table's META entry) here, oneDNN's
    first (to be probed in turn: which kernel PyTorch runs depends on the dtype, the CPU and
    torch.backends.mkldnn; the library of either ISA takes every kind); none without a kernel library
    (:func:`forward_library`) or with OMP_DYNAMIC on."""
    if OMP_DYNAMIC or forward_library() is None:
        return ()
    return tuple(table[torch_forward] for table in (ONEDNN_FORWARDS, FORWARDS) if torch_forward in table)


def aten_ranges(n: int, kind: int, threads: int) -> list[tuple[int, int]]:
    """How ATen's kernel for the forward ``kind`` splits a contiguous n-element tensor over ``threads``
    (TensorIterator with OpenMP: at::parallel_for's equal chunks, one range under the grain size)."""
    grain = GRAIN_SIZE
    if kind in GELUS and n > GELU_SERIAL_MOST:
        grain = max(n // threads, 1)
    if n < grain or threads <= 1:
        return [(0, n)]
    chunk = -(-n // min(threads, -(-n // grain)))
    return [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]


def aten_tails(n: int, dtype: torch.dtype, kind: int, threads: int) -> list[tuple[int, int]]:
    """The ranges that ATen's kernel computes with its scalar code: each range's vectorised loop leaves
    its last ``len % (2 * vector)`` elements to the scalar loop (a vector: 16 float32, 32 bfloat16 or
    float16 with AVX-512; half as many with AVX2). None for oneDNN's kernels, which run their vector
    code on every element."""
    if kind in ONEDNN_KINDS:
        return []
    step = (32 if dtype == torch.float32 else 64) // (1 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 2)
    return [(hi - (hi - lo) % step, hi) for lo, hi in aten_ranges(n, kind, threads) if (hi - lo) % step]


def forward_code(x: Tensor, y: Tensor, kind: int, cmap: CodeMap, bits: int) -> Tensor | None:
    """y = the forward ``kind`` of contiguous CPU ``x`` (ATen's vector code on every element) and the
    packed code, in one pass; None where the kernel does not take them, or where PyTorch would not run
    that kernel (oneDNN's for a single element)."""
    lib = forward_library()
    if (lib is None or x.dtype not in DTYPE_IDS or y.dtype != x.dtype or not (x.is_contiguous() and y.is_contiguous())
            or not x.is_cpu or not y.is_cpu or y.numel() != x.numel()):
        return None
    return forward_call(lib, kind, cmap, bits, x.dtype, bitpack.denormals_flushed())(x, y)


@functools.lru_cache(maxsize=256)
def forward_call(lib: ctypes.CDLL, kind: int, cmap: CodeMap, bits: int, dtype: torch.dtype,
                 flushed: bool) -> Callable[[Tensor, Tensor], Tensor | None]:
    """:func:`forward_code` of ``lib`` for x and y that its checks passed (contiguous CPU tensors of
    ``dtype``, as many elements), with what does not change from call to call bound once (the op's
    per-call cost at small sizes)."""
    fn, dtype_id = lib.invact_forward_code, DTYPE_IDS[dtype]
    n_thr, thr, strict, codes, nan_code = _map_args(cmap, flushed)
    least = 2 if kind in ONEDNN_KINDS else 1  # ATen calls oneDNN for more than one element

    def call(x: Tensor, y: Tensor) -> Tensor | None:
        n, threads = x.numel(), aten_threads()
        if n < least:
            return None
        out = torch.empty(bitpack.packed_bytes(n, bits), dtype=torch.uint8)
        chunk = aten_ranges(n, kind, threads)[0][1]
        done = fn(kind, chunk, dtype_id, n, x.data_ptr(), y.data_ptr(), n_thr, thr, strict, codes, nan_code, bits,
                  out.data_ptr(), threads)
        return out if done == 0 else None
    return call
