"""Branch analysis: pieces, critical points, monotone branches, their ends, tails and codes.

A *branch* here is a maximal interval of x on which one formula piece is strictly monotone (or
constant). Branches whose y ranges only touch share a code; the code width is the smallest of
0, 1, 2, 4, 8 bits that holds the codes (the runtime's planar packing needs 8/bits codes a byte).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import sympy as sp
from scipy.optimize import brentq

from .domain import classify_points, time_limit
from .errors import SpecError
from .formulas import X, ActivationSpec, check_constants
from .tables import MAX_CODES, code_bits_for

__all__ = ["Branch", "Analysis", "analyze", "numeric", "time_limit", "END_KINDS"]

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
SCAN = 60.0          # critical points: a fine scan on [-SCAN, SCAN], coarser out to FAR_SCAN (_scan_grid)
FAR_SCAN = 1e15      # branch points lie within |x| <= FAR_SCAN; a sign change of f' beyond it is refused
FAR = 1e4            # "infinity" for numeric limits
MAX_CRITICAL = 16


_SOFTPLUS, _ERFC, _SECH2 = sp.Function("softplus_"), sp.Function("erfc_"), sp.Function("sech2_")
_EXPM1 = sp.Function("expm1_")


def stable(expr: sp.Expr) -> sp.Expr:
    """Rewrite cancellation-prone forms for float64 evaluation: c + c*erf(a) -> c*erfc(-a),
    c + c*tanh(a) -> 2c/(1 + exp(-2a)), c - c*tanh(a)**2 -> c*sech(a)**2, c*exp(a) - c -> c*expm1(a),
    log(1 + exp(a)) -> softplus(a), exp(a)/(1 + exp(a))**2 -> sech(a/2)**2/4 (a sigmoid's derivative),
    exp(a)/(1 + exp(a)) -> 1/(1 + exp(-a))."""
    def fix_add(e: sp.Add):
        terms = list(e.args)
        consts = [t for t in terms if t.is_number]
        for t in terms:
            c, rest = t.as_coeff_Mul()
            if isinstance(rest, sp.exp) and -c in consts:
                new, c = c * _EXPM1(rest.args[0]), -c
            elif isinstance(rest, (sp.erf, sp.tanh)) and c in consts:
                a = rest.args[0]
                new = c * _ERFC(-a) if isinstance(rest, sp.erf) else 2 * c / (1 + sp.exp(-2 * a))
            elif isinstance(rest, sp.Pow) and rest.exp == 2 and isinstance(rest.base, sp.tanh) and -c in consts:
                new, c = -c * _SECH2(rest.base.args[0]), -c
            else:
                continue
            others = list(terms)
            others.remove(t)
            others.remove(c)
            return sp.Add(*others) + new
        return e

    def fix_log(e: sp.log):
        a = e.args[0]
        if isinstance(a, sp.Add) and len(a.args) == 2 and 1 in a.args:
            other = a.args[0] if a.args[1] == 1 else a.args[1]
            if isinstance(other, sp.exp):
                return _SOFTPLUS(other.args[0])
        return e

    def fix_mul(e: sp.Mul):
        # exp(u)/(1 + exp(u))**2 -> sech(u/2)**2/4 and exp(u)/(1 + exp(u)) -> 1/(1 + exp(-u)): inf/inf
        # where exp(u) overflows (x*sigmoid(25*x)'s f' at x = -30) becomes 0 and 1
        factors = list(e.args)
        for t in factors:
            if not (isinstance(t, sp.Pow) and t.exp in (-1, -2) and isinstance(t.base, sp.Add)
                    and len(t.base.args) == 2 and 1 in t.base.args):
                continue
            ex = t.base.args[0] if t.base.args[1] == 1 else t.base.args[1]
            if isinstance(ex, sp.exp) and ex in factors:
                u = ex.args[0]
                others = list(factors)
                others.remove(t)
                others.remove(ex)
                new = _SECH2(u / 2) / 4 if t.exp == -2 else 1 / (1 + sp.exp(-u))
                return sp.Mul(*others) * new
        return e

    expr = expr.replace(lambda e: isinstance(e, sp.log), fix_log)
    expr = expr.replace(lambda e: isinstance(e, sp.Mul), fix_mul)
    expr = expr.replace(lambda e: isinstance(e, sp.Add), fix_add)
    return expr.replace(lambda e: isinstance(e, sp.Add), fix_add)


def numeric(expr: sp.Expr):
    """float64 numpy function of x for a sympy expression, rewritten by :func:`stable`."""
    f = sp.lambdify(X, stable(expr), modules=[{"erf": _erf, "erfc": _erfc, "erfc_": _erfc, "softplus_": _softplus, "sech2_": _sech2, "expm1_": np.expm1}, "numpy"])

    def call(x):
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(all="ignore"):
            out = f(x)
        return np.broadcast_to(np.asarray(out, dtype=np.float64), x.shape).copy()
    call.raw = f          # for callers already inside np.errstate(all="ignore"): see raw_values
    return call


def raw_values(fn, x: np.ndarray) -> np.ndarray:
    """``fn(x)`` for a :func:`numeric` function and a float64 array x, the same values without the
    per-call overhead; the caller must hold ``np.errstate(all="ignore")``."""
    return _own_array(fn.raw(x), x)


def numeric_many(exprs: list[sp.Expr]):
    """One float64 numpy function of x returning a tuple of arrays, one per expression (rewritten by
    :func:`stable`): common subexpressions are evaluated once (an erfc shared by f and f', say), and
    small integer powers are written as products (numpy's pow takes ~100x longer on negative bases).
    Values agree with :func:`numeric`'s to a few float64 ulps, not bit for bit."""
    mods = {"erf": _erf, "erfc": _erfc, "erfc_": _erfc, "softplus_": _softplus, "sech2_": _sech2,
            "expm1_": np.expm1, "_ipow": _ipow}
    f = sp.lambdify(X, [stable(e) for e in exprs], modules=[mods, "numpy"],
                    printer=_fast_printer(mods), cse=True)

    def call(x):
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(all="ignore"):
            outs = f(x)
        return tuple(_own_array(o, x) for o in outs)
    return call


def _own_array(o, x: np.ndarray) -> np.ndarray:
    """o as a new float64 array of x's shape (a constant broadcast, never x itself)."""
    if isinstance(o, np.ndarray) and o.dtype == np.float64 and o.shape == x.shape and not np.may_share_memory(o, x):
        return o
    return np.broadcast_to(np.asarray(o, dtype=np.float64), x.shape).copy()


def numeric_fast(expr: sp.Expr):
    """:func:`numeric_many` for one expression: a float64 numpy function of x."""
    f = numeric_many([expr])
    return lambda x: f(x)[0]


def _ipow(v, n: int):
    """v**n for a small integer n >= 3 by repeated multiplication (within ~n ulps of pow)."""
    out = v * v
    for _ in range(n - 2):
        out = out * v
    return out


def _fast_printer(user_functions: dict):
    """A NumPy printer (with lambdify's own settings) writing x**n, 3 <= |n| <= 8, as products."""
    from sympy.printing.numpy import NumPyPrinter

    class FastPrinter(NumPyPrinter):
        def _print_Pow(self, expr, rational=False):
            n = expr.exp
            if n.is_Integer and 3 <= abs(int(n)) <= 8:
                base = f"_ipow({self._print(expr.base)}, {abs(int(n))})"
                return base if n > 0 else f"(1.0/{base})"
            return super()._print_Pow(expr, rational=rational)

    return FastPrinter({"fully_qualified_modules": False, "inline": True, "allow_unknown_functions": True,
                        "user_functions": {k: k for k in user_functions}})


def _erf(x):
    from scipy.special import erf
    return erf(x)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sech2(x):
    return 1.0 / np.cosh(x) ** 2


def _erfc(x):
    from scipy.special import erfc
    return erfc(x)


@dataclass
class Piece:
    expr: sp.Expr           # substituted expression on this piece
    sym_expr: sp.Expr       # with parameter symbols
    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool
    removable: list[float] = field(default_factory=list)   # removable points (0/0) inside, .domain


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
    pieces = _pieces(spec)
    singular = _find_points(pieces)
    _check_real(spec, pieces)
    _check_singular(spec, pieces, singular)
    branches: list[Branch] = []
    for p_index, piece in enumerate(pieces):
        for lo, hi, lo_c, hi_c, direction in _monotone_parts(piece):
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
    x_breaks, codes = _code_breaks(branches)
    return Analysis(spec, branches, _count_monotone(branches), n_codes, x_breaks, codes)


# ---------------------------------------------------------------------------------------------
# pieces

def _pieces(spec: ActivationSpec) -> list[Piece]:
    expr = sp.piecewise_fold(spec.substituted().rewrite(sp.Piecewise))
    sym = sp.piecewise_fold(spec.expr.rewrite(sp.Piecewise))
    if not isinstance(expr, sp.Piecewise):
        return [Piece(expr, sym, -math.inf, math.inf, False, False)]
    sym_args = sym.args if isinstance(sym, sp.Piecewise) and len(sym.args) == len(expr.args) else None
    covered = sp.EmptySet
    out = []
    for i, (e, cond) in enumerate(expr.args):
        try:
            region = cond.as_set() if cond is not sp.true else sp.Reals
        except (NotImplementedError, TypeError):
            raise SpecError(f"piece condition {cond} is not a condition on x alone") from None
        region = sp.Intersection(region, sp.Complement(sp.Reals, covered))
        covered = sp.Union(covered, region)
        for iv in _intervals(region):
            out.append(Piece(e, sym_args[i][0] if sym_args else e, float(iv.start), float(iv.end),
                             not iv.left_open, not iv.right_open))
    gaps = [iv for iv in _intervals(sp.Complement(sp.Reals, covered)) if iv.measure > 0]
    if gaps:
        g = gaps[0]
        text = f"{'(' if g.left_open else '['}{float(g.start):g}, {float(g.end):g}{')' if g.right_open else ']'}"
        raise SpecError(f"{spec.name!r} is undefined (not real-valued) for x in {text}: no condition of its "
                        "Piecewise holds there; a table needs f on the whole real line (end with a (value, True) piece)")
    out.sort(key=lambda p: p.lo)
    return out


def _intervals(region) -> list[sp.Interval]:
    if region is sp.EmptySet:
        return []
    if isinstance(region, sp.Interval):
        return [region]
    if isinstance(region, sp.Union):
        return [iv for arg in region.args for iv in _intervals(arg)]
    if isinstance(region, sp.FiniteSet):
        return []  # isolated points: measure zero, owned by a neighbour
    raise SpecError(f"cannot split the real line into intervals for condition set {region}")


def _check_real(spec: ActivationSpec, pieces: list[Piece]) -> None:
    """Refuse a piece where f or f' is not a number on a grid of x."""
    for p in pieces:
        lo, hi = max(p.lo, -30.0), min(p.hi, 30.0)
        if lo >= hi:
            continue
        xs = np.linspace(lo, hi, 2001)[1:-1]
        ys = numeric(p.expr)(xs)
        bad = ~np.isfinite(ys)
        if bad.any():
            x_bad = float(xs[np.argmax(bad)])
            exact = _precise(p.expr, x_bad)
            if exact is not None and _continuous_there(p.expr, x_bad, exact):
                raise _float64_fault(f"{spec.name!r}: ", "f", x_bad, ys[np.argmax(bad)], exact)
            note = next((f"; {removable_note(c)}" for c in p.removable if _same_point(c, x_bad)), "")
            raise SpecError(f"{spec.name!r} is not real-valued (or not finite) on the real line: "
                            f"f({x_bad:.6g}) is {ys[np.argmax(bad)]}{note}")
        fp = sp.diff(p.expr, X)
        fpn = numeric(fp)
        dys = fpn(xs)
        bad = np.isnan(dys)
        if bad.any():
            x_bad = float(xs[np.argmax(bad)])
            exact = _precise(fp, x_bad)
            if exact is not None and _continuous_there(fp, x_bad, exact):
                raise _float64_fault(f"{spec.name!r}: ", "f'", x_bad, "nan", exact)
            if (sides := _corner(fpn, x_bad)) is not None:
                raise _corner_error(repr(spec.name), x_bad, sides, " (f' is nan at it)")
            raise SpecError(f"{spec.name!r} has no derivative at x = {x_bad:.6g} (f' is nan there): a table of "
                            "g(y) = f'(f^-1(y)) needs f' defined inside each piece of the formula")


CORNER_STEPS = (1e-9, 1e-7)   # a corner's one-sided f' is read at these distances (relative to max(1, |x|))


def _corner(fpn, x: float) -> tuple[float, float] | None:
    """(f' to the left, f' to the right) of x where f' jumps there between finite one-sided limits
    of opposite signs (f continuous with a corner, as sqrt(x**4 + 2*x**2) = |x| sqrt(x**2 + 2) at 0),
    else None: on each side the values at :data:`CORNER_STEPS` agree to 1e-4 relative (next to a
    smooth zero of f' they differ 100-fold)."""
    d = np.array(CORNER_STEPS) * max(1.0, abs(x))
    left, right = fpn(x - d), fpn(x + d)
    settled = all(np.isfinite(v).all() and abs(v[0] - v[1]) <= 1e-4 * abs(v[1]) for v in (left, right))
    return (float(left[0]), float(right[0])) if settled and left[0] * right[0] < 0 else None


def _corner_error(who: str, x: float, sides: tuple[float, float], note: str = "") -> SpecError:
    """The refusal of a corner of f where its formula has none (:func:`_corner`)."""
    return SpecError(f"{who} has a corner at x = {x:.6g} inside one piece of its formula: f' jumps there "
                     f"from {sides[0]:.6g} to {sides[1]:.6g}{note}, and a certified g needs f' bounded up to each "
                     "branch end; write the corner as a boundary of the formula's pieces (with Abs, Max, Min or a "
                     "Piecewise, as Abs(x) is) so that f' on each side is finite up to it")


def removable_note(c: float) -> str:
    """Why a table cannot be fitted through the removable point c (:mod:`.domain`)."""
    return (f"x = {c:.6g} is a removable point of the formula (0/0 there, with a finite limit): float "
            "arithmetic gives NaN or a wrong value for f at it and loses the digits of f' next to it, so "
            "g(y) = f'(f^-1(y)) can be neither fitted nor certified there; write f without the 0/0 at that point")


def _same_point(c: float, x: float) -> bool:
    return abs(x - c) <= 1e-12 * max(1.0, abs(c))


def _float64_fault(prefix: str, what: str, x: float, got, exact) -> SpecError:
    """The refusal where float64 gives ``got`` (inf or nan) for ``what`` (f or f') at x but its 15-digit
    value ``exact`` is a number: an overflow or a cancellation, not a property of f."""
    return SpecError(f"{prefix}float64 cannot evaluate {what} at x = {x:.6g} (it gives {got}, from an overflow or a "
                     f"cancellation; {what} is {float(exact):.6g} there): write the formula in a form whose terms "
                     "stay within float64's range")


def _continuous_there(expr: sp.Expr, x: float, exact) -> bool:
    """Whether ``exact`` (:func:`_precise` of ``expr`` at x) is f's value indeed, where float64 gives
    inf or nan: the precise values at x (1 +- 1e-12) (x +- 1e-12 at 0) agree with it to 1e-6 (1 + |f|).
    At a 0/0 point, as x/(exp(x) - 1) at 0, evalf's value at x (0) is none of f's (1 next to it):
    f is not defined there, float64 is not to blame."""
    h = 1e-12 * abs(x) if x != 0 else 1e-12
    for t in (x - h, x + h):
        v = _precise(expr, t)
        if v is None or abs(float(v) - float(exact)) > 1e-6 * (1 + abs(float(exact))):
            return False
    return True


def _find_points(pieces: list[Piece]) -> list[list[tuple[str, str]]]:
    """Each piece's singular points (:mod:`.domain`); its removable points go to ``piece.removable``."""
    out = []
    for p in pieces:
        points = classify_points(p.expr, p.lo, p.hi, p.lo_closed, p.hi_closed)
        p.removable = points.removable
        out.append(points.singular)
    return out


def _check_singular(spec: ActivationSpec, pieces: list[Piece], singular: list[list[tuple[str, str]]]) -> None:
    """Refuse a point inside a piece where f is not defined or not continuous (a pole between the
    sample points of :func:`_check_real`, which the scan of f' would not see): :mod:`.domain`."""
    for bad in singular:
        if bad:
            where = "; ".join(f"{x}: {why}" for x, why in bad)
            raise SpecError(f"{spec.name!r} is not real-valued (or not finite) on the real line: f is not defined "
                            f"(or not continuous) at {where}; a table needs f finite and continuous on the whole "
                            "real line")


# ---------------------------------------------------------------------------------------------
# monotone parts

def _monotone_parts(piece: Piece):
    fp = sp.diff(piece.expr, X)
    if fp == 0 or (fp.is_number and float(fp) == 0.0):
        yield piece.lo, piece.hi, piece.lo_closed, piece.hi_closed, "constant"
        return
    crit = _critical_points(piece, fp)
    fpn = numeric(fp)
    cuts = [piece.lo] + sorted(crit + _flat_points(piece, fp, fpn, crit)) + [piece.hi]
    for j in range(len(cuts) - 1):
        a, b = cuts[j], cuts[j + 1]
        slope = _typical_slope(fpn, a, b, piece.removable)
        lo_c = piece.lo_closed if j == 0 else True
        hi_c = piece.hi_closed if j == len(cuts) - 2 else True
        yield a, b, lo_c, hi_c, ("increasing" if slope > 0 else "decreasing")


def _typical_slope(fpn, a: float, b: float, removable: list[float] = ()) -> float:
    """f' where it is largest on a grid inside (a, b), away from removable points (as
    :func:`_scan_grid`): its sign is the branch's direction (a single interior point could be an
    inflection with f' = 0, as for x**3 at 0)."""
    lo = a if math.isfinite(a) else (min(b, 0.0) - 30.0 if math.isfinite(b) else -30.0)
    hi = b if math.isfinite(b) else (max(a, 0.0) + 30.0 if math.isfinite(a) else 30.0)
    xs = _away_from(np.linspace(lo, hi, 403)[1:-1], removable)
    v = fpn(xs)
    v = np.where(np.isfinite(v), v, 0.0)
    return float(v[np.argmax(np.abs(v))])


REMOVABLE_GAP = 1e-4   # scan points within this (relative to max(1, |c|)) of a removable point c are left out


def _away_from(xs: np.ndarray, removable: list[float]) -> np.ndarray:
    """``xs`` without the points within :data:`REMOVABLE_GAP` of a removable point."""
    for c in removable:
        xs = xs[np.abs(xs - c) > REMOVABLE_GAP * max(1.0, abs(c))]
    return xs


def _scan_grid(lo: float, hi: float, removable: list[float] = ()) -> np.ndarray:
    """x at which f' is sampled for sign changes on (lo, hi): 20001 points on [-SCAN, SCAN] (spacing
    0.006), spacing 0.024 out to |x| = 8 SCAN, then geometric (about 200 points a decade) out to
    |x| = FAR_SCAN; clipped to the piece (its finite ends included). Points next to a removable point
    (:data:`REMOVABLE_GAP`) are left out: float64 f and f' there are 0/0 or lose their digits (f' of
    t/(exp(t) - 1) with exp(-0.3) folded into a Float: ~1e-16/t^2), which would read as a sign change
    or a step against the branch's direction."""
    near = np.linspace(-SCAN, SCAN, 20001)
    mid = np.linspace(SCAN, 8 * SCAN, 17501)
    far = np.geomspace(8 * SCAN, FAR_SCAN, 2401)
    xs = np.unique(np.concatenate([near, mid, far, -mid, -far]))
    xs = _away_from(xs[(xs > lo) & (xs < hi)], removable)
    return np.concatenate([[lo] if math.isfinite(lo) else [], xs, [hi] if math.isfinite(hi) else []])


def _critical_points(piece: Piece, fp: sp.Expr) -> list[float]:
    """Sign changes of f' inside the piece, to float64 accuracy. Every sign change found on the scan
    (:func:`_scan_grid`, out to |x| = FAR_SCAN) is a branch point; more than MAX_CRITICAL of them, or
    one beyond FAR_SCAN (:func:`_check_far_sign`), is refused: none is dropped."""
    fpn = numeric(fp)
    roots = _sign_changes_on(fpn, _scan_grid(piece.lo, piece.hi, piece.removable), fp)
    if len(roots) > MAX_CRITICAL:
        raise SpecError(f"f' changes sign {len(roots)} times on [{max(piece.lo, -FAR_SCAN):g}, "
                        f"{min(piece.hi, FAR_SCAN):g}] (first at x = {roots[0]:.6g}, last at x = {roots[-1]:.6g}): "
                        "the function appears to have infinitely many monotone branches, which a finite "
                        f"code cannot index (at most {MAX_CRITICAL + 1} branches per piece are supported)")
    for side in (-1.0, 1.0):
        if (piece.hi if side > 0 else -piece.lo) > FAR_SCAN:
            _check_far_sign(fp, fpn, side)
    roots = [_polish_root(fp, r) for r in roots]
    for r in roots:
        if (sides := _corner(fpn, r)) is not None:
            raise _corner_error("f", r, sides)
    return roots


def _check_far_sign(fp: sp.Expr, fpn, side: float) -> None:
    """Refuse a sign change of f' beyond |x| = FAR_SCAN on one side, found by a geometric scan out
    to float64's largest values (a branch point there would lie beyond what the fit can resolve)."""
    far = _sign_changes_on(fpn, side * np.geomspace(FAR_SCAN, 1.7e308, 2937), fp)
    if far:
        raise SpecError(f"f' changes sign near x = {far[0]:.3g}, beyond |x| = {FAR_SCAN:g} where the fitter "
                        f"places branch points: f is not monotone as x -> {'+' if side > 0 else '-'}inf, "
                        "and such a far branch is not supported")


def _flat_points(piece: Piece, fp: sp.Expr, fpn, crit: list[float]) -> list[float]:
    """Zeros of f' where it keeps its sign (tanhshrink's x - tanh(x) at 0, f' ~ x^2; x**5): the
    branch is split there, since g ~ |y - y0|^(m/(m+1)) is singular at such a point on both sides.
    Candidates are strict local minima of |f'| on a grid; a zero of even order of f' is a sign change
    of f'', found by brentq, and kept where f' there is below 1e-12 of its values a grid step away.
    Refuses infinitely many (x + sin(x))."""
    xs = _scan_grid(piece.lo, piece.hi, piece.removable)   # the critical points' grid: a flat point far out splits too
    if xs.size < 3:
        return []
    a = np.abs(fpn(xs))
    a = np.where(np.isfinite(a), a, np.inf)
    local = np.nonzero((a[1:-1] < a[:-2]) & (a[1:-1] < a[2:]) & (np.minimum(a[:-2], a[2:]) > 1e-250))[0] + 1
    fpp = numeric(sp.diff(fp, X))
    out: list[float] = []
    for i in local:
        if any(abs(xs[i] - c) <= 2 * (xs[i + 1] - xs[i - 1]) for c in crit):
            continue
        x0 = _second_root(fpp, float(xs[i - 1]), float(xs[i]), float(xs[i + 1]))
        if x0 is not None and abs(float(fpn(np.array([x0]))[0])) <= 1e-12 * min(a[i - 1], a[i + 1]) \
                and piece.lo < x0 < piece.hi and _precise_flat(fp, x0, float(xs[i - 1]), float(xs[i + 1])):
            out.append(x0)
    if len(out) > MAX_CRITICAL:
        raise SpecError(f"f' touches zero without changing sign {len(out)} times on [{xs[0]:g}, {xs[-1]:g}] (first at "
                        f"x = {out[0]:.6g}): infinitely many flat points, each a singularity of g")
    return out


def _precise_flat(fp: sp.Expr, x0: float, a: float, b: float) -> bool:
    """Whether |f'(x0)| <= 1e-12 |f'| at a and b to 15 correct digits (:func:`_precise`): far out,
    float64 cancellation makes f' noise that can touch 0 (x/sqrt(1 + x**2) at |x| ~ 1e14); True
    where evalf cannot tell."""
    v0, va, vb = (_precise(fp, t) for t in (x0, a, b))
    if v0 is None or va is None or vb is None:
        return True
    return bool(abs(v0) <= sp.Float(1e-12) * min(abs(va), abs(vb)))


def _second_root(fpp, a: float, m: float, b: float) -> float | None:
    """A zero of f'' in [a, b] (m, the grid point, if f''(m) is exactly 0), or None."""
    va, vm, vb = (float(v) for v in fpp(np.array([a, m, b])))
    if vm == 0:
        return m
    if va * vb >= 0 or not (math.isfinite(va) and math.isfinite(vb)):
        return None
    return brentq(lambda t: float(fpp(np.array([t]))[0]), a, b, xtol=1e-15, rtol=1e-15)


def _sign_changes_on(fpn, xs: np.ndarray, fp: sp.Expr | None = None) -> list[float]:
    """Sign changes of f' between neighbouring grid points xs (brentq), and grid points where f' is
    exactly 0 between opposite signs. With ``fp``, a change that f' to 15 correct digits shows to be
    a float64 artefact is dropped: overflow can flip the sign of a tiny f' (silu's
    x*exp(-x)/(1 + exp(-x))**2 becomes -0 at x = -355 while 1/(1 + exp(-x)) stays positive)."""
    if xs.size < 2:
        return []
    v = fpn(xs)
    s = np.sign(v)
    real = _precise_change(fp)
    out = []
    for i in np.nonzero(s[:-1] * s[1:] < 0)[0]:
        if real(xs[i], xs[i + 1]):
            out.append(brentq(lambda t: float(fpn(np.array([t]))[0]), xs[i], xs[i + 1], xtol=1e-15, rtol=1e-15))
    for i in np.nonzero((s[1:-1] == 0) & (s[:-2] * s[2:] < 0))[0]:
        if real(xs[i], xs[i + 2]):
            out.append(float(xs[i + 1]))
    return sorted(out)


def _precise_change(fp: sp.Expr | None):
    """(a, b) -> False when f' to 15 correct digits (:func:`_precise`) has the same nonzero sign at a
    and b, else True (also where ``fp`` is None or evalf gives no real number)."""
    if fp is None:
        return lambda a, b: True

    def sign(x: float) -> int:
        v = _precise(fp, x)
        return 0 if v is None else int(sp.sign(v))
    return lambda a, b: not ((sa := sign(a)) != 0 and sa == sign(b))


def _precise(expr: sp.Expr, x: float):
    """expr at x by sympy's evalf, which raises its working precision until 15 digits are right (so
    neither float64 overflow nor cancellation shows), as a sympy number; None where it is no finite
    real number or evalf fails."""
    try:
        with time_limit(LIMIT_SECONDS):
            v = expr.evalf(15, subs={X: sp.Float(float(x), 17)}, maxn=2000)
        return v if v.is_extended_real and v.is_finite else None
    except Exception:  # noqa: BLE001 - evalf fails in many ways: unknown
        return None


def _polish_root(fp: sp.Expr, x0: float) -> float:
    """Refine a root of f' with mpmath at 30 digits; float64 result."""
    import mpmath
    try:
        f = sp.lambdify(X, fp, "mpmath")
        with mpmath.workdps(30):
            return float(mpmath.findroot(f, mpmath.mpf(x0)))
    except Exception:  # noqa: BLE001 - keep the bracketed root when mpmath cannot refine it
        return float(x0)


def _make_branch(index, p_index, piece, lo, hi, lo_c, hi_c, direction) -> Branch:
    f = numeric(piece.expr)
    ya, yb = _value_at(f, lo, piece.expr), _value_at(f, hi, piece.expr)
    y_lo, y_hi = (ya, yb) if direction != "decreasing" else (yb, ya)
    if direction == "constant":
        y_lo = y_hi = ya if math.isfinite(ya) else yb
    y_closed = (lo_c, hi_c) if direction != "decreasing" else (hi_c, lo_c)
    return Branch(index, p_index, piece.expr, piece.sym_expr, (lo, hi), (lo_c, hi_c), (y_lo, y_hi), direction,
                  y_closed=y_closed, removable=[c for c in piece.removable if lo <= c <= hi])


MONOTONE_CHECKS = 20   # sampled violations of a branch's direction confirmed at 15 digits, worst first


def _check_monotone(spec: ActivationSpec, b: Branch) -> None:
    """Refuse a non-constant branch whose y range is empty or inverted, or whose y on the scan's grid
    goes against its direction (confirmed to 15 digits by :func:`_precise`, so float64 noise is no
    reason): a pole or a wiggle between the grid points the branch analysis did not see."""
    if b.flat:
        return
    (lo, hi), (y_lo, y_hi) = b.x_range, b.y_range
    where = f"{spec.name!r}: the {b.direction} stretch x in [{lo:g}, {hi:g}] found by the scan"
    tail = "f may have a pole, or a narrow wiggle, between the scan's points, which the fitter does not support"
    if not y_lo < y_hi:
        raise SpecError(f"{where} has y range [{y_lo:.6g}, {y_hi:.6g}], which is not increasing; {tail}")
    sign = 1.0 if b.direction == "increasing" else -1.0
    xs = _scan_grid(lo, hi, b.removable)
    ys = numeric(b.expr)(xs)
    with np.errstate(all="ignore"):       # inf - inf far out: nan, no evidence either way
        step = np.diff(ys) * sign
        slack = 1e-9 * (np.abs(ys[:-1]) + np.abs(ys[1:]))
        against = np.nonzero(step < -slack)[0]
    for i in against[np.argsort(step[against] / np.maximum(slack[against], 1e-300))][:MONOTONE_CHECKS]:
        v0, v1 = _precise(b.expr, xs[i]), _precise(b.expr, xs[i + 1])
        if v0 is not None and v1 is not None and (v1 - v0) * sign < 0:
            raise SpecError(f"{where} is not {b.direction}: f({xs[i]:.6g}) = {float(v0):.6g} and f({xs[i + 1]:.6g}) "
                            f"= {float(v1):.6g}; {tail}")


LIMIT_SECONDS = 5.0   # a guard for sympy's limit; numeric extrapolation decides when it gives up


def _value_at(f, x: float, expr: sp.Expr | None = None, what: str = "f") -> float:
    """f at x, or its limit at x = +-inf: the value where f settles on |x| in [10, 1e5] (inf/inf
    NaNs far out are skipped), or +-inf when it keeps growing. Slowly converging limits (atan's
    pi/2 - 1/x) come from sympy's ``limit`` of ``expr`` when it finds one that the values agree
    with, else from extrapolating the values at x = 2^k (:func:`_extrapolate`)."""
    if not math.isinf(x):
        return float(f(np.array([x]))[0])
    xs = np.copysign(np.geomspace(10.0, FAR * 10, 60), x)
    raw = f(xs)
    v = raw[~np.isnan(raw)]
    if v.size >= 2 and np.isfinite(v[-2:]).all() and abs(v[-1] - v[-2]) <= 1e-12 * (1 + abs(v[-2])):
        return float(v[-1]) if abs(v[-1]) > 1e-200 else 0.0
    if v.size >= 8 and (np.isinf(v[-1]) or (abs(v[-1]) > 1 and abs(v[-1]) >= 2 * abs(v[-8]))):
        if np.isinf(v[-1]) and expr is not None:
            _check_float64(expr, xs, raw, what)
        return math.copysign(math.inf, v[-1])
    numeric_limit = _extrapolate(f, x)
    symbolic = _sympy_limit(expr, x) if expr is not None else None
    if symbolic is not None and (numeric_limit is None or _agree(symbolic, numeric_limit)):
        return symbolic
    if numeric_limit is not None:
        return numeric_limit
    raise SpecError(f"{what} has no limit as x -> {'+' if x > 0 else '-'}inf (it neither settles nor diverges "
                    "by |x| = 2^63)")


def _check_float64(expr: sp.Expr, xs: np.ndarray, values: np.ndarray, what: str) -> None:
    """Refuse where float64 gives inf or nan at the first such x of ``xs`` but ``expr`` to 15 digits
    (:func:`_precise`) is a float64 number there that is not growing (it is smaller in magnitude than
    at the grid point before): an overflow or a cancellation (asin(2*sigmoid(x) - 1)'s
    f' as x/0), not a property of f."""
    i = int(np.argmax(~np.isfinite(values)))
    exact = _precise(expr, float(xs[i]))
    before = _precise(expr, float(xs[i - 1])) if i > 0 else None
    growing = before is not None and exact is not None and abs(exact) > abs(before)   # toward +-inf indeed
    if exact is not None and abs(float(exact)) < 1.7e308 and not growing:
        raise _float64_fault("", what, float(xs[i]), values[i], exact)


def _agree(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= 1e-6 * (1 + abs(a))


def _sympy_limit(expr: sp.Expr, x: float) -> float | None:
    """sympy's limit of ``expr`` at x = +-inf as a float (+-inf included), or None."""
    try:
        with time_limit(LIMIT_SECONDS):
            lim = sp.limit(expr, X, sp.oo if x > 0 else -sp.oo)
    except Exception:  # noqa: BLE001 - sympy fails in many ways; the numeric route decides then
        return None
    if lim in (sp.oo, -sp.oo):
        return float(lim)
    if not (lim.is_number and lim.is_real):
        return None
    try:
        value = float(lim)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _extrapolate(f, x: float) -> float | None:
    """The limit of f(2^k) (k -> inf) from its increments, when they shrink geometrically (a
    power-law approach |f - L| ~ |x|^-q gives the ratio 2^-q, Aitken's extrapolation is then exact
    to leading order), +-inf when they keep f growing at a steady pace (log-like growth), else None."""
    xs = np.copysign(2.0 ** np.arange(4, 64), x)
    v = f(xs)
    ok = np.isfinite(v)
    if ok.sum() < 12:
        return None
    v = v[ok]
    dv = np.diff(v)
    if np.all(np.abs(dv[-3:]) <= 1e-15 * (1 + np.abs(v[-3:]))):
        return float(v[-1])                  # settled to float64 precision by |x| = 2^63
    v, dv = v[-12:], dv[-11:]
    if np.all(dv > 0) or np.all(dv < 0):
        ratios = dv[1:] / dv[:-1]
        r = float(ratios[-1])
        if 0 < r <= 0.97 and np.all(np.abs(ratios[-4:] - r) <= 0.02):
            return float(v[-1] + dv[-1] * r / (1 - r))
        if np.all(ratios[-6:] >= 0.99):
            return math.copysign(math.inf, float(dv[-1]))
    return None


def _check_continuous(spec: ActivationSpec, branches: list[Branch]) -> None:
    """Refuse a jump between neighbouring branches: at a jump f' holds a Dirac delta that no g(y)
    can give back, and PyTorch's gradient there is a convention of the formula, not of y."""
    for left, right in zip(branches, branches[1:]):
        x_b = left.x_range[1]
        y_l = left.y_range[1] if left.direction != "decreasing" else left.y_range[0]
        y_r = right.y_range[0] if right.direction != "decreasing" else right.y_range[1]
        if math.isfinite(x_b) and not abs(y_l - y_r) <= 1e-9 * (1 + abs(y_l) + abs(y_r)):
            raise SpecError(f"{spec.name!r} is discontinuous: f jumps at x = {x_b:.17g} from y = {y_l:.17g} "
                            f"to y = {y_r:.17g}; a table of g(y) = f'(f^-1(y)) needs a continuous f "
                            "(write the formula without the jump)")


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
            lim = _value_at(fp, x, sp.diff(b.expr, X), "f'")
            b.limits[which] = lim
            kind = "tail" if math.isinf(y) else _approach(numeric(b.expr), x, y)
            side = f"x -> {'+' if x > 0 else '-'}inf"
            if kind == "log":
                b.singularities.append(f"log at y={y:.17g} ({side})")
            elif kind == "power":
                q = b.orders[which] = _power_order(numeric(b.expr), x, y)
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


def _far_gaps(f, x: float, y: float) -> np.ndarray:
    """|f(x_k) - y| at x_k = +-2^k, k = 0 .. 63 (NaN where f is not finite)."""
    xs = np.copysign(2.0 ** np.arange(0, 64), x)
    return np.abs(f(xs) - y)


def _approach(f, x: float, y: float) -> str:
    """How f reaches its finite limit y as x -> +-inf: "log" when the gap |f - y| shrinks faster
    than any power of x (exponentially: g has a log-type singularity, t = log|y' - y| is the right
    variable), "power" when it shrinks like |x|^-q."""
    d = _far_gaps(f, x, y)
    k = _first_small(d)
    if k is None:   # from above 1e-5 straight to 0 within an octave: faster than any power
        return "log" if (d == 0).any() else "power"
    if k + 2 >= d.size or not (d[k + 1] > 0 and d[k + 2] > 0):
        return "log"
    s1, s2 = math.log2(d[k] / d[k + 1]), math.log2(d[k + 1] / d[k + 2])
    return "log" if s2 > 1.3 * s1 + 0.5 else "power"


def _first_small(d: np.ndarray) -> int | None:
    """The first k with 0 < d[k] < 1e-5 (where the gap is small but far above float64 rounding)."""
    small = np.nonzero((d > 0) & (d < 1e-5))[0]
    return int(small[0]) if small.size else None


def _power_order(f, x: float, y: float) -> float:
    """q in |f - y| ~ |x|^-q (rounded to an integer or half-integer when within 0.02 of one)."""
    d = _far_gaps(f, x, y)
    k = _first_small(d)
    if k is None or k + 2 >= d.size or not d[k + 2] > 0:
        ok = np.nonzero(d > 0)[0]
        k = max(int(ok[-1]) - 2, 0) if ok.size else 0
    q = math.log2(d[k + 1] / d[k + 2]) if k + 2 < d.size and d[k + 1] > 0 and d[k + 2] > 0 else math.inf
    if not math.isfinite(q):
        return q
    half = round(2 * q) / 2
    return half if abs(q - half) <= 0.02 else q


# ---------------------------------------------------------------------------------------------
# codes

def _overlap(a: Branch, b: Branch) -> bool:
    """True when y alone cannot tell a from b on a set of positive measure of either."""
    (a0, a1), (b0, b1) = a.y_range, b.y_range
    tol = 1e-9 * (1 + max(abs(v) for v in (a0, a1, b0, b1) if math.isfinite(v)) if any(
        math.isfinite(v) for v in (a0, a1, b0, b1)) else 1e-9)
    if a.flat and b.flat:
        return abs(a0 - b0) <= tol
    if a.flat or b.flat:
        p, other = (a0, b) if a.flat else (b0, a)
        return other.y_range[0] + tol < p < other.y_range[1] - tol
    return min(a1, b1) - max(a0, b0) > tol


def _signed_zero_clash(a: Branch, b: Branch) -> bool:
    """True when a and b touch only at y = 0, g jumps there, and the branch that does not own y = 0
    (the owner as :func:`.pipeline._branch_break` decides, y_closed) has |g| < 1 there: its values
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


def _assign_codes(branches: list[Branch]) -> int:
    """Greedy colouring from the right, so the branch reaching +inf gets code 0; branches y cannot
    tell apart (:func:`_overlap`, :func:`_signed_zero_clash`) get different codes."""
    for b in reversed(branches):
        taken = {o.code for o in branches if o.index > b.index and (_overlap(o, b) or _signed_zero_clash(o, b))}
        b.code = next(c for c in range(len(branches)) if c not in taken)
    return max(b.code for b in branches) + 1


def _code_breaks(branches: list[Branch]) -> tuple[list[tuple[float, str]], list[int]]:
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
