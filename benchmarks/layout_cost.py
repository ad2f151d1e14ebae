"""Calibrate ``invact.fitting.fit``'s C cost model: time the per-table C kernel of synthetic layouts.

Each layout is GELU's committed plan with its POLY rows replaced: ``segments`` rows of ``degree``
(their transforms: GELU's sqrt and the log of its far left tail, or the sqrt alone), split over its
two code classes, compiled by the generator the runtime's kernels come from (``c_gen.generate_c``)
with ``invact.table_c``'s flags (with FMA where the runtime builds with it, ``table_c.fma``), and
timed on 2^22 float32 y = gelu(3 N(0, 1)) at one thread (the fastest of ``--repeat`` rounds, every
layout timed in turn). It prints ns per element beside the model's prediction (``fit.c_time``), and
with ``--fit`` the least-squares coefficients that ``fit.C_COST`` records (the machine is shared and noisy: run it twice).

    python benchmarks/layout_cost.py [--repeat 7] [--fit]
    python benchmarks/layout_cost.py --tables ROOT [--names gelu,silu]

With ``--tables``: the C kernels of the tables under ROOT/generated/tables (a refit written
elsewhere, or the tables of another revision) side by side with this tree's and PyTorch's native
backward, same inputs.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import math
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import sympy as sp
import torch

from invact import cpu_kernel, table_c
from invact.fitting.codegen.analysis import ClassPlan, plan_table
from invact.fitting.codegen.c_gen import generate_c
from invact.fitting.codegen.torch_gen import generate_torch
from invact.fitting.fit import c_features, c_time
from invact.fitting.model import Transform
from invact.fitting.tables import load_table, project_root

N = 1 << 22
LAYOUTS = [  # (degree, segments, transforms: 2 = sqrt and log, 1 = sqrt; denominator degree)
    (14, 7, 2, 0), (12, 7, 2, 0), (12, 8, 2, 0), (8, 8, 2, 0), (6, 8, 2, 0), (4, 8, 2, 0), (8, 16, 2, 0),
    (6, 16, 2, 0), (10, 16, 2, 0), (8, 12, 2, 0), (8, 24, 2, 0), (8, 8, 1, 0), (14, 8, 1, 0), (6, 16, 1, 0),
    (12, 16, 2, 0), (14, 16, 2, 0), (10, 12, 1, 0), (4, 8, 1, 4), (6, 8, 1, 6), (5, 12, 2, 5),
]


def synthetic_plan(base, degree: int, segments: int, transforms: int, den: int = 0):
    """``base`` (a plan with two code classes and a sqrt transform) with ``segments`` POLY rows of
    ``degree`` (rational rows with a denominator of degree ``den``), transformed by the sqrt and (with
    ``transforms`` = 2) the log."""
    row_len = 5 + degree + den
    rows = []
    for k in range(segments):
        tid = float(k % transforms)
        rows.append((tid, 0.5 + k, 1.0 / (1 + k), 0.25 + k / 64, 1e-9 * k,
                     *[(-1) ** j * 0.01 / (j + k + 1) for j in range(degree)], *[0.1 / (j + 2) for j in range(den)]))
    first = segments // 2
    classes = []
    for c, (offset, n) in zip(base.classes, ((0, first), (first, segments - first))):
        breaks = tuple((sp.Float(-0.1 + 6.0 * (offset + j + 1) / segments), "left") for j in range(n - 1))
        classes.append(ClassPlan(c.code, offset, n, breaks, offset - (1 if offset else 0)))
    assert len(rows[0]) == row_len
    sqrt = next(tf for tf in base.transforms if tf.kind == "sqrt")
    log = Transform("log", (0.0, 0.0, 0.0), -1)           # GELU's far left tail before issue 17's refit
    return dataclasses.replace(base, poly=tuple(rows), degree=degree, den_degree=den, classes=tuple(classes),
                               transforms=(sqrt, log)[:transforms], exact=(), constant=(), nan_values=())


def build(text: str, folder: Path, name: str) -> ctypes.CDLL:
    path = folder / f"{name}.c"
    path.write_text(text)
    so = folder / f"{name}.so"
    subprocess.run([cpu_kernel._compiler(), *table_c._flags(table_c.fma()), str(path), "-o", str(so)], check=True)
    return table_c.bind(ctypes.CDLL(str(so)))


NATIVE = {"gelu": lambda go, x: torch.ops.aten.gelu_backward(go, x),
          "gelu_tanh": lambda go, x: torch.ops.aten.gelu_backward(go, x, approximate="tanh"),
          "silu": torch.ops.aten.silu_backward, "mish": torch.ops.aten.mish_backward}


class Timer:
    """One layout's built kernel and its inputs: ``once()`` is one timed call at one thread."""

    def __init__(self, plan, folder: Path, name: str, f=torch.nn.functional.gelu) -> None:
        self.lib, self.plan = build(generate_c(plan), folder, name), plan
        g = torch.Generator().manual_seed(0)
        self.y = f(3 * torch.randn(N, generator=g))
        self.grad, self.out = torch.randn(N, generator=g), torch.empty(N)
        self.code = torch.randint(0, 256, (N // 8,), dtype=torch.uint8, generator=g)
        self.thr = torch.tensor([float(b) for c in plan.classes for b, _ in c.y_breaks] or [0.0], dtype=torch.float32)
        self.poly = torch.tensor(plan.poly, dtype=torch.float32).T.contiguous()
        self.param = (ctypes.c_double * 1)(0.0)

    def once(self) -> float:
        """ns per element of one call."""
        start = time.perf_counter()
        rc = self.lib.invact_table_grad(table_c.DTYPES[torch.float32], N, self.y.data_ptr(), self.grad.data_ptr(),
                                        self.out.data_ptr(),
                                        self.code.data_ptr(), self.plan.code_bits, self.thr.data_ptr(),
                                        self.poly.data_ptr(), self.param, 1)
        if rc != 0:
            raise RuntimeError(f"invact_table_grad returned {rc}")
        return (time.perf_counter() - start) / N * 1e9


def avx512_timer(plan, timer: Timer):
    """One call of invact.cpu_kernel's AVX-512 polynomial kernel (what float32 fitted tables run on
    AVX-512 CPUs) for ``plan``, on ``timer``'s inputs; None where it does not run here."""
    mod = types.ModuleType(f"layout_{plan.name}")
    exec(compile(generate_torch(plan), mod.__name__, "exec"), mod.__dict__)
    thr = tuple(float(torch.tensor(float(b), dtype=torch.float32)) for c in plan.classes for b, _ in c.y_breaks)
    strict = tuple(side == "left" for c in plan.classes for _, side in c.y_breaks)
    table = cpu_kernel.kernel_table(mod, thr, strict)
    if table is None or cpu_kernel.library() is None:
        return None

    def once() -> float:
        start = time.perf_counter()
        if not cpu_kernel.run(table, timer.out, timer.grad, timer.y, timer.code, plan.code_bits):
            raise RuntimeError("the AVX-512 kernel declined")
        return (time.perf_counter() - start) / N * 1e9
    return once


def side_by_side(root: Path, names: list[str], repeat: int) -> None:
    """ns per element: this tree's table and the one under ``root`` by the per-table C kernel, then
    by the AVX-512 kernel where it runs, and PyTorch's backward."""
    here = project_root()
    print(f"{'activation':<12}{'C here':>10}{'C root':>8}{'512 here':>9}{'512 root':>9}{'native':>8}"
          f"   (ns per element, fastest of {repeat}; 512: the AVX-512 kernel)")
    with tempfile.TemporaryDirectory(prefix="invact-layout-") as tmp:
        for name in names:
            rel = f"generated/tables/{name}.json"
            old, new = (plan_table(load_table(r / rel), rel) for r in (here, root))
            timers = [Timer(p, Path(tmp), f"{name}_{k}") for k, p in enumerate((old, new))]
            x = 3 * torch.randn(N, generator=torch.Generator().manual_seed(0))
            native = NATIVE.get(name)

            def native_once() -> float:
                start = time.perf_counter()
                native(timers[0].grad, x)
                return (time.perf_counter() - start) / N * 1e9
            calls = [t.once for t in timers] + [avx512_timer(p, t) for p, t in zip((old, new), timers)] + [
                native_once if native else None]
            times = [[c() if c else math.nan for c in calls] for _ in range(repeat + 1)][1:]
            best = [min(r[k] for r in times) for k in range(len(calls))]
            print(f"{name:<12}{best[0]:10.3f}{best[1]:8.3f}{best[2]:9.3f}{best[3]:9.3f}{best[4]:8.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--fit", action="store_true", help="print least-squares coefficients of the features")
    parser.add_argument("--tables", type=Path, help="a root whose generated/tables to compare (side by side)")
    parser.add_argument("--names", default="gelu,silu,gelu_tanh,quick_gelu,mish")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.tables:
        side_by_side(args.tables, args.names.split(","), args.repeat)
        return 0
    root = project_root()
    base = plan_table(load_table(root / "generated/tables/gelu.json"), "generated/tables/gelu.json")
    isa = torch.backends.cpu.get_cpu_capability()
    print(f"C kernel, {N} float32 elements, 1 thread, ISA {isa}")
    print(f"{'degree':>6}{'segments':>9}{'transforms':>11}{'den':>4}{'ns/elem':>9}{'model':>8}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="invact-layout-") as tmp:
        plans = [synthetic_plan(base, *layout) for layout in LAYOUTS]
        timers = [Timer(plan, Path(tmp), "l{}_{}_{}_{}".format(*layout)) for plan, layout in zip(plans, LAYOUTS)]
        times = [[t.once() for t in timers] for _ in range(args.repeat + 1)][1:]   # in turn, round by round
        for k, ((degree, segments, transforms, den), plan) in enumerate(zip(LAYOUTS, plans)):
            ns = min(r[k] for r in times)   # the least disturbed call (shared machine)
            logs = sum(tf.kind == "log" for tf in plan.transforms)
            rows.append((c_features(degree, segments, logs, den), ns))
            model = c_time(degree, segments, logs, den, isa)
            print(f"{degree:6d}{segments:9d}{transforms:11d}{den:4d}{ns:9.3f}{model:8.3f}")
    if args.fit:
        a = np.array([f for f, _ in rows])
        b = np.array([t for _, t in rows])
        coef = np.linalg.lstsq(a, b, rcond=None)[0]
        print("least squares:", ", ".join(f"{c:.4f}" for c in coef),
              f"(max residual {np.max(np.abs(a @ coef - b)):.3f} ns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
