"""Branch analysis: monotone branches of a formula, their ends, tails and codes.

A *branch* here is a maximal interval of x on which one formula piece is strictly monotone (or
constant). Branches whose y ranges only touch share a code; the code width is the smallest of
0, 1, 2, 4, 8 bits that holds the codes (the runtime's planar packing needs 8/bits codes a byte).
The steps :func:`analyze` takes live beside it: the pieces and their checks (:mod:`.pieces`), the scan
for critical and flat points (:mod:`.scan`), limits at +-inf (:mod:`.limits`), float64 evaluation
(:mod:`.numeric`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from .errors import SpecError
from .float32 import TINY32
from .formulas import X, ActivationSpec, check_constants
from .limits import approach, check_far_float64, power_order, value_at
from .numeric import numeric, precise
from .pieces import Piece, check_real, check_singular, find_points, split_pieces
from .scan import monotone_parts, scan_grid
from .tables import MAX_CODES, code_bits_for

__all__ = ["Branch", "Analysis", "analyze", "numeric", "END_KINDS", "code_breaks", "codes_clash"]

END_KINDS = {  # what each kind of branch end means (invact show prints the ones a table has)
    "sqrt": "branch point: f' has a simple zero (minimum or maximum), g ~ sqrt|y - y0|; fitted in t = sqrt|y - y0|",
    "root": "flat point: f' has a zero of order m >= 2, g ~ |y - y0|^(m/(m+1)); g = 0 next to it, then t = log|y - y0|",
    "log": "finite limit approached exponentially as x -> +-inf: log-type singularity; constant tail, then t = log|y - y0|",
    "power": "finite limit approached like |x|^-q as x -> +-inf: g ~ |y - y0|^((q+1)/q); fitted up to y0 (t = sqrt|y - y0| for q = 2)",
    "tail": "y -> +-inf with g settling to a constant: constant tail; or with g growing like |y|^((n-1)/n) "
            "(|f| ~ |x|^n): power tail g = |y|^((n-1)/n) h(t), t = |y|^(-1/n), certified relative to g; or, f "
            "exponential (g ~ c|y|), exponential tail g = |y| h(t), t = log|y|",
    "regular": "f' finite and nonzero at the end (a kink or a piece boundary)",
    "flat": "a plateau: y carries no x, g is PyTorch's gradient there (0)",
}


@dataclass
class Branch:
    """One monotone (or constant) stretch of one formula piece."""

    index: int
    piece: int
    expr: sp.Expr
    sym_expr: sp.Expr
    x_range: tuple[float, float]
    x_closed: tuple[bool, bool]
    y_range: tuple[float, float]
    direction: str                  # increasing | decreasing | constant
    lower_end: str = "regular"      # kind of the y_range ends: sqrt | root | log | power | tail | regular | flat
    upper_end: str = "regular"
    y_closed: tuple[bool, bool] = (True, True)
    code: int = 0
    limits: dict = field(default_factory=dict)   # y end -> limit of f' there ("lower"/"upper")
    orders: dict = field(default_factory=dict)   # y end -> q of a "power" end (|y - L| ~ |x|^-q),
                                                 # m of a "root" end (f' has a zero of order m)
    singularities: list[str] = field(default_factory=list)
    removable: list[float] = field(default_factory=list)   # removable points (0/0) in x_range, ends included

    @property
    def flat(self) -> bool:
        return self.direction == "constant"

    def x_at_y_end(self, which: str) -> float:
        """x at the lower/upper y end of the branch."""
        lo_first = self.direction != "decreasing"
        return self.x_range[0] if (which == "lower") == lo_first else self.x_range[1]

    def to_json(self) -> dict:
        return {"index": self.index, "code": self.code, "x_range": list(self.x_range),
                "y_range": list(self.y_range), "direction": self.direction,
                "lower_end": self.lower_end, "upper_end": self.upper_end,
                "singularities": list(self.singularities)}


@dataclass
class Analysis:
    spec: ActivationSpec
    branches: list[Branch]
    n_branches: int          # monotone branches after merging continuous same-direction neighbours
    n_codes: int
    x_breaks: list[tuple[float, str]]   # (value, side) where the code changes
    codes: list[int]                    # code of each x interval

    @property
    def code_bits(self) -> int:
        bits = code_bits_for(self.n_codes)
        assert bits is not None, "analyze refuses more codes than the runtime stores"
        return bits


def analyze(spec: ActivationSpec) -> Analysis:
    """Split ``spec`` into monotone branches, classify their ends and assign codes."""
    check_constants(spec.substituted(), f"{spec.name!r} with {spec.params}" if spec.params else repr(spec.name))
    pieces = split_pieces(spec)
    singular = find_points(pieces)
    check_real(spec, pieces)
    check_singular(spec, pieces, singular)
    _check_far_float64(pieces)
    branches: list[Branch] = []
    for p_index, piece in enumerate(pieces):
        for lo, hi, lo_c, hi_c, direction in monotone_parts(piece):
            branches.append(_make_branch(len(branches), p_index, piece, lo, hi, lo_c, hi_c, direction))
    if not branches:
        raise SpecError(f"{spec.name!r} has no real domain")
    for b in branches:
        _check_monotone(spec, b)
    _check_continuous(spec, branches)
    for b in branches:
        _classify_ends(b, branches)
    n_codes = _assign_codes(branches)
    if n_codes > MAX_CODES:   # before any fitting: the runtime packs at most 8 bits of code an element
        raise SpecError(f"{spec.name!r} has {len(branches)} monotone branches needing {n_codes} distinct codes; "
                        f"the runtime stores at most {MAX_CODES} codes (8 bits) an element")
    x_breaks, codes = code_breaks(branches)
    return Analysis(spec, branches, _count_monotone(branches), n_codes, x_breaks, codes)


def _check_far_float64(pieces: list[Piece]) -> None:
    """Refuse, before the scan, f that float64 cannot evaluate as x -> +-inf: :func:`_make_branch`'s
    :func:`value_at` refuses it at the same x with the same message, but only after the scan has spent
    minutes confirming sign changes of f' that the overflow made (softclip's
    log((1 + exp(5x))/(1 + exp(5x - 5)))/5: f' is float64 noise for x in [8, 142])."""
    for piece in pieces:
        for end in (piece.lo, piece.hi):
            if math.isinf(end):
                check_far_float64(numeric(piece.expr), end, piece.expr)


def _make_branch(index, p_index, piece, lo, hi, lo_c, hi_c, direction) -> Branch:
    f = numeric(piece.expr)
    ya, yb = value_at(f, lo, piece.expr), value_at(f, hi, piece.expr)
    y_lo, y_hi = (ya, yb) if direction != "decreasing" else (yb, ya)
    if direction == "constant":
        y_lo = y_hi = ya if math.isfinite(ya) else yb
    y_closed = (lo_c, hi_c) if direction != "decreasing" else (hi_c, lo_c)
    return Branch(index, p_index, piece.expr, piece.sym_expr, (lo, hi), (lo_c, hi_c), (y_lo, y_hi), direction,
                  y_closed=y_closed, removable=[c for c in piece.removable if lo <= c <= hi])


MONOTONE_CHECKS = 20   # sampled violations of a branch's direction confirmed at 15 digits, worst first


def _check_monotone(spec: ActivationSpec, b: Branch) -> None:
    """Refuse a non-constant branch whose y range is empty or inverted, or whose y on the scan's grid
    goes against its direction (confirmed to 15 digits by :func:`precise`, so float64 noise is no
    reason): a pole or a wiggle between the grid points the branch analysis did not see."""
    if b.flat:
        return
    (lo, hi), (y_lo, y_hi) = b.x_range, b.y_range
    where = f"{spec.name!r}: the {b.direction} stretch x in [{lo:g}, {hi:g}] found by the scan"
    tail = "f may have a pole, or a narrow wiggle, between the scan's points, which the fitter does not support"
    if not y_lo < y_hi:
        raise SpecError(f"{where} has y range [{y_lo:.6g}, {y_hi:.6g}], which is not increasing; {tail}")
    sign = 1.0 if b.direction == "increasing" else -1.0
    xs = scan_grid(lo, hi, b.removable)
    ys = numeric(b.expr)(xs)
    with np.errstate(all="ignore"):       # inf - inf far out: nan, no evidence either way
        step = np.diff(ys) * sign
        slack = 1e-9 * (np.abs(ys[:-1]) + np.abs(ys[1:]))
        against = np.nonzero(step < -slack)[0]
    for i in against[np.argsort(step[against] / np.maximum(slack[against], 1e-300))][:MONOTONE_CHECKS]:
        v0, v1 = precise(b.expr, xs[i]), precise(b.expr, xs[i + 1])
        if v0 is not None and v1 is not None and (v1 - v0) * sign < 0:
            raise SpecError(f"{where} is not {b.direction}: f({xs[i]:.6g}) = {float(v0):.6g} and f({xs[i + 1]:.6g}) "
                            f"= {float(v1):.6g}; {tail}")


def _check_continuous(spec: ActivationSpec, branches: list[Branch]) -> None:
    """Refuse a jump between neighbouring branches: at a jump f' holds a Dirac delta that no g(y)
    can give back, and PyTorch's gradient there is a convention of the formula, not of y. A gap of
    1e-9 relative to y there (softplus's threshold leaves 2e-9 at y = 20) or within float64's noise of
    the two sides' y (:func:`_break_noise`) passes; both scale with f, so c*f gets f's verdict for any
    c (an absolute allowance passed Piecewise((x, x < 0), (x + 1e-10, True)))."""
    for left, right in zip(branches, branches[1:]):
        x_b = left.x_range[1]
        y_l = left.y_range[1] if left.direction != "decreasing" else left.y_range[0]
        y_r = right.y_range[0] if right.direction != "decreasing" else right.y_range[1]
        if not math.isfinite(x_b):
            continue
        tol = 1e-9 * (abs(y_l) + abs(y_r)) + _break_noise(left, x_b) + _break_noise(right, x_b)
        if not abs(y_l - y_r) <= tol:
            raise SpecError(f"{spec.name!r} is discontinuous: f jumps at x = {x_b:.17g} from y = {y_l:.17g} "
                            f"to y = {y_r:.17g}; a table of g(y) = f'(f^-1(y)) needs a continuous f "
                            "(write the formula without the jump)")


JUMP_NOISE = 64   # float64 roundings a side's y at a break may carry, in units of eps times its magnitudes


def _break_noise(b: Branch, x: float) -> float:
    """How far float64's y of ``b`` at the piece boundary x may be from its value there: :data:`JUMP_NOISE`
    roundings of the magnitudes f adds up (:func:`_magnitude`: x**3 - 0.001 at x = 0.1 gives 1.5e-19,
    not 0) and of x itself, times f' (the boundary sqrt(2) of x**2 - 2 is a float). Non-finite parts
    count 0."""
    at = np.array([x])
    with np.errstate(all="ignore"):
        parts = [numeric(_magnitude(b.expr))(at)[0], abs(x) * abs(numeric(sp.diff(b.expr, X))(at)[0])]
    return JUMP_NOISE * float(np.finfo(float).eps) * sum(float(v) for v in parts if np.isfinite(v))


def _magnitude(e: sp.Expr) -> sp.Expr:
    """e with every sum's terms and product's factors taken by absolute value: the scale of the
    numbers float64 adds when it evaluates e (the rounding of a sum is relative to it, not to the sum)."""
    if isinstance(e, (sp.Add, sp.Mul)):
        return e.func(*(_magnitude(a) for a in e.args), evaluate=False)
    return sp.Abs(e)


# ---------------------------------------------------------------------------------------------
# ends

ZERO_ORDER_MAX = 6


def _zero_order(expr: sp.Expr, x0: float, highest: int = ZERO_ORDER_MAX) -> int:
    """The order m of the zero of f' at x0: the first k >= 1 with f^(k+1)(x0) clearly nonzero
    (30 digits; x0 is known to ~1e-8 at a zero of even order, so a vanishing f^(k+1) reads ~1e-8)."""
    d = sp.diff(expr, X)
    xv = sp.Float(x0, 30)
    for k in range(1, highest):
        d = sp.diff(d, X)
        try:
            v = abs(complex(d.subs(X, xv).evalf(30)))
        except (TypeError, ValueError):
            return k
        if v > 1e-5:
            return k
    return highest


UNBOUNDED_SLOPE = 1e12   # |f'| above this at a finite end (or just inside it): g unbounded there


def _end_slope(fp, b: Branch, x: float) -> float:
    """f' at a finite branch end x, or the value just inside it that is larger in magnitude (f'
    can be finite at x itself and blow up next to it, as x**(1/3) + 0 gives 0 at x = 0 by convention).
    Where float64 gives NaN at x itself (0*inf: abs(x)**1.5's 1.5*x**1.5/x), f' there is its limit
    from inside, read from the values 1e-12 and 1e-9 inside: f' ~ |x - x0|^p, 0 for p > 0 (a zero
    of integer order p; another p is refused with it), +-inf for p < 0."""
    lo, hi = b.x_range
    inward = 1.0 if x == lo else -1.0
    d1, d2 = 1e-12 * max(1.0, abs(x)), 1e-9 * max(1.0, abs(x))
    vals = fp(np.array([x, x + inward * d1, x + inward * d2]))
    if np.isinf(vals).any():
        return float(vals[np.argmax(np.isinf(vals))])
    if np.isnan(vals[1:]).any():
        raise SpecError(f"f' cannot be evaluated next to x = {x:.17g} (float64 gives nan there), so the kind "
                        "of this branch end is unknown")
    if np.isnan(vals[0]):
        v1, v2 = abs(float(vals[1])), abs(float(vals[2]))
        if v1 == 0.0 or v2 == 0.0:
            return 0.0 if v1 <= v2 else float(vals[1])
        p = math.log(v2 / v1) / math.log(d2 / d1)
        if abs(p) <= 0.01:
            return float(vals[1])
        if p < 0:
            return math.copysign(math.inf, float(vals[1]))
        if abs(p - round(p)) > 0.02:
            raise SpecError(f"f' -> 0 like |x - x0|^{p:.3g} at the branch end x0 = {x:.17g}: g ~ |y - y0|^"
                            f"({p:.3g}/{p + 1:.3g}) there, a zero of non-integer order, which no transform of "
                            "the fitter follows (branch ends: sqrt for order 1, root for orders 2 and up)")
        return 0.0
    big = np.abs(vals) > UNBOUNDED_SLOPE
    return float(vals[np.argmax(big)]) if big.any() else float(vals[0])


def _classify_ends(b: Branch, branches: list[Branch]) -> None:
    if b.flat:
        b.lower_end = b.upper_end = "flat"
        return
    fp = numeric(sp.diff(b.expr, X))
    for which in ("lower", "upper"):
        x = b.x_at_y_end(which)
        y = b.y_range[0] if which == "lower" else b.y_range[1]
        if math.isinf(x):
            lim = value_at(fp, x, sp.diff(b.expr, X), "f'")
            b.limits[which] = lim
            kind = "tail" if math.isinf(y) else approach(numeric(b.expr), x, y)
            side = f"x -> {'+' if x > 0 else '-'}inf"
            if kind == "log":
                b.singularities.append(f"log at y={y:.17g} ({side})")
            elif kind == "power":
                q = b.orders[which] = power_order(numeric(b.expr), x, y)
                b.singularities.append(f"power at y={y:.17g} ({side}, |y - {y:.6g}| ~ |x|^-{q:g})")
        else:
            slope = _end_slope(fp, b, x)
            if not math.isfinite(slope) or abs(slope) > UNBOUNDED_SLOPE:
                raise SpecError(f"g = f'(f^-1(y)) is unbounded next to y = {y:.17g} (f' -> "
                                f"{'inf' if slope > 0 else '-inf'} as x -> {x:.17g}): a table "
                                "cannot hold a g that grows without bound on a bounded range of y")
            b.limits[which] = slope
            kind = "sqrt" if abs(slope) < 1e-12 else "regular"
            if kind == "sqrt" and (m := _zero_order(b.expr, x)) > 1:
                kind = "root"   # f - y0 ~ (x - x0)^(m+1): g ~ |y - y0|^(m/(m+1))
                b.orders[which] = m
                b.singularities.append(f"root at y={y:.17g} (x={x:.17g}, f' has a zero of order {m}"
                                       f"{' or more' if m >= ZERO_ORDER_MAX else ''})")
            elif kind == "sqrt":
                b.singularities.append(f"sqrt at y={y:.17g} (x={x:.17g})")
        setattr(b, f"{which}_end", kind)


# ---------------------------------------------------------------------------------------------
# codes

def _overlap(a: Branch, b: Branch) -> bool:
    """True when y alone cannot tell a from b on a set of positive measure of either: their y ranges
    share more than a millionth of the narrower one, and more than the noise of their ends: that of a
    jump :func:`_check_continuous` lets pass where one follows the other in x (softplus's 2e-9 at its
    threshold), else :func:`_end_noise`. x**3 - 1e-6*x + 1's middle branch spans y in 1 +- 3.8e-10, its
    outer branches share that, and one code for branches that y cannot tell apart misses g by 4e-6."""
    (a0, a1), (b0, b1) = a.y_range, b.y_range
    if a.flat and b.flat:
        return abs(a0 - b0) <= _y_tol(a, b)
    if a.flat or b.flat:
        return False   # a plateau against the union of its code's branches: _plateau_inside
    lo, hi = max(a0, b0), min(a1, b1)
    if _follows(a, b) or _follows(b, a):
        noise = _y_tol(a, b)
    else:
        noise = max(_end_noise(br, which, a, b) for br in (a, b)
                    for which, v in zip(("lower", "upper"), br.y_range) if v in (lo, hi))
    return hi - lo > min(noise, 1e-6 * min(a1 - a0, b1 - b0))


def _end_noise(br: Branch, which: str, *branches: Branch) -> float:
    """How far a y end of ``br`` may be from its true value: :func:`_y_tol` where it is f's limit at
    x = +-inf (read from far values: :func:`.limits.value_at`), a thousandth of that where it is f at a
    finite x (float64 rounding, some cancellation included)."""
    tol = _y_tol(*branches)
    return tol if math.isinf(br.x_at_y_end(which)) else max(1e-3 * tol, TINY32)


def _y_tol(*branches: Branch) -> float:
    """The gap below which y ends of ``branches`` count as equal: 1e-9 relative to the largest of their
    finite ends (the noise of ends is relative to y's scale: never absolute, see :func:`_end_noise`), at
    least float32's smallest normal number."""
    ends = [abs(v) for b in branches for v in b.y_range if math.isfinite(v)]
    return max(1e-9 * max(ends, default=0.0), TINY32)


def _plateau_inside(members: list[Branch]) -> bool:
    """True when some plateau of ``members`` (one code class) lies strictly inside the y range of a
    stretch of its sloped branches that follow each other in x (one curve the analysis split): y = 0 of
    the plateau of Piecewise((0, x < -1), (0.5*x*(x + 1), x < 0), (0.5*x, True)) is the end of both rising
    branches (split at x = 0) and inside their stretch, and y alone cannot tell the plateau's g from
    f'(0) = 0.5 there. A plateau at an end of a stretch (relu's 0; a staircase's step between two ramps
    apart in x) owns that y (.codes._branch_break): one x at most shares it, as at a kink."""
    tol = _y_tol(*members)
    stretches: list[tuple[float, float]] = []
    last: Branch | None = None
    for m in sorted((m for m in members if not m.flat), key=lambda m: m.x_range[0]):
        lo, hi = m.y_range
        if last is not None and _follows(last, m) and lo <= stretches[-1][1] + tol and hi >= stretches[-1][0] - tol:
            stretches[-1] = (min(stretches[-1][0], lo), max(stretches[-1][1], hi))
        else:
            stretches.append((lo, hi))
        last = m
    return any(lo + tol < p.y_range[0] < hi - tol for p in members if p.flat for lo, hi in stretches)


def _follows(left: Branch, right: Branch) -> bool:
    """Whether ``right`` starts at the x where ``left`` ends."""
    end, start = left.x_range[1], right.x_range[0]
    return math.isfinite(end) and abs(end - start) <= 1e-12 * (1 + abs(end))


def _signed_zero_clash(a: Branch, b: Branch) -> bool:
    """True when a and b touch only at y = 0, g jumps there, and the branch that does not own y = 0
    (the owner as :func:`.codes._branch_break` decides, y_closed) has |g| < 1 there: its values
    next to the break underflow to a signed zero in 16-bit y (0.01*x of Piecewise((0.01*x, x < 0),
    (x, True)) for float16 |x| < 3e-6 is -0), which y cannot tell from the owner's 0. With |g| >= 1
    (y = x) they stay at least the smallest subnormal. Such branches take codes of their own, so the
    stored code (the x side) classifies them, as PyTorch's autograd of the formula does."""
    if a.flat or b.flat:
        return False
    lo, hi = (a, b) if a.y_range[0] < b.y_range[0] else (b, a)
    if not (lo.y_range[1] == 0.0 == hi.y_range[0]):
        return False
    g_lo, g_hi = lo.limits.get("upper", math.nan), hi.limits.get("lower", math.nan)
    lo_owns = (lo.y_closed[1] and not hi.y_closed[0]) or not (lo.y_closed[1] or hi.y_closed[0])
    other = g_hi if lo_owns else g_lo
    return g_lo != g_hi and abs(other) < 1.0


def _flat_end_touch(a: Branch, b: Branch) -> bool:
    """True when a and b, apart in x, touch at a y end of each (within :func:`_overlap`'s noise) where one
    ends flatly (a sqrt or root end: f' -> 0, so every x near it rounds to that y) and the other's g is not
    0: the owner of that y would give the flat branch's many x the other's g (1 - x**2 for x < 0 and
    1 + 0.01*(x - 1) for x > 1 meet at y = 1: 0.01 for |x| < 1.7e-4 where g is below 3.4e-4). At a
    kink with g nonzero on both sides one x at most shares the y, and they may share a code."""
    if a.flat or b.flat or _follows(a, b) or _follows(b, a):
        return False
    tol = _y_tol(a, b)
    for wa, ya in zip(("lower", "upper"), a.y_range):
        for wb, yb in zip(("lower", "upper"), b.y_range):
            if not (math.isfinite(ya) and math.isfinite(yb)) or abs(ya - yb) > tol:
                continue
            flat_a, flat_b = (getattr(br, f"{w}_end") in ("sqrt", "root") for br, w in ((a, wa), (b, wb)))
            g_a, g_b = a.limits.get(wa, math.nan), b.limits.get(wb, math.nan)
            if (flat_a and abs(g_b) > 0) or (flat_b and abs(g_a) > 0):
                return True
    return False


def _assign_codes(branches: list[Branch]) -> int:
    """Greedy colouring from the right, so the branch reaching +inf gets code 0; branches y cannot
    tell apart (:func:`_overlap`, :func:`_signed_zero_clash`, :func:`_flat_end_touch`,
    :func:`_plateau_inside`) get different
    codes."""
    for b in reversed(branches):
        later = [o for o in branches if o.index > b.index]
        taken = {o.code for o in later if _overlap(o, b) or _signed_zero_clash(o, b) or _flat_end_touch(o, b)}
        taken |= {o.code for o in later if _plateau_inside([m for m in later if m.code == o.code] + [b])}
        b.code = next(c for c in range(len(branches)) if c not in taken)
    return max(b.code for b in branches) + 1


def codes_clash(branches: list[Branch]) -> bool:
    """Whether two branches sharing a code are ones y cannot tell apart (as :func:`_assign_codes` keeps
    apart): a table's codes checked at other parameter values."""
    if any(a.code == b.code and (_overlap(a, b) or _signed_zero_clash(a, b) or _flat_end_touch(a, b))
           for a, b in itertools.combinations(branches, 2)):
        return True
    return any(_plateau_inside([b for b in branches if b.code == code]) for code in {b.code for b in branches})


def code_breaks(branches: list[Branch]) -> tuple[list[tuple[float, str]], list[int]]:
    """(the x where the code changes, with the side that x belongs to; the code of each x interval)."""
    breaks, codes = [], [branches[0].code]
    for left, right in zip(branches, branches[1:]):
        if right.code != left.code:
            breaks.append((left.x_range[1], "left" if left.x_closed[1] else "right"))
            codes.append(right.code)
    return breaks, codes


def _count_monotone(branches: list[Branch]) -> int:
    n = 1
    for left, right in zip(branches, branches[1:]):
        same = left.direction == right.direction and not left.flat
        continuous = abs(left.y_range[1 if left.direction == "increasing" else 0]
                         - right.y_range[0 if right.direction == "increasing" else 1]) < 1e-6
        n += 0 if (same and continuous) else 1
    return n
