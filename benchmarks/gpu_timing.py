"""benchmarks/activations.py with its CUDA timings taken between CUDA events: each round times CALLS
back-to-back calls of an operation and divides, so the host's work before each launch (~45-135 us of
Python a call) overlaps the kernels before it instead of adding to one kernel's time, as one call
and a synchronisation per round did (a kernel at 0.9 of a copy's bandwidth could be reported as a
miss). CPU timings are activations.py's own.

    python benchmarks/gpu_timing.py [activations.py's arguments]     (benchmarks/gpu_check.sh runs it)
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import activations  # noqa: E402

CALLS = 10                      # back-to-back calls a round
_wall_clock = activations.side_by_side


def side_by_side(fns: dict[str, Callable], repeat: int, sync: Callable = lambda: None,
                 calls: int = CALLS) -> dict[str, float]:
    """activations.side_by_side's median seconds a call; where ``sync`` is torch.cuda.synchronize, each
    round times ``calls`` back-to-back calls between two CUDA events."""
    import torch
    if sync is not torch.cuda.synchronize:
        return _wall_clock(fns, repeat, sync)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for round_ in range(repeat + 2):
        for key, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            if round_ >= 2:
                times[key].append(start.elapsed_time(end) / 1e3 / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    activations.side_by_side = side_by_side
    activations.main(argv)


if __name__ == "__main__":
    main()
