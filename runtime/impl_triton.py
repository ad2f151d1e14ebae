"""The Triton implementation: the generated fused kernels (triton_NAME.py), y and the packed code in one
pass, the backward in one more; float32 arithmetic for float32, bfloat16 and float16 tensors. The
backward of bfloat16 and float16 y gathers g from the table of every 16-bit y and code that the eager
code filled (:data:`LUT_MOST_BITS`; act_triton.lut_backward_kernel), the same kernel for every table.

Triton launches on the current CUDA device and stream, not on its arguments' device:
:func:`launched` makes the tensors' device current around a launch (:func:`device_guard`) and turns a
kernel that fails to build or launch into one warning and None (Triton is then not tried again; the
caller runs :func:`invact.backends.instead_of_triton`); running out of memory and CUDA errors
propagate. :mod:`invact.norms` launches its kernels the same way. Kernels read data pointers: every
tensor they read is made contiguous first (a no-op for autograd's saved tensors).

The float32 scheme's segment index is a binary search over slots where the generated module has one
(``g_search``, :func:`search_tables`), else a count of thresholds (``g_y``); u's clamp is left out
where invact.u_clamp proves it changes nothing (:func:`clamps`).

Documented internals: :class:`Triton` / :data:`TRITON`, :func:`device_guard`, :func:`launched`,
:data:`PROPAGATED`, :func:`search_tables`, :func:`clamps`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import torch
from torch import Tensor

from . import backends, layout, registry, u_clamp
from .common import slots
from .constants import module_constants
from .impl_eager import flushed, lookup_table

__all__ = ["Triton", "TRITON", "LUT_MOST_BITS", "PROPAGATED", "device_guard", "launched", "search_tables",
           "clamps"]

T = TypeVar("T")
LUT_MOST_BITS = 2   # 16-bit y of tables with codes of at most this many bits: g from a table of 2^(16 + bits)
                    # floats (1 MB at 2 bits), one gather an element


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while a Triton kernel launches: Triton launches on the current CUDA
    device and stream, not on its arguments' device (a tensor on cuda:1 while cuda:0 is current
    would be read from the wrong device). The caller's current device is restored afterwards."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# errors of the memory or the device, not of Triton: the torch code instead would meet them too
PROPAGATED = (torch.OutOfMemoryError, torch.AcceleratorError)


def launched(device: torch.device, launch: Callable[[], T]) -> T | None:
    """``launch()`` with ``device`` current; None where Triton failed before, or fails now.

    The rule: :data:`PROPAGATED` errors (``torch.OutOfMemoryError``, also from the allocations in
    ``launch``, and ``torch.AcceleratorError``, a CUDA error torch reports) are raised as they are and
    leave Triton on, as is :class:`invact.registry.TableRefittedError` (the table was refitted on disk
    while this process computes with its earlier version: the kernels are fine). Any other
    ``Exception`` counts as a kernel that does not build or launch (a compile error, a launcher or
    driver error): it warns once, and Triton is not tried again in this process."""
    if "triton" not in backends.available(device.type):
        return None  # failed before
    try:
        with device_guard(device):
            return launch()
    except (*PROPAGATED, registry.TableRefittedError):
        raise
    except Exception as error:  # noqa: BLE001 - any other failure of the kernel falls back
        backends.after_triton_failed(error, device.type)
        return None


class Triton:
    """The fused kernels; None where they do not run (the caller runs the backend instead)."""

    def forward(self, x: Tensor, name: str, params: list[float]) -> tuple[Tensor, Tensor] | None:
        y, code = layout.like(x), layout.empty_code(x, registry.module(name).CODE_BITS)
        dims = layout.order(y)
        k = module_constants(registry.module(name), torch.float32, x.device, tuple(params))

        def launch() -> tuple[Tensor, Tensor]:
            registry.triton_module(name).forward(layout.flat(x, dims).contiguous(), layout.flat(y, dims), code,
                                                 k.x_threshold_tensor, list(params))
            return y, code
        return launched(x.device, launch)

    def value(self, x: Tensor, name: str, params: list[float]) -> Tensor | None:
        done = self.forward(x, name, params)  # the kernel packs the code as it goes
        return None if done is None else done[0]

    def backward(self, grad: Tensor, y: Tensor, code: Tensor, name: str, params: list[float]) -> Tensor | None:
        out, gf, yf, of = layout.backward_buffers(grad, y)  # contiguous: the kernels read data pointers
        code = code.contiguous()
        mod = registry.module(name)
        if y.dtype in (torch.bfloat16, torch.float16) and mod.CODE_BITS <= LUT_MOST_BITS:
            # g of every 16-bit y and code, by the eager g_kernel (cached per table, dtype, parameters and
            # device): the eager backward's g bit for bit, one gather an element instead of the scheme's
            # ~100 instructions (benchmarks/ptx_estimate.py)
            lut = lookup_table(mod, y.dtype, tuple(params), y.device, flushed(y))
            from . import act_triton

            def launch_lut() -> Tensor:
                act_triton.lut_backward(gf, yf.view(torch.int16), code, of, lut, mod.CODE_BITS)
                return out
            return launched(y.device, launch_lut)
        k = module_constants(mod, torch.float32, y.device, tuple(params))

        def launch() -> Tensor:
            tmod = registry.triton_module(name)
            searched = search_tables(mod, tmod.SEARCH_LEVELS, y.device, tuple(params))
            clamp = clamps(mod, tuple(params))
            if searched is not None:
                tmod.backward(gf, yf, code, of, *searched, list(params), by_search=True, clamp=clamp)
            else:
                tmod.backward(gf, yf, code, of, k.y_thresholds, k.poly, list(params), clamp=clamp)
            return out
        return launched(y.device, launch)


@registry.per_root(maxsize=256)
def clamps(mod: ModuleType, values: tuple[float, ...]) -> int:
    """The sides of u's clamp to [-1, 1] that the float32 scheme of a generated module needs for
    parameter ``values`` (invact.u_clamp's bits: LOWER, max(u, -1); UPPER, min(u, 1)): a side is
    left out only where invact.u_clamp proves that no float32 y reaches past it (the AVX-512 kernel
    leaves the clamp out where neither side is reached). Both for tables without POLY rows."""
    rows, transforms = getattr(mod, "POLY", ()), getattr(mod, "TRANSFORMS", ())
    if not rows or not transforms:
        return u_clamp.LOWER | u_clamp.UPPER
    k = module_constants(mod, torch.float32, torch.device("cpu"), values)
    passed_from = slots.passed_from_each(k.y_threshold_values, k.y_strict)
    return u_clamp.clamp_sides(tuple(mod.CLASSES), tuple(transforms), rows, passed_from)


@registry.per_root(maxsize=256)
def search_tables(mod: ModuleType, levels: int, device: torch.device, values: tuple[float, ...]) -> tuple[Tensor, Tensor] | None:
    """(level thresholds, POLY by slot) of a generated Triton ``g_search`` whose segment search has
    ``levels`` (its module's SEARCH_LEVELS), for parameter ``values``: invact.common.slots' layout of the
    float32 y thresholds. None where there is no search (``levels`` 0) or the layout declines these
    thresholds (invact.common.slots.search_layout: a NaN, a subnormal or a strict zero one,
    thresholds out of order): g_y counts them."""
    if not levels:
        return None
    k = module_constants(mod, torch.float32, device, values)
    layout = slots.search_layout(tuple(mod.CLASSES), k.y_threshold_values, k.y_strict)
    if layout is None or layout.levels != levels:
        return None
    width = len(mod.CLASSES) << levels
    thresholds = torch.tensor([v for level in layout.level_thr for v in level[:width]], dtype=torch.float32)
    return thresholds.to(device), k.poly[:, layout.row_of_slot[:width]].contiguous()


TRITON = Triton()
