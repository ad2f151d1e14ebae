"""Segment kinds: one class per kind, each binding the primitives of :class:`Segment` once, and the
transforms of fitted pieces."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
import sympy as sp

from .errors import CertificationError, ScaleError, TableError
from .float32 import F32_MAX, TINY32, end_neighbours, log32, overflows_as, root_power32
from .scheme import ClosedForm, closed_form_fn, horner, is_numbers, number, param_values, plain_extra

__all__ = ["Transform", "BoundContext", "Emitter", "Segment", "ConstantSegment", "ExactSegment", "PolySegment",
           "RationalSegment", "PowerTailSegment", "KINDS", "segment_problem", "segment_texts"]


@dataclass(frozen=True)
class Transform:
    """t = T(y): identity, sqrt(sign*(y - origin)) or log(sign*(y - origin)); origin = hi + mid + lo
    (float32 terms subtracted in order); or, for power_tail segments only, power: t = a^(-1/root),
    a = sign*y clamped to [1, float32 max], with the weight w = a^((root-1)/root) g is multiplied by;
    root 0 (f grows exponentially, g ~ c|y|): t = log a, weight w = a. Hashable: code generation
    numbers a table's distinct ones."""

    kind: str = "identity"                       # identity | sqrt | log | power
    origin: tuple[float, ...] = ()
    sign: int = 1
    root: int = 0                                # power: the growth order n of f (|f| ~ |x|^n), 0: exp

    KINDS: ClassVar[tuple[str, ...]] = ("identity", "sqrt", "log")   # of poly segments

    @classmethod
    def from_json(cls, d: dict) -> Transform:
        if d["kind"] == "identity":
            return cls()
        if d["kind"] == "power":
            return cls("power", (), d.get("sign", 1), d.get("root", 0))
        origin = d.get("origin", 0.0)
        return cls(d["kind"], tuple(origin if isinstance(origin, list) else [origin]), d.get("sign", 1))

    def to_json(self) -> dict:
        if self.kind == "power":
            return {"kind": "power", "sign": self.sign, "root": self.root}
        return {"kind": self.kind} if self.kind == "identity" else {
            "kind": self.kind, "origin": list(self.origin), "sign": self.sign}

    def d(self, y: np.ndarray) -> np.ndarray:
        """sign * (((y - hi) - mid) - lo) in y's dtype."""
        ft = y.dtype.type
        d = y
        for o in self.origin:
            d = d - ft(o)
        return ft(self.sign) * d

    def t(self, y: np.ndarray) -> np.ndarray:
        """t in float64 (the fitter's variable)."""
        return self.scheme(np.asarray(y, dtype=np.float64))

    def scheme(self, y: np.ndarray) -> np.ndarray:
        """t as the documented scheme computes it in y's dtype (float32: the runtime's log)."""
        if self.kind == "identity":
            return y
        if self.kind == "power" and self.root:
            return self.power(y, -1)
        ft = y.dtype.type
        if self.kind == "power":      # root 0: log a (a >= 1, no floor needed)
            a = self.base(y)
            return np.where(np.isnan(a), a, log32(a)) if y.dtype == np.float32 else np.log(a)
        d = self.d(y)
        with np.errstate(all="ignore"):
            if self.kind == "sqrt":
                return np.sqrt(np.maximum(d, ft(0)))
            d = np.maximum(d, ft(TINY32))
            return np.where(np.isnan(d), d, log32(d)) if y.dtype == np.float32 else np.log(d)

    def y(self, t: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`t` in float64."""
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "identity":
            return t
        if self.kind == "power":
            with np.errstate(divide="ignore", over="ignore"):
                return self.sign * (t ** -float(self.root) if self.root else np.exp(t))
        hi, *rest = self.origin
        return hi + (sum(rest) + self.sign * (t * t if self.kind == "sqrt" else np.exp(t)))

    def power(self, y: np.ndarray, k: int) -> np.ndarray:
        """a^(k/root), a = sign*y clamped to [1, float32 max], in y's dtype (float32: the scheme's
        :func:`.float32.root_power32`)."""
        a = self.base(y)
        with np.errstate(all="ignore"):
            return root_power32(a, self.root, k) if y.dtype == np.float32 else a ** (k / self.root)

    def base(self, y: np.ndarray) -> np.ndarray:
        """a = sign*y clamped to [1, float32 max] in y's dtype: a power transform's argument."""
        ft = y.dtype.type
        with np.errstate(all="ignore"):
            return np.clip(ft(self.sign) * y, ft(1), ft(F32_MAX))

    def weight(self, y: np.ndarray) -> np.ndarray:
        """w = a^((root-1)/root), or a itself for root 0 (exact: no rounding)."""
        return self.power(y, self.root - 1) if self.root else self.base(y)

    def describe(self) -> str:
        if self.kind == "identity":
            return "y"
        if self.kind == "power":
            sy = f"{'' if self.sign > 0 else '-'}y"
            return f"t = {sy}^(-1/{self.root})" if self.root else f"t = log({sy})"
        return f"{self.kind}({'' if self.sign > 0 else '-'}(y - {sum(map(float, self.origin)):.10g}))"


@dataclass(frozen=True)
class BoundContext:
    """What certifying one segment needs: its branch's float64 expression and reference
    (a :class:`.reference.BranchReference`), the table's target, tolerance and parameters."""

    name: str
    branch: int
    expr: sp.Expr
    ref: Any
    target: str
    tolerance: float
    params: dict


class Emitter(Protocol):
    """The forms code generation evaluates (``Segment.emit`` calls one of them)."""

    def row(self, transform: Transform, center: float, scale: float, coeffs: list[float], c0_lo: float,
            den: list[float]) -> None: ...
    def closed_form(self, expr: str) -> None: ...
    def constant(self, value: Any) -> None: ...


# --------------------------------------------------------------------------------------------
# segments

@dataclass
class Segment:
    """One piece of a code class over ``y_range`` (JSON numbers or "inf" strings), from ``branch``.
    ``extra``: keys the model does not interpret (an inverse table's ``cutoff``), kept as read."""

    y_range: list
    branch: int | None                       # None only for a piece outside a table
    extra: dict = field(default_factory=dict, kw_only=True)

    kind: ClassVar[str] = ""
    KEYS: ClassVar[tuple[str, ...]] = ()     # the JSON keys this kind requires (besides "kind")
    TEXTS: ClassVar[tuple[tuple[str, tuple[str, ...], str], ...]] = ()   # (key, variables, label) of the
                                             # expression strings it holds (checked by the whitelist)
    fitted: ClassVar[bool] = False           # a fitted piece (counted as a piece, certified by a proof)

    @staticmethod
    def from_json(d: dict) -> Segment:
        kind = KINDS.get(d.get("kind"))
        if kind is None:
            raise TableError(f"unknown segment kind {d.get('kind')!r}; expected one of {', '.join(KINDS)}")
        cls = kind.variant(d)
        names = [f.name for f in fields(cls) if f.name != "extra"]
        values = {"branch": None, **{n: d[n] for n in names if n in d}}   # a lone piece may lack its branch
        return cls(**cls._typed(values), extra=plain_extra(d, {"kind", *names}))

    @classmethod
    def variant(cls, d: dict) -> type[Segment]:
        """The class of a JSON segment of this kind (a kind may have variants: poly with "den")."""
        return cls

    @classmethod
    def _typed(cls, values: dict) -> dict:
        """Field values from their JSON form (numbers and strings stay as read)."""
        return values

    def to_json(self) -> dict:
        out = {"kind": self.kind}
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        out["y_range"] = list(self.y_range)
        if self.branch is None:
            del out["branch"]
        out.update(self.extra)
        return out

    @property
    def lo(self) -> float:
        return number(self.y_range[0])

    @property
    def hi(self) -> float:
        return number(self.y_range[1])

    @property
    def certified(self) -> bool:
        """False for an inverse table's cutoff constant (beyond float32's range: not certified)."""
        return not self.extra.get("cutoff")

    def evaluate(self, y: np.ndarray, params: dict | None = None) -> np.ndarray:
        """g~(y) by the documented scheme in y's dtype (float32: bit for bit as generated code for
        y inside ``y_range``, which is all certification evaluates; generated code also clamps an exact
        closed form to its branch's sign, max(g, 0) on an increasing and min(g, 0) on a decreasing
        branch (:func:`.codegen.analysis.signed`), a clamp idle inside ``y_range`` and not done here)."""
        raise NotImplementedError

    def evaluate_fma(self, y: np.ndarray, params: dict | None = None) -> np.ndarray:
        """g~(y) by the FMA scheme (docs/table-format.md) in float32: :meth:`evaluate` for a kind
        with no fused step (only POLY rows have them)."""
        return self.evaluate(y, params)

    def spread(self, y: np.ndarray, params: dict | None = None) -> np.ndarray:
        """(least, greatest) g~(y) over the results the library functions it calls may have, stacked
        (shape (2, *y.shape); broadcast where it calls none): :meth:`evaluate` for a kind without calls."""
        g = self.evaluate(y, params)
        return np.broadcast_to(g, (2, *g.shape))

    def scheme_error(self, ref: Callable, y: np.ndarray, params: dict | None = None) -> float:
        """Max error of the emulated float32 scheme at the float32 values ``y`` against the float64
        reference ``ref``, absolute where |g| <= 1 and relative above, as certification measures it;
        inf where float32 gives NaN or inf and the reference is finite (but not where it rounds to that inf)."""
        y = np.asarray(y, dtype=np.float32)
        g = ref(y.astype(np.float64))
        with np.errstate(all="ignore"):
            got = self.spread(y, params).astype(np.float64)     # every library within its ulps (scheme.py)
            err = np.where(np.isfinite(got), np.abs(got - g) / np.maximum(1.0, np.abs(g)), np.inf)
            err = np.where(overflows_as(got, g), 0.0, err)    # g past float32 max: inf is its float32 value
        return float(np.max(err[:, np.isfinite(g)], initial=0.0))

    def bound(self, ctx: BoundContext) -> tuple[float, str]:
        """(bound on |g~ - g| in real arithmetic over the segment, the method that gave it)."""
        raise NotImplementedError

    def describe(self, fmt: Callable[[float], str] = "{:.4g}".format) -> str:
        raise NotImplementedError

    def emit(self, out: Emitter) -> None:
        raise NotImplementedError

    @classmethod
    def structure_problem(cls, d: dict, where: str) -> str | None:
        """What is wrong with the JSON ``d`` of this kind beyond missing keys (None: nothing)."""
        return None

    @classmethod
    def value_problem(cls, d: dict, where: str) -> str | None:
        """What is wrong with the values of ``d`` that reach generated code other than as expressions."""
        return None

    def text(self) -> Any:
        """The closed form or value a branch's ``tails`` list shows for this segment (None: fitted)."""
        return getattr(self, self.TEXTS[0][0]) if self.TEXTS else None

    def substituted(self, params: dict) -> Segment:
        """The segment with parameter values put into its expressions (tables that are not generic)."""
        return self


@dataclass
class ConstantSegment(Segment):
    """g = value (a number, or an expression in parameter names)."""

    value: Any

    kind: ClassVar[str] = "constant"
    KEYS: ClassVar[tuple[str, ...]] = ("value", "y_range", "branch")
    TEXTS: ClassVar[tuple] = (("value", (), "constant"),)

    def evaluate(self, y, params=None):
        ft = y.dtype.type
        return np.full_like(y, ft(number(self.value, params))) + y * ft(0)  # NaN propagates

    def bound(self, ctx):
        """|g - value| on 200k points dense in x (a tail's g is monotone there)."""
        lo, hi = max(self.lo, -F32_MAX), min(self.hi, F32_MAX)
        xa, xb = sorted(float(v) for v in ctx.ref.inverse(np.array([lo, hi]), bulk=False))
        x = np.concatenate([np.linspace(xa, min(xb, xa + 1e3), 100_000),
                            np.geomspace(1, 1 + xb - xa, 100_000) + xa - 1])
        x = x[(x >= xa) & (x <= xb)]
        value = number(self.value, ctx.params)
        return float(np.max(np.abs(ctx.ref.value(x, bulk=False) - value), initial=0.0)), "dense-tail"

    def describe(self, fmt=None):
        return f"constant {self.value}"

    def emit(self, out):
        out.constant(self.value)


@dataclass
class ExactSegment(Segment):
    """g = expr(y), a closed form evaluated as written."""

    expr: str

    kind: ClassVar[str] = "exact"
    KEYS: ClassVar[tuple[str, ...]] = ("expr", "y_range", "branch")
    TEXTS: ClassVar[tuple] = (("expr", ("y",), "expr"),)

    def evaluate(self, y, params=None):
        return self._form(params)(y).astype(y.dtype)

    def spread(self, y, params=None):
        """:meth:`.scheme.ClosedForm.spread`: over every library within LIBRARY_ULPS of the exact results."""
        return self._form(params).spread(y).astype(y.dtype)

    def _form(self, params) -> ClosedForm:
        return closed_form_fn(self.expr, tuple(sorted((params or {}).items())))

    def scheme_error(self, ref, y, params=None):
        """:meth:`Segment.scheme_error` at ``y`` and at the float32 values next to the segment's
        finite ends (:func:`.float32.end_neighbours`, as certification checks them): a closed form
        cancels there (4*(y + 0.3)**(3/4) sums y and float32 0.3, 3e-6 off at y = -0.29999998), so
        the fitter fits a branch whose closed form float32 cannot evaluate next to its ends."""
        y = np.concatenate([np.asarray(y, dtype=np.float64), end_neighbours(self.lo, self.hi)])
        return super().scheme_error(ref, y, params)

    def bound(self, ctx):
        return 0.0, "exact"

    def describe(self, fmt=None):
        return f"exact {self.expr}"

    def emit(self, out):
        out.closed_form(self.expr)

    def substituted(self, params):
        from .expressions import parse
        e = parse(self.expr, ("y",), tuple(params), "segment expr").subs(param_values(params))
        return ExactSegment(self.y_range, self.branch, sp.sstr(e), extra=dict(self.extra))


@dataclass
class PolySegment(Segment):
    """g = c0 + u P(u), u = clamp((T(y) - center) * scale, -1, 1); c0 = c0_hi + c0_lo (float32 terms)."""

    transform: Transform
    center: float
    scale: float
    coeffs: list                # c0_hi, c1 .. cd (float32 values)
    c0_lo: float
    error: float                # max error found when fitting (real arithmetic)

    kind: ClassVar[str] = "poly"
    KEYS: ClassVar[tuple[str, ...]] = ("y_range", "branch", "transform", "center", "scale", "coeffs", "c0_lo",
                                       "error")
    fitted: ClassVar[bool] = True

    @classmethod
    def variant(cls, d):
        return RationalSegment if d.get("den") is not None else PolySegment

    @classmethod
    def _typed(cls, values):
        return dict(values, transform=Transform.from_json(values["transform"]))

    @classmethod
    def structure_problem(cls, d, where):
        if not is_numbers(d["coeffs"]):
            return f"has non-numeric coeffs in {where}"
        if "den" in d and not (is_numbers(d["den"]) and len(d["den"]) >= 2 and d["den"][0] == 1
                               and len(d["coeffs"]) >= 2):
            return f"has a malformed den in {where} (numbers [1, d1, ...], with a numerator of degree >= 1)"
        return None

    @classmethod
    def value_problem(cls, d, where):
        tf = d["transform"]
        origin = tf.get("origin", 0.0) if isinstance(tf, dict) else None
        origin = origin if isinstance(origin, list) else [origin]
        if not (isinstance(tf, dict) and tf.get("kind") in Transform.KINDS and tf.get("sign", 1) in (1, -1)
                and is_numbers(origin) and is_numbers([d["center"], d["scale"], d["c0_lo"]])):
            return (f"has a malformed poly segment {where} (transform kind identity/sqrt/log, sign +-1, numeric "
                    "origin, center, scale and c0_lo)")
        return None

    def to_json(self):
        out = super().to_json()
        out["transform"] = self.transform.to_json()
        out["coeffs"] = list(self.coeffs)
        return out

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    @property
    def den_degree(self) -> int:
        return 0

    @property
    def denominator(self) -> list | None:
        return None

    def u(self, y: np.ndarray) -> np.ndarray:
        """The centred variable by the scheme, in y's dtype."""
        ft = y.dtype.type
        return np.clip((self.transform.scheme(y) - ft(self.center)) * ft(self.scale), ft(-1), ft(1))

    def evaluate(self, y, params=None):
        return horner(self.coeffs, self.c0_lo, self.u(y), self.denominator)

    def evaluate_fma(self, y, params=None):
        return horner(self.coeffs, self.c0_lo, self.u(y), self.denominator, fma=True)

    def bound(self, ctx):
        """A proved bound (python-flint balls, :mod:`.arb_bound`) over the piece's ends in x."""
        from .arb_bound import piece_bound
        lo, hi = self.lo, self.hi
        xa, xb = sorted(float(v) for v in ctx.ref.inverse(np.array([lo, hi]), bulk=False))
        xa, xb = xa - 1e-15 * max(1.0, abs(xa)), xb + 1e-15 * max(1.0, abs(xb))

        def prove(a, b):   # piece_bound's goal is the tolerance when it fails: a bound above it is
            bound, _, proved = piece_bound(ctx.expr, self, ctx.target, a, b, ctx.tolerance)   # the error's
            return bound, proved, bound > ctx.tolerance              # lower bound at a point (a violation)

        return _proved(ctx, self, f"piece on y in [{lo:g}, {hi:g}]", prove, xa, xb, lambda a, b: 0.5 * (a + b)), \
            "arb-taylor2"

    def _shape(self) -> str:
        return f"poly degree {self.degree}"

    def describe(self, fmt="{:.4g}".format):
        return f"{self._shape()} in {self.transform.describe()}, error {fmt(self.error)}"

    def emit(self, out):
        out.row(self.transform, float(self.center), float(self.scale), [float(c) for c in self.coeffs],
                float(self.c0_lo), [float(d) for d in self.denominator or [1.0]])


@dataclass
class RationalSegment(PolySegment):
    """g = c0 + u N(u) / Q(u), Q = den = (1, d1 .. dn) with no zero on [-1, 1] (JSON kind "poly" with
    "den"); N = c1 + c2 u + ... from ``coeffs``."""

    den: list                   # 1, d1 .. dn (float32 values)

    @property
    def den_degree(self) -> int:
        return len(self.den) - 1

    @property
    def denominator(self) -> list:
        return self.den

    def to_json(self):
        out = super().to_json()
        out["den"] = list(self.den)
        return out

    def _shape(self) -> str:
        return f"rational ({self.degree}, {self.den_degree})"


@dataclass
class PowerTailSegment(PolySegment):
    """g = w * h, a tail where g grows without bound like |y|^((n-1)/n) (|f| ~ |x|^n as x -> +-inf):
    the transform is Transform("power", sign=s, root=n), t = a^(-1/n) and w = a^((n-1)/n) with
    a = s*y clamped to [1, float32 max] (:func:`.float32.root_power32`), and h = c0 + u P(u) the
    polynomial of a poly segment in t; root 0 where f grows exponentially (g/|y| -> c != 0): t = log a,
    w = a. Its certified error is relative (|g| >= 1 on the whole tail)."""

    kind: ClassVar[str] = "power_tail"

    @classmethod
    def variant(cls, d):
        return PowerTailSegment

    @classmethod
    def structure_problem(cls, d, where):
        if "den" in d:
            return f"has a den in power_tail segment {where} (power tails are polynomial)"
        return super().structure_problem(d, where)

    @classmethod
    def value_problem(cls, d, where):
        from ..common.float32_scheme import ROOT_ORDERS
        tf = d["transform"]
        if not (isinstance(tf, dict) and tf.get("kind") == "power" and tf.get("sign") in (1, -1)
                and tf.get("root") in (0, *ROOT_ORDERS) and not isinstance(tf.get("root"), bool)
                and is_numbers([d["center"], d["scale"], d["c0_lo"]])):
            return (f"has a malformed power_tail segment {where} (transform kind power, sign +-1, root 0 or one of "
                    f"{', '.join(map(str, ROOT_ORDERS))}; numeric center, scale and c0_lo)")
        return None

    def evaluate(self, y, params=None):
        return self._weighted(y, super().evaluate(y, params))

    def evaluate_fma(self, y, params=None):
        return self._weighted(y, super().evaluate_fma(y, params))

    def _weighted(self, y: np.ndarray, h: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):     # g = c|y| past float32 max (c > 1): inf, its float32 value
            return self.transform.weight(y) * h

    def bound(self, ctx):
        """A proved bound on |g~ - g| / |g| (python-flint balls, :func:`.power_bound.tail_bound`)."""
        from .power_bound import tail_bound
        lo, hi = max(self.lo, -F32_MAX), min(self.hi, F32_MAX)   # float32 +-inf is clamped to the max
        xa, xb = sorted(float(v) for v in ctx.ref.inverse(np.array([lo, hi]), bulk=False))
        xa, xb = xa - 1e-15 * max(1.0, abs(xa)), xb + 1e-15 * max(1.0, abs(xb))

        def prove(a, b):
            return tail_bound(ctx.expr, self, a, b, ctx.tolerance, detail=True)

        def middle(a, b):   # the cells are in log|x| (in x for root 0)
            return math.copysign(math.sqrt(a * b), a) if self.transform.root else 0.5 * (a + b)

        return _proved(ctx, self, f"power tail on y in [{lo:g}, {hi:g}]", prove, xa, xb, middle), "arb-relative1"

    def _shape(self) -> str:
        n = self.transform.root
        if not n:
            return f"exponential tail g = |y| * h(t), h poly degree {self.degree}"
        return f"power tail g = |y|^({n - 1}/{n}) * h(t), h poly degree {self.degree}"

    def describe(self, fmt="{:.4g}".format):
        return f"{self._shape()}, {self.transform.describe()}, relative error {fmt(self.error)}"


SPLIT_DEPTH = 2     # a proof that fails is retried on the halves of its x range, and theirs, this deep
SCALE_MISS = 10.0   # tolerances by which a fit may miss g next to a change of f finer than its samples (ScaleError)
LOCATE_HALVINGS = 24   # a violated range is halved this often at most towards the point the proof fails at
DENSE_POINTS = 100_001   # float64 x at which a violated range is checked (:func:`_sampled_error`)


def _proved(ctx: BoundContext, seg: Segment, what: str, prove, xa: float, xb: float, middle) -> float:
    """The bound ``prove(a, b)`` ((bound, proved, violated)) gives over [xa, xb], retried on halves
    (at ``middle(a, b)``) of a range that fails (each with a full cell budget), SPLIT_DEPTH deep.
    Unproved: where the piece's error is shown to exceed the tolerance at a point, ScaleError if
    float64 sees no such error across that range (:func:`_violation_error`), else CertificationError
    (the fitter's checks missed it: a bug); otherwise FitError (exit 2) naming the piece, where its
    proof failed and the bound reached there: a property of the formula in Arb's ball arithmetic
    (x + exp(-1/x**2) has no finite enclosure at x = 0) that no tighter fit can change."""
    from .errors import FitError
    failed = None
    stack = [(xa, xb, 0)]
    worst = 0.0
    while stack:
        a, b, depth = stack.pop()
        bound, proved, violated = prove(a, b)
        m = middle(a, b)
        if proved:
            worst = max(worst, bound)
        elif violated or depth >= SPLIT_DEPTH or not a < m < b:
            failed = (a, b, bound, violated)
            break
        else:
            stack += [(m, b, depth + 1), (a, m, depth + 1)]
    if failed is None:
        return worst
    a, b, bound, violated = failed
    where = f"{ctx.name}: the {what} of branch {ctx.branch} (x in [{xa:.6g}, {xb:.6g}])"
    if violated:
        raise _violation_error(ctx, seg, where, *_violated_part(prove, middle, a, b, bound))
    bad = [x for x in (a, b, 0.5 * (a + b), *([0.0] if a < 0.0 < b else [])) if not _arb_finite(ctx.expr, x)]
    if bad:
        why = (f"Arb's ball arithmetic evaluates f or f' at x = {bad[0]:.6g} as inf or NaN (a term such as "
               "exp(-1/x**2) at x = 0), so no enclosure next to that point is finite")
        advice = "a table needs a proved bound on every piece: write f so that Arb can evaluate it there"
    else:
        why = (f"on x in [{a:.6g}, {b:.6g}] the bound reached {bound:.3g}: Arb's enclosures of the error there "
               f"stay wider than the tolerance, also with the proof split into {2 ** SPLIT_DEPTH} parts")
        advice = "a table needs a proved bound on every piece: a looser --tolerance may let this one be proved"
    raise FitError(f"{where} cannot be proved within {ctx.tolerance:g}: {why}", None, advice)


def _violated_part(prove, middle, a: float, b: float, bound: float) -> tuple[float, float, float]:
    """(a', b', the error's lower bound there): the part of [a, b], where ``prove`` shows the error
    above the tolerance at a point, halved (at ``middle``) into a half where it shows that again, at
    most LOCATE_HALVINGS times; it stops where neither half shows it within its cell budget."""
    for _ in range(LOCATE_HALVINGS):
        m = middle(a, b)
        if not a < m < b:
            break
        for lo, hi in ((a, m), (m, b)):
            half_bound, _, violated = prove(lo, hi)
            if violated:
                a, b, bound = lo, hi, half_bound
                break
        else:
            break
    return a, b, bound


def _violation_error(ctx: BoundContext, seg: Segment, where: str, a: float, b: float, bound: float) -> Exception:
    """The refusal of a piece whose proof shows its error above the tolerance at a point of x in
    [a, b]: a ScaleError where float64 f, at DENSE_POINTS across [a, b], shows the piece within the
    tolerance everywhere (x + tanh(1e20*(x - 1e-5))/1e20 rises by 2e-20 within 1e-20 of x = 1e-5,
    between any two float64 samples the fitter takes: g is 2 there, 1 beside it), else (an error above
    the tolerance that float64 shows, or no sample of x whose y is in the segment) a CertificationError:
    the fitter's own float64 checks should have seen it, a bug."""
    sampled, spacing, count = _sampled_error(ctx, seg, a, b)
    found = (f"{where} has an error of at least {bound:.3g} at a point of x in [{a:.9g}, {b:.9g}], above the "
             f"tolerance {ctx.tolerance:g}")
    if sampled > ctx.tolerance or count == 0:
        return CertificationError(f"{found}; float64 samples there show an error of {sampled:.3g} at {count} points")
    ys = ctx.ref.f(np.array([a, b]))
    return ScaleError(f"{found} (y in [{min(ys):.9g}, {max(ys):.9g}]), while float64 f at {DENSE_POINTS} points "
                      f"spaced {spacing:.3g} across it shows an error of {sampled:.3g} at most: f changes there on a "
                      "scale of x finer than the fitter's scans and float64 samples resolve")


def _sampled_error(ctx: BoundContext, seg: Segment, a: float, b: float) -> tuple[float, float, int]:
    """(the largest error of ``seg`` against g, absolute where |g| <= 1 and relative above, at y = f(x)
    for DENSE_POINTS float64 x evenly spread over [a, b] with y in the segment, their spacing, how many
    of them have y in the segment)."""
    x = np.linspace(a, b, DENSE_POINTS)
    with np.errstate(all="ignore"):
        y = ctx.ref.f(x)
        inside = np.isfinite(y) & (y >= seg.lo) & (y <= seg.hi)
        want = ctx.ref.value(x[inside], bulk=False)
        err = np.abs(seg.evaluate(y[inside], ctx.params) - want) / np.maximum(1.0, np.abs(want))
    err = np.where(np.isfinite(want), np.nan_to_num(err, nan=np.inf), 0.0)
    return float(np.max(err, initial=0.0)), (b - a) / (DENSE_POINTS - 1), int(np.count_nonzero(inside))


def _arb_finite(expr: sp.Expr, x: float) -> bool:
    """Whether f and f' evaluate to finite Arb balls at the point x."""
    from flint import arb, ctx

    from .arb_bound import PREC, compile_arb
    from .formulas import X
    old = ctx.prec
    ctx.prec = PREC
    try:
        return all(v.is_finite() for v in compile_arb((expr, sp.diff(expr, X)))(arb(x)))
    except (ValueError, ZeroDivisionError, ArithmeticError):
        return False
    finally:
        ctx.prec = old


KINDS: dict[str, type[Segment]] = {cls.kind: cls for cls in (ConstantSegment, ExactSegment, PolySegment,
                                                             PowerTailSegment)}


def segment_problem(d: dict, where: str) -> str | None:
    """What is wrong with the structure of JSON segment ``d`` (at ``where`` in its table), or None."""
    cls = KINDS.get(d.get("kind"))
    missing = [k for k in (cls.KEYS if cls else ("kind",)) if k not in d]
    if missing or cls is None:
        return f"has a malformed segment {where} (missing {missing})"
    return cls.structure_problem(d, where)


def segment_texts(d: dict, where: str) -> list[tuple[Any, tuple[str, ...], str]]:
    """(text, its variables, what it is) of each expression string JSON segment ``d`` holds."""
    return [(d[key], variables, f"{where} {label}") for key, variables, label in KINDS[d["kind"]].TEXTS]


def _check_kinds() -> None:
    """Every kind names its JSON keys and binds the primitives (a new kind missing one fails here)."""
    for kind, cls in KINDS.items():
        missing = [m for m in ("evaluate", "bound", "describe", "emit") if getattr(cls, m) is getattr(Segment, m)]
        if missing or cls.kind != kind or not cls.KEYS:
            raise TypeError(f"segment kind {kind!r} ({cls.__name__}) lacks {missing or 'its kind or KEYS'}")


_check_kinds()

