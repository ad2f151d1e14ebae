"""The fitted backward's Triton kernel priced from its PTX: instructions per element against the
memory time at 2^28 elements on an H200 (issue 17; ``--gpu``: another, by default the current CUDA
device's figures, benchmarks/gpu_devices.py), without a GPU.

    python benchmarks/ptx_estimate.py [--numel 268435456] [--names gelu,silu] [--arch 90]
                                      [--dtype bfloat16|float32] [--forward] [--json] [--gpu h100]

Kernels per activation: ``scheme``, the table's float32 scheme (act_triton.backward_kernel: what
float32 y runs) as impl_triton launches it, its segment found by act_triton.search where the table's
Triton module has a g_search; ``counted``, the same scheme counting thresholds (g_y: where the
search's layout declines them), for tables that search; and, for bfloat16, ``lookup``, a gather from
g of every 16-bit y and code (act_triton.lut_backward_kernel: what bfloat16/float16 y run,
impl_triton.LUT_MOST_BITS); with ``--forward``, the forward (act_triton.forward_kernel: y and the
code, 2 bytes of x and y an element in bfloat16, every activation). Each is compiled for sm_ARCH as
its launcher launches it on ``--dtype``
(tests/triton_offline.py: meta tensors, Triton's own argument binder). The
lookup's table (256 KB a code) is assumed to stay in cache (L2: 50-60 MB; the y of one activation
concentrate on a few thousand of the 65,536 patterns). Its PTX is counted per
thread: straight-line code once, a loop's body once per trip (the plane loop: 8 / code bits trips),
divided by the elements a thread handles (BLOCK code bytes x planes / threads). Registers come from
ptxas -v (Triton's own ptxas). The estimate, per element:
  issue  SASS instructions (ptxas's code for the PTX, the loop's body once a trip; where nvdisasm is
         missing, PTX instructions: mov excluded, sqrt.rn / div.rn counted as the ~8 / ~10
         instructions they become) / (SMs x 128 lanes x clock)
  lsu    global loads and stores (a gather per coefficient: ld.global.b32) / (SMs x 32 x clock)
  memory bytes read and written once (y, grad in, grad out, the code's bits) / HBM bandwidth
The kernel is memory-bound by this count where max(issue, lsu) <= memory. It is an estimate (no
dual issue, no latency, no cache misses on the POLY rows); gpu_check.sh prints it next to the
measured time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import triton_offline  # noqa: E402
from gpu_devices import DEFAULT, GPUS, Gpu, current_key  # noqa: E402

from invact import act_triton, ops, registry  # noqa: E402

# 128 FP32/INT lanes per SM issue a thread-instruction a cycle each, the load/store units 32; the SMs,
# clock and HBM bandwidth are the GPU's (gpu_devices.GPUS; H200 SXM: 132 SMs, 1.98 GHz, 4.8 TB/s)
LANES, LSU_LANES = 128, 32
EXPANDS = {"sqrt.rn.f32": 8, "div.rn.f32": 10}   # PTX instructions that become a short sequence in SASS
FREE = ("mov",)                                   # register moves: mostly folded by ptxas


@dataclass
class Estimate:
    name: str
    kernel: str             # scheme, counted, lookup or forward
    elements_per_thread: float
    issue: float            # thread-instructions per element (PTX)
    sass: float             # SASS instructions per element (ptxas's code: what the SMs issue)
    loads: float            # global loads per element (ld.global, any width)
    gathers: float          # scalar 32-bit global loads per element (coefficient gathers and thresholds)
    stores: float
    registers: int
    issue_ms: float
    lsu_ms: float
    memory_ms: float

    @property
    def bound(self) -> str:
        worst = max(self.issue_ms, self.lsu_ms)
        return "memory" if worst <= self.memory_ms else ("issue" if self.issue_ms >= self.lsu_ms else "load/store")


def _instructions(ptx: str) -> list[tuple[int, str]]:
    """(line number, opcode) of each instruction of the kernel body, and the labels' line numbers."""
    out = []
    for k, line in enumerate(ptx.splitlines()):
        s = line.strip()
        if not s or s.startswith(("//", ".", "{", "}", "$")) or not s.endswith(";") and not s.startswith("@"):
            continue
        op = s.split()[1] if s.startswith("@") else s.split()[0]
        out.append((k, op.rstrip(";")))
    return out


def count(ptx: str, trips: int) -> dict[str, float]:
    """Per-thread dynamic counts: loop bodies (a label that a later branch jumps back to) ``trips``
    times, everything else once."""
    lines = ptx.splitlines()
    labels = {m.group(1): k for k, line in enumerate(lines) if (m := re.match(r"(\$L__BB\d+_\d+):", line))}
    loops = []
    for k, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and labels.get(m.group(1), k + 1) < k:
            loops.append((labels[m.group(1)], k))
    counts = {"issue": 0.0, "loads": 0.0, "gathers": 0.0, "stores": 0.0}
    for k, op in _instructions(ptx):
        times = trips if any(a <= k <= b for a, b in loops) else 1
        if op.startswith(FREE):
            continue
        counts["issue"] += times * EXPANDS.get(op, 1)
        if op.startswith("ld.global"):
            counts["loads"] += times
            counts["gathers"] += times * (op in ("ld.global.b32", "ld.global.f32"))
        elif op.startswith("st.global"):
            counts["stores"] += times
    return counts


def assemble(ptx: str, arch: int) -> tuple[int, str]:
    """(registers per thread, SASS text) of the PTX as Triton's ptxas builds it for sm_ARCH
    (-1 and "" where the tools cannot say)."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = Path(get_ptxas(arch).path)
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        done = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                               str(src), "-o", str(cubin)], capture_output=True, text=True)
        found = re.search(r"Used (\d+) registers", done.stdout + done.stderr)
        nvdisasm = ptxas.with_name("nvdisasm")
        sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True).stdout \
            if nvdisasm.exists() and cubin.exists() else ""
    return (int(found.group(1)) if found else -1), sass


def count_sass(sass: str, trips: int) -> float:
    """Per-thread dynamic SASS instructions up to the kernel's last EXIT (after it: the slow paths of
    sqrt.rn, called for rare inputs), a loop's body (a label a later BRA jumps back to) ``trips``
    times; NOPs excluded."""
    lines = sass.splitlines()
    labels = {m.group(1): k for k, line in enumerate(lines) if (m := re.match(r"(\.L_x_\d+):", line))}
    body = [(k, line) for k, line in enumerate(lines) if re.match(r"\s+/\*[0-9a-f]+\*/", line)]
    exits = [k for k, line in body if re.search(r"\bEXIT\b", line)]
    end = exits[-1] if exits else len(lines)
    loops = [(labels[m.group(1)], k) for k, line in body
             if (m := re.search(r"BRA `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), k + 1) < k]
    total = 0.0
    for k, line in body:
        if k <= end and not re.search(r"\bNOP\b", line):
            total += trips if any(a <= k <= b for a, b in loops) else 1
    return total


def lookup_launch(bits: int, numel: int) -> tuple[tuple, dict]:
    """(args, kwargs) of act_triton.lut_backward's launch on ``numel`` bfloat16 elements with codes of
    ``bits`` (meta tensors: what the launcher passes, recorded by tests/triton_offline.py's Recorder)."""
    meta = dict(device="meta")
    go, gx = (torch.empty(numel, dtype=torch.bfloat16, **meta) for _ in range(2))
    y16 = torch.empty(numel, dtype=torch.int16, **meta)
    code = torch.empty(-(-numel * bits // 8) if bits else 0, dtype=torch.uint8, **meta)
    lut = torch.empty(1 << (16 + bits), dtype=torch.float32, **meta)
    saved, act_triton.lut_backward_kernel = act_triton.lut_backward_kernel, triton_offline.Recorder()
    try:
        act_triton.lut_backward(go, y16, code, gx, lut, bits)
        return act_triton.lut_backward_kernel.calls[0]
    finally:
        act_triton.lut_backward_kernel = saved


def estimate(name: str, numel: int, arch: int = 90, kernel: str = "scheme",
             dtype: torch.dtype = torch.bfloat16, gpu: Gpu = GPUS[DEFAULT]) -> Estimate | None:
    """The estimate for activation ``name`` on ``numel`` elements of ``dtype`` by ``kernel``: the
    backward by ``scheme`` (the table's float32 scheme as impl_triton launches it,
    act_triton.backward_kernel: float32 y, and 16-bit y of codes wider than impl_triton.LUT_MOST_BITS),
    ``counted`` (the same with the segment counted, g_y, where the scheme searches; None elsewhere) or
    ``lookup`` (act_triton.lut_backward_kernel: a gather from g of every 16-bit y, what 16-bit y run);
    or ``forward`` (act_triton.forward_kernel: y = f(x) and the code; x read, y written); times on ``gpu``."""
    bits = registry.module(name).CODE_BITS
    if kernel == "lookup":
        jit, (args, kwargs) = act_triton.lut_backward_kernel, lookup_launch(bits, numel)
    elif kernel == "forward":
        jit, (args, kwargs) = act_triton.forward_kernel, triton_offline._launches(name, dtype, numel)["forward"]
    else:
        jit = act_triton.backward_kernel
        launch = triton_offline._launches(name, dtype, numel).get("backward_counted" if kernel == "counted" else "backward")
        if launch is None:
            return None
        args, kwargs = launch
    ptx = triton_offline.compile_kernel(jit, args, kwargs, arch)
    threads = int(re.search(r"\.reqntid (\d+)", ptx).group(1))
    planes = 8 // bits if bits else 1
    block = kwargs.get("BLOCK") or args[jit.arg_names.index("BLOCK")]
    per_thread = block * planes / threads
    c = {k: v / per_thread for k, v in count(ptx, planes).items()}
    regs, sass = assemble(ptx, arch)
    issue = count_sass(sass, planes) / per_thread if sass else c["issue"]
    scale = numel * 1e3
    return Estimate(name, kernel, per_thread, c["issue"], issue, c["loads"], c["gathers"], c["stores"], regs,
                    issue * scale / (gpu.sms * LANES * gpu.clock_hz),
                    (c["loads"] + c["stores"]) * scale / (gpu.sms * LSU_LANES * gpu.clock_hz),
                    ((2 if kernel == "forward" else 3) * dtype.itemsize + bits / 8) * scale / gpu.hbm_bytes_s)


def fitted_names() -> list[str]:
    """The activations whose backward evaluates POLY rows (act_triton.row)."""
    return [n for n in ops.names() if "act_triton.row(" in Path(registry.triton_module(n).__file__).read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=2**28)
    parser.add_argument("--names", default="", help="comma-separated (default: the fitted tables)")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="y's dtype (float32 runs the scheme alone)")
    parser.add_argument("--forward", action="store_true", help="the forward kernel instead, every activation by default")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--gpu", choices=sorted(GPUS), default=None,
                        help=f"the GPU's figures (default: the current CUDA device's, {DEFAULT} without one)")
    args = parser.parse_args(argv)
    gpu = GPUS[args.gpu or current_key()]
    names = [n for n in args.names.split(",") if n] or (ops.names() if args.forward else fitted_names())
    dtype = getattr(torch, args.dtype)
    kernels = ("scheme", "counted", "lookup") if dtype == torch.bfloat16 else ("scheme", "counted")
    kernels = ("forward",) if args.forward else kernels
    found = [e for n in names for kernel in kernels if (e := estimate(n, args.numel, args.arch, kernel, dtype, gpu))]
    if args.json:
        print(json.dumps([asdict(e) | {"bound": e.bound} for e in found], indent=1))
        return 0
    print(f"PTX estimate, {'forward' if args.forward else 'backward'}, {args.numel} {args.dtype} elements, sm_{args.arch}, "
          f"{gpu.name} ({gpu.sms} SMs, {gpu.clock_hz / 1e9:g} GHz, {gpu.hbm_bytes_s / 1e12:g} TB/s)")
    print(f"{'activation':<12}{'kernel':<8}{'ptx/el':>7}{'sass/el':>8}{'loads/el':>9}{'gathers':>8}{'regs':>5}{'issue ms':>9}"
          f"{'lsu ms':>8}{'memory ms':>10}  bound")
    for e in found:
        print(f"{e.name:<12}{e.kernel:<8}{e.issue:7.1f}{e.sass:8.1f}{e.loads:9.2f}{e.gathers:8.2f}{e.registers:5d}{e.issue_ms:9.3f}"
              f"{e.lsu_ms:8.3f}{e.memory_ms:10.3f}  {e.bound}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
