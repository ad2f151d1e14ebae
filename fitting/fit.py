"""Piecewise polynomial and rational fits of one branch's target in a transformed, centred variable.

Per piece: t = T(y) (sqrt next to a branch point, log next to a finite asymptote, else identity),
u = (t - center) * scale in [-1, 1], a Chebyshev least-squares fit on Chebyshev-distributed points
(near-minimax), converted to monomials in u and rounded to float32 one coefficient at a time from the
top, refitting the lower ones after each rounding; the constant is kept as float32 hi + lo.
A rational piece is g = c0 + u N(u) / Q(u) with Q(0) = 1 (:mod:`.rational`: linearised fit with
Lawson steps; Q rounded to float32 first, then c0 and N refitted and rounded the same way); a
denominator that comes near zero on [-1, 1] (extended a little) refuses the candidate.
Pieces are grown greedily to the largest that meets the bound; among the polynomial degrees and
rational types tried, the layout cheapest to evaluate (``layout_cost``) wins.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import sympy as sp

from .errors import FitError, SpecError
from .float32 import f32, f32_below, ordinal_nodes, split3
from .formulas import X
from .model import PolySegment, RationalSegment, Transform, horner
from .numeric import float64_fault, precise
from .rational import MAX_AMPLIFICATION, MIN_DEN_MARGIN, den_margin, rational_fit, rounding_amplification
from .reference import BranchReference
from .settings import MAX_TOLERANCE

__all__ = ["Transform", "PieceFit", "fit_branch", "layout_cost", "table_cost", "branch_layout", "layouts",
           "f32", "f32_below", "DEGREES", "RATIONALS", "DIVISION_COST", "c_time", "c_features",
           "triton_instructions", "search_pays", "COUNT_INSTRUCTIONS", "LEVEL_INSTRUCTIONS"]

DEGREES = (6, 8, 10, 12, 14)   # tried in order; stops once no higher degree can be cheaper; above 14
                                # float32 Horner rounding grows past 2.5e-7 (x*tanh(x), degree 16)
RATIONALS = ((4, 4), (5, 5), (6, 6), (7, 7), (8, 8))   # (numerator m, denominator n) of c0 + u N/Q


def layout_cost(degree: int, pieces: int, den_degree: int = 0, logs: int = 0) -> float:
    """``table_cost`` of one fitted branch of ``pieces`` pieces (``logs``: 1 where one uses the log
    transform), as if the table had another branch like it (the fitted built-ins have one on either
    side of a minimum): the segments of both, and a tail each, share the kernel's column permutes."""
    return table_cost([(degree, den_degree, pieces, logs)] * 2, 2)


def table_cost(branches: list[tuple[int, ...]], n_codes: int = 1) -> float:
    """Predicted ns per float32 element of the table's C kernel (``c_time``, the mean of its AVX-512
    and AVX2 calibrations) from (degree, den_degree, pieces[, logs]) per fitted branch: every element
    runs the table's widest Horner, its denominator and division (with any rational piece) and every
    transform the table uses (the log: where any piece has it), and the POLY rows (the pieces and a
    tail per code class) are selected by one permute per column up to 8 rows, 16 with AVX-512,
    element by element beyond 16. The Triton kernel ranks layouts alike (``triton_instructions``):
    a gather per column, a Horner step per degree, the log's ~25 instructions."""
    if not branches:
        return 0.0
    degree = max(b[0] for b in branches)
    den = max(b[1] for b in branches)
    segments = sum(b[2] for b in branches) + n_codes
    logs = int(any(len(b) > 3 and b[3] for b in branches))
    return sum(c_time(degree, segments, logs, den, isa) for isa in C_COST) / len(C_COST)


def c_features(degree: int, segments: int, logs: int = 0, den_degree: int = 0) -> list[float]:
    """What the per-table C kernel (runtime/csrc/invact_table.h) executes per element beyond its
    loads and stores, for a table of ``segments`` POLY rows of ``degree`` (with a sqrt transform, as
    every fitted table has; denominators of ``den_degree``) and ``logs`` log transforms: [1, Horner
    steps (each also a column selected per block), a division, log transforms, columns of a 9-16 row
    table (a 16-wide permute, or two permutes and a blend on AVX2), columns of a wider one (gathered
    one element at a time), thresholds compared (the segment index)]."""
    columns = 5 + degree + den_degree             # tid, center, scale, c0, c0_lo, c1 .. cd, d1 .. dn
    return [1.0, float(degree + den_degree), float(den_degree > 0), float(logs), columns * (8 < segments <= 16),
            columns * (segments > 16), float(max(segments - 2, 0))]


def c_time(degree: int, segments: int, logs: int = 0, den_degree: int = 0, isa: str = "AVX512") -> float:
    """Predicted ns per float32 element of the C kernel at one thread: ``C_COST[isa]`` . ``c_features``."""
    return sum(a * b for a, b in zip(C_COST[isa], c_features(degree, segments, logs, den_degree)))


# ns per element for each c_features entry, rounded from benchmarks/layout_cost.py's runs (2^22 float32,
# one thread, fastest of 9-15 rounds, every layout in turn) on an AMD EPYC whose 2 cores other jobs
# shared: under load averages 4-7 every time grew by up to 2x and the least-squares fits moved with it,
# their ratios less. Quietest runs, AVX-512 (ATEN_CPU_CAPABILITY=avx2 for AVX2): a Horner step 0.09
# (0.12), the log transform 1.0 (1.9), a column of a 9-16 row table 0.02 (0.02), of a wider one ~0.2
# (0.2: 8 Horner steps 13 columns wide went 2.3 -> 5.8 ns at 24 rows), a threshold 0.02 (0.03);
# under load the log measured 1.3-2.7 ns (AVX-512), always more than 8 Horner steps. The division
# (rational rows) measured nothing distinguishable from noise: priced at a vdivps, 0.2.
C_COST = {"AVX512": (0.6, 0.09, 0.2, 1.0, 0.02, 0.2, 0.02), "AVX2": (0.8, 0.12, 0.2, 1.9, 0.02, 0.2, 0.03)}
DIVISION_COST = 8   # instructions of a correctly rounded float32 division on GPUs (``triton_instructions``)
# SASS instructions an element of the Triton segment index (sm_90, benchmarks/ptx_estimate.py): counting
# costs a compare, a select and an add per threshold of every class; the search an address (the gather's),
# a compare, a select and an add per level, besides the level's gather
COUNT_INSTRUCTIONS, LEVEL_INSTRUCTIONS = 3, 4
LOG_INSTRUCTIONS = 27   # act_triton.log: bit operations, a 9-term Horner, the exponent's terms


def triton_instructions(degree: int, segments: int, logs: int = 0, den_degree: int = 0,
                        levels: int = 0) -> dict[str, int]:
    """Per element, the fitted backward's Triton kernel (act_triton ``row``): gathers (a coefficient
    load per column, tl.load(P + col * NSEG + s), and with a segment search of ``levels``, a
    threshold per level, act_triton.search), and arithmetic (the segment index: a compare and an add
    per threshold, or an address, a compare and an add per level; the transforms; Horner: a
    multiply and an add a step; clamps and the c0 terms)."""
    index = LEVEL_INSTRUCTIONS * levels if levels else COUNT_INSTRUCTIONS * max(segments - 2, 0)
    arithmetic = index + 4 + LOG_INSTRUCTIONS * logs + 2 * (degree + den_degree) + 6 \
        + (DIVISION_COST if den_degree else 0)
    return {"gathers": 5 + degree + den_degree + levels, "arithmetic": arithmetic}


def search_pays(levels: int, thresholds: int) -> bool:
    """Whether a Triton segment search of ``levels`` (a gather each) takes fewer instructions an element
    than counting ``thresholds`` (those of every class)."""
    return (LEVEL_INSTRUCTIONS + 1) * levels < COUNT_INSTRUCTIONS * thresholds


def layouts(degrees=DEGREES, rationals=RATIONALS) -> list[tuple[int, int]]:
    """(degree, den_degree) candidates, cheapest single piece first (polynomials first on ties)."""
    cands = [(d, 0) for d in degrees] + [tuple(r) for r in rationals]
    return sorted(cands, key=lambda c: (layout_cost(c[0], 1, c[1]), c[1], c[0]))


SAFETY = 0.55        # pieces aim at SAFETY * tolerance, leaving room for certification slack
F32_SLACK = 1.5e-7   # float32 evaluation may add this to the tolerance (a few ulps of g near 1),
                     # sampled while fitting; certification then measures it exhaustively
F32_SLACK_RATIONAL = 1.0e-7  # the same for rational pieces: two Horner chains and a division make the
                     # sample's maximum a weaker guide (dense checks found up to 1.4x its value)
MAX_PIECES = 64
ROUNDING_NODES = 8192  # float32 y per spread (float32 order, u, y) in the fit's rounding check


@dataclass
class PieceFit:
    y_lo: float
    y_hi: float
    transform: Transform
    center: float
    scale: float
    coeffs: list[float]        # c0_hi, c1..cd (float32 values)
    c0_lo: float
    error: float               # max |P - g| on the dense check grid (float64 arithmetic)
    float32_error: float = 0.0  # the same for the float32 scheme at float32 y (sampled)
    den: list[float] | None = None  # rational pieces: 1, d1 .. dn (float32 values) of Q
    rounding_error: float | None = None  # float32 scheme vs float64 scheme, dense (``_meets``)

    def u(self, y: np.ndarray) -> np.ndarray:
        return np.clip((self.transform.t(y) - self.center) * self.scale, -1.0, 1.0)

    def __call__(self, y: np.ndarray) -> np.ndarray:
        return horner(self.coeffs, self.c0_lo, self.u(y), self.den)

    def segment(self, branch: int | None = None) -> PolySegment:
        """The table's segment of this piece (a rational one when it has a denominator)."""
        args = ([self.y_lo, self.y_hi], branch, self.transform, self.center, self.scale, list(self.coeffs),
                self.c0_lo, self.error)
        return PolySegment(*args) if self.den is None else RationalSegment(*args, list(self.den))

    def to_json(self) -> dict:
        """The piece as a JSON segment (without a branch)."""
        return self.segment().to_json()


def fit_piece(ref: BranchReference, y_lo: float, y_hi: float, tf: Transform, degree: int,
              den_degree: int = 0) -> PieceFit:
    """One piece over float32 breaks [y_lo, y_hi] in transform ``tf``: a polynomial of ``degree``,
    or with ``den_degree`` > 0 the rational c0 + u N(u) / Q(u), N of degree ``degree`` - 1."""
    ta, tb = sorted(float(v) for v in tf.t(np.array([y_lo, y_hi])))
    if not tb > ta * (1 + 2.0**-20) + 2.0**-120 or not np.isfinite([ta, tb]).all():
        # the transform collapses this piece (below float32 resolution of t): unusable here
        return PieceFit(y_lo, y_hi, tf, 0.0, 1.0, [0.0], 0.0, math.inf)
    center = f32(0.5 * (ta + tb))
    half = max(abs(ta - center), abs(tb - center))   # >= (tb - ta) / 2: center is rounded to float32
    scale = f32_below(1.0 / half * (1 - 2.0**-20))
    while max(abs((ta - center) * scale), abs((tb - center) * scale)) > 1.0:
        scale = float(np.nextafter(np.float32(scale), np.float32(0)))
    ua, ub = (ta - center) * scale, (tb - center) * scale
    m = 10 * (degree + den_degree + 1)
    k = np.arange(m)
    u = 0.5 * (ua + ub) + 0.5 * (ub - ua) * np.cos(np.pi * (k + 0.5) / m)
    u = np.concatenate([[ua, ub], u])
    g = ref(tf.y(center + u / scale))
    den = None
    if den_degree:
        fitted = _rounded_rational_fit(u, g, degree, den_degree)
        if fitted is None:
            return PieceFit(y_lo, y_hi, tf, center, scale, [0.0], 0.0, math.inf)
        coeffs, den = fitted
    else:
        coeffs = _rounded_fit(u, g, degree)
    c0 = coeffs[0]
    c0_hi = f32(c0)
    c0_lo = f32(c0 - c0_hi)
    coeffs = [c0_hi] + [f32(c) for c in coeffs[1:]]
    with np.errstate(all="ignore"):
        err = float(np.max(np.abs(horner(coeffs, c0_lo, u, den) - g)))
    err = err if math.isfinite(err) else math.inf
    piece = PieceFit(y_lo, y_hi, tf, center, scale, coeffs, c0_lo, err, den=den)
    if ref.target == "derivative":  # an inverse's x carries t's rounding times dx/dt: not gated
        piece.float32_error = _float32_error(piece, ref, tf.y(center + u / scale))
    else:
        piece.rounding_error = 0.0
    return piece


def _float32_error(piece: PieceFit, ref: BranchReference, y_nodes: np.ndarray) -> float:
    """The segment's float32 scheme error (:meth:`.model.Segment.scheme_error`) at float32 y: the
    nodes and an even spread (``_meets`` adds a denser check of the rounding alone)."""
    y = np.concatenate([y_nodes, np.linspace(piece.y_lo, piece.y_hi, 1025)]).astype(np.float32)
    return piece.segment().scheme_error(ref, y[(y >= piece.y_lo) & (y <= piece.y_hi)])


def _rounding_error(piece: PieceFit, n: int = ROUNDING_NODES) -> float:
    """Max |scheme in float32 - scheme in float64| at float32 y over both float32 schemes (without
    and with FMA: kernels run either, and the certificate bounds both), relative above |g| = 1 as
    ``scheme_error``: evenly spread in float32 order (small |y|), in u and in y. No reference is
    needed, so the sample is dense enough to meet rounding that is rare but large (loglog's first
    piece ends at g = 0 from terms of ~0.3: one y in 20 near that end was over budget, and the
    reference sample had missed them all)."""
    seg, u = piece.segment(), np.linspace(-1.0, 1.0, n)
    with np.errstate(all="ignore"):
        y = np.concatenate([ordinal_nodes(piece.y_lo, piece.y_hi, n), piece.transform.y(piece.center + u / piece.scale),
                            np.linspace(piece.y_lo, piece.y_hi, n)]).astype(np.float32)
        y = y[(y >= piece.y_lo) & (y <= piece.y_hi)]
        exact = seg.evaluate(y.astype(np.float64))
        got = np.maximum(np.abs(seg.evaluate(y).astype(np.float64) - exact),
                         np.abs(seg.evaluate_fma(y).astype(np.float64) - exact))
        err = got / np.maximum(1.0, np.abs(exact))
    err = err[np.isfinite(exact)]
    return float(np.max(np.where(np.isnan(err), np.inf, err), initial=0.0))


def _rounded_fit(u: np.ndarray, g: np.ndarray, degree: int) -> list[float]:
    """Least squares in the Chebyshev basis, then float32 rounding from the top with refits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", np.exceptions.RankWarning)
        cheb = np.polynomial.chebyshev.Chebyshev.fit(u, g, degree, domain=[-1, 1], window=[-1, 1])
    c = list(cheb.convert(kind=np.polynomial.Polynomial).coef) + [0.0] * (degree + 1)
    c = c[:degree + 1]
    return _round_down(np.vander(u, degree + 1, increasing=True), g, c)


def _round_down(vander: np.ndarray, g: np.ndarray, c: list[float], w: np.ndarray | None = None) -> list[float]:
    """Round c[d] .. c[1] to float32 from the top, refitting the lower ones (least squares over the
    rows of ``vander``, weighted by ``w``) after each rounding; c[0] is left to the caller."""
    for j in range(len(c) - 1, 0, -1):
        c[j] = f32(c[j])
        resid = g - vander[:, j:] @ np.array(c[j:])
        if w is None:
            c[:j] = list(np.linalg.lstsq(vander[:, :j], resid, rcond=None)[0])
        else:
            c[:j] = list(np.linalg.lstsq(vander[:, :j] * w[:, None], resid * w, rcond=None)[0])
    return c


def _rounded_rational_fit(u: np.ndarray, g: np.ndarray, degree: int, den_degree: int):
    """(coeffs, den) of c0 + u N(u) / Q(u) with float32 Q (1, d1 .. dn) and N (c1 .. cm), or None.

    Rounding Q moves it by ~1e-8 relative, which the refitted numerator absorbs (g times a tiny
    polynomial is nearly a polynomial); c0 and N are then refitted with the Lawson weights of the
    rational fit (near-minimax) and rounded from the top like a polynomial's coefficients."""
    fitted = rational_fit(u, g, degree, den_degree)
    if fitted is None:
        return None
    num, den, v = fitted
    den = [1.0] + [f32(d) for d in den[1:]]
    if not den_margin(den) >= MIN_DEN_MARGIN:
        return None
    q = np.polynomial.polynomial.polyval(u, den)
    vander = np.vander(u, degree + 1, increasing=True)
    vander[:, 1:] /= q[:, None]                          # columns 1, u / Q, u^2 / Q, ..., u^m / Q
    w = np.sqrt(v) + 1e-3 / np.sqrt(u.size)              # Lawson weights, none quite zero
    c = list(np.linalg.lstsq(vander * w[:, None], g * w, rcond=None)[0])
    c = _round_down(vander, g, c, w)
    if rounding_amplification(c[1:], den) > MAX_AMPLIFICATION:
        return None
    return c, den


def _transforms(ref: BranchReference, origins) -> list[Transform]:
    """The candidate transforms of a branch: one per singular end, from (kind, y0, sign) triples (or
    a {kind: (y0, sign)} dict); the identity where there is none."""
    items = [(k, v[0], v[1]) for k, v in origins.items()] if isinstance(origins, dict) else list(origins)
    out = [Transform(kind, origin_terms(y0, sign), sign) for kind, y0, sign in items]
    return out or [Transform("identity")]


def origin_terms(value, sign: int) -> tuple[float, float, float]:
    """:func:`split3` of ``value`` rounded to the side where sign * (y - origin) >= 0 holds for every
    y of the branch: down for a lower end (a minimum), up for an upper end (a maximum)."""
    return split3(value) if sign > 0 else tuple(0.0 - v for v in split3(-value))   # 0.0 - v: no -0.0


def _best(ref, y_lo, y_hi, tfs, degree, den_degree=0) -> PieceFit:
    fits = [fit_piece(ref, y_lo, y_hi, tf, degree, den_degree) for tf in tfs]
    return min(fits, key=lambda p: p.error)


def fit_branch(ref: BranchReference, y_lo: float, y_hi: float, origins: dict, tolerance: float,
               degrees=DEGREES, rationals=RATIONALS, max_cost: float = math.inf) -> list[PieceFit]:
    """Cover [y_lo, y_hi] (float32) with pieces meeting SAFETY * tolerance; the cheapest layout wins
    (polynomials of ``degrees``, rationals of the (m, n) in ``rationals``; ties go to polynomials).
    Each piece takes the transform that fits it best: first among the branch's transforms without
    the log plus the identity (the log costs every element of the table as much as ~10 Horner
    steps: ``C_COST``), then, where the branch has a log end, among its own transforms as well.
    Only layouts cheaper than ``max_cost`` are considered; FitError when none meets the bound, or
    when the range is empty (the branch's tails cover it: a tolerance too loose to fit)."""
    if not y_lo < y_hi:
        raise FitError(f"no y range is left to fit ([{y_lo:g}, {y_hi:g}]): the branch's tails cover it at "
                       f"tolerance {tolerance:g}", None, "use a smaller --tolerance")
    tfs = _transforms(ref, origins)
    cheap = [tf for tf in tfs if tf.kind != "log"]
    cheap += [Transform("identity")] * (Transform("identity") not in cheap)
    sets = [cheap] + ([tfs] if any(tf.kind == "log" for tf in tfs) else [])
    best, best_err, reach = _search(ref, y_lo, y_hi, sets, tolerance, degrees, rationals, max_cost)
    if best is None:
        if not math.isfinite(best_err) and (fault := _float64_fault(ref, y_lo, y_hi)) is not None:
            raise fault
        kinds = " or ".join(k for k, on in (("polynomial", degrees), ("rational", rationals)) if on)
        cheaper = f" costing less than {max_cost:g}" if math.isfinite(max_cost) else ""
        # a looser tolerance is tried only where this refusal is the fit's answer: not for a search for
        # a layout cheaper than one found, nor for rationals alone (tried beside polynomials)
        search = None if math.isfinite(max_cost) or not degrees else \
            (lambda tol: _search(ref, y_lo, y_hi, sets, tol, degrees, rationals, max_cost)[:2])
        advice = _advice(best_err, tolerance, search, _absolute_limit(ref, max(reach, y_lo), y_hi, tolerance))
        raise FitError(f"no {kinds} layout with up to {MAX_PIECES} pieces{cheaper} meets "
                       f"{tolerance:g} on y in [{y_lo:g}, {y_hi:g}]", best_err, advice,
                       "the closest pieces need a tolerance of")
    return best


def _search(ref, y_lo, y_hi, sets, tolerance, degrees, rationals, max_cost):
    """(the cheapest layout meeting ``tolerance`` or None, the tolerance the closest pieces need, the
    largest y the pieces of any layout tried reached) over the candidate transform ``sets``
    (:func:`fit_branch`)."""
    best, best_cost, best_err, reach = None, max_cost, math.inf, -math.inf
    for candidates in sets:
        logs = int(any(tf.kind == "log" for tf in candidates))
        for degree, den_degree in layouts(degrees, rationals):
            if layout_cost(degree, 1, den_degree, logs) >= best_cost:
                break            # (layouts() is in order of this cost)
            limit = MAX_PIECES   # a layout with more pieces than this could not beat the best so far
            while limit > 1 and layout_cost(degree, limit, den_degree, logs) >= best_cost:
                limit -= 1
            pieces, err, stop = _greedy(ref, y_lo, y_hi, candidates, degree, SAFETY * tolerance, den_degree, limit)
            best_err, reach = min(best_err, err), max(reach, stop)
            if pieces is None:
                continue
            cost = layout_cost(degree, len(pieces), den_degree, int(any(p.transform.kind == "log" for p in pieces)))
            if cost < best_cost:
                best, best_cost = pieces, cost
    return best, best_err, reach


def _needed(piece: PieceFit) -> float:
    """The smallest tolerance at which ``piece`` passes :func:`_meets`: its approximation error over
    SAFETY, and its float32 errors (sampled scheme error; approximation plus dense rounding error)
    beyond the float32 slack. A refusal reports this figure, so it exceeds the tolerance refused."""
    slack = F32_SLACK if piece.den is None else F32_SLACK_RATIONAL
    return max(piece.error / SAFETY, piece.float32_error - slack,
               piece.error + (piece.rounding_error or 0.0) - slack)


HINT_TRIES = 2       # looser tolerances tried before one is proposed


def _float64_fault(ref: BranchReference, y_lo: float, y_hi: float) -> SpecError | None:
    """The refusal of a branch whose float64 f' is inf or NaN at some x of y in [y_lo, y_hi] (x spread
    evenly and in float32 order of y) while f' there, to 15 digits (:func:`.numeric.precise`), is a
    number: an overflow or a cancellation of f' as written, which no fit can meet a tolerance against
    (x*exp(2x)/(1 + exp(x))**2 at x = 354.4 is inf/finite). None where f' is finite there, or in fact inf."""
    x_ends = ref.inverse(np.array([y_lo, y_hi]))
    x = np.concatenate([np.linspace(*np.sort(x_ends), 4097), ref.inverse(ordinal_nodes(y_lo, y_hi, 4097))])
    x = x[np.isfinite(x)]
    g = ref.fp(x)
    for k in np.nonzero(~np.isfinite(g))[0][:1]:
        exact = precise(sp.diff(ref.branch.expr, X), float(x[k]))
        if exact is not None:
            return float64_fault(f"branch {ref.branch.index}: ", "f'", float(x[k]), g[k], exact)
    return None


def _absolute_limit(ref: BranchReference, y_a: float, y_b: float, tolerance: float) -> str | None:
    """Why no layout covers [y_a, y_b] (where the pieces stopped) when that is the absolute bound each
    piece is held to (``_meets``: SAFETY * tolerance on |P - g|, as the piece's proof bounds it) rather
    than g: a piece's float32 coefficients round its terms by up to 2^-24 of them, and its linear term
    is about half of g's change across it, so g may change by only ~2^25 SAFETY tolerance per piece;
    None where :data:`MAX_PIECES` such pieces span g's change on [y_a, y_b] (the measure is not the
    reason). x**4*exp(0.002*x): |g| grows to 1.3e8 on its first branch, 1e6*tanh(x): 1e6."""
    g = ref(ordinal_nodes(y_a, y_b, 4097))
    g = g[np.isfinite(g)]
    per_piece = 2.0**25 * SAFETY * tolerance
    change = float(np.sum(np.abs(np.diff(g))))
    if change <= MAX_PIECES * per_piece:
        return None
    return (f"|g| reaches {np.max(np.abs(g)):.3g} on y in [{y_a:.6g}, {y_b:.6g}], where the pieces stopped, and "
            f"changes by {change:.3g} there; each piece is held to an absolute error of {SAFETY:g} x tolerance "
            "(its proof bounds |g~ - g| absolutely) and float32 coefficients round its terms by up to 2^-24 of "
            f"them, so g may change by only about {per_piece:.2g} across a piece, and {MAX_PIECES} pieces do not "
            "span that change. The tolerance is relative where |g| > 1, but this fitter holds pieces to it "
            "absolutely: a limitation of the fitter, not of the formula")


def _advice(needed: float, tolerance: float, search=None, reason: str | None = None) -> str:
    """What to change. ``needed`` (:func:`_needed`) is what the pieces closest to meeting the bound
    lacked where the greedy stopped: a lower bound, not a promise, since at a looser tolerance the
    pieces before that point widen and the search can stop elsewhere, needing more (1e6*tanh(x):
    6.8e-8 at 5e-8, 9.8e-8 at 9e-8, 5.6e-3 at 2e-7). So a looser tolerance is proposed only once
    ``search(tol)`` ((layout or None, needed), the same search) has found a layout at it: up to
    HINT_TRIES tolerances, each 20 % above what the last search needed, rounded up to one digit,
    and at least twice the one before. ``reason``: why no looser tolerance helps, where the caller
    knows (:func:`_absolute_limit`)."""
    tried, looser = [], tolerance
    while math.isfinite(needed) and len(tried) < HINT_TRIES:
        step = 10.0 ** math.floor(math.log10(needed * 1.2))    # 20% above, rounded up to one digit
        looser = max(float(f"{math.ceil(needed * 1.2 / step) * step:.1g}"), 2 * looser if tried else 0.0)
        if not tolerance < looser <= MAX_TOLERANCE:
            break
        if search is None:
            return f"--tolerance {looser:g} or more may fit (not tried)"
        found, needed = search(looser)
        if found is not None:
            return (f"--tolerance {looser:g} or more is likely to fit (a fit of this branch at {looser:g} was tried "
                    "and met it; the table is certified after the fit)")
        tried.append(f"{looser:g}")
    if not math.isfinite(needed) and reason is None:   # an error measured as inf or NaN says nothing of smoothness
        return ("a looser tolerance would not help: the closest pieces' error measured inf or NaN, as g or the "
                "pieces' float32 evaluation overflows here")
    why = reason or "g is not smooth enough here for piecewise polynomials in this branch's transforms"
    if tried:
        return (f"no layout fits at --tolerance {' or '.join(tried)} either (tried), so no looser tolerance is "
                f"proposed: {why}")
    return f"a looser tolerance would not help: {why}" + ("" if reason else "; please report the formula")


def branch_layout(pieces) -> tuple[int, int, int, int]:
    """(degree, den_degree, pieces, logs) of a fitted branch (PieceFits or their
    :class:`.model.PolySegment`s); logs: 1 where a piece uses the log transform."""
    return (max(len(p.coeffs) - 1 for p in pieces), max(len(getattr(p, "den", None) or [1]) - 1 for p in pieces),
            len(pieces), int(any(p.transform.kind == "log" for p in pieces)))


def _meets(piece: PieceFit, target: float) -> bool:
    slack = F32_SLACK if piece.den is None else F32_SLACK_RATIONAL
    budget = target / SAFETY + slack
    if not (piece.error <= target and piece.float32_error <= budget):
        return False
    if piece.rounding_error is None:     # the dense check, only for pieces that pass the rest
        piece.rounding_error = _rounding_error(piece)
    return piece.error + piece.rounding_error <= budget


def _search_step(x_a: float, x_end: float, wide: bool = False):
    """x at fraction w of the way from x_a to x_end: linear, or linear in asinh(x) when the branch
    reaches far out (a power-law end fitted up to its limit: x ~ 1e16 there) or ``wide`` is asked."""
    if abs(x_end - x_a) <= 1e6 and not wide:
        return lambda w: x_a + w * (x_end - x_a)
    s_a, s_end = math.asinh(x_a), math.asinh(x_end)
    return lambda w: math.sinh(s_a + w * (s_end - s_a))


def _greedy(ref, y_lo, y_hi, tfs, degree, target, den_degree=0, max_pieces=MAX_PIECES):
    """Largest pieces from y_lo upward; x (monotone along the branch) is the search variable.
    (pieces, the tolerance they need, y_hi); (None, the tolerance the closest pieces need:
    :func:`_needed`, the y where the next piece would start) when more than ``max_pieces`` would be
    needed: that of one piece for the rest of the range when the pieces run out, else the smallest
    of the trial pieces that failed where the next piece starts."""
    pieces, start = [], y_lo
    x_end = float(ref.inverse(np.array([y_hi]))[0])
    while start < y_hi:
        whole = _best(ref, start, y_hi, tfs, degree, den_degree)
        meets = _meets(whole, target)     # (computes the rounding error that _needed reads)
        if len(pieces) >= max_pieces:     # one piece more would be needed: at least the tolerance
            return None, max(_needed(whole), target / SAFETY), start
        if meets:
            pieces.append(whole)
            break
        x_a = float(ref.inverse(np.array([start]))[0])
        good, needed = _largest_piece(ref, start, _search_step(x_a, x_end), tfs, degree, den_degree, target)
        if good is None and abs(x_end - x_a) <= 1e6:
            # the linear steps' smallest trial, 2^-14 of the way, is too long a piece where g changes on a
            # much finer scale of x at the start than over the rest (g -> 5 like 1/y^2 out to x ~ 3e5)
            good, finer = _largest_piece(ref, start, _search_step(x_a, x_end, wide=True), tfs, degree, den_degree,
                                         target)
            needed = min(needed, finer)
        if good is None:
            return None, min(needed, _needed(whole)), start
        pieces.append(good)
        start = good.y_hi
    return pieces, max(_needed(p) for p in pieces), y_hi


def _largest_piece(ref, start, step, tfs, degree, den_degree, target):
    """(the largest piece from y = ``start`` to f(step(w)) meeting ``target`` that 14 halvings of the
    fraction w in (0, 1) find, or None; the tolerance the closest trial pieces that failed need)."""
    lo_w, hi_w, good, needed = 0.0, 1.0, None, math.inf
    for _ in range(14):
        w = 0.5 * (lo_w + hi_w)
        y_b = f32(float(ref.f(np.array([step(w)]))[0]))
        if not y_b > start:
            lo_w = w
            continue
        trial = _best(ref, start, y_b, tfs, degree, den_degree)
        if _meets(trial, target):
            lo_w, good = w, trial
        else:
            hi_w = w
            needed = min(needed, _needed(trial))
    return good, needed
