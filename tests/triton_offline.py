"""Compile every generated Triton kernel for a CUDA GPU without one, as its launcher would launch it.

    python tests/triton_offline.py [--arch 90] [--names gelu,silu]

Prints one JSON object: for each activation, kernel ("forward"/"backward", and "backward_counted"
where the backward searches its segment: see ``_launches``) and case ("float32",
"bfloat16", and "float16-int64": a launch of more than 2**31 elements), the count of each PTX instruction in
``INSTRUCTIONS``, and the compile options the launcher passed. The launchers are called with meta
tensors and a recording stand-in for each kernel, so the signature (pointer dtypes, 32- or 64-bit
sizes, parameters) and the options are those of a real launch. Triton's interpreter cannot show what
a GPU build does (it runs numpy: no FMA contraction, no approximate division or square root); this
does, with the ptxas that ships in triton's wheel. Runs without $TRITON_INTERPRET (unset here).
"""

from __future__ import annotations

import argparse
import json
import os
import re

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from invact import act_triton, impl_triton, ops, registry  # noqa: E402 - act_triton: the kernels the launchers launch

INSTRUCTIONS = ("fma.rn.f32", "div.full.f32", "div.rn.f32", "sqrt.approx.f32", "sqrt.rn.f32", "ex2.approx",
                "div.s64", "rem.s64", "div.u64", "rem.u64", "ld.global.v4", "st.global.v4", "max.NaN.f32",
                "min.NaN.f32", "cvt.rn.bf16.f32", "cvt.rn.bf16x2.f32", "cvt.rn.f16.f32",
                "cvt.rn.f16x2.f32")
# float32, bfloat16: sizes divisible by 128 (the code's planes start 16-byte aligned: vector loads);
# float16-int64: a ragged size past 2**31 (64-bit kernel arguments, element by element access)
CASES = {"float32": (torch.float32, 4096), "bfloat16": (torch.bfloat16, 2**20 + 384),
         "float16-int64": (torch.float16, 2**31 + 9)}


class Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _launches(name: str, dtype: torch.dtype, n: int) -> dict[str, tuple[tuple, dict]]:
    """The (args, kwargs) each kernel of ``name`` gets for n elements of dtype (meta tensors): "forward",
    "backward" as invact.impl_triton launches it (g_search where the table has one, u's clamp where
    invact.impl_triton.clamps keeps it), and where it has a g_search,
    "backward_counted" (g_y, what runs where the search's layout declines the thresholds)."""
    mod, torch_mod = registry.triton_module(name), registry.module(name)
    meta = dict(dtype=dtype, device="meta")
    x, y, go, gx = (torch.empty(n, **meta) for _ in range(4))
    bits = torch_mod.CODE_BITS
    code = torch.empty(-(-n * bits // 8) if bits else 0, dtype=torch.uint8, device="meta")
    k = ops.table_constants(name, torch.float32, "cpu")  # small: the pointer dtypes are what matter
    params = list(k.params.values())
    saved = act_triton.forward_kernel, act_triton.backward_kernel   # what the launchers launch
    act_triton.forward_kernel, act_triton.backward_kernel = fwd, bwd = Recorder(), Recorder()
    searched = impl_triton.search_tables(torch_mod, mod.SEARCH_LEVELS, torch.device("cpu"), tuple(params))
    clamp = impl_triton.clamps(torch_mod, tuple(params))
    try:
        mod.forward(x, y, code, k.x_threshold_tensor, params)
        if searched is not None:
            mod.backward(go, y, code, gx, *searched, params, by_search=True, clamp=clamp)
        mod.backward(go, y, code, gx, k.y_thresholds, k.poly, params, clamp=clamp)
    finally:
        act_triton.forward_kernel, act_triton.backward_kernel = saved
    if searched is None:
        return {"forward": fwd.calls[0], "backward": bwd.calls[0]}
    return {"forward": fwd.calls[0], "backward": bwd.calls[0], "backward_counted": bwd.calls[1]}


def compile_kernel(kernel, args: tuple, kwargs: dict, arch: int) -> str:
    """PTX of ``kernel`` compiled for sm_``arch`` as ``kernel[grid](*args, **kwargs)`` would be: Triton's
    own argument binder gives the signature and the specializations a launch gets (pointers aligned
    to 16 bytes, integers divisible by 16 or equal to 1), from which it compiles."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled.asm["ptx"]


def report(names: list[str], arch: int) -> dict:
    out: dict = {}
    for name in names:
        for case, (dtype, n) in CASES.items():
            for kernel, (args, kwargs) in _launches(name, dtype, n).items():
                jit = act_triton.forward_kernel if kernel == "forward" else act_triton.backward_kernel
                ptx = compile_kernel(jit, args, kwargs, arch)
                counts = {i: len(re.findall(re.escape(i) + r"\b", ptx)) for i in INSTRUCTIONS}
                options = {k: v for k, v in kwargs.items() if k != "BLOCK"}
                out.setdefault(name, {}).setdefault(kernel, {})[case] = {"ptx": counts, "options": options}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--names", default="", help="comma-separated activations (default: all)")
    args = parser.parse_args()
    names = [n for n in args.names.split(",") if n] or ops.names()
    print(json.dumps(report(names, args.arch), indent=1))


if __name__ == "__main__":
    main()
