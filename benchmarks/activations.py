"""Speed of invact's ops against PyTorch's native op of the same activation, side by side in one run.

    python benchmarks/activations.py [--numel 16777216] [--dtypes float32,bfloat16] [--names gelu,silu]

Ratios (invact time / native time; lower is better; every operation timed in turn, round by round,
medians), CPU:
  bwd compiled  the compiled backward (unpack code, g(y, code), * grad) vs the native backward
                (target <= 0.6); the C kernel of invact.cpu_kernel for tables of polynomial pieces
                on AVX-512 CPUs, Inductor's code otherwise
  fwd           forward incl. computing and packing the code (compiled backend) vs the native
                forward (target <= 1.15)
  bwd eager     the plain-torch backward vs the native backward (target <= 3)
  floor         grad * y (reads two tensors, writes one, as any backward from y must) vs the native
                backward: no backward can go below it; where it is near 0.6 that target is out of reach
With CUDA: Triton forward/backward bandwidth in GB/s (bytes read + written once).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from invact import ops

TARGETS = {"bwd compiled": 0.6, "fwd": 1.15, "bwd eager": 3.0}


def timeit(fn, repeat: int, sync=lambda: None) -> float:
    """Median seconds of fn() over ``repeat`` runs after two warm-up runs."""
    return side_by_side({"fn": fn}, repeat, sync)["fn"]


def side_by_side(fns: dict, repeat: int, sync=lambda: None) -> dict[str, float]:
    """Median seconds of each function, timed in turn round by round (after two warm-up rounds), so
    that a shared machine's slow spells fall on all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for round_ in range(repeat + 2):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            if round_ >= 2:
                times[key].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def native(name: str):
    meta = ops.info(name)
    expr = meta["torch_forward"]
    return lambda x: eval(expr, {"F": F, "torch": torch, "x": x, **meta["params"]})  # noqa: S307


def cpu_ratios(name: str, dtype: torch.dtype, numel: int, repeat: int, scale: float = 3.0) -> dict[str, float]:
    params = [float(v) for v in ops.info(name)["params"].values()]
    f = native(name)
    x = (torch.randn(numel) * scale).to(dtype)
    go = torch.randn(numel).to(dtype)
    xg = x.clone().requires_grad_()
    y_native = f(xg)
    y, code = torch.ops.invact.forward(x, name, params, "compiled")
    t = side_by_side({
        "native fwd": lambda: f(x),
        "fwd": lambda: torch.ops.invact.forward(x, name, params, "compiled"),
        "native bwd": lambda: torch.autograd.grad(y_native, xg, go, retain_graph=True),
        "floor": lambda: torch.mul(go, y_native.detach()),
        "bwd compiled": lambda: torch.ops.invact.backward(go, y, code, name, params, "compiled"),
        "bwd eager": lambda: torch.ops.invact.backward(go, y, code, name, params, "eager"),
    }, repeat)
    return {"fwd": t["fwd"] / t["native fwd"],
            **{k: t[k] / t["native bwd"] for k in ("floor", "bwd compiled", "bwd eager")}}


def gpu_bandwidth(name: str, dtype: torch.dtype, numel: int, repeat: int) -> dict[str, float]:
    params = [float(v) for v in ops.info(name)["params"].values()]
    x = torch.randn(numel, device="cuda").to(dtype)
    go = torch.randn(numel, device="cuda").to(dtype)
    y, code = torch.ops.invact.forward(x, name, params, "triton")
    sync = torch.cuda.synchronize
    t_f = timeit(lambda: torch.ops.invact.forward(x, name, params, "triton"), repeat, sync)
    t_b = timeit(lambda: torch.ops.invact.backward(go, y, code, name, params, "triton"), repeat, sync)
    size = x.element_size() * numel
    return {"fwd GB/s": (2 * size + code.numel()) / t_f / 1e9,
            "bwd GB/s": (3 * size + code.numel()) / t_b / 1e9}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--names", default=",".join(ops.names()))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--scale", type=float, default=3.0,
                        help="x = SCALE * N(0, 1) (default 3: both branches and the far tails, whose pieces "
                             "cost the most on CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    names = [n for n in args.names.split(",") if n and ops.info(n)["torch_forward"]]
    cols = [*TARGETS, "floor"]
    print(f"CPU, {args.numel} elements, x = {args.scale:g} * N(0, 1), {torch.get_num_threads()} threads; "
          "invact / native time "
          f"(targets: {', '.join(f'{c} <= {v}' for c, v in TARGETS.items())})")
    print(f"{'activation':<14}{'dtype':<10}" + "".join(f"{c:>14}" for c in cols))
    for name in names:
        for dtype in dtypes:
            r = cpu_ratios(name, dtype, args.numel, args.repeat, args.scale)
            marks = "".join(f"{r[c]:>13.2f}{'*' if r[c] > TARGETS.get(c, math.inf) else ' '}" for c in cols)
            print(f"{name:<14}{str(dtype).removeprefix('torch.'):<10}{marks}")
    print("(* misses its target)")
    if torch.cuda.is_available():
        print(f"\nCUDA Triton, {args.numel} elements")
        for name in names:
            for dtype in dtypes:
                r = gpu_bandwidth(name, dtype, args.numel, args.repeat)
                print(f"{name:<14}{str(dtype).removeprefix('torch.'):<10}"
                      + "".join(f"{k}: {v:8.1f}   " for k, v in r.items()))
    else:
        print("\nno CUDA device: Triton bandwidth skipped")


if __name__ == "__main__":
    main()
