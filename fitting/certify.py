"""Certification of a table, independent of how it was fitted.

Per branch: a rigorous real-arithmetic bound per poly piece (:mod:`.arb_bound`); the emulated float32
evaluation at every bf16 and every fp16 value of y in the branch's range; a stratified sample of
float32 values (or all of them with ``exhaustive``). References come from :class:`BranchReference`
(float64 bracketed Newton on the formula), never from the table.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import numpy as np

from .arb_bound import piece_bound
from .branches import analyze
from .errors import CertificationError
from .evaluate import eval_code_class, number, segment_index
from .reference import BranchReference

__all__ = ["certify_table", "branch_reference", "branch_sample_range", "float_values"]

F32_MAX = float(np.finfo(np.float32).max)
CHUNK = 1 << 22


_ANALYSES: dict[str, object] = {}


def _key(table: dict) -> str:
    return json.dumps({k: table[k] for k in ("name", "formula", "params", "param_domain", "torch_forward")},
                      sort_keys=True)


def remember_analysis(table: dict, analysis) -> None:
    """Let certification reuse the branch analysis the fitter made of the same formula."""
    _ANALYSES[_key(table)] = analysis


def _branches(table: dict):
    key = _key(table)
    if key not in _ANALYSES:
        from .pipeline import spec_from_table
        _ANALYSES[key] = analyze(spec_from_table(table))
    return _ANALYSES[key].branches


def branch_reference(table: dict, index: int) -> BranchReference | None:
    b = _branches(table)[index]
    return None if b.flat else BranchReference(b, table["target"])


def branch_sample_range(table: dict, index: int) -> tuple[float, float]:
    """The branch's y range, with infinite ends replaced by the float32 extremes."""
    lo, hi = (number(v) for v in table["branches"][index]["y_range"])
    return max(lo, -F32_MAX), min(hi, F32_MAX)


def float_values(dtype: str) -> np.ndarray:
    """Every finite value of bf16 or fp16, as float64, sorted."""
    bits = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(invalid="ignore"):
        return _finite_sorted(bits, dtype)


def _finite_sorted(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "fp16":
        vals = bits.astype(np.uint16).view(np.float16).astype(np.float64)
    else:
        vals = (bits << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    return np.unique(vals[np.isfinite(vals)])


def _f32_ordinal(v: float) -> int:
    """Monotone integer index of a float32 value (negative values below positive ones)."""
    i = int(np.array(v, dtype=np.float32).view(np.int32))
    return i if i >= 0 else -(i & 0x7FFFFFFF)


def _f32_from_ordinal(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, dtype=np.int64)
    bits = np.where(k >= 0, k, (-k) | 0x80000000).astype(np.uint32)
    return bits.view(np.float32)


def certify_table(table: dict, exhaustive: bool = False, fp32_samples: int = 2**24,
                  progress: Callable[[float, str], None] | None = None) -> dict:
    """A certificate dict (see docs/table-format.md); raises CertificationError if a bound fails."""
    say = progress or (lambda frac, label: None)
    branches = _branches(table)
    heavy = [b.index for b in branches if not b.flat]
    # Branches are independent: one forked process each (fork keeps the analysis). Not after torch
    # is imported (forking its thread pools is unsafe), nor for --exhaustive (one progress bar).
    parallel = not exhaustive and "torch" not in sys.modules
    workers = min(len(heavy), os.cpu_count() or 1, 2) if parallel else 1
    if workers > 1:
        say(0.0, f"{len(heavy)} branches on {workers} processes")
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            done = dict(zip(heavy, pool.map(_certify_branch, [(table, i, exhaustive, fp32_samples) for i in heavy])))
    else:
        done = {i: _certify_branch((table, i, exhaustive, fp32_samples),
                                   lambda frac, label, i=i: say((heavy.index(i) + frac) / len(heavy), label))
                for i in heavy}
    results = [done.get(b.index) or {"index": b.index, "approx_error": 0.0, "bf16_eval_error": 0.0,
                                     "fp16_eval_error": 0.0, "fp32_eval_error": 0.0, "fp32_samples": 0,
                                     "fp32_exhaustive": exhaustive, "method": "constant"}
               for b in branches]
    say(1.0, "done")
    return {
        "method": "arb-taylor2",
        "approx_error": max(r["approx_error"] for r in results),
        "float32_eval_error": max(max(r["bf16_eval_error"], r["fp16_eval_error"], r["fp32_eval_error"])
                                  for r in results),
        "checks": ["rigorous", "bf16-exhaustive", "fp16-exhaustive",
                   "fp32-exhaustive" if exhaustive else f"fp32-stratified-{fp32_samples}"],
        "branches": results,
    }


def _certify_branch(job, say=lambda frac, label: None) -> dict:
    table, i, exhaustive, fp32_samples = job
    b = _branches(table)[i]
    ref = BranchReference(b, table["target"])
    say(0.0, f"branch {i}: rigorous bound")
    approx, method = _rigorous(table, i, b, ref)
    entry = {"index": i, "approx_error": approx, "method": method}
    for dt in ("bf16", "fp16"):
        say(0.05, f"branch {i}: every {dt} value")
        entry[f"{dt}_eval_error"] = _eval_error(table, i, ref, float_values(dt))
    label = "every fp32 value" if exhaustive else f"{fp32_samples} stratified fp32 values"
    entry["fp32_eval_error"], entry["fp32_samples"] = _fp32_error(
        table, i, ref, None if exhaustive else fp32_samples,
        lambda frac: say(0.1 + 0.9 * frac, f"branch {i}: {label} ({frac:.0%})"))
    entry["fp32_exhaustive"] = exhaustive
    return entry


def _rigorous(table: dict, index: int, b, ref: BranchReference) -> tuple[float, str]:
    """Max over the branch's segments of a proved bound (poly), 0 (exact), or a dense check (tails)."""
    worst, methods = 0.0, set()
    tol = table["tolerance"]
    for cc in table["code_classes"]:
        for seg in cc["segments"]:
            if seg["branch"] != index or seg.get("cutoff"):
                continue
            lo, hi = (number(v) for v in seg["y_range"])
            if seg["kind"] == "poly":
                xa, xb = sorted(float(v) for v in ref.inverse(np.array([lo, hi])))
                xa, xb = xa - 1e-15 * max(1.0, abs(xa)), xb + 1e-15 * max(1.0, abs(xb))
                bound, _, proved = piece_bound(b.expr, seg, table["target"], xa, xb, tol)
                if not proved:
                    raise CertificationError(f"{table['name']}: piece on y in [{lo:g}, {hi:g}] of branch {index} "
                                             f"could not be proved within {tol:g} (reached {bound:.3g})")
                worst = max(worst, bound)
                methods.add("arb-taylor2")
            elif seg["kind"] == "constant":
                worst = max(worst, _tail_check(table, seg, ref, lo, hi))
                methods.add("dense-tail")
            else:
                methods.add("exact")
    return worst, "+".join(sorted(methods))


def _tail_check(table, seg, ref, lo, hi) -> float:
    """Constant tails: |g - value| on 200k points dense in x (the tail's g is monotone there)."""
    lo, hi = max(lo, -F32_MAX), min(hi, F32_MAX)
    xa, xb = sorted(float(v) for v in ref.inverse(np.array([lo, hi])))
    x = np.concatenate([np.linspace(xa, min(xb, xa + 1e3), 100_000), np.geomspace(1, 1 + xb - xa, 100_000) + xa - 1])
    x = x[(x >= xa) & (x <= xb)]
    return float(np.max(np.abs(ref.value(x) - number(seg["value"], table["params"])), initial=0.0))


def _eval_error(table: dict, index: int, ref: BranchReference, y: np.ndarray) -> float:
    lo, hi = branch_sample_range(table, index)
    y = y[(y >= lo) & (y <= hi)]
    return _max_error(table, index, ref, y.astype(np.float32))


def _max_error(table: dict, index: int, ref: BranchReference, y32: np.ndarray) -> float:
    if y32.size == 0:
        return 0.0
    cc = table["code_classes"][table["branches"][index]["code"]]
    own = np.array([s["branch"] == index and not s.get("cutoff") for s in cc["segments"]])
    mine = own[segment_index(cc["y_breaks"], y32, table["params"])]   # ties owned by another branch
    y32 = y32[mine]
    got = eval_code_class(cc, y32, table["params"]).astype(np.float64)
    want = ref(y32.astype(np.float64))
    err = np.abs(got - want) / np.maximum(1.0, np.abs(want))   # absolute below 1, relative above
    bad = ~np.isfinite(err) & np.isfinite(want)
    if bad.any():
        return math.inf
    return float(np.max(err, initial=0.0))


def _fp32_error(table, index, ref, samples: int | None, tick) -> tuple[float, int]:
    lo, hi = branch_sample_range(table, index)
    k_lo, k_hi = _f32_ordinal(lo), _f32_ordinal(hi)
    total = k_hi - k_lo + 1
    if samples is None or samples >= total:
        ks = None
        n = total
    else:
        rng = np.random.default_rng(20241128 + index)
        edges = k_lo + (np.arange(samples + 1, dtype=np.float64) * total / samples).astype(np.int64)
        ks = edges[:-1] + (rng.random(samples) * np.maximum(edges[1:] - edges[:-1], 1)).astype(np.int64)
        n = samples
    worst, start = 0.0, 0
    while start < n:
        stop = min(n, start + CHUNK)
        chunk = ks[start:stop] if ks is not None else np.arange(k_lo + start, k_lo + stop, dtype=np.int64)
        y32 = _f32_from_ordinal(chunk)
        worst = max(worst, _max_error(table, index, ref, y32[np.isfinite(y32)]))
        start = stop
        tick(start / n)
    return worst, n
