"""The typed table model (docs/table-format.md): :class:`Table`, :class:`TableBranch`, :class:`CodeClass`
and one :class:`Segment` class per kind, loaded from and dumped to the JSON format unchanged.

Like numpy.polynomial, one base class states the few primitives every kind provides, and each kind
binds them once: ``evaluate`` (the documented scheme in numpy, float32 bit for bit or float64),
``scheme_error`` (that scheme against a reference), ``bound`` (certification of the piece),
``describe`` (``invact show``) and ``emit`` (what code generation builds from it). Adding a segment
kind means adding one class in :mod:`.segments` (and registering it in :data:`KINDS`); the
numbers and arithmetic they share are in :mod:`.scheme`. This module holds the table's own parts
and is the one place to import the model from.

Values are kept as the JSON holds them (numbers stay numbers, ``"inf"`` stays a string, expression
strings stay strings), so ``Table.from_json(t).to_json() == t`` and a table dumps to the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .float32 import F32_MAX
from .scheme import Break, horner, number, plain_extra, segment_index
from .segments import (KINDS, BoundContext, ConstantSegment, Emitter, ExactSegment, PolySegment, RationalSegment,
                       Segment, Transform, segment_problem, segment_texts)

__all__ = ["Table", "TableBranch", "CodeClass", "ForwardCode", "Break", "Transform", "Segment",
           "ConstantSegment", "ExactSegment", "PolySegment", "RationalSegment", "KINDS", "BoundContext",
           "Emitter", "number", "horner", "segment_index", "segment_problem", "segment_texts", "spec_of",
           "NAN_PROBES", "nan_gradients_json", "nan_gradients_problem"]


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
                   plain_extra(d, {"code", "y_breaks", "segments"}))

    def to_json(self) -> dict:
        return {"code": self.code, "y_breaks": [b.to_json() for b in self.y_breaks],
                "segments": [s.to_json() for s in self.segments], **self.extra}

    def evaluate(self, y: np.ndarray, params: dict | None = None, fma: bool = False) -> np.ndarray:
        """g~(y); y's dtype (float32 or float64) is the arithmetic used; ``fma``: the FMA scheme."""
        return self.evaluate_schemes(y, params, (fma,))[0]

    def evaluate_schemes(self, y: np.ndarray, params: dict | None = None,
                         fma: tuple[bool, ...] = (False, True), spread: bool = False) -> list[np.ndarray]:
        """g~(y) by each scheme of ``fma`` (False: without FMA), the segment index found once and a
        segment with no fused step (no ``evaluate_fma`` of its own) evaluated once for both. ``spread``:
        each scheme's (least, greatest) g~(y) over the results a closed form's library calls may have
        (:meth:`.segments.Segment.spread`), shape (2, *y.shape)."""
        y = np.asarray(y)
        idx = segment_index(self.y_breaks, y, params)
        outs = [np.empty((2, *y.shape) if spread else y.shape, dtype=y.dtype) for _ in fma]
        for i, seg in enumerate(self.segments):
            m = idx == i
            if m.any():
                ym, done = y[m], {}
                fused = type(seg).evaluate_fma is not Segment.evaluate_fma
                for out, f in zip(outs, fma):
                    key = bool(f) and fused
                    if key not in done:
                        done[key] = seg.evaluate_fma(ym, params) if key else (
                            seg.spread(ym, params) if spread else seg.evaluate(ym, params))
                    out[..., m] = done[key]
        return outs


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
        return cls(*(d[k] for k in cls._KEYS), info=plain_extra(d, cls._KEYS))

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


NAN_PROBES = ("nan", "-inf", "inf")   # the keys of a table's nan_gradients: inputs x whose y may be NaN


def nan_gradients_json(measured) -> dict[str, list[float]]:
    """A table's ``nan_gradients`` from (x, PyTorch's derivatives there) pairs
    (:func:`.pytorch_probe.nan_gradients`): {"nan" / "-inf" / "inf": the derivatives, sorted}."""
    return {repr(float(x)): sorted(float(d) for d in values) for x, values in measured}


def nan_gradients_problem(value, torch_forward) -> str | None:
    """What is wrong with a table's ``nan_gradients`` (docs/table-format.md), or None."""
    if not isinstance(value, dict) or not set(value) <= set(NAN_PROBES):
        return f"has nan_gradients that is not an object with keys among {', '.join(NAN_PROBES)}"
    for x, grads in value.items():
        if not (isinstance(grads, list) and grads and all(
                v in ("inf", "-inf") or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in grads)):
            return f"has nan_gradients[{x!r}] that is not a non-empty list of numbers"
    if value and not torch_forward:
        return "has nan_gradients without a torch_forward (they are PyTorch's, measured on it)"
    return None


_TABLE_KEYS = ("format", "format_version", "invact_version", "name", "formula", "params", "param_generic",
               "param_domain", "torch_forward", "target", "tolerance", "n_branches", "n_codes", "code_bits")


@dataclass
class Table:
    """A whole table. ``nan_gradients``: PyTorch's gradients where its y is NaN, as the JSON holds them;
    ``certificate`` None: not certified yet; ``sha256`` as read (None when built:
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
    nan_gradients: dict = field(default_factory=dict)
    certificate: dict | None = None
    sha256: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> Table:
        return cls(*(d[k] for k in _TABLE_KEYS), ForwardCode.from_json(d["forward_code"]),
                   [TableBranch.from_json(b) for b in d["branches"]],
                   [CodeClass.from_json(c) for c in d["code_classes"]], d["nan_gradients"], d.get("certificate"),
                   d.get("sha256"), plain_extra(d, {*_TABLE_KEYS, "forward_code", "branches", "code_classes",
                                                    "nan_gradients", "certificate", "sha256"}))

    @classmethod
    def of(cls, table: Table | dict) -> Table:
        """``table`` as a :class:`Table` (a JSON dict is converted)."""
        return table if isinstance(table, Table) else cls.from_json(table)

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in _TABLE_KEYS}
        out.update(forward_code=self.forward_code.to_json(), branches=[b.to_json() for b in self.branches],
                   code_classes=[c.to_json() for c in self.code_classes], nan_gradients=self.nan_gradients)
        if self.certificate is not None:
            out["certificate"] = self.certificate
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        out.update(self.extra)
        return out

    def measured_nan_gradients(self) -> tuple[tuple[float, frozenset[float]], ...]:
        """``nan_gradients`` as (x, derivatives) pairs, the form :func:`.pytorch_probe.nan_gradients` measures."""
        return tuple((float(x), frozenset(number(v) for v in grads)) for x, grads in self.nan_gradients.items())

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
