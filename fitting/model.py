"""The typed table model (docs/table-format.md): :class:`Table`, :class:`TableBranch`, :class:`CodeClass`
and one :class:`Segment` class per kind, loaded from and dumped to the JSON format unchanged.

Like numpy.polynomial, one base class states the few primitives every kind provides, and each kind
binds them once: ``evaluate`` (the documented scheme in numpy, float32 bit for bit or float64),
``scheme_error`` (that scheme against a reference), ``bound`` (certification of the piece),
``describe`` (``invact show``) and ``emit`` (what code generation builds from it). Adding a segment
kind means adding one class here (and registering it in :data:`KINDS`).

Values are kept as the JSON holds them (numbers stay numbers, ``"inf"`` stays a string, expression
strings stay strings), so ``Table.from_json(t).to_json() == t`` and a table dumps to the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
import sympy as sp

from .errors import CertificationError, TableError
from .float32 import F32_MAX, TINY32, log32

__all__ = ["Table", "TableBranch", "CodeClass", "ForwardCode", "Break", "Transform", "Segment",
           "ConstantSegment", "ExactSegment", "PolySegment", "RationalSegment", "KINDS", "BoundContext",
           "Emitter", "number", "horner", "segment_index"]


# --------------------------------------------------------------------------------------------
# numbers and the scheme's arithmetic

def number(text, params: dict | None = None) -> float:
    """A table number: a float, "inf"/"-inf", or an expression string in parameter names."""
    if isinstance(text, (int, float)):
        return float(text)
    if text in ("inf", "-inf"):
        return float(text)
    params = params or {}
    return float(_sym(text, tuple(sorted(params))).subs(_symbols(params)))


def _symbols(params: dict) -> dict:
    return {sp.Symbol(k, real=True): v for k, v in params.items()}


@lru_cache(maxsize=512)
def _sym(text: str, names: tuple[str, ...]) -> sp.Expr:
    """``text`` parsed with y, x and the table's parameter names as the real symbols they are."""
    from .expressions import parse
    return parse(text, ("y", "x"), names, "table expression")


@lru_cache(maxsize=256)
def _exact_fn(expr: str, params: tuple):
    e = _sym(expr, tuple(k for k, _ in params)).subs(_symbols(dict(params)))
    f = sp.lambdify(sp.Symbol("y", real=True), e, modules=["numpy"])

    def call(y):
        with np.errstate(all="ignore"):
            return np.broadcast_to(np.asarray(f(y), dtype=y.dtype), y.shape)
    return call


def horner(coeffs, c0_lo: float, u: np.ndarray, den=None) -> np.ndarray:
    """The documented evaluation order in u's dtype (docs/table-format.md): c0 + u N(u), or with a
    denominator (1, d1 .. dn) c0 + u N(u) / Q(u), Q by Horner down to d0 = 1."""
    u = np.asarray(u)
    ft = u.dtype.type
    if len(coeffs) == 1:
        return (u * ft(0) + ft(c0_lo)) + ft(coeffs[0])   # u * 0: NaN propagates, as in generated code
    p = np.full_like(u, coeffs[-1])
    for c in coeffs[-2:0:-1]:
        p = p * u + ft(c)
    if den is not None:
        q = np.full_like(u, den[-1])
        for d in den[-2::-1]:
            q = q * u + ft(d)
        with np.errstate(all="ignore"):
            p = p / q
    p = p * u
    return (p + ft(c0_lo)) + ft(coeffs[0])


def segment_index(breaks, y: np.ndarray, params: dict | None = None) -> np.ndarray:
    """Index of the segment holding each y: sum over breaks of (y > b) (left side) or (y >= b)."""
    idx = np.zeros(y.shape, dtype=np.int64)
    for b in breaks:
        b = b if isinstance(b, Break) else Break.from_json(b)
        v = y.dtype.type(number(b.value, params))
        idx += (y > v) if b.side == "left" else (y >= v)
    return idx


def _plain_extra(d: dict, known) -> dict:
    return {k: v for k, v in d.items() if k not in known}


# --------------------------------------------------------------------------------------------
# small parts

@dataclass(frozen=True)
class Break:
    """A break between intervals: ``value`` (number or expression string) and the side owning it."""

    value: Any
    side: str

    @classmethod
    def from_json(cls, d: dict) -> Break:
        return cls(d["value"], d["side"])

    def to_json(self) -> dict:
        return {"value": self.value, "side": self.side}


@dataclass(frozen=True)
class Transform:
    """t = T(y): identity, sqrt(sign*(y - origin)) or log(sign*(y - origin)); origin = hi + mid + lo
    (float32 terms subtracted in order). Hashable: code generation numbers a table's distinct ones."""

    kind: str = "identity"                       # identity | sqrt | log
    origin: tuple[float, ...] = ()
    sign: int = 1

    KINDS: ClassVar[tuple[str, ...]] = ("identity", "sqrt", "log")

    @classmethod
    def from_json(cls, d: dict) -> Transform:
        if d["kind"] == "identity":
            return cls()
        origin = d.get("origin", 0.0)
        return cls(d["kind"], tuple(origin if isinstance(origin, list) else [origin]), d.get("sign", 1))

    def to_json(self) -> dict:
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
        ft = y.dtype.type
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
        hi, *rest = self.origin
        return hi + (sum(rest) + self.sign * (t * t if self.kind == "sqrt" else np.exp(t)))

    def describe(self) -> str:
        if self.kind == "identity":
            return "y"
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
    fitted: ClassVar[bool] = False           # a fitted piece (counted as a piece, certified by a proof)

    @staticmethod
    def from_json(d: dict) -> Segment:
        kind = KINDS.get(d.get("kind"))
        if kind is None:
            raise TableError(f"unknown segment kind {d.get('kind')!r}; expected one of {', '.join(KINDS)}")
        cls = kind.variant(d)
        names = [f.name for f in fields(cls) if f.name != "extra"]
        values = {"branch": None, **{n: d[n] for n in names if n in d}}   # a lone piece may lack its branch
        return cls(**cls._typed(values), extra=_plain_extra(d, {"kind", *names}))

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
        """g~(y) by the documented scheme in y's dtype (float32: bit for bit as generated code)."""
        raise NotImplementedError

    def scheme_error(self, ref: Callable, y: np.ndarray, params: dict | None = None) -> float:
        """Max error of the emulated float32 scheme at the float32 values ``y`` against the float64
        reference ``ref``, absolute where |g| <= 1 and relative above, as certification measures it;
        inf where float32 gives NaN or inf and the reference is finite."""
        y = np.asarray(y, dtype=np.float32)
        g = ref(y.astype(np.float64))
        with np.errstate(all="ignore"):
            got = self.evaluate(y, params).astype(np.float64)
            err = np.where(np.isfinite(got), np.abs(got - g) / np.maximum(1.0, np.abs(g)), np.inf)
        return float(np.max(err[np.isfinite(g)], initial=0.0))

    def bound(self, ctx: BoundContext) -> tuple[float, str]:
        """(bound on |g~ - g| in real arithmetic over the segment, the method that gave it)."""
        raise NotImplementedError

    def describe(self, fmt: Callable[[float], str] = "{:.4g}".format) -> str:
        raise NotImplementedError

    def emit(self, out: Emitter) -> None:
        raise NotImplementedError

    def texts(self) -> list[tuple[Any, tuple[str, ...]]]:
        """(expression text, its variables) of every expression the segment holds (validation)."""
        return []

    def text(self) -> Any:
        """The closed form or value a branch's ``tails`` list shows for this segment."""
        return None

    def substituted(self, params: dict) -> Segment:
        """The segment with parameter values put into its expressions (tables that are not generic)."""
        return self


@dataclass
class ConstantSegment(Segment):
    """g = value (a number, or an expression in parameter names)."""

    value: Any

    kind: ClassVar[str] = "constant"
    KEYS: ClassVar[tuple[str, ...]] = ("value", "y_range", "branch")

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

    def texts(self):
        return [(self.value, ())]

    def text(self):
        return self.value


@dataclass
class ExactSegment(Segment):
    """g = expr(y), a closed form evaluated as written."""

    expr: str

    kind: ClassVar[str] = "exact"
    KEYS: ClassVar[tuple[str, ...]] = ("expr", "y_range", "branch")

    def evaluate(self, y, params=None):
        return _exact_fn(self.expr, tuple(sorted((params or {}).items())))(y).astype(y.dtype)

    def bound(self, ctx):
        return 0.0, "exact"

    def describe(self, fmt=None):
        return f"exact {self.expr}"

    def emit(self, out):
        out.closed_form(self.expr)

    def texts(self):
        return [(self.expr, ("y",))]

    def text(self):
        return self.expr

    def substituted(self, params):
        from .expressions import parse
        e = parse(self.expr, ("y",), tuple(params), "segment expr").subs(_symbols(params))
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

    def bound(self, ctx):
        """A proved bound (python-flint balls, :mod:`.arb_bound`) over the piece's ends in x."""
        from .arb_bound import piece_bound
        lo, hi = self.lo, self.hi
        xa, xb = sorted(float(v) for v in ctx.ref.inverse(np.array([lo, hi]), bulk=False))
        xa, xb = xa - 1e-15 * max(1.0, abs(xa)), xb + 1e-15 * max(1.0, abs(xb))
        bound, _, proved = piece_bound(ctx.expr, self, ctx.target, xa, xb, ctx.tolerance)
        if not proved:
            raise CertificationError(f"{ctx.name}: piece on y in [{lo:g}, {hi:g}] of branch {ctx.branch} "
                                     f"could not be proved within {ctx.tolerance:g} (reached {bound:.3g})")
        return bound, "arb-taylor2"

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


KINDS: dict[str, type[Segment]] = {cls.kind: cls for cls in (ConstantSegment, ExactSegment, PolySegment)}


# --------------------------------------------------------------------------------------------
# code classes, branches, the table

@dataclass
class CodeClass:
    """The segments a code value selects, sorted by y, and the breaks between them."""

    code: int
    y_breaks: list[Break]
    segments: list[Segment]
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> CodeClass:
        return cls(d["code"], [Break.from_json(b) for b in d["y_breaks"]],
                   [Segment.from_json(s) for s in d["segments"]],
                   _plain_extra(d, {"code", "y_breaks", "segments"}))

    def to_json(self) -> dict:
        return {"code": self.code, "y_breaks": [b.to_json() for b in self.y_breaks],
                "segments": [s.to_json() for s in self.segments], **self.extra}

    def evaluate(self, y: np.ndarray, params: dict | None = None) -> np.ndarray:
        """g~(y); y's dtype (float32 or float64) is the arithmetic used."""
        y = np.asarray(y)
        idx = segment_index(self.y_breaks, y, params)
        out = np.empty_like(y)
        for i, seg in enumerate(self.segments):
            m = idx == i
            if m.any():
                out[m] = seg.evaluate(y[m], params)
        return out


@dataclass
class ForwardCode:
    x_breaks: list[Break]
    codes: list[int]

    @classmethod
    def from_json(cls, d: dict) -> ForwardCode:
        return cls([Break.from_json(b) for b in d["x_breaks"]], list(d["codes"]))

    def to_json(self) -> dict:
        return {"x_breaks": [b.to_json() for b in self.x_breaks], "codes": list(self.codes)}


@dataclass
class TableBranch:
    """A branch as the table describes it (for humans, plots and tests): ranges, direction, ends;
    ``info`` holds the rest as read (route, singularities, tails, pieces, degrees ...)."""

    index: int
    code: int
    x_range: list
    y_range: list
    direction: str
    lower_end: str
    upper_end: str
    info: dict = field(default_factory=dict)

    _KEYS: ClassVar[tuple[str, ...]] = ("index", "code", "x_range", "y_range", "direction", "lower_end",
                                        "upper_end")

    @classmethod
    def from_json(cls, d: dict) -> TableBranch:
        return cls(*(d[k] for k in cls._KEYS), info=_plain_extra(d, cls._KEYS))

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in self._KEYS}
        out["x_range"], out["y_range"] = list(self.x_range), list(self.y_range)
        out.update(self.info)
        return out

    @property
    def flat(self) -> bool:
        return self.direction == "constant"

    def sample_range(self) -> tuple[float, float]:
        """The y range, with infinite ends replaced by the float32 extremes."""
        lo, hi = (number(v) for v in self.y_range)
        return max(lo, -F32_MAX), min(hi, F32_MAX)


_TABLE_KEYS = ("format", "format_version", "invact_version", "name", "formula", "params", "param_generic",
               "param_domain", "torch_forward", "target", "tolerance", "n_branches", "n_codes", "code_bits")


@dataclass
class Table:
    """A whole table. ``certificate`` None: not certified yet; ``sha256`` as read (None when built:
    :func:`.tables.dump_table` computes it)."""

    format: str
    format_version: int
    invact_version: str
    name: str
    formula: str
    params: dict
    param_generic: bool
    param_domain: list
    torch_forward: str | None
    target: str
    tolerance: float
    n_branches: int
    n_codes: int
    code_bits: int
    forward_code: ForwardCode
    branches: list[TableBranch]
    code_classes: list[CodeClass]
    certificate: dict | None = None
    sha256: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> Table:
        return cls(*(d[k] for k in _TABLE_KEYS), ForwardCode.from_json(d["forward_code"]),
                   [TableBranch.from_json(b) for b in d["branches"]],
                   [CodeClass.from_json(c) for c in d["code_classes"]], d.get("certificate"), d.get("sha256"),
                   _plain_extra(d, {*_TABLE_KEYS, "forward_code", "branches", "code_classes", "certificate",
                                    "sha256"}))

    @classmethod
    def of(cls, table: Table | dict) -> Table:
        """``table`` as a :class:`Table` (a JSON dict is converted)."""
        return table if isinstance(table, Table) else cls.from_json(table)

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in _TABLE_KEYS}
        out.update(forward_code=self.forward_code.to_json(), branches=[b.to_json() for b in self.branches],
                   code_classes=[c.to_json() for c in self.code_classes])
        if self.certificate is not None:
            out["certificate"] = self.certificate
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        out.update(self.extra)
        return out

    def spec(self):
        """The :class:`.formulas.ActivationSpec` the table was fitted from."""
        return spec_of(self.name, self.formula, self.params, self.param_domain, self.torch_forward)

    def segments(self, branch: int | None = None):
        """(code class, segment) pairs, all or those of one branch."""
        return [(cc, s) for cc in self.code_classes for s in cc.segments if branch is None or s.branch == branch]

    def code_class_of(self, branch: int) -> CodeClass:
        return self.code_classes[self.branches[branch].code]


def spec_of(name: str, formula: str, params: dict, param_domain, torch_forward: str | None):
    """The :class:`.formulas.ActivationSpec` of a table's formula fields."""
    from .expressions import parse
    from .formulas import ActivationSpec
    expr = parse(formula, ("x",), tuple(params), "formula")
    return ActivationSpec(name, expr, dict(params), tuple(param_domain), torch_forward=torch_forward)


def _check_kinds() -> None:
    """Every kind names its JSON keys and binds the primitives (a new kind missing one fails here)."""
    for kind, cls in KINDS.items():
        missing = [m for m in ("evaluate", "bound", "describe", "emit") if getattr(cls, m) is getattr(Segment, m)]
        if missing or cls.kind != kind or not cls.KEYS:
            raise TypeError(f"segment kind {kind!r} ({cls.__name__}) lacks {missing or 'its kind or KEYS'}")


_check_kinds()
