"""Certification of a table, independent of how it was fitted.

Per branch: a rigorous real-arithmetic bound per poly piece (:mod:`.arb_bound`); the emulated float32
evaluation at every bf16 and every fp16 value of y in the branch's range; a stratified sample of
float32 values (or all of them with ``exhaustive``). References come from :class:`BranchReference`
(float64 bracketed Newton on the formula, in its bulk mode), never from the table.

The work is split into independent jobs (a rigorous bound per piece, the bf16/fp16 checks per
branch, runs of 2^22 float32 values) run by forked worker processes; the figures do not depend on
the split (maxima over the same values; the stratified sample's generator is advanced to each run).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .arb_bound import piece_bound
from .branches import analyze
from .errors import CertificationError
from .evaluate import eval_code_class, number, segment_index
from .reference import BranchReference

__all__ = ["certify_table", "branch_reference", "branch_sample_range", "float_values"]

F32_MAX = float(np.finfo(np.float32).max)
CHUNK = 1 << 16                 # float32 values per vectorised pass (cache-sized)
TICK = 1 << 22                  # progress is reported every this many float32 values


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
    keys = [_reference_key(table, i) for i in heavy]
    try:
        for i in heavy:                      # built before forking: every worker inherits them
            _reference(table, i)
        results, jobs = _run_jobs(table, _jobs(table, heavy, exhaustive, fp32_samples), say, exhaustive)
    finally:
        for key in keys:
            _REFERENCES.pop(key, None)
    per_branch = {i: {"index": i, "approx_error": 0.0, "method": set()} for i in heavy}
    fp32 = {i: 0.0 for i in heavy}
    for job, res in zip(jobs, results):
        entry = per_branch[job.branch]
        if job.kind == "fp32":
            fp32[job.branch] = max(fp32[job.branch], res)
        elif job.kind == "segment":
            bound, method = res
            entry["approx_error"] = max(entry["approx_error"], bound)
            entry["method"].add(method)
        else:
            entry["approx_error"] = max(entry["approx_error"], res["approx_error"])
            entry["method"] |= res["method"]
            entry["bf16_eval_error"], entry["fp16_eval_error"] = res["bf16_eval_error"], res["fp16_eval_error"]
    for i, entry in per_branch.items():
        entry["method"] = "+".join(sorted(entry["method"]))
        entry["fp32_eval_error"] = fp32[i]
        entry["fp32_samples"] = _fp32_count(table, i, None if exhaustive else fp32_samples)
        entry["fp32_exhaustive"] = exhaustive
    results = [per_branch.get(b.index) or {"index": b.index, "approx_error": 0.0, "bf16_eval_error": 0.0,
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
        "branches": [{k: r[k] for k in _ENTRY_KEYS} for r in results],
    }


def _run_jobs(table: dict, jobs: list, say, every_job: bool = False) -> tuple[list, list]:
    """(each job's result, the jobs). Jobs are independent: forked worker processes (fork keeps the
    analysis and the references) share them; not after torch is imported (forking its thread pools
    is unsafe). Progress: after every job (``every_job``: long runs), else after each quarter."""
    total = sum(j.weight for j in jobs)
    results: list = []
    done = 0.0
    workers = min(len(jobs), _cpus(), MAX_WORKERS) if "torch" not in sys.modules else 1
    if workers <= 1:
        for job in jobs:
            results.append(_run_job(table, job, lambda frac, job=job, done=done: say(
                (done + frac * job.weight) / total, f"branch {job.branch}: {job.label} ({frac:.0%})")))
            done += job.weight
        return results, jobs
    say(0.0, f"{len(jobs)} jobs on {workers} processes")
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        futures = [pool.submit(_run_job, table, job) for job in jobs]
        for job, fut in zip(jobs, futures):
            results.append(fut.result())
            step = int(4 * done / total)
            done += job.weight
            if every_job or (int(4 * done / total) > step and done < total):
                say(done / total, f"branch {job.branch}: {job.label}")
    finally:                       # a failed bound (or ^C) stops the other jobs at once
        pool.shutdown(wait=True, cancel_futures=True)
    return results, jobs


_ENTRY_KEYS = ("index", "approx_error", "method", "bf16_eval_error", "fp16_eval_error", "fp32_eval_error",
               "fp32_samples", "fp32_exhaustive")
MAX_WORKERS = 8
JOB_VALUES = 1 << 22            # float32 values per fp32 job (a few tenths of a second)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:     # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class _Job:
    kind: str                  # segment | half | fp32
    branch: int
    weight: float              # rough cost, for progress
    label: str
    segment: tuple[int, int] = (0, 0)     # (code class, segment) of a poly piece
    span: tuple[int, int] = (0, 0)        # fp32 values [start, stop) of the branch's sequence
    samples: int | None = None            # of the stratified sample (None: every float32 value)


def _jobs(table: dict, heavy: list[int], exhaustive: bool, fp32_samples: int) -> list[_Job]:
    """Per branch: one job per poly piece's rigorous bound (the costliest, first), one for the
    exhaustive bf16/fp16 checks with the branch's tails and exact segments, and the float32 values
    in runs of JOB_VALUES."""
    bounds, halves, fp32 = [], [], []
    for i in heavy:
        for c, cc in enumerate(table["code_classes"]):
            for s, seg in enumerate(cc["segments"]):
                if seg["branch"] == i and not seg.get("cutoff") and seg["kind"] == "poly":
                    bounds.append(_Job("segment", i, 2.0 * JOB_VALUES, "rigorous bound", segment=(c, s)))
        halves.append(_Job("half", i, 0.1 * JOB_VALUES, "every bf16 and fp16 value"))
        n = _fp32_count(table, i, None if exhaustive else fp32_samples)
        per = JOB_VALUES if not exhaustive else 1 << 24
        label = "every fp32 value" if exhaustive else f"{fp32_samples} stratified fp32 values"
        parts = -(-n // per)
        fp32 += [_Job("fp32", i, float(min(n, a + per) - a),
                      label + (f", part {k + 1}/{parts}" if parts > 1 else ""), span=(a, min(n, a + per)),
                      samples=None if exhaustive else fp32_samples) for k, a in enumerate(range(0, n, per))]
    return bounds + halves + fp32


def _run_job(table: dict, job: _Job, tick=lambda frac: None):
    i = job.branch
    ref = _reference(table, i)
    if job.kind == "segment":
        c, s = job.segment
        return _segment_bound(table, i, _branches(table)[i], ref, table["code_classes"][c]["segments"][s])
    if job.kind == "half":
        worst, methods = 0.0, set()
        for cc in table["code_classes"]:       # tails and exact segments: cheap
            for seg in cc["segments"]:
                if seg["branch"] == i and not seg.get("cutoff") and seg["kind"] != "poly":
                    bound, method = _segment_bound(table, i, _branches(table)[i], ref, seg)
                    worst, methods = max(worst, bound), methods | {method}
        return {"bf16_eval_error": _eval_error(table, i, ref, float_values("bf16")),
                "fp16_eval_error": _eval_error(table, i, ref, float_values("fp16")),
                "approx_error": worst, "method": methods}
    return _fp32_error(table, i, ref, job.samples, job.span, tick)


def _reference_key(table: dict, index: int) -> tuple:
    return _key(table), table["target"], index


def _reference(table: dict, index: int) -> BranchReference:
    key = _reference_key(table, index)
    if key not in _REFERENCES:
        _REFERENCES[key] = BranchReference(_branches(table)[index], table["target"], bulk=True)
    return _REFERENCES[key]


_REFERENCES: dict = {}


def _segment_bound(table: dict, index: int, b, ref: BranchReference, seg: dict) -> tuple[float, str]:
    """A proved bound (poly), 0 (exact), or a dense check (constant tails), with its method."""
    tol = table["tolerance"]
    lo, hi = (number(v) for v in seg["y_range"])
    if seg["kind"] == "poly":   # the piece's ends in x: two values, by the default mode (as the fitter)
        xa, xb = sorted(float(v) for v in ref.inverse(np.array([lo, hi]), bulk=False))
        xa, xb = xa - 1e-15 * max(1.0, abs(xa)), xb + 1e-15 * max(1.0, abs(xb))
        bound, _, proved = piece_bound(b.expr, seg, table["target"], xa, xb, tol)
        if not proved:
            raise CertificationError(f"{table['name']}: piece on y in [{lo:g}, {hi:g}] of branch {index} "
                                     f"could not be proved within {tol:g} (reached {bound:.3g})")
        return bound, "arb-taylor2"
    if seg["kind"] == "constant":
        return _tail_check(table, seg, ref, lo, hi), "dense-tail"
    return 0.0, "exact"


def _tail_check(table, seg, ref, lo, hi) -> float:
    """Constant tails: |g - value| on 200k points dense in x (the tail's g is monotone there)."""
    lo, hi = max(lo, -F32_MAX), min(hi, F32_MAX)
    xa, xb = sorted(float(v) for v in ref.inverse(np.array([lo, hi]), bulk=False))
    x = np.concatenate([np.linspace(xa, min(xb, xa + 1e3), 100_000), np.geomspace(1, 1 + xb - xa, 100_000) + xa - 1])
    x = x[(x >= xa) & (x <= xb)]
    return float(np.max(np.abs(ref.value(x, bulk=False) - number(seg["value"], table["params"])), initial=0.0))


def _eval_error(table: dict, index: int, ref: BranchReference, y: np.ndarray) -> float:
    lo, hi = branch_sample_range(table, index)
    y = y[(y >= lo) & (y <= hi)]
    return _max_error(table, index, ref, y.astype(np.float32))


def _max_error(table: dict, index: int, ref: BranchReference, y32: np.ndarray) -> float:
    if y32.size == 0:
        return 0.0
    cc = table["code_classes"][table["branches"][index]["code"]]
    own = np.array([s["branch"] == index and not s.get("cutoff") for s in cc["segments"]])
    if not own.all():
        mine = own[segment_index(cc["y_breaks"], y32, table["params"])]   # ties owned by another branch
        y32 = y32[mine]
    got = eval_code_class(cc, y32, table["params"]).astype(np.float64)
    want = ref(y32.astype(np.float64))
    err = np.abs(got - want)
    err /= np.maximum(1.0, np.abs(want))   # absolute below 1, relative above
    worst = float(np.max(err, initial=0.0))
    if math.isfinite(worst):
        return worst
    finite = np.isfinite(want)              # where g itself is infinite there is no error to measure
    if (~np.isfinite(err) & finite).any():
        return math.inf
    return float(np.max(err[finite], initial=0.0))


def _fp32_count(table: dict, index: int, samples: int | None) -> int:
    """How many float32 values the branch's fp32 check covers (all of them: ``samples`` None)."""
    lo, hi = branch_sample_range(table, index)
    total = _f32_ordinal(hi) - _f32_ordinal(lo) + 1
    return total if samples is None or samples >= total else samples


def _fp32_error(table, index, ref, samples: int | None, span: tuple[int, int], tick) -> float:
    """Max error over values [start, stop) of the branch's fp32 sequence: every float32 in the
    branch's range in order (exhaustive), or the stratified sample, value j drawn uniformly from
    the j-th of ``samples`` equal runs of float32 ordinals (generator seeded per branch, so any
    span gives the values the whole sequence has there)."""
    lo, hi = branch_sample_range(table, index)
    k_lo, k_hi = _f32_ordinal(lo), _f32_ordinal(hi)
    total = k_hi - k_lo + 1
    start, stop = span
    worst = 0.0
    rng = None
    for a in range(start, stop, CHUNK):
        b = min(stop, a + CHUNK)
        if samples is None or samples >= total:
            ks = np.arange(k_lo + a, k_lo + b, dtype=np.int64)
        else:
            if rng is None:
                rng = np.random.default_rng(20241128 + index)
                rng.bit_generator.advance(a)
            edges = k_lo + (np.arange(a, b + 1, dtype=np.float64) * total / samples).astype(np.int64)
            ks = edges[:-1] + (rng.random(b - a) * np.maximum(edges[1:] - edges[:-1], 1)).astype(np.int64)
        y32 = _f32_from_ordinal(ks)
        finite = np.isfinite(y32)
        worst = max(worst, _max_error(table, index, ref, y32 if finite.all() else y32[finite]))
        if b == stop or (b - start) % TICK == 0:
            tick((b - start) / (stop - start))
    return worst
