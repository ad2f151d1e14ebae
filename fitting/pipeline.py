"""Formula -> branches -> exact forms or piecewise fits -> code classes -> certified table (a dict).

The steps below :func:`build_table`: :mod:`.ends` (a fitted branch's y range and tails),
:mod:`.codes` (forward code, code classes, branch JSON), :mod:`.param_domain` (parameter-generic tables)."""

from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
import sympy as sp

from ..common import VERSION
from ..common.params import DEFAULT_TOLERANCE
from .branches import Branch, analyze
from .certify import (EVAL_KEYS, FP32_SAMPLES, certify_table, check_fp32_samples, segment_end_values,
                      worst_fp32_value, worst_value)
from .codes import branch_json, code_classes, forward_code
from .ends import fit_range
from .errors import CertificationError, FitError, InputError, ScaleError, SpecError
from .exact import exact_expression
from .fit import F32_SLACK, branch_layout, fit_branch, layout_cost, table_cost
from .float32 import F32_MAX, f32, half_values, ordinal_nodes
from .formulas import ActivationSpec
from .model import ConstantSegment, ExactSegment, Segment, Table, nan_gradients_json
from .param_domain import generic_holds, numeric_only, param_domain
from .pieces import removable_note
from .pytorch_probe import nan_gradients
from .reference import BranchReference
from .scan import NEAR_POINTS, SCAN, unresolved_at, unresolved_changes
from .segments import SCALE_MISS
from .settings import MAX_TOLERANCE, MIN_TOLERANCE, RATIONAL_MODES, tolerance_text
from .tables import FORMAT, FORMAT_VERSION, TARGETS

__all__ = ["build_table", "TARGETS", "RATIONAL_MODES", "FORMAT_VERSION", "MIN_TOLERANCE", "MAX_TOLERANCE"]


def build_table(spec: ActivationSpec, target: str = "derivative", tolerance: float = DEFAULT_TOLERANCE,
                fp32_samples: int = FP32_SAMPLES, progress: Callable[[str], None] | None = None,
                rationals: str = "auto") -> dict:
    """A complete, certified table (without its sha256) for ``spec``.

    ``rationals``: "auto" (rational pieces where they make the table cheaper to evaluate,
    ``fit.table_cost``), "never" (polynomials only) or "prefer" (a rational layout on every fitted
    branch that has one meeting the tolerance, whatever it costs; for comparisons and tests)."""
    if target not in TARGETS:
        raise InputError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if rationals not in RATIONAL_MODES:
        raise InputError(f"rationals must be one of {', '.join(RATIONAL_MODES)}, got {rationals!r}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise InputError(f"tolerance must be a positive number, got {tolerance!r}")
    if tolerance < MIN_TOLERANCE:
        raise FitError(f"tolerance {tolerance:g} is below what float32 coefficients can represent",
                       None, f"use --tolerance {tolerance_text(MIN_TOLERANCE)} or more")   # as --help writes it
    if tolerance > MAX_TOLERANCE:
        raise FitError(f"tolerance {tolerance:g} is above {MAX_TOLERANCE:g}: g's error is absolute where "
                       "|g| < 1 and relative above, so a tolerance near 1 lets g be 0; "
                       f"{tolerance_text(MAX_TOLERANCE)} is already coarser than bf16's rounding", None,
                       f"use --tolerance {MAX_TOLERANCE:g} or less")
    check_fp32_samples(fp32_samples)
    say = progress or (lambda msg: None)
    say(f"{spec.name}: analysing branches")
    options: dict[int, list[list[Segment]]] = {}
    exprs: dict[int, sp.Expr] = {}
    try:
        analysis = analyze(spec)
        for b in analysis.branches:
            say(f"{spec.name}: branch {b.index} ({b.direction}, x in [{b.x_range[0]:.4g}, {b.x_range[1]:.4g}])")
            options[b.index], exprs[b.index] = _branch_segments(b, spec, target, tolerance, rationals)
    except ScaleError as exc:
        raise ScaleError(f"{spec.name!r}: {exc}; {_scale_advice(spec)}") from None
    per_branch = _cheapest_table(options, analysis.n_codes) if rationals == "auto" else \
        {i: opts[-1] for i, opts in options.items()}
    generic = bool(spec.params) and all(not s.fitted for segs in per_branch.values() for s in segs) \
        and all(e is None or not numeric_only(e, b) for b in analysis.branches for e in [exprs[b.index]])
    domain = param_domain(spec, [e for e in exprs.values() if e is not None], analysis) if generic else None
    if domain is not None and not generic_holds(analysis, per_branch, exprs, spec, domain, target):
        domain = None     # the table of some values in the domain differs: made for the fitted values only
    generic = domain is not None
    branches = [branch_json(b, per_branch[b.index]) for b in analysis.branches]
    if not generic:    # closed forms with the parameters' values (the branches' tails keep their text)
        per_branch = {i: [s.substituted(spec.params) for s in segs] for i, segs in per_branch.items()}
    table = Table(FORMAT, FORMAT_VERSION, VERSION, spec.name, sp.sstr(spec.expr), dict(spec.params),
                  generic, domain if generic else list(spec.domain), spec.torch_forward, target,
                  float(tolerance), analysis.n_branches,
                  analysis.n_codes, analysis.code_bits, forward_code(analysis, spec, generic), branches,
                  code_classes(analysis, per_branch, spec, generic),
                  nan_gradients=nan_gradients_json(nan_gradients(spec.torch_forward, spec.params)))
    say(f"{spec.name}: certifying")
    try:
        table.certificate = certify_table(table, fp32_samples=fp32_samples, analysis=analysis,
                                          progress=lambda frac, label: say(f"{spec.name}: {label}"))
    except ScaleError as exc:    # a proof shows an error that float64 samples do not see (segments._proved)
        raise ScaleError(f"{exc}; {_scale_advice(spec)}") from None
    bad = [b["index"] for b in table.certificate["branches"]
           if not all(math.isfinite(b[k]) for k in ("approx_error", *EVAL_KEYS))]
    if bad:   # the fitter checks every segment first: reaching this is a bug, never a table to write
        raise CertificationError(f"{spec.name}: branch {bad[0]} evaluates to inf or NaN where g is finite")
    missed = [(b["index"], max(b[k] for k in EVAL_KEYS)) for b in table.certificate["branches"]]
    missed = [(i, e) for i, e in missed if e > SCALE_MISS * tolerance + F32_SLACK and target == "derivative"]
    if missed:   # g missed far beyond the fit's bound (an inverse's float32 error is not gated: fit.py)
        raise _missed_error(table, analysis.branches[missed[0][0]], missed[0][1], tolerance, spec, fp32_samples)
    return table.to_json()


# ---------------------------------------------------------------------------------------------

def _missed_error(table: Table, b: Branch, missed: float, tolerance: float, spec: ActivationSpec,
                  fp32_samples: int) -> Exception:
    """The refusal of a certified table whose float32 checks found branch ``b``'s g missed by ``missed``,
    more than SCALE_MISS tolerances (the fitter's and its proof's bound is the tolerance), at its worst
    bf16, fp16 or segment-end value y, or where none shows it, the worst of the stratified fp32 sample
    (``fp32_samples``): a ScaleError where g itself changes by more than that from y to a neighbouring
    float32 value (x + tanh(1e12*(x - 1))/1e12: g(1) = 2, 1 next to it), which no piecewise polynomial
    in y follows, or where f' at x = f^-1(y) departs from f' at the scan's grid points either side
    (:func:`.scan.unresolved_at`: x + tanh(1e8*(x - 0.001))/1e4 rises within 1e-8 of 0.001, between
    the grid points 0 and 0.006, where g is 1e4 and the table's 1); else a CertificationError (a bug)."""
    ref = BranchReference(b, table.target)
    ys = np.concatenate([half_values("bf16"), half_values("fp16"), segment_end_values(table, b.index)])
    y, err = worst_value(table, b.index, ref, ys)
    if not err > SCALE_MISS * tolerance:
        y, err = worst_fp32_value(table, b.index, BranchReference(b, table.target, bulk=True), fp32_samples)
    if err > SCALE_MISS * tolerance:
        near = np.float32(y)
        steps = np.array([np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))],
                         dtype=np.float64)
        g = ref(steps)
        x = float(ref.inverse(steps[1:2])[0])
        misses = f"{spec.name!r}: branch {b.index}: the table misses g by {err:.3g} at y = {y:.9g}"
        if np.max(np.abs(np.diff(g)) / np.maximum(1.0, np.abs(g[1]))) > SCALE_MISS * tolerance:
            return ScaleError(f"{misses}, where g goes from {g[0]:.6g} to {g[1]:.6g} to {g[2]:.6g} over three "
                              f"neighbouring float32 values of y: f changes near x = {x:.9g} on a scale of x finer "
                              f"than the scan resolves; {_scale_advice(spec)}")
        grid = unresolved_at(ref.fp, x, *b.x_range, b.removable)
        if grid is not None:
            (xa, xb), (ga, gb) = grid, ref.fp(np.array(grid))
            return ScaleError(f"{misses} (x = {x:.9g}), where g is {g[1]:.6g} while it is {ga:.6g} and {gb:.6g} at "
                              f"the scan's neighbouring grid points x = {xa:.9g} and {xb:.9g}: f changes between "
                              f"them on a scale of x finer than the scan resolves; {_scale_advice(spec)}")
    return CertificationError(f"{spec.name}: branch {b.index}: the float32 checks found g missed by {missed:.3g}, "
                              f"beyond {SCALE_MISS:g} times the tolerance {tolerance:g} (the fitter should have refined)")


def _scale_advice(spec: ActivationSpec) -> str:
    """What sets f's scale in x, for a :class:`ScaleError`: the parameters' values, else the formula."""
    if not spec.params:
        return ("rescale x in the formula so that f changes over a range of x the scan resolves, or shift it "
                f"nearer 0: the scan's grid is finest for |x| <= {SCAN:g} (spacing {2 * SCAN / (NEAR_POINTS - 1):g}) "
                "and coarser farther out")
    values = ", ".join(f"{name} = {value:g}" for name, value in spec.params.items())
    return f"the parameter values {values} set that scale: choose values that keep it within the scans' resolution"


def _branch_segments(b: Branch, spec: ActivationSpec, target: str, tol: float,
                     rationals: str = "auto") -> tuple[list[list[Segment]], sp.Expr | None]:
    """(the branch's segment lists to choose from, polynomial first; its exact expression or None)."""
    lo, hi = b.y_range
    if b.flat:
        value = "0" if target == "derivative" else repr(float(b.x_range[1]))
        return [[ConstantSegment([lo, hi], b.index, value)]], None
    expr = exact_expression(b, spec, target)
    if expr is not None:
        seg = ExactSegment([lo, hi], b.index, sp.sstr(expr))
        if _exact_float32_error(b, target, seg, spec.params) <= tol + F32_SLACK:
            return [[seg]], expr
        # a closed form that float32 cannot evaluate (Cardano's cancels for x**3 + x): fit instead
    if b.removable:
        raise SpecError(f"{spec.name!r}: branch {b.index} (x in [{b.x_range[0]:g}, {b.x_range[1]:g}]) has no closed "
                        f"form and needs a fitted g; {removable_note(b.removable[0])}")
    return _fitted_segments(b, target, tol, rationals), None


def _exact_float32_error(b: Branch, target: str, seg: ExactSegment | dict, params: dict) -> float:
    """The float32 scheme error of an exact segment (or its JSON) at float32 y spread evenly in
    float32 order over the branch, its ends included (x/sqrt(1 + x^2)'s closed form is NaN at y = +-1)."""
    seg = seg if isinstance(seg, Segment) else Segment.from_json(seg)
    ends = [f32(v) for v in b.y_range if math.isfinite(v) and abs(v) <= F32_MAX]
    y = np.concatenate([ordinal_nodes(*b.y_range), ends])
    return seg.scheme_error(BranchReference(b, target), y, params)


def _cheapest_table(options: dict[int, list[list[Segment]]], n_codes: int) -> dict[int, list[Segment]]:
    """One segment list per branch: the combination of the fitted branches' layouts (polynomial, or
    rational where one was cheaper for the branch alone) whose ``table_cost`` is lowest; ties keep
    polynomials (the first option). A rational piece makes every element of the table pay for its
    denominator and division, so it must win for the table, not only for its branch."""
    def layout(segs):
        fitted = [s for s in segs if s.fitted]
        return branch_layout(fitted) if fitted else None

    best, best_cost = None, math.inf
    for combo in itertools.product(*(range(len(options[i])) for i in sorted(options))):
        chosen = {i: options[i][k] for i, k in zip(sorted(options), combo)}
        cost = table_cost([lay for segs in chosen.values() if (lay := layout(segs))], n_codes)
        if cost < best_cost:
            best, best_cost = chosen, cost
    return best


def _fitted_segments(b: Branch, target: str, tol: float, rationals: str = "auto") -> list[list[Segment]]:
    ref = BranchReference(b, target)
    y_lo, y_hi, origins, lows, highs = fit_range(b, ref, target, tol)
    if not y_lo < y_hi and (whole := _one_constant(b, ref, lows + highs, tol)) is not None:
        return [[whole]]
    # the cheapest polynomial layout, and a cheaper rational one if the branch has it (the table
    # decides between them: _cheapest_table); rationals alone where no polynomial layout fits
    polys = rats = error = None
    try:
        polys = fit_branch(ref, y_lo, y_hi, origins, tol, rationals=())
    except FitError as exc:
        if rationals == "never":
            raise
        error = exc
    if rationals != "never":
        budget = math.inf
        if polys is not None and rationals == "auto":   # a table gains at most what its branch gains
            degree, den_degree, pieces, logs = branch_layout(polys)
            budget = layout_cost(degree, pieces, den_degree, logs)
        try:
            rats = fit_branch(ref, y_lo, y_hi, origins, tol, degrees=(), max_cost=budget)
        except FitError:
            if polys is None:
                raise error from None
    fitted = [[p.segment(b.index) for p in pieces] for pieces in (polys, rats) if pieces is not None]
    return [lows + segs + highs for segs in _resolved(b, ref, fitted, tol)]


def _one_constant(b: Branch, ref: BranchReference, tails: list[Segment], tol: float) -> ConstantSegment | None:
    """The branch as one constant segment where its constant tails, all of one value, cover it (nothing
    is left to fit) and g is within tolerance / 4 of that value at y spread over it in float32 order:
    x**3 - 1e-16*x's middle branch, |g| <= 1e-16 on y in +-3.8e-25, whose flat tails from either end
    meet. None otherwise (fit_branch refuses the empty range)."""
    values = {s.value for s in tails if isinstance(s, ConstantSegment)}
    if not tails or len(values) != 1 or not all(isinstance(s, ConstantSegment) for s in tails):
        return None
    (value,) = values
    g = ref(ordinal_nodes(max(b.y_range[0], -F32_MAX), min(b.y_range[1], F32_MAX), 4097))
    if not np.all(np.abs(g - float(value)) <= tol / 4):
        return None
    return ConstantSegment(list(b.y_range), b.index, value)


PROBE_POINTS = 129   # x probed across such a change (its interval, 4 times as wide on either side)


def _resolved(b: Branch, ref: BranchReference, fits: list[list[Segment]], tol: float) -> list[list[Segment]]:
    """The fits (segment lists) whose g is within SCALE_MISS tolerances of the reference's next to every
    change of f that the scan's grid does not resolve (:func:`.scan.unresolved_changes`): where f
    changes on a scale of x finer than the fit's samples (x + tanh(1e20*x)/1e20: g is 2 at y = 0 and 1
    from |y| ~ 1e-19), a fit can miss it, and its proof then fails. ScaleError where no fit is left."""
    changes = unresolved_changes(ref.f, ref.fp, *b.x_range, b.removable)
    misses = [_scale_miss(b, ref, segs, changes, tol) for segs in fits]
    if fits and all(misses):
        raise misses[0]
    return [segs for segs, miss in zip(fits, misses) if miss is None]


def _scale_miss(b: Branch, ref: BranchReference, segs: list[Segment], changes: list[tuple[float, float]],
                tol: float) -> ScaleError | None:
    """The refusal of fitted segments ``segs`` whose g misses the reference's by more than SCALE_MISS
    tolerances (absolute below 1, relative above) at some y = f(x), x across an unresolved change
    [a, c]; None where it misses by less everywhere."""
    for a, c in changes:
        w = c - a
        with np.errstate(all="ignore"):
            x = np.linspace(a - 4 * w, c + 4 * w, PROBE_POINTS)
            y = ref.f(x[(x >= b.x_range[0]) & (x <= b.x_range[1])])
        for seg in segs:
            inside = y[np.isfinite(y) & (y >= seg.lo) & (y <= seg.hi)]
            if inside.size == 0:
                continue
            want = ref(inside)
            with np.errstate(all="ignore"):
                err = np.abs(seg.evaluate(inside) - want) / np.maximum(1.0, np.abs(want))
            err = np.where(np.isfinite(want), np.nan_to_num(err, nan=np.inf), 0.0)
            k = int(np.argmax(err))
            if err[k] > SCALE_MISS * tol:
                return ScaleError(
                    f"branch {b.index}: near x in [{a:.6g}, {c:.6g}] f changes on a scale of x of about {w:.2g}, "
                    "finer than the scan's grid resolves (f's step between two of its points disagrees with f' "
                    "at them) and than the fit's samples: the fitted g is "
                    f"{float(seg.evaluate(inside[k:k + 1])[0]):.6g} at y = {inside[k]:.6g}, where g is {want[k]:.6g}")
    return None
