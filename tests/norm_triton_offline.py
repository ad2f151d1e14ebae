"""Compile invact's norm kernels (runtime/norm_triton.py) for a CUDA GPU without one, as the launchers
would launch them: prints JSON {kernel: {case: {PTX instruction: count}, options}}.

    python tests/norm_triton_offline.py [--arch 90]

The launchers run on meta tensors with a recording stand-in for each kernel (tests/triton_offline.py's
Recorder), so signatures, specializations (N = 1 included) and options are a real launch's.
"""

from __future__ import annotations

import argparse
import json
import os
import re

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from invact import norm_triton  # noqa: E402
from triton_offline import INSTRUCTIONS, Recorder, compile_kernel  # noqa: E402

# (dtype, rows, N, rms, kept columns)
CASES = {"float32-layer": (torch.float32, 64, 1024, False, 3), "bfloat16-rms": (torch.bfloat16, 64, 4099, True, 0),
         "float16-layer-N1": (torch.float16, 7, 1, False, 0)}


def _launches(dtype: torch.dtype, rows: int, n: int, rms: bool, kept: int) -> dict[str, tuple[tuple, dict]]:
    meta = dict(dtype=dtype, device="meta")
    x, dy = torch.empty(rows, n, **meta), torch.empty(rows, n, **meta)
    w, b = torch.empty(n, **meta), None if rms else torch.empty(n, **meta)
    saved = norm_triton._forward_kernel, norm_triton._backward_kernel
    norm_triton._forward_kernel, norm_triton._backward_kernel = fwd, bwd = Recorder(), Recorder()
    try:
        y, _, rstd = norm_triton.forward(x, w, b, 1e-5, rms, 0.0, None, dtype)
        cols = torch.arange(kept, device="meta")
        extra = torch.empty(rows, kept, **meta)
        norm_triton.backward(dy, y, rstd, extra, cols, w, b, rms, 0.0, dtype)
    finally:
        norm_triton._forward_kernel, norm_triton._backward_kernel = saved
    return {"forward": fwd.calls[0], "backward": bwd.calls[0]}


def report(arch: int) -> dict:
    out: dict = {}
    for case, spec in CASES.items():
        for kernel, (args, kwargs) in _launches(*spec).items():
            ptx = compile_kernel(getattr(norm_triton, f"_{kernel}_kernel"), args, kwargs, arch)
            counts = {i: len(re.findall(re.escape(i) + r"\b", ptx)) for i in INSTRUCTIONS}
            options = {k: v for k, v in kwargs.items() if k == "enable_fp_fusion"}
            out.setdefault(kernel, {})[case] = {"ptx": counts, "options": options}
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    print(json.dumps(report(parser.parse_args().arch), indent=1))
