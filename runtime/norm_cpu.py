"""The norms' CPU backward kernel: ``csrc/norm_kernels.c`` (portable C vectors, built for the ISA ATen
uses: AVX-512, AVX2, or the compiler's baseline), one pass per row over y and dy that recovers
``t = y - beta`` and computes dx, and the column sums of dgamma and dbeta, in the same pass (see the C
file). Built once and cached like :mod:`invact.cpu_kernel`'s kernels (:mod:`invact.kernel_cache`'s
checks, ``$CC``, ``INVACT_CPU_KERNEL=0`` switches it off); without a C compiler or where the build
fails (one warning), :mod:`invact.norms` runs its Inductor / ATen path.
"""

from __future__ import annotations

import ctypes
import functools
import subprocess
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import cpu_kernel, kernel_cache

__all__ = ["library", "backward", "all_recoverable"]

SOURCE = Path(__file__).with_name("csrc") / "norm_kernels.c"
HEADERS = kernel_cache.headers_of(SOURCE.read_bytes(), SOURCE.parent)  # in the cache key
ABI = 2
DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _check_abi(lib: ctypes.CDLL) -> None:
    if lib.invact_norm_abi() != ABI:
        raise RuntimeError(f"norm kernel ABI {lib.invact_norm_abi()}, expected {ABI}")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where this CPU or machine cannot run it (one warning where a build
    that should work fails)."""
    compiler = cpu_kernel._compiler()
    if not cpu_kernel.enabled() or compiler is None:
        return None
    flags = cpu_kernel.flags_for(cpu_kernel.isa_flags())
    try:
        lib = kernel_cache.load_first(cpu_kernel.builds("norm_kernels", SOURCE, HEADERS, compiler, flags), _check_abi)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"invact: the norms' CPU kernel could not be built ({error}); their backward runs "
                      "torch.compile's / ATen's code", RuntimeWarning, stacklevel=2)
        return None
    p = ctypes.c_void_p
    lib.invact_norm_backward.restype = ctypes.c_int
    lib.invact_norm_backward.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                         *[p] * 12, ctypes.c_int]
    lib.invact_norm_unrecoverable.restype = ctypes.c_int64
    lib.invact_norm_unrecoverable.argtypes = [ctypes.c_int, ctypes.c_int64, p, p, ctypes.c_float, ctypes.c_float,
                                              ctypes.c_float]
    return lib


def all_recoverable(weight: Tensor, bias: Tensor | None, offset: float, ratio: float, floor: float) -> bool | None:
    """Whether every column passes :func:`invact.norm_recovery.recoverable` (the same float32 operations:
    ``|w_j + offset| ratio >= floor + |beta_j|``, ``floor`` the rule's absolute term in float32,
    :func:`invact.norms.recovery_floor`), for contiguous CPU parameters of one dtype (float32, bfloat16,
    float16): one call instead of a few torch ops per forward; None (not answered) elsewhere."""
    if (weight.dtype not in DTYPE_IDS or not weight.is_cpu or not weight.is_contiguous()
            or (bias is not None and (bias.dtype != weight.dtype or not bias.is_cpu or not bias.is_contiguous()))):
        return None  # checked first: CUDA parameters never build the kernel
    lib = library()
    if lib is None:
        return None
    return lib.invact_norm_unrecoverable(DTYPE_IDS[weight.dtype], weight.numel(), weight.data_ptr(), _ptr(bias),
                                         offset, ratio, floor) == 0


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def backward(dy: Tensor, y: Tensor, rstd: Tensor, g: Tensor, divisor: Tensor, b: Tensor | None,
             c2_fix: Tensor | None, rms: bool, x_dtype: torch.dtype) -> tuple[Tensor, ...] | None:
    """(dx in ``x_dtype``, c1, c2 (rows, 1), dgamma, dbeta (float32; dbeta empty without ``b``)) of
    :func:`invact.norm_math._backward_rows` / ``_backward_columns`` for CPU y and dy (rows, n) of one dtype,
    float32 rstd (rows), gamma / divisor / beta (n) and ``c2_fix`` (rows, 1) or None; None (nothing done)
    where the kernel does not take them."""
    lib = library()
    rows, n = y.shape
    floats = [rstd, g, divisor] + [t for t in (b, c2_fix) if t is not None]
    if (lib is None or y.dtype not in DTYPE_IDS or dy.dtype != y.dtype or x_dtype not in DTYPE_IDS or not n
            or y.device.type != "cpu" or not (y.is_contiguous() and dy.is_contiguous())
            or any(t.dtype != torch.float32 or not t.is_contiguous() for t in floats)):
        return None
    cpu = {"dtype": torch.float32, "device": "cpu"}  # never the default dtype or device: the kernel writes float32
    dx = torch.empty(rows, n, dtype=x_dtype, device="cpu")
    c1, c2 = (torch.empty(rows, 1, **cpu) for _ in range(2))
    dg, db = torch.empty(n, **cpu), torch.empty(n if b is not None else 0, **cpu)
    done = lib.invact_norm_backward(DTYPE_IDS[y.dtype], DTYPE_IDS[x_dtype], int(rms), rows, n, y.data_ptr(),
                                    dy.data_ptr(), rstd.data_ptr(), g.data_ptr(), divisor.data_ptr(), _ptr(b),
                                    _ptr(c2_fix), dx.data_ptr(), c1.data_ptr(), c2.data_ptr(), dg.data_ptr(),
                                    db.data_ptr() if b is not None else None, torch.get_num_threads())
    return (dx, c1, c2, dg, db) if done == 0 else None
