"""Per-call cost at small and medium sizes: a training step's forward + backward through autograd (what a
model pays per activation call: argument checks, the autograd.Function, the kernels) and an inference
forward, invact against PyTorch's native op, side by side in one run.

    python benchmarks/overhead.py [--names silu,gelu,relu] [--dtypes float32,bfloat16]
                                  [--sizes 256,4096,65536,1048576] [--threads 1] [--repeat 7]

Prints microseconds a call (medians of ``--repeat`` rounds, each op timed in turn round by round, each
round ~``--round-ms`` of calls) and invact / native. At small sizes the difference is Python's fixed
cost a call; from ~2^20 elements the kernels' speed (benchmarks/activations.py) decides.
"""

from __future__ import annotations

import argparse
import time

import torch

from invact import ops

from activations import native, side_by_side


def calls_per_round(fn, round_ms: float) -> int:
    """How many calls of ``fn`` take about ``round_ms`` (from a short trial, at least 1)."""
    fn()
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 0.002:
        fn()
        n += 1
    per = (time.perf_counter() - t) / n
    return max(1, int(round_ms / 1e3 / per))


def per_call_us(name: str, dtype: torch.dtype, numel: int, repeat: int, round_ms: float) -> dict[str, float]:
    """Microseconds a call of each of: invact's and the native train step (forward + backward through
    autograd) and inference forward (no grad)."""
    f = native(name)
    x = (3 * torch.randn(numel)).to(dtype).requires_grad_()
    go = torch.randn(numel).to(dtype)

    def train(forward):
        return lambda: torch.autograd.grad(forward(x), x, go)

    def infer(forward):
        def run():
            with torch.no_grad():
                forward(x)
        return run

    steps = {"invact train": train(lambda t: ops.apply(t, name)), "native train": train(f),
             "invact infer": infer(lambda t: ops.apply(t, name)), "native infer": infer(f)}
    counts = {k: calls_per_round(fn, round_ms) for k, fn in steps.items()}
    loops = {k: (lambda fn=fn, n=counts[k]: [fn() for _ in range(n)]) for k, fn in steps.items()}
    seconds = side_by_side(loops, repeat)
    return {k: seconds[k] / counts[k] * 1e6 for k in steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", default="silu,gelu,relu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--sizes", default="256,4096,65536,1048576")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--round-ms", type=float, default=20.0, help="length of one round of calls (ms)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in args.names.split(",") if n]
    unknown = sorted(set(names) - set(ops.names()))
    if unknown:
        parser.error(f"--names: unknown activation(s) {', '.join(unknown)}; known: {', '.join(ops.names())}")
    dtypes = []
    for d in args.dtypes.split(","):
        if not isinstance(getattr(torch, d, None), torch.dtype):
            parser.error(f"--dtypes: {d!r} is not a torch dtype")
        dtypes.append(getattr(torch, d))
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.error(f"--sizes: expected comma-separated element counts, got {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        parser.error(f"--sizes: expected element counts >= 1, got {args.sizes!r}")
    print(f"CPU, {args.threads} thread(s); microseconds a call, invact / native "
          "(train: forward + backward through autograd; infer: forward without grad)")
    print(f"{'activation':12s}{'dtype':10s}{'numel':>9s}{'train':>10s}{'native':>10s}{'ratio':>7s}"
          f"{'infer':>10s}{'native':>10s}{'ratio':>7s}")
    for name in names:
        for dtype in dtypes:
            for n in sizes:
                us = per_call_us(name, dtype, n, args.repeat, args.round_ms)
                cells = "".join(f"{us['invact ' + step]:10.1f}{us['native ' + step]:10.1f}"
                                f"{us['invact ' + step] / us['native ' + step]:7.2f}" for step in ("train", "infer"))
                print(f"{name:12s}{str(dtype).removeprefix('torch.'):10s}{n:9d}{cells}")


if __name__ == "__main__":
    main()
