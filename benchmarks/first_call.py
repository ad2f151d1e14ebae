"""Time of each activation's FIRST forward + backward, each in a fresh Python process (CPU).

    python benchmarks/first_call.py [--names elu,softplus] [--dtype float32] [--numel 4096]

Per table, two fresh processes, both with an empty Inductor cache (TORCHINDUCTOR_CACHE_DIR in a new
temporary directory, so no compiled graph is reused) and one private kernel cache for the run
(INVACT_CACHE):
  cold   the first process: includes building the table's C kernel (invact.table_c) and, on
         AVX-512 CPUs, invact.cpu_kernel's, once per machine
  warm   the second process: the kernels are built (what every later process of a user sees);
         target <= 1 s (issue 17)
``graphs``: the frames torch.compile compiled in the warm process (0: no Inductor compile at all).
Import time is not counted (torch's own import dominates it). ``--inductor`` runs the same with
the C kernels switched off (INVACT_CPU_KERNEL=0): what the first call cost before them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import torch
from torch._dynamo.utils import counters
from invact import ops
name, dtype, numel = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
x = torch.randn(numel, dtype=dtype, generator=torch.Generator().manual_seed(0)).requires_grad_()
start = time.perf_counter()
y = ops.apply(x, name, backend="compiled")
mid = time.perf_counter()
y.backward(torch.ones_like(y))
end = time.perf_counter()
print(json.dumps({"forward": mid - start, "backward": end - mid, "graphs": counters["stats"]["unique_graphs"]}))
"""


def first_call(name: str, dtype: str, numel: int, env: dict[str, str]) -> dict:
    """One fresh process's first forward and backward of ``name`` (seconds) and its compiled graphs."""
    with tempfile.TemporaryDirectory(prefix="inductor-") as inductor:
        done = subprocess.run([sys.executable, "-c", CHILD, name, dtype, str(numel)], capture_output=True, text=True,
                              env={**env, "TORCHINDUCTOR_CACHE_DIR": inductor})
    if done.returncode:
        raise RuntimeError(f"{name}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from invact import ops

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", default=",".join(ops.names()), help="comma-separated activations (default: all)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--numel", type=int, default=4096)
    parser.add_argument("--inductor", action="store_true", help="with the C kernels switched off (before them)")
    args = parser.parse_args(argv)
    names = [n for n in args.names.split(",") if n]
    unknown = sorted(set(names) - set(ops.names()))
    if unknown:
        parser.error(f"--names: unknown activation(s) {', '.join(unknown)}; known: {', '.join(ops.names())}")
    with tempfile.TemporaryDirectory(prefix="invact-cache-") as cache:
        env = {**os.environ, "INVACT_CACHE": cache}
        if args.inductor:
            env["INVACT_CPU_KERNEL"] = "0"
        print(f"first forward + backward, {args.dtype}, {args.numel} elements, seconds "
              f"({'Inductor: C kernels off' if args.inductor else 'C kernels'}; target warm <= 1 s)")
        print(f"{'name':12s} {'cold':>7s} {'warm':>7s} {'(fwd':>7s} {'bwd)':>7s} {'graphs':>6s}")
        for name in names:
            cold = first_call(name, args.dtype, args.numel, env)
            warm = first_call(name, args.dtype, args.numel, env)
            total = warm["forward"] + warm["backward"]
            flag = "" if total <= 1.0 else "  over target"
            print(f"{name:12s} {cold['forward'] + cold['backward']:7.2f} {total:7.2f} {warm['forward']:7.2f} "
                  f"{warm['backward']:7.2f} {warm['graphs']:6d}{flag}", flush=True)


if __name__ == "__main__":
    main()
