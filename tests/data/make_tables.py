"""Write small valid tables (docs/table-format.md) for code-generation tests: `python tests/data/make_tables.py DIR`.

- ``tanh``: monotone, one exact segment.
- ``square``: f = x**2, two codes; poly segments in the sqrt transform (g = +-2 sqrt(y) is degree 1
  in t = sqrt(y), so the poly is exact) with exact tails.
- ``elu_generic``: param-generic ELU: an exact segment in alpha and a constant one.
- ``fold``: f = x for x >= 0, exp(-x) - 1 left of 0: two codes over the same y, exact segments in
  plain arithmetic (g = 1 and g = -(1 + y)), so its 16-bit backward is computed directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

from invact.fitting.tables import write_table

CERT = {"method": "test", "approx_error": 0.0, "float32_eval_error": 0.0, "checks": [], "branches": []}


def _base(name, formula, **kw):
    t = {"format": "invact-table", "format_version": 1, "invact_version": "0.1.0", "name": name,
         "formula": formula, "params": {}, "param_generic": False, "param_domain": [],
         "torch_forward": None, "nan_gradients": {}, "target": "derivative", "tolerance": 5e-08,
         "n_branches": 1, "n_codes": 1, "code_bits": 0, "forward_code": {"x_breaks": [], "codes": [0]},
         "branches": [], "code_classes": [], "certificate": CERT}
    t.update(kw)
    return t


def _branch(i, code, x_range, y_range, direction="increasing"):
    return {"index": i, "code": code, "x_range": x_range, "y_range": y_range, "direction": direction,
            "route": "exact", "lower_end": "regular", "upper_end": "regular", "singularities": [], "tails": []}


def _sqrt_poly(sign, branch):
    # t = sqrt(y) in [0, 10], u = (t - 5) * 0.2, g = sign * 2 t = sign * (10 + 10 u)
    return {"kind": "poly", "y_range": [0.0, 100.0], "branch": branch,
            "transform": {"kind": "sqrt", "origin": [0.0, 0.0, 0.0], "sign": 1},
            "center": 5.0, "scale": 0.2, "coeffs": [10.0 * sign, 10.0 * sign], "c0_lo": 0.0, "error": 0.0}


def tables() -> list[dict]:
    tanh = _base("tanh", "tanh(x)", torch_forward="torch.tanh(x)",
                 branches=[_branch(0, 0, ["-inf", "inf"], [-1.0, 1.0])],
                 code_classes=[{"code": 0, "y_breaks": [], "segments": [
                     {"kind": "exact", "expr": "1 - y**2", "y_range": [-1.0, 1.0], "branch": 0}]}])
    square_classes = []
    for code, sign, branch in ((0, 1, 1), (1, -1, 0)):     # code 0: x >= 0, branch 1 (increasing)
        square_classes.append({"code": code, "y_breaks": [{"value": "100.0", "side": "left"}], "segments": [
            _sqrt_poly(sign, branch), {"kind": "exact", "expr": f"{2 * sign}*sqrt(y)", "y_range": [100.0, "inf"],
                                       "branch": branch}]})
    square = _base("square", "x**2", n_branches=2, n_codes=2, code_bits=1,
                   forward_code={"x_breaks": [{"value": "0", "side": "right"}], "codes": [1, 0]},
                   branches=[_branch(0, 1, ["-inf", 0.0], [0.0, "inf"], "decreasing"),
                             _branch(1, 0, [0.0, "inf"], [0.0, "inf"])],
                   code_classes=square_classes)
    elu = _base("elu_generic", "Piecewise((alpha*(exp(x) - 1), x <= 0), (x, True))", params={"alpha": 1.0},
                param_generic=True, param_domain=["alpha > 0"], torch_forward="F.elu(x, alpha)",
                n_branches=2, branches=[_branch(0, 0, ["-inf", 0.0], ["-alpha", 0.0]),
                                        _branch(1, 0, [0.0, "inf"], [0.0, "inf"])],
                code_classes=[{"code": 0, "y_breaks": [{"value": "0", "side": "left"}], "segments": [
                    {"kind": "exact", "expr": "alpha + y", "y_range": [-1.0, 0.0], "branch": 0},
                    {"kind": "constant", "value": "1", "y_range": [0.0, "inf"], "branch": 1}]}])
    fold = _base("fold", "Piecewise((exp(-x) - 1, x < 0), (x, True))", n_branches=2, n_codes=2, code_bits=1,
                 forward_code={"x_breaks": [{"value": "0", "side": "right"}], "codes": [1, 0]},
                 branches=[_branch(0, 1, ["-inf", 0.0], [0.0, "inf"], "decreasing"),
                           _branch(1, 0, [0.0, "inf"], [0.0, "inf"])],
                 code_classes=[{"code": 0, "y_breaks": [], "segments": [
                                   {"kind": "constant", "value": "1", "y_range": [0.0, "inf"], "branch": 1}]},
                               {"code": 1, "y_breaks": [], "segments": [
                                   {"kind": "exact", "expr": "-(1 + y)", "y_range": [0.0, "inf"], "branch": 0}]}])
    return [tanh, square, elu, fold]


def write_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_table(t, folder / f"{t['name']}.json") for t in tables()]


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1])):
        print(p)
