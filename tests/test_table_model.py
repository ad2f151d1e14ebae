"""The typed table model (invact.fitting.model): every committed table loads into it and dumps back to
the same bytes, and each segment kind binds its primitives."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar   # at module level: dataclasses resolve string annotations here

import numpy as np
import pytest

from invact.fitting import model
from invact.fitting.errors import TableError
from invact.fitting.evaluate import eval_code_class
from invact.fitting.tables import dump_table, list_tables, load_table

PATHS = list_tables()


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_committed_tables_round_trip_byte_for_byte(path):
    text = path.read_text(encoding="utf-8")
    raw = load_table(path)
    table = model.Table.from_json(raw)
    assert table.to_json() == raw
    assert dump_table(table.to_json()) == text


def test_round_trip_keeps_rational_and_unknown_keys():
    seg = {"kind": "poly", "y_range": [0.0, "inf"], "branch": 1, "transform": {"kind": "identity"},
           "center": 0.5, "scale": 2.0, "coeffs": [1.0, 0.25, 0.125], "c0_lo": 0.0, "error": 1e-9,
           "den": [1.0, 0.5], "future_key": [1, 2]}
    s = model.Segment.from_json(seg)
    assert isinstance(s, model.RationalSegment) and s.den_degree == 1 and s.degree == 2
    assert s.to_json() == seg
    const = {"kind": "constant", "value": "0.0", "y_range": ["-inf", -1.0], "branch": 0, "cutoff": True}
    c = model.Segment.from_json(const)
    assert c.to_json() == const and not c.certified


def test_unknown_kind_is_refused():
    with pytest.raises(TableError, match="unknown segment kind 'spline'"):
        model.Segment.from_json({"kind": "spline", "y_range": [0, 1], "branch": 0})


def test_rational_segment_evaluates_c0_plus_u_n_over_q():
    """g = c0 + u N(u) / Q(u) (docs/table-format.md) at float64, against the formula written out."""
    s = model.Segment.from_json({"kind": "poly", "y_range": [-1.0, 1.0], "branch": 0,
                                 "transform": {"kind": "identity"}, "center": 0.0, "scale": 1.0,
                                 "coeffs": [0.5, 1.0, -0.25], "c0_lo": 0.0, "error": 0.0, "den": [1.0, 0.5]})
    y = np.linspace(-1, 1, 101)
    want = 0.5 + y * (1.0 - 0.25 * y) / (1 + 0.5 * y)
    # float64 Horner against the same expression: a few roundings of O(1) terms
    np.testing.assert_allclose(s.evaluate(y), want, rtol=0, atol=8 * np.finfo(float).eps)


@pytest.mark.parametrize("path", PATHS[:4], ids=lambda p: p.name)
def test_code_class_evaluation_is_the_kinds_evaluation(path):
    """CodeClass.evaluate picks each segment's own evaluate (the same values, bit for bit)."""
    raw = load_table(path)
    table = model.Table.from_json(raw)
    for cc, cc_raw in zip(table.code_classes, raw["code_classes"]):
        for seg in cc.segments:
            lo, hi = (max(min(v, 1e4), -1e4) for v in (seg.lo, seg.hi))
            y = np.linspace(lo, hi, 257).astype(np.float32)
            got = cc.evaluate(y, raw["params"])
            own = model.segment_index(cc.y_breaks, y, raw["params"]) == cc.segments.index(seg)
            np.testing.assert_array_equal(got[own], seg.evaluate(y[own], raw["params"]))
            np.testing.assert_array_equal(got, eval_code_class(cc_raw, y, raw["params"]))


def test_describe_names_kind_and_shape():
    gelu = model.Table.from_json(load_table(next(p for p in PATHS if p.name == "gelu.json")))
    texts = [s.describe() for _, s in gelu.segments()]
    assert any(t.startswith("poly degree") and " in sqrt(" in t for t in texts), texts
    assert any(t.startswith("constant") for t in texts), texts
    assert all(math.isfinite(s.lo) or math.isinf(s.lo) for _, s in gelu.segments())


def test_a_new_kind_is_one_class(monkeypatch, tmp_path):
    """A segment kind defined and registered in one place is loaded, validated, evaluated, certified,
    described and planned for code generation with no other change (here g = a + b y, standing in for
    relu's exact g = 1 on its right branch)."""
    from invact.fitting import segments, tables
    from invact.fitting.certify import certify_table
    from invact.fitting.codegen.analysis import plan_table

    @dataclass
    class LinearSegment(model.Segment):
        a: float
        b: float

        kind: ClassVar[str] = "linear"
        KEYS: ClassVar[tuple[str, ...]] = ("a", "b", "y_range", "branch")

        def evaluate(self, y, params=None):
            ft = y.dtype.type
            return ft(self.a) + ft(self.b) * y

        def bound(self, ctx):
            return 0.0, "exact"

        def describe(self, fmt=None):
            return f"linear {self.a} + {self.b} y"

        def emit(self, out):
            out.closed_form(f"{self.a!r} + {self.b!r}*y")

    monkeypatch.setitem(segments.KINDS, "linear", LinearSegment)
    segments._check_kinds()
    raw = load_table(next(p for p in PATHS if p.name == "relu.json"))
    cc = raw["code_classes"][0]
    i = next(k for k, s in enumerate(cc["segments"]) if s["kind"] == "exact")
    cc["segments"][i] = {"kind": "linear", "a": 1.0, "b": 0.0, "y_range": cc["segments"][i]["y_range"], "branch": 1}
    path = tmp_path / "generated" / "tables" / "relu.json"
    text = dump_table(raw)
    table = tables.load_table(path, text)                    # validated like any table
    assert model.Table.from_json(table).to_json() == table
    seg = model.Segment.from_json(cc["segments"][i])
    assert isinstance(seg, LinearSegment) and seg.describe() == "linear 1.0 + 0.0 y"
    y = np.float32([0.5, 2.0, 1e30])
    np.testing.assert_array_equal(eval_code_class(table["code_classes"][0], y), np.float32([1, 1, 1]))
    cert = certify_table(table, fp32_samples=2**10)
    assert cert["approx_error"] == 0.0 and cert["float32_eval_error"] == 0.0   # g = 1 exactly
    plan = plan_table(table, "relu.json")
    assert [(k, str(e)) for k, e in plan.exact] == [(i, "1.00000000000000")]
    monkeypatch.delitem(segments.KINDS, "linear")
    with pytest.raises(TableError, match="unknown segment kind 'linear'"):
        model.Segment.from_json(cc["segments"][i])


def test_a_kind_missing_a_primitive_is_refused(monkeypatch):
    from invact.fitting import segments

    @dataclass
    class Half(model.Segment):
        kind: ClassVar[str] = "half"
        KEYS: ClassVar[tuple[str, ...]] = ("y_range", "branch")

        def evaluate(self, y, params=None):
            return y * y.dtype.type(0.5)

    monkeypatch.setitem(segments.KINDS, "half", Half)
    with pytest.raises(TypeError, match="'half'.*bound.*describe.*emit"):
        segments._check_kinds()
