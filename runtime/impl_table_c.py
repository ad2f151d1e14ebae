"""The compiled backend's C implementation for every table on CPU (:mod:`invact.table_c`'s kernels).

In the compiled backend's order (invact.ops) it comes after :mod:`invact.impl_cpu` (the AVX-512
kernels, which keep the fitted tables' float32 backward, the 16-bit backward and the forward code
where they run; on AVX2 CPUs the fitted tables' float32 backward) and before Inductor's code (:mod:`invact.impl_compiled`): with both, no table's first
call on CPU compiles anything (benchmarks/first_call.py). It computes the 16-bit backward of tables
whose g is plain arithmetic (:func:`invact.table_c.direct16`) from y; without AVX-512 it also packs
the forward code and gathers the other 16-bit backwards; float64 runs the eager torch code. It declines (None) CUDA
tensors, ``INVACT_CPU_KERNEL=0`` and whatever the kernels do not take (a failed build: one warning).

Documented internals: :class:`TableC` / :data:`TABLE_C`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_kernel, layout, registry
from .constants import module_constants
from .impl_cpu import coded_forward
from .impl_eager import EAGER, flushed, lookup_table
from .table_c import direct16, library, pack, run, run_lookup

__all__ = ["TableC", "TABLE_C"]


class TableC:
    """The compiled backend's CPU work that needs no per-table compile, where :mod:`invact.impl_cpu`
    declined: float32 backward (every table), 16-bit backward computed from y (``direct16`` tables),
    and without AVX-512 also the packed forward code and the other 16-bit backwards (lookup); float64
    runs the eager torch code. Declines (None) the rest: CUDA
    tensors, layouts or machines the kernels do not take (then Inductor's code runs)."""

    def value(self, x: Tensor, name: str, params: list[float]) -> None:
        return None                                  # y alone: the generated forward, never compiled

    def forward(self, x: Tensor, name: str, params: list[float]) -> tuple[Tensor, Tensor] | None:
        if not x.is_cpu or not cpu_kernel.enabled():
            return None
        if x.dtype == torch.float64:
            return EAGER.forward(x, name, params)
        return coded_forward(x, name, params, lambda mod: library(mod) is not None,
                             lambda mod, flat, cmap, k: pack(mod, flat.contiguous(), cmap))

    def backward(self, grad: Tensor, y: Tensor, code: Tensor, name: str, params: list[float]) -> Tensor | None:
        if not y.is_cpu or grad.dtype != y.dtype or not cpu_kernel.enabled():
            return None
        if y.dtype == torch.float64:
            return EAGER.backward(grad, y, code, name, params)
        mod = registry.module(name)
        out, gf, yf, of = layout.backward_buffers(grad, y)
        code = code.contiguous()
        if y.dtype == torch.float32 or direct16(mod):
            k = module_constants(mod, torch.float32, y.device, tuple(params))
            done = run(mod, of, gf, yf, code, k.y_thresholds, k.poly, tuple(params))
        else:
            lut = lookup_table(mod, y.dtype, tuple(params), y.device, flushed(y))
            done = run_lookup(mod, of, gf, yf, code, lut)
        return out if done else None


TABLE_C = TableC()
