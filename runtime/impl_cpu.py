"""The compiled backend's C kernels on CPU tensors (:mod:`invact.cpu_kernel`), tried before Inductor.

Forward: y by the generated torch forward, the packed code by the C kernel from the thresholds and the
codes at them (:func:`code_map`); y and the code in one pass over x where y is PyTorch's hardswish,
silu, gelu (both forms; ATen's or oneDNN's kernel), mish or quick_gelu's three ops (on CPUs with AVX2
and no AVX-512: the same forwards in float32 and bfloat16; :func:`invact.cpu_kernel.forward_library`)
(:func:`one_pass_forward`, bit for bit PyTorch's y). Backward: a
gather from g of every 16-bit y and code for bfloat16 / float16 y (the table
:func:`invact.impl_eager.lookup_table` holds; declined for tables whose per-table C computes it
directly, faster: :func:`invact.table_c.direct16`), the fused polynomial kernel for float32 y of tables it
covers (:func:`fused_table`; AVX-512's, or on CPUs with AVX2 and no AVX-512 as ATen sees them that of
``csrc/cpu_avx2.c``: :func:`invact.cpu_kernel.poly_library`), with FMA unless ``INVACT_FMA=0``. Bit for
bit what the eager backend computes, but for that FMA scheme. Answers None where the kernels do not take
the tensors (no AVX-512, or for float32 neither AVX-512 nor AVX2; no compiler; float64; a table the kernel
does not cover): :mod:`invact.impl_table_c` and then :mod:`invact.impl_compiled` run then.

Documented internals: :class:`CpuKernels` / :data:`CPU`, :func:`fused_table`, :func:`code_map` and
:func:`coded_forward` (the forward both C implementations run, each with its own packer),
:func:`one_pass_forward`, :func:`one_pass_kind` and :func:`probe`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from . import cpu_kernel, impl_compiled, layout, registry, table_c
from .constants import Constants, module_constants
from .impl_eager import EAGER, flushed, lookup_table, output

__all__ = ["CpuKernels", "CPU", "fused_table", "code_map", "coded_forward", "one_pass_forward", "one_pass_kind",
           "probe"]


@registry.per_root(maxsize=256)
def fused_table(mod: ModuleType, values: tuple[float, ...]) -> cpu_kernel.Table | None:
    """The fused CPU backward's table of a generated module (None where it does not cover it)."""
    k = module_constants(mod, torch.float32, torch.device("cpu"), values)
    return cpu_kernel.kernel_table(mod, k.y_threshold_values, k.y_strict)


@registry.per_root(maxsize=256)
def code_map(mod: ModuleType, dtype: torch.dtype, values: tuple[float, ...]) -> cpu_kernel.CodeMap | None:
    """The forward code of a generated module as the C kernel takes it (invact.cpu_kernel.code_map)."""
    k = module_constants(mod, dtype, torch.device("cpu"), values)
    return cpu_kernel.code_map(mod.code_kernel, k.x_thresholds, k.x_strict, dtype)


Packer = Callable[[ModuleType, Tensor, cpu_kernel.CodeMap, Constants], Tensor | None]


def coded_forward(x: Tensor, name: str, params: list[float], ready: Callable[[ModuleType], bool],
                  pack: Packer) -> tuple[Tensor, Tensor] | None:
    """(y, packed code) with y by the generated forward and the code by a C kernel: ``pack(mod, flat x in
    y's order, code map, constants)``. None where the table's code has no code map, ``ready(mod)`` is
    False (no kernel library) or ``pack`` answers None; tables without a code need no kernel."""
    mod = registry.module(name)
    bits = mod.CODE_BITS
    cmap = code_map(mod, x.dtype, tuple(params)) if bits else None
    if bits and (cmap is None or not ready(mod)):
        return None
    k = module_constants(mod, x.dtype, x.device, tuple(params))
    y = output(x, mod, k)
    if not bits:
        return y, layout.empty_code(x, 0)
    packed = pack(mod, layout.flat(x, layout.order(y)), cmap, k)
    return None if packed is None else (y, packed)


def one_pass_forward(x: Tensor, name: str, params: list[float]) -> tuple[Tensor, Tensor] | None:
    """(y, packed code) in one pass over x by the C kernel, for contiguous x of a table whose y is a
    PyTorch forward the kernel reproduces here (:func:`one_pass_kind`); the few elements ATen computes
    with its scalar code (invact.cpu_kernel.aten_tails) are recomputed by the generated forward. None
    elsewhere, and with denormals flushed (ATen's worker threads keep their own setting)."""
    mod = registry.module(name)
    if (not mod.CODE_BITS or params or not x.is_contiguous() or x.numel() == 0 or not x.is_cpu
            or x.dtype not in cpu_kernel.DTYPE_IDS or flushed(x)):
        return None
    run = _one_pass_runner(mod, x.dtype, torch.backends.mkldnn.enabled, cpu_kernel.forward_library())
    return None if run is None else run(x)


@registry.per_root(maxsize=64)
def _one_pass_runner(mod: ModuleType, dtype: torch.dtype, mkldnn: bool,
                     lib: object) -> Callable[[Tensor], tuple[Tensor, Tensor] | None] | None:
    """:func:`one_pass_forward` of contiguous CPU x of ``dtype``, looked up once per table, dtype, oneDNN
    setting and kernel library (``lib``: the library there now; None: no one-pass forward)."""
    kind = one_pass_kind(mod, dtype, mkldnn) if lib is not None else None
    cmap = code_map(mod, dtype, ()) if kind is not None else None
    if cmap is None:
        return None
    return functools.partial(_one_pass_with, mod, kind, cpu_kernel.forward_call(lib, kind, cmap, mod.CODE_BITS, dtype,
                                                                                 False))


def _one_pass(mod: ModuleType, x: Tensor, kind: int) -> tuple[Tensor, Tensor] | None:
    """:func:`_one_pass_with` by :func:`invact.cpu_kernel.forward_code` (its checks, the library and the
    denormal setting of now): the probes' call."""
    cmap = code_map(mod, x.dtype, ())
    if cmap is None:
        return None
    return _one_pass_with(mod, kind, lambda xs, y: cpu_kernel.forward_code(xs, y, kind, cmap, mod.CODE_BITS), x)


def _one_pass_with(mod: ModuleType, kind: int, call: Callable[[Tensor, Tensor], Tensor | None],
                   x: Tensor) -> tuple[Tensor, Tensor] | None:
    """y and the code of contiguous CPU x by ``call`` (:func:`invact.cpu_kernel.forward_call`), the
    elements ATen computes with its scalar code recomputed by the generated forward."""
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    packed = call(x, y)
    if packed is None:
        return None
    tails = cpu_kernel.aten_tails(x.numel(), x.dtype, kind, cpu_kernel.aten_threads())
    if tails:
        xf, yf = x.view(-1), y.view(-1)
        for lo, hi in tails:
            yf[lo:hi] = _scalar_tail(mod, xf, lo, hi)
    return y, packed


def _scalar_tail(mod: ModuleType, xf: Tensor, lo: int, hi: int) -> Tensor:
    """y of flat x's elements [lo, hi) as ATen's scalar loop computes them inside a longer tensor. A tail of
    one element is computed with the one before it (also by the scalar loop, the slice being shorter than a
    vector pair): alone it would be a one-element tensor, whose binary ops ATen runs as ops with a scalar,
    another operand order (float16 quick_gelu's product of two NaNs took the other NaN's sign)."""
    start = lo - 1 if hi - lo == 1 and lo > 0 else lo
    return mod.forward(xf[start:hi])[lo - start:]


def probe(dtype: torch.dtype) -> Tensor:
    """x of dtype for checking a forward: every 16-bit pattern (bfloat16/float16); for float32 each
    bfloat16 pattern with pseudo-random low bits (every exponent, both signs, infinities, NaNs)."""
    patterns = torch.arange(1 << 16, dtype=torch.int32)
    if dtype != torch.float32:
        return patterns.to(torch.int16).view(dtype)
    low = torch.randint(0, 1 << 16, (1 << 16,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    return (patterns << 16 | low).view(torch.float32)


def one_pass_kind(mod: ModuleType, dtype: torch.dtype, mkldnn: bool) -> int | None:
    """The C kernel's forward for this table's y in dtype: the first of invact.cpu_kernel.forward_kinds
    that gives PyTorch's y bit for bit on :func:`probe` here, or None. Which kernel PyTorch runs
    depends on the CPU and on ``mkldnn`` (torch.backends.mkldnn.enabled: with it, ATen's gelu calls
    oneDNN's for float32 and bfloat16). The probes' answers are cached; whether the kernel library is
    there is asked every time (a None from a moment without it is not kept)."""
    if not mod.CODE_BITS:
        return None
    kinds = cpu_kernel.forward_kinds(mod.META.get("torch_forward"))
    isa = torch.backends.cpu.get_cpu_capability()  # which kernel library answers
    return next((kind for kind in kinds if _probe_passes(mod, dtype, mkldnn, kind, isa)), None)


@registry.per_root(maxsize=64)
def _probe_passes(mod: ModuleType, dtype: torch.dtype, mkldnn: bool, kind: int, isa: str) -> bool:
    x = probe(dtype)
    got = _one_pass(mod, x, kind)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    return got is not None and torch.equal(got[0].view(bits), mod.forward(x).view(bits))


def _pack(mod: ModuleType, flat: Tensor, cmap: cpu_kernel.CodeMap, k: Constants) -> Tensor:
    # a strided x (x[::3], h[:, ::2]) packed from a contiguous copy, as invact.impl_table_c does: a transient
    # copy of x, where Inductor's code would compile on the first call (2-16 s) and per grad mode
    packed = cpu_kernel.pack_code(flat.contiguous(), cmap, mod.CODE_BITS)
    if packed is None:  # a dtype or machine the kernel does not take: Inductor's code for the y computed
        packed = impl_compiled.kernels(mod.NAME)[0](flat, k.x_thresholds)
    return packed


class CpuKernels:
    """The C kernels on CPU tensors of float32, bfloat16 and float16 (ops.py only asks for those)."""

    def value(self, x: Tensor, name: str, params: list[float]) -> Tensor:
        return EAGER.value(x, name, params)

    def forward(self, x: Tensor, name: str, params: list[float]) -> tuple[Tensor, Tensor] | None:
        return (one_pass_forward(x, name, params)
                or coded_forward(x, name, params, lambda mod: cpu_kernel.library() is not None, _pack))

    def backward(self, grad: Tensor, y: Tensor, code: Tensor, name: str, params: list[float]) -> Tensor | None:
        mod = registry.module(name)
        lut = table = None
        if y.dtype in (torch.bfloat16, torch.float16):
            if cpu_kernel.library() is None or table_c.direct16(mod):  # direct16: the closed forms, computed
                return None                                           # by invact.impl_table_c, faster than a gather
            lut = lookup_table(mod, y.dtype, tuple(params), y.device, flushed(y))
        elif cpu_kernel.poly_library() is None or (table := fused_table(mod, tuple(params))) is None:
            return None
        out, gf, yf, of = layout.backward_buffers(grad, y)
        done = (cpu_kernel.run_lookup(lut, of, gf, yf, code, mod.CODE_BITS) if lut is not None
                else cpu_kernel.run(table, of, gf, yf, code, mod.CODE_BITS))
        return out if done else None

CPU = CpuKernels()
