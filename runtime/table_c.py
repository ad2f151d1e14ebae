"""Per-table C kernels: the float32 backward of every table on CPU without torch.compile.

``invact generate`` writes ``generated/c_NAME.c`` next to each table's torch and Triton code: the
statements of the generated eager ``g_kernel`` in C (invact.fitting.codegen.c_gen), with
``csrc/invact_table.h``'s loop over elements, bit planes and threads. The first backward that needs
one builds it with the system C compiler into the kernel cache (:mod:`invact.kernel_cache`: manifest,
sha256 and ownership checks, as :mod:`invact.cpu_kernel`), typically in well under a second; later
processes load it. Parameters, thresholds and POLY are arguments, so one build serves every
parameter set.

Results: the eager backend's bits where the torch code is plain arithmetic (built with
``-ffp-contract=off``, no FMA); where it calls torch.exp/log/tanh/erf/... the C library's float
function stands in for ATen's vectorised one, about an ulp apart (tests/test_c_tables.py bounds it).
A table without its C file (code generated before there were any), a file generated from another
table, or a failed build: one warning, and the compiled backend runs Inductor's code as before.
``INVACT_CPU_KERNEL=0`` switches these kernels off too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import re
import subprocess
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from . import cpu_kernel, kernel_cache

__all__ = ["source", "library", "run"]

CSRC = Path(__file__).with_name("csrc")
HEADERS = (CSRC / "invact_table.h", CSRC / "invact_threads.h")
ABI_VERSION = 1
_ISA_FLAGS = {"AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"), "AVX2": ("-mavx2",)}
_warned: set[str] = set()


def _flags() -> tuple[str, ...]:
    """-O3 without FMA contraction (every operation rounded as torch's), vectorised for the ISA ATen
    uses here (honouring $ATEN_CPU_CAPABILITY); errno is never read, so sqrtf vectorises."""
    isa = _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ())
    return ("-O3", *isa, "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-pthread", f"-I{CSRC}")


def source(mod: ModuleType) -> Path:
    """The C file generated next to the torch module ``mod`` (generated/c_NAME.c)."""
    path = Path(mod.__file__)
    return path.with_name("c_" + path.stem.removeprefix("torch_") + ".c")


def _warn_once(what: str, why: str) -> None:
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"invact: {what} ({why}); the compiled backend runs torch.compile's code for it",
                      RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=None)
def _load(path: Path, sha256: str) -> ctypes.CDLL | None:
    compiler = cpu_kernel._compiler()
    if compiler is None:
        return None
    try:
        text = path.read_bytes()
    except OSError as error:
        _warn_once(f"no C kernel for {path.stem[2:]}", f"{error.strerror}: {path}; run `invact generate`")
        return None
    if f'#define TABLE_SHA256 "{sha256}"'.encode() not in text:
        _warn_once(f"stale C kernel {path.name}", "generated from another table; run `invact generate`")
        return None
    flags = _flags()
    parts = [text, *(h.read_bytes() for h in HEADERS), compiler.encode(), " ".join(flags).encode()]
    name = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)
    key = f"table-{name}-{hashlib.sha256(bytes(1).join(parts)).hexdigest()[:16]}"

    def check(lib: ctypes.CDLL) -> None:
        if lib.invact_table_abi() != ABI_VERSION:
            raise RuntimeError(f"ABI version {lib.invact_table_abi()}, expected {ABI_VERSION}")
        lib.invact_table_sha256.restype = ctypes.c_char_p
        if lib.invact_table_sha256().decode() != sha256:
            raise RuntimeError("built from another table")

    try:
        lib = kernel_cache.load([compiler, *flags, str(path)], key, check)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _warn_once("the per-table C kernels could not be built", str(error))
        return None
    lib.invact_table_grad.restype = ctypes.c_int
    lib.invact_table_grad.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 4, ctypes.c_int,  # n, y, grad, out, code, bits
                                      *[ctypes.c_void_p] * 3, ctypes.c_int]  # thr, poly, params, threads
    return lib


def library(mod: ModuleType) -> ctypes.CDLL | None:
    """The built kernel of generated torch module ``mod``, or None where there is none (switched
    off, no C compiler, no or a stale C file, a failed build: those warn once)."""
    if not cpu_kernel.enabled():
        return None
    return _load(source(mod), mod.TABLE_SHA256)


def run(mod: ModuleType, out: Tensor, grad: Tensor, y: Tensor, code: Tensor, thresholds: Tensor, poly: Tensor,
        params: tuple[float, ...]) -> bool:
    """out = g(y, code) * grad for flat contiguous float32 CPU tensors (code: invact.bitpack's planes
    of ``mod.CODE_BITS`` bits), with the float32 ``thresholds`` and ``poly`` (POLY transposed) of
    invact.ops.module_constants and the parameter values in ``mod.PARAMS`` order; False (nothing
    done) where the kernel does not take them."""
    tensors = (out, grad, y, code, thresholds, poly)
    if (y.dtype != torch.float32 or not all(t.dtype == torch.float32 for t in (out, grad, thresholds, poly))
            or not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            or len(params) != len(mod.PARAMS) or not out.numel() == grad.numel() == y.numel()):
        return False
    lib = library(mod)
    if lib is None:
        return False
    values = (ctypes.c_double * max(len(params), 1))(*params)
    done = lib.invact_table_grad(y.numel(), y.data_ptr(), grad.data_ptr(), out.data_ptr(),
                                 code.data_ptr() if mod.CODE_BITS else None, mod.CODE_BITS, thresholds.data_ptr(),
                                 poly.data_ptr(), values, torch.get_num_threads())
    return done == 0
