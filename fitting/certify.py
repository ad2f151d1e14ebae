"""Certification of a table, independent of how it was fitted.

Per branch: a rigorous real-arithmetic bound per poly piece (:mod:`.arb_bound`); the emulated float32
evaluation at every bf16 and every fp16 value of y in the branch's range; a stratified sample of
float32 values (or all of them with ``exhaustive``), and the float32 values next to every finite end
of the branch's segments (:func:`segment_end_values`), where a closed form cancels. Each float check
measures the scheme twice at the same values against one reference: as written, and with its Horner
steps fused (FMA). References come from :class:`BranchReference` (float64 bracketed Newton on the
formula, in its bulk mode), never from the table.

The work is split into independent jobs (a rigorous bound per piece, the bf16/fp16 checks per
branch, runs of 2^22 float32 values) run by forked worker processes; the figures do not depend on
the split (maxima over the same values; the stratified sample's generator is advanced to each run).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from .branches import Analysis, analyze
from .errors import InputError
from .float32 import end_neighbours, from_ordinal, half_values, ordinal, overflows_as
from .interrupts import HELD, signals_deferred
from .model import BoundContext, Table, segment_index, spec_of
from .reference import BranchReference
from .settings import FP32_SAMPLES, MAX_FP32_SAMPLES

__all__ = ["certify_table", "analysis_of", "branch_reference", "branch_sample_range", "check_fp32_samples",
           "worst_value", "worst_fp32_value", "segment_end_values", "EVAL_KEYS", "FP32_SAMPLES",
           "MAX_FP32_SAMPLES"]

CHUNK = 1 << 16                 # float32 values per vectorised pass (cache-sized)
TICK = 1 << 22                  # progress is reported every this many float32 values


def _key(table: Table) -> str:
    return json.dumps({"name": table.name, "formula": table.formula, "params": table.params,
                       "param_domain": table.param_domain, "torch_forward": table.torch_forward}, sort_keys=True)


def analysis_of(table: Table | dict) -> Analysis:
    """The branch analysis of a table's formula (what the fitter made of it: the same function of the
    same formula), computed once per formula and parameters."""
    return _analysis(_key(Table.of(table)))


@lru_cache(maxsize=64)
def _analysis(key: str) -> Analysis:
    return analyze(spec_of(**json.loads(key)))


def branch_reference(table: Table | dict, index: int, analysis: Analysis | None = None) -> BranchReference | None:
    """The float64 reference of branch ``index`` (None for a flat branch)."""
    table = Table.of(table)
    b = (analysis or analysis_of(table)).branches[index]
    return None if b.flat else BranchReference(b, table.target)


def branch_sample_range(table: Table | dict, index: int) -> tuple[float, float]:
    """The branch's y range, with infinite ends replaced by the float32 extremes."""
    return Table.of(table).branches[index].sample_range()


@dataclass(frozen=True)
class _Run:
    """One certification: the table, its analysis' branches and a bulk reference per fitted branch."""

    table: Table
    branches: list
    refs: dict[int, BranchReference]

    def context(self, index: int) -> BoundContext:
        t = self.table
        return BoundContext(t.name, index, self.branches[index].expr, self.refs[index], t.target, t.tolerance,
                            t.params)


_RUN: _Run | None = None   # the run in progress, set for its duration: forked workers inherit it


def check_fp32_samples(fp32_samples: int) -> None:
    """InputError unless ``fp32_samples`` is an int in [1, MAX_FP32_SAMPLES]."""
    if isinstance(fp32_samples, bool) or not isinstance(fp32_samples, int) or fp32_samples < 1:
        raise InputError(f"--fp32-samples (fp32_samples) must be a positive integer, got {fp32_samples!r}")
    if fp32_samples > MAX_FP32_SAMPLES:
        raise InputError(f"--fp32-samples (fp32_samples) {fp32_samples} is more than the 2**32 float32 values "
                         "there are; use at most 2**32 = 4294967296 (`invact certify --exhaustive` checks "
                         "every value of every branch)")


def certify_table(table: Table | dict, exhaustive: bool = False, fp32_samples: int = FP32_SAMPLES,
                  progress: Callable[[float, str], None] | None = None, analysis: Analysis | None = None) -> dict:
    """A certificate dict (see docs/table-format.md); raises CertificationError if a bound fails.

    ``analysis``: the branch analysis of the table's formula (the fitter passes its own), else
    :func:`analysis_of`."""
    global _RUN
    check_fp32_samples(fp32_samples)
    say = progress or (lambda frac, label: None)
    table = Table.of(table)
    branches = (analysis or analysis_of(table)).branches
    heavy = [b.index for b in branches if not b.flat]
    # references are built before forking: every worker inherits them
    run = _Run(table, branches, {i: BranchReference(branches[i], table.target, bulk=True) for i in heavy})
    try:
        _RUN = run
        results, jobs = _run_jobs(_jobs(table, heavy, exhaustive, fp32_samples), say, exhaustive)
    finally:
        _RUN = None
    per_branch = {i: {"index": i, "approx_error": 0.0, "method": set()} for i in heavy}
    fp32 = {i: (0.0, 0.0) for i in heavy}         # (without FMA, with FMA)
    for job, res in zip(jobs, results):
        entry = per_branch[job.branch]
        if job.kind == "fp32":
            fp32[job.branch] = tuple(map(max, fp32[job.branch], res))
        elif job.kind == "segment":
            bound, method = res
            entry["approx_error"] = max(entry["approx_error"], bound)
            entry["method"].add(method)
        else:
            entry["approx_error"] = max(entry["approx_error"], res["approx_error"])
            entry["method"] |= res["method"]
            entry.update({k: res[k] for k in _HALF_KEYS})
            fp32[job.branch] = tuple(map(max, fp32[job.branch], res["fp32_ends"]))
    for i, entry in per_branch.items():
        entry["method"] = "+".join(sorted(entry["method"]))
        entry["fp32_eval_error"], entry["fp32_fma_eval_error"] = fp32[i]
        entry["fp32_samples"] = _fp32_count(table, i, None if exhaustive else fp32_samples)
        entry["fp32_exhaustive"] = exhaustive
    results = [per_branch.get(b.index) or {"index": b.index, "approx_error": 0.0, **dict.fromkeys(EVAL_KEYS, 0.0),
                                           "fp32_samples": 0, "fp32_exhaustive": exhaustive, "method": "constant"}
               for b in branches]
    say(1.0, "done")
    return {
        "method": "arb-taylor2",
        "approx_error": max(r["approx_error"] for r in results),
        "float32_eval_error": max(max(r[k] for k in EVAL_KEYS[:3]) for r in results),
        "float32_fma_eval_error": max(max(r[k] for k in EVAL_KEYS[3:]) for r in results),
        "checks": ["rigorous", "bf16-exhaustive", "fp16-exhaustive",
                   "fp32-exhaustive" if exhaustive else f"fp32-stratified-{fp32_samples}"],
        "branches": [{k: r[k] for k in _ENTRY_KEYS} for r in results],
    }


def _run_jobs(jobs: list, say, every_job: bool = False) -> tuple[list, list]:
    """(each job's result, the jobs). Jobs are independent: forked worker processes (fork keeps the
    run: analysis and references) share them; not after torch is imported (forking its thread pools
    is unsafe). Progress: after every job (``every_job``: long runs), else after each quarter."""
    total = sum(j.weight for j in jobs)
    results: list = []
    done = 0.0
    workers = min(len(jobs), _cpus(), MAX_WORKERS) if "torch" not in sys.modules else 1
    if workers <= 1:
        for job in jobs:
            results.append(_run_job(job, lambda frac, job=job, done=done: say(
                (done + frac * job.weight) / total, f"branch {job.branch}: {job.label} ({frac:.0%})")))
            done += job.weight
        return results, jobs
    say(0.0, f"{len(jobs)} jobs on {workers} processes")
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_ignore_signals)
    try:
        with signals_deferred():   # the workers fork here: a signal before their initializer is held
            futures = [pool.submit(_run_job, job) for job in jobs]
        for job, fut in zip(jobs, futures):
            results.append(fut.result())
            step = int(4 * done / total)
            done += job.weight
            if every_job or (int(4 * done / total) > step and done < total):
                say(done / total, f"branch {job.branch}: {job.label}")
    except BaseException:          # a failed bound, ^C or SIGTERM stops the other jobs at once
        with signals_deferred():   # (a second ^C must not leave workers running)
            _stop(pool)
        raise
    pool.shutdown(wait=True)
    return results, jobs


def _ignore_signals() -> None:
    """A worker's initializer: SIGINT/SIGTERM sent to the process group (^C, `timeout`) are the
    parent's to handle (it stops the workers); raised in a worker, they could leave the pool's
    queue locked and the parent waiting on it."""
    for sig in HELD:
        signal.signal(sig, signal.SIG_IGN)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Kill the workers (they ignore SIGTERM) and shut the pool down without waiting for jobs."""
    kill = getattr(pool, "kill_workers", None)           # Python 3.14; before, the pool's processes
    if kill is not None:
        kill()
    else:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


# per branch: the float32 scheme's error without FMA, then with (docs/table-format.md, CERT)
EVAL_KEYS = ("bf16_eval_error", "fp16_eval_error", "fp32_eval_error",
              "bf16_fma_eval_error", "fp16_fma_eval_error", "fp32_fma_eval_error")
_HALF_KEYS = tuple(k for k in EVAL_KEYS if not k.startswith("fp32"))
_ENTRY_KEYS = ("index", "approx_error", "method", *EVAL_KEYS, "fp32_samples", "fp32_exhaustive")
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
    segment: tuple[int, int] = (0, 0)     # (code class, segment) of a fitted piece
    span: tuple[int, int] = (0, 0)        # fp32 values [start, stop) of the branch's sequence
    samples: int | None = None            # of the stratified sample (None: every float32 value)


def _jobs(table: Table, heavy: list[int], exhaustive: bool, fp32_samples: int) -> list[_Job]:
    """Per branch: one job per fitted piece's rigorous bound (the costliest, first), one for the
    exhaustive bf16/fp16 checks with the branch's other segments (tails, closed forms), and the
    float32 values in runs of JOB_VALUES."""
    bounds, halves, fp32 = [], [], []
    for i in heavy:
        for c, cc in enumerate(table.code_classes):
            for s, seg in enumerate(cc.segments):
                if seg.branch == i and seg.certified and seg.fitted:
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


def _run_job(job: _Job, tick=lambda frac: None):
    run = _RUN
    i = job.branch
    ctx = run.context(i)
    if job.kind == "segment":
        c, s = job.segment
        return run.table.code_classes[c].segments[s].bound(ctx)
    if job.kind == "half":
        worst, methods = 0.0, set()
        for _, seg in run.table.segments(i):       # tails and closed forms: cheap
            if seg.certified and not seg.fitted:
                bound, method = seg.bound(ctx)
                worst, methods = max(worst, bound), methods | {method}
        (bf16, bf16_fma), (fp16, fp16_fma) = (_eval_error(run.table, i, ctx.ref, half_values(d))
                                              for d in ("bf16", "fp16"))
        return {"bf16_eval_error": bf16, "fp16_eval_error": fp16, "bf16_fma_eval_error": bf16_fma,
                "fp16_fma_eval_error": fp16_fma, "approx_error": worst, "method": methods,
                "fp32_ends": _eval_error(run.table, i, ctx.ref, segment_end_values(run.table, i))}
    return _fp32_error(run.table, i, ctx.ref, job.samples, job.span, tick)


def segment_end_values(table: Table, index: int) -> np.ndarray:
    """The float32 values next to every finite end of the branch's segments, inside each segment
    (:func:`.float32.end_neighbours`): checked besides the stratified sample (and by the exhaustive
    check anyway), since there a closed form's float32 evaluation cancels (y + 0.3 at the float32
    next to -0.3 keeps 0.3's float32 rounding error: 4*(y + 0.3)**(3/4) is 3e-6 off there)."""
    ys = [end_neighbours(seg.lo, seg.hi) for _, seg in table.segments(index) if seg.certified]
    return np.unique(np.concatenate(ys)) if ys else np.empty(0)


def _eval_error(table: Table, index: int, ref: BranchReference, y: np.ndarray) -> tuple[float, float]:
    """(max error without FMA, with FMA) of the float32 scheme at the values ``y`` in the branch."""
    lo, hi = branch_sample_range(table, index)
    y = y[(y >= lo) & (y <= hi)]
    return _max_error(table, index, ref, y.astype(np.float32))


def _max_error(table: Table, index: int, ref: BranchReference, y32: np.ndarray) -> tuple[float, float]:
    """(without FMA, with FMA): one reference, both schemes evaluated at the same float32 values."""
    return tuple(float(np.max(e, initial=0.0)) for e in _value_errors(table, index, ref, y32)[1:])


def _value_errors(table: Table, index: int, ref: BranchReference,
                  y32: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the float32 values of ``y32`` that the branch owns, the error there without FMA, with FMA)
    (:func:`_errors`), a closed form's over every library within LIBRARY_ULPS of its calls' exact results
    (:meth:`.scheme.ClosedForm.spread`)."""
    if y32.size == 0:
        return y32, np.zeros(0), np.zeros(0)
    cc = table.code_class_of(index)
    own = np.array([s.branch == index and s.certified for s in cc.segments])
    if not own.all():
        mine = own[segment_index(cc.y_breaks, y32, table.params)]   # ties owned by another branch
        y32 = y32[mine]
    want = ref(y32.astype(np.float64))
    plain, fma = (np.max(_errors(got.astype(np.float64), want), axis=0)     # the least and the greatest g~
                  for got in cc.evaluate_schemes(y32, table.params, spread=True))
    return y32, plain, fma


def worst_value(table: Table | dict, index: int, ref: BranchReference, y: np.ndarray) -> tuple[float, float]:
    """(the value of ``y`` (as float32) in branch ``index``'s range where either float32 scheme misses
    g most, that error); (nan, 0) where none of ``y`` lies there."""
    table = Table.of(table)
    lo, hi = branch_sample_range(table, index)
    y = y[(y >= lo) & (y <= hi)]
    y32, plain, fma = _value_errors(table, index, ref, y.astype(np.float32))
    err = np.maximum(plain, fma)
    if err.size == 0:
        return math.nan, 0.0
    k = int(np.argmax(err))
    return float(y32[k]), float(err[k])


def _errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| / max(1, |want|) per value (absolute below 1, relative above); inf where float32
    gave NaN or inf and g is finite, unless g rounds to that float32 inf (:func:`.float32.overflows_as`);
    0 where g itself is infinite: there is no error to measure."""
    with np.errstate(all="ignore"):
        err = np.where(overflows_as(got, want), 0.0, np.abs(got - want)) / np.maximum(1.0, np.abs(want))
    return np.where(np.isfinite(want), np.nan_to_num(err, nan=math.inf, posinf=math.inf), 0.0)


def _fp32_count(table: Table, index: int, samples: int | None) -> int:
    """How many float32 values the branch's fp32 check covers (all of them: ``samples`` None)."""
    lo, hi = branch_sample_range(table, index)
    total = ordinal(hi) - ordinal(lo) + 1
    return total if samples is None or samples >= total else samples


def _fp32_error(table: Table, index, ref, samples: int | None, span: tuple[int, int], tick) -> tuple[float, float]:
    """Max error (without FMA, with FMA) over values [start, stop) of the branch's fp32 sequence
    (:func:`_fp32_values`)."""
    worst = (0.0, 0.0)
    for y32 in _fp32_values(table, index, samples, span, tick):
        worst = tuple(map(max, worst, _max_error(table, index, ref, y32)))
    return worst


def worst_fp32_value(table: Table | dict, index: int, ref: BranchReference,
                     samples: int | None) -> tuple[float, float]:
    """:func:`worst_value` over the branch's whole fp32 sequence (:func:`_fp32_values`): where the
    fp32 check found its largest error."""
    table = Table.of(table)
    best = (math.nan, 0.0)
    for y32 in _fp32_values(table, index, samples, (0, _fp32_count(table, index, samples))):
        y, err = worst_value(table, index, ref, y32)
        if err > best[1]:
            best = (y, err)
    return best


def _fp32_values(table: Table, index, samples: int | None, span: tuple[int, int], tick=lambda frac: None):
    """The finite float32 values [start, stop) of the branch's fp32 sequence, in chunks: every float32
    in the branch's range in order (exhaustive), or the stratified sample, value j drawn uniformly from
    the j-th of ``samples`` equal runs of float32 ordinals (generator seeded per branch, so any span
    gives the values the whole sequence has there)."""
    lo, hi = branch_sample_range(table, index)
    k_lo, k_hi = ordinal(lo), ordinal(hi)
    total = k_hi - k_lo + 1
    start, stop = span
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
        y32 = from_ordinal(ks)
        finite = np.isfinite(y32)
        yield y32 if finite.all() else y32[finite]
        if b == stop or (b - start) % TICK == 0:
            tick((b - start) / (stop - start))
