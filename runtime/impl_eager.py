"""The eager implementation: the generated torch code run as plain torch ops (always available).

y is the generated ``forward`` (PyTorch's own op), laid out like x; the code is ``code_packed`` of x in
y's memory order. The backward runs ``grad_kernel`` on chunks of :func:`chunk_size` elements within one
bit plane (bounded temporaries), except for bfloat16/float16 y, where it gathers g from a table of every
16-bit y and code that ``g_kernel`` filled (:func:`lookup_table`, the same bits, fewer ops).

Documented internals: :class:`Eager` / :data:`EAGER` (the implementation), :func:`kernels` (the
generated code and gradient functions it calls), :func:`output`, :func:`lookup_table`,
:func:`flushed`, :func:`run_planes`, :func:`chunk_size` (:data:`CHUNK`, :data:`DEVICE_CHUNK`);
:mod:`invact.impl_compiled` and :mod:`invact.impl_cpu` build on them.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from . import bitpack, cpu_kernel, layout, registry, table_c
from .constants import Constants, module_constants

__all__ = ["Eager", "EAGER", "CHUNK", "DEVICE_CHUNK", "chunk_size", "kernels", "output", "lookup_table", "flushed",
           "run_planes"]

CHUNK = 1 << 16         # the eager backward's chunks on CPU: bounded temporaries that stay in cache
DEVICE_CHUNK = 1 << 20  # elsewhere, where each torch op is a kernel launch (~5 us; an op over 2^16 float32
                        # elements moves ~0.5 MB, ~0.2 us of an H100's memory): ~100 B of temporaries an element


def chunk_size(y: Tensor) -> int:
    """Elements per chunk of the eager backward of ``y`` (and bytes of code per chunk of the forward's,
    :meth:`Eager.code`): :data:`CHUNK` on CPU, else :data:`DEVICE_CHUNK`."""
    return CHUNK if y.is_cpu else DEVICE_CHUNK


def kernels(name: str) -> tuple[Callable, Callable]:
    """(packed forward code, flat gradient) of activation ``name``'s generated module."""
    mod = registry.module(name)
    return mod.code_packed, mod.grad_kernel


def output(x: Tensor, mod: ModuleType, k: Constants) -> Tensor:
    """y = f(x) by the generated torch forward, in the layout the fakes promise."""
    y = mod.forward(x, **k.params)
    if y.stride() != layout.dense_strides(x):
        y = layout.like(x).copy_(y)
    return y


def flushed(t: Tensor) -> bool:
    """Whether arithmetic on ``t`` reads subnormals as 0 now (torch.set_flush_denormal: CPU only)."""
    return t.is_cpu and bitpack.denormals_flushed()


@registry.per_root(maxsize=32)
def lookup_table(mod: ModuleType, dtype: torch.dtype, values: tuple[float, ...], device: torch.device,
                 flushed: bool = False) -> Tensor:
    """g of every 16-bit y and code, by the generated eager g_kernel (invact.cpu_kernel.lookup_table),
    as it computes with denormals flushed or not (``flushed``: the caller's current setting)."""
    k = module_constants(mod, dtype, torch.device("cpu"), values)
    g = table_c.g_kernel(mod) or mod.g_kernel  # its C kernel where that gives g_kernel's bits
    lut = cpu_kernel.lookup_table(g, dtype, mod.CODE_BITS, k.y_thresholds, k.poly, flushed=flushed, **k.params)
    return lut.to(device)


def _lookup_grad(out: Tensor, go: Tensor, y: Tensor, packed: Tensor, shift: int, bits: int, lut: Tensor) -> None:
    """out = lut[code << 16 | bits of y] * go in torch ops, for flat 16-bit y in one bit plane (the
    eager backward of bfloat16/float16: the table holds what g_kernel computes, so the result is the
    same bit for bit, from six whole-chunk ops instead of a Horner chain of them)."""
    index = y.view(torch.uint16).to(torch.int32)
    if bits:
        index += (packed.to(torch.int32) << (16 - shift)) & (((1 << bits) - 1) << 16)
    torch.mul(lut.index_select(0, index), go, out=out)


def run_planes(grad: Tensor, y: Tensor, code: Tensor, mod: ModuleType, k: Constants, grad_fn: Callable,
               thresholds, size: int, lut: Tensor | None = None) -> Tensor:
    """grad * g(y, code) by ``grad_fn`` (a generated ``grad_kernel``, or ``lut`` where given) on chunks of
    at most ``size`` elements within one bit plane of the code, in y's memory order."""
    out, gf, yf, of = layout.backward_views(grad, y)
    for a, b, first, shift in bitpack.plane_chunks(yf.numel(), mod.CODE_BITS, size):
        codes = code[first:first + b - a]
        if lut is not None:
            _lookup_grad(of[a:b], gf[a:b], yf[a:b], codes, shift, mod.CODE_BITS, lut)
        else:
            grad_fn(of[a:b], gf[a:b], yf[a:b], codes, torch.tensor(shift, dtype=torch.int32), thresholds, k.poly,
                    **k.params)
    return out


class Eager:
    """The generated torch code as torch ops; takes every tensor (never answers None)."""

    def value(self, x: Tensor, name: str, params: list[float]) -> Tensor:
        mod = registry.module(name)
        return output(x, mod, module_constants(mod, x.dtype, x.device, tuple(params)))

    def forward(self, x: Tensor, name: str, params: list[float]) -> tuple[Tensor, Tensor]:
        mod = registry.module(name)
        k = module_constants(mod, x.dtype, x.device, tuple(params))
        y = output(x, mod, k)
        if not mod.CODE_BITS:
            return y, layout.empty_code(x, 0)
        return y, self.code(layout.flat(x, layout.order(y)), name, k)

    def code(self, flat_x: Tensor, name: str, k: Constants) -> Tensor:
        """The packed code of flat x (in y's memory order): ``code_packed``'s bytes, computed in chunks of
        :func:`chunk_size` bytes, each from the elements of every plane that byte holds, so the int32
        codes and their planes are temporaries of a chunk, not of the whole tensor (4-5 bytes an element)."""
        mod = registry.module(name)
        n, bits = flat_x.numel(), mod.CODE_BITS
        nbytes, size = bitpack.packed_bytes(n, bits), chunk_size(flat_x)
        if nbytes <= size:
            return kernels(name)[0](flat_x, k.x_thresholds)
        out = flat_x.new_empty(nbytes, dtype=torch.uint8)
        for a in range(0, nbytes, size):
            b = min(a + size, nbytes)
            for plane in range(8 // bits):
                lo, hi = plane * nbytes + a, min(plane * nbytes + b, n)
                if lo >= hi:
                    break
                codes = mod.code_kernel(flat_x[lo:hi], k.x_thresholds).to(torch.uint8) << plane * bits
                if plane == 0:
                    out[a:b] = codes
                else:
                    out[a:a + hi - lo] |= codes
        return out

    def backward(self, grad: Tensor, y: Tensor, code: Tensor, name: str, params: list[float]) -> Tensor:
        mod = registry.module(name)
        k = module_constants(mod, y.dtype, y.device, tuple(params))
        grad_fn = kernels(name)[1]
        lut = None
        if y.dtype in (torch.bfloat16, torch.float16):
            lut = lookup_table(mod, y.dtype, tuple(params), y.device, flushed(y))
        return run_planes(grad, y, code, mod, k, grad_fn, k.y_thresholds, chunk_size(y), lut)


EAGER = Eager()
