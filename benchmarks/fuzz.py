"""Fuzz invact's activations against PyTorch: random tensors, every dtype, worst error per region.

    python benchmarks/fuzz.py [--cases 10000] [--names gelu,silu] [--dtypes float32,bfloat16]
                              [--seed 0] [--backend eager] [--max-numel 4096] [--json out.json]

For every activation and dtype, ``--cases`` random tensors (sizes 0 .. --max-numel, log-uniform;
contiguous, transposed or sliced; values from one distribution per tensor: normal at scales 0.1 .. 100,
uniform within 0.1 of a branch or kink point, +-64 ulps of it, the tails, log-uniform magnitudes over
the dtype's whole range, or normal values mixed with NaN/+-inf/zeros/subnormals/extremes) run through
invact's forward and backward and PyTorch's, and are compared as tests/test_properties.py does
(tests/tolerances.py: forward bit for bit; gradient NaN/inf exactly where PyTorch's, finite values
within the bound built from float rounding, the table's certificate and the information floor, against
float64 autograd). Printed per dtype and activation, for each region of x:

  branch   within 0.1 of a branch point or kink (where the information floor lives)
  body     |x| <= 8 elsewhere
  tails    8 < |x| <= 1e4
  far      |x| > 1e4, finite (y may overflow)
  special  NaN, +-inf, zeros and subnormals

the worst derivative error |ours - go f'(x)| / (|go| max(1, |f'(x)|)) (absolute where |f'| <= 1,
relative above, as the certificates count; ``-`` where the region got no element) and, at
the end, the number of tensors and elements outside tolerance (target zero) and of elements under a
documented deviation (tests/tolerances.py DEVIATIONS; pinned by tests). Exit status 1 if any tensor is
outside tolerance or any forward differs from PyTorch's, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from invact import ops

# tests/tolerances.py holds the comparison (shared with the tests); under pytest it is imported already
if "tolerances" in sys.modules:
    tol = sys.modules["tolerances"]
else:
    _spec = importlib.util.spec_from_file_location("tolerances", Path(__file__).parents[1] / "tests" / "tolerances.py")
    tol = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))   # dataclasses need it
    _spec.loader.exec_module(tol)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}
REGIONS = ("branch", "body", "tails", "far", "special")
DISTRIBUTIONS = ("normal", "near-break", "break-ulps", "tails", "log-uniform", "specials")
SCALES = (0.1, 1.0, 3.0, 10.0, 100.0)
BATCH_ELEMENTS = 1 << 16             # float64 references are computed on this many elements at once


# ------------------------------------------------------------------------------------------------
# random cases

def special_values(dtype: torch.dtype) -> np.ndarray:
    fi = torch.finfo(dtype)
    sub = fi.tiny * fi.eps
    return np.array([math.nan, math.inf, -math.inf, 0.0, -0.0, fi.max, -fi.max, fi.tiny, -fi.tiny,
                     sub, -sub, fi.tiny - sub, -(fi.tiny - sub)])


def _ulp_neighbours(points: np.ndarray, k: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """points rounded to dtype, moved by k representable values: steps of the bit pattern read as a
    sign-magnitude integer (ordered like the floats, through zero; never NaN for |k| < 2**10)."""
    bits = torch.tensor(points, dtype=torch.float64).to(dtype).view(INT_VIEW[dtype]).to(torch.int64)
    width = torch.finfo(dtype).bits
    mask = (1 << (width - 1)) - 1
    wrap = -(1 << (width - 1))             # the sign bit, as a signed width-bit pattern
    ordinal = torch.where(bits >= 0, bits, -(bits & mask)) + torch.tensor(k, dtype=torch.int64)
    bits = torch.where(ordinal >= 0, ordinal, -ordinal + wrap)
    return bits.to(INT_VIEW[dtype]).view(dtype)


def values(rng: np.random.Generator, name: str, dtype: torch.dtype, n: int, dist: str) -> torch.Tensor:
    """n values of ``dist`` rounded to dtype (one distribution per tensor)."""
    points = np.array(tol.break_points(name) or [0.0])
    fi = torch.finfo(dtype)
    if dist == "normal":
        v = rng.standard_normal(n) * rng.choice(SCALES)
    elif dist == "near-break":
        v = rng.choice(points, n) + rng.uniform(-0.1, 0.1, n)
    elif dist == "break-ulps":
        return _ulp_neighbours(rng.choice(points, n), rng.integers(-64, 65, n), dtype)
    elif dist == "tails":
        v = rng.choice([-1.0, 1.0], n) * np.exp(rng.uniform(np.log(8.0), np.log(1e4), n))
    elif dist == "log-uniform":
        lo, hi = math.log(fi.tiny * fi.eps), math.log(fi.max)
        v = rng.choice([-1.0, 1.0], n) * np.exp(rng.uniform(lo, hi, n))
    elif dist == "specials":
        v = rng.standard_normal(n) * 3
        pick = rng.random(n) < 0.25
        v[pick] = rng.choice(special_values(dtype), int(pick.sum()))
    else:
        raise ValueError(f"dist must be one of {', '.join(DISTRIBUTIONS)}, got {dist!r}")
    return torch.tensor(v, dtype=torch.float64).to(dtype)


def make_case(rng: np.random.Generator, name: str, dtype: torch.dtype, max_numel: int = 4096) -> torch.Tensor:
    """One random tensor: size log-uniform in 1 .. max_numel (sometimes 0), 1-3 dimensions,
    contiguous, transposed or sliced, values from one random distribution."""
    n = 0 if rng.random() < 0.01 else int(np.exp(rng.uniform(0, math.log(max_numel + 1))))
    dims = int(rng.integers(1, 4))
    shape = [n] + [1] * (dims - 1)
    for d in range(1, dims):                      # split n into dims factors (some of size 1)
        f = int(rng.choice([f for f in range(1, 9) if shape[0] % f == 0]))
        shape[0] //= f
        shape[d] = f
    layout = rng.choice(["contiguous", "transposed", "sliced"])
    dist = str(rng.choice(DISTRIBUTIONS))
    if layout == "sliced":
        base = values(rng, name, dtype, 2 * math.prod(shape), dist).reshape(*shape[:-1], 2 * shape[-1])
        return base[..., 1::2]
    base = values(rng, name, dtype, math.prod(shape), dist).reshape(shape)
    return base.t() if layout == "transposed" and base.dim() == 2 else base


def run_case(name: str, x: torch.Tensor, backend: str, go_seed: int) -> tuple[torch.Tensor, ...]:
    """(y, ref y, go, PyTorch's gradient, invact's gradient) for one tensor."""
    a, b = x.detach().requires_grad_(), x.detach().requires_grad_()
    ref = tol.torch_reference(name, a)
    y = ops.apply(b, name, backend=backend)
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(go_seed), dtype=torch.float64).to(x.dtype)
    ref.backward(go)
    y.backward(go)
    return y.detach(), ref.detach(), go, a.grad, b.grad


def regions(name: str, x: np.ndarray) -> np.ndarray:
    """Region index (into REGIONS) of each element of x (float64)."""
    ax = np.abs(x)
    out = np.full(x.shape, REGIONS.index("body"))
    out[ax > 8] = REGIONS.index("tails")
    out[ax > 1e4] = REGIONS.index("far")
    near = np.zeros(x.shape, dtype=bool)
    for p in tol.break_points(name):
        near |= np.abs(x - p) <= 0.1
    out[near] = REGIONS.index("branch")
    with np.errstate(invalid="ignore"):
        special = ~np.isfinite(x) | (ax < float(np.finfo(np.float32).tiny))
    out[special] = REGIONS.index("special")
    return out


# ------------------------------------------------------------------------------------------------
# statistics

@dataclass
class Stats:
    """Per activation and dtype: worst derivative error per region and what fell outside."""

    cases: int = 0
    elements: int = 0
    worst: dict = field(default_factory=lambda: {r: None for r in REGIONS})
    worst_ratio: float = 0.0          # max error / bound over finite comparisons
    bad_cases: int = 0
    bad_elements: int = 0
    forward_mismatches: int = 0
    documented: int = 0
    examples: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def _accumulate(stats: Stats, name: str, dtype: torch.dtype, batch: list[tuple]) -> None:
    """Compare a batch of cases at once (one float64 reference for all their elements)."""
    if not batch:
        return
    cat = [np.concatenate([c[i] for c in batch]) for i in range(5)]
    owner = np.concatenate([np.full(len(c[0]), k) for k, c in enumerate(batch)])
    comp = tol.compare(name, dtype, *cat)
    bad = comp.bad
    stats.bad_elements += int(bad.sum())
    stats.bad_cases += len(set(owner[bad].tolist()))
    stats.documented += int(comp.documented.sum())
    if bad.any() and len(stats.examples) < 5:
        stats.examples.append(comp.describe(name, dtype, limit=2))
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.abs(comp.ours - comp.exact) / (np.abs(comp.go) * np.maximum(1.0, np.abs(comp.exact / comp.go)))
        ratio = np.abs(comp.ours - comp.exact) / comp.bound
    ok = np.isfinite(err) & np.isfinite(comp.theirs) & ~comp.documented & (comp.go != 0)
    if ok.any():
        stats.worst_ratio = max(stats.worst_ratio, float(np.max(ratio[ok])))
    reg = regions(name, comp.x)
    for r, label in enumerate(REGIONS):
        sel = ok & (reg == r)
        if sel.any():
            w = float(np.max(err[sel]))
            stats.worst[label] = w if stats.worst[label] is None else max(stats.worst[label], w)


def fuzz(name: str, dtype: torch.dtype, cases: int, seed: int = 0, backend: str = "eager",
         max_numel: int = 4096) -> Stats:
    """Run ``cases`` random tensors of activation ``name`` in ``dtype``; reproducible per (seed, name,
    dtype) whatever else runs."""
    rng = np.random.default_rng([seed, sum(map(ord, name)), list(DTYPES.values()).index(dtype)])
    stats, batch, pending = Stats(), [], 0
    for k in range(cases):
        x = make_case(rng, name, dtype, max_numel)
        y, ref, go, theirs, ours = run_case(name, x, backend, go_seed=seed * 1_000_003 + k)
        stats.cases += 1
        stats.elements += x.numel()
        same = torch.equal(y.view(INT_VIEW[dtype]), ref.view(INT_VIEW[dtype]))
        if not same:
            stats.forward_mismatches += 1
            stats.bad_cases += 1
            if len(stats.examples) < 5:
                stats.examples.append(f"{name} {dtype}: forward differs from PyTorch's on a {tuple(x.shape)} tensor")
        flat = [t.double().reshape(-1).numpy() for t in (x, y, go, theirs, ours)]
        batch.append(flat)
        pending += x.numel()
        if pending >= BATCH_ELEMENTS:
            _accumulate(stats, name, dtype, batch)
            batch, pending = [], 0
    _accumulate(stats, name, dtype, batch)
    return stats


# ------------------------------------------------------------------------------------------------
# command line

def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2g}"


def report(results: dict[tuple[str, str], Stats], out=None) -> int:
    """Print the tables; return the number of tensors outside tolerance (forward mismatches included)."""
    out = out or sys.stdout
    total_bad = 0
    for dname in dict.fromkeys(d for _, d in results):
        print(f"\n{dname}: worst |ours - go f'(x)| / (|go| max(1, |f'|)) per region; tensors (elements) "
              "outside tolerance",
              file=out)
        print(f"{'activation':<11} {'tensors':>7} {'elements':>9} " + " ".join(f"{r:>8}" for r in REGIONS)
              + f" {'err/bound':>9} {'outside':>10} {'documented':>10}", file=out)
        for (name, d), s in results.items():
            if d != dname:
                continue
            total_bad += s.bad_cases
            print(f"{name:<11} {s.cases:>7} {s.elements:>9} " + " ".join(f"{_fmt(s.worst[r]):>8}" for r in REGIONS)
                  + f" {s.worst_ratio:>9.2g} {f'{s.bad_cases} ({s.bad_elements})':>10} {s.documented:>10}", file=out)
    for s in results.values():
        for e in s.examples:
            print(e, file=out)
    cases = sum(s.cases for s in results.values())
    elements = sum(s.elements for s in results.values())
    documented = sum(s.documented for s in results.values())
    print(f"\n{cases} tensors, {elements} elements: {total_bad} tensors outside tolerance; "
          f"{documented} elements under documented deviations (tests/tolerances.py DEVIATIONS)", file=out)
    return total_bad


def _list(text: str, known, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in known]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none given)'}; "
                                         f"known: {', '.join(known)}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="random tensors per activation and dtype")
    parser.add_argument("--names", type=lambda t: _list(t, ops.names(), "activation"), default=ops.names())
    parser.add_argument("--dtypes", type=lambda t: _list(t, list(DTYPES), "dtype"), default=list(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["eager", "compiled"], default="eager",
                        help="a torch backend (their forward is PyTorch's own, compared bit for bit)")
    parser.add_argument("--max-numel", type=int, default=4096)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.cases < 1 or args.max_numel < 1:
        parser.error("--cases and --max-numel must be positive")
    results = {}
    start = time.perf_counter()
    for dname in args.dtypes:
        for name in args.names:
            t = time.perf_counter()
            results[name, dname] = fuzz(name, DTYPES[dname], args.cases, args.seed, args.backend, args.max_numel)
            print(f"  {name} {dname}: {args.cases} tensors in {time.perf_counter() - t:.0f} s", file=sys.stderr,
                  flush=True)
    bad = report(results)
    print(f"({time.perf_counter() - start:.0f} s, seed {args.seed}, backend {args.backend})")
    if args.json:
        args.json.write_text(json.dumps({f"{n}/{d}": s.as_dict() for (n, d), s in results.items()}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
