"""Parameter-generic tables whose param_domain let through values that change the formula's shape (bug hunt:
a silently wrong gradient). `Max(x, b*x)` fitted at b = 0.5 was stored valid for every b > 0: for b > 1 the
arguments of Max swap sides and x.grad was [2, 2, 1, 1] where autograd gives [1, 1, 2, 2]; `b*x + Abs(x)`
fitted at b = 2 took b = 0.5 and gave every x < 0 the slope b + 1 instead of b - 1. A generic table's domain
now keeps the sign of every quantity its branch structure relies on (a constant f', which side of a piece
condition's zero each piece takes, the order of those zeros) and the fitter compares the generic table with
the analysis at values spread over the domain (fitting/param_domain.py: param_domain, generic_holds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from invact.common.params import holds
from invact.fitting.formulas import get_spec
from invact.fitting.param_domain import _probe_values, param_domain

REPO = Path(__file__).resolve().parents[1]

# name: (formula, fitted parameters, PyTorch's own forward of it (x and the parameters), values that change
# its shape (refused), values inside its domain near the boundaries (accepted))
CASES = {
    "leakymax": ("Max(x, b*x)", {"b": 0.5}, "torch.maximum(x, b*x)", [{"b": 2.0}, {"b": 1.5}, {"b": -0.5}],
                 [{"b": 0.999}, {"b": 0.001}]),
    # 1 < b < 2 too: the slope b - 1 of x < 0 below 1 rounds float16 y of tiny x to -0 (test_signed_zero_*)
    "absslope": ("b*x + Abs(x)", {"b": 2.0}, "b*x + x.abs()", [{"b": 0.5}, {"b": 0.999}, {"b": 1.0}, {"b": -2.0},
                                                                 {"b": 1.5}, {"b": 1.999}],
                 [{"b": 2.0}, {"b": 50.0}]),
    "leakymin": ("Min(x, b*x)", {"b": 0.5}, "torch.minimum(x, b*x)", [{"b": 2.0}], [{"b": 0.999}]),
    "floor": ("Max(x, b)", {"b": 0.5}, "torch.clamp(x, min=b)", [], [{"b": 2.0}, {"b": -3.0}]),
    "clip": ("Max(Min(x, b), -b)", {"b": 1.0}, "torch.clamp(x, -b, b)", [{"b": -1.0}], [{"b": 3.0}, {"b": 0.01}]),
    "window": ("Min(Max(x, a), b)", {"a": -1.0, "b": 1.0}, "torch.clamp(x, a, b)", [{"a": 2.0, "b": 1.0}],
               [{"a": 0.5, "b": 0.6}, {"a": -4.0, "b": -3.0}]),
    "step": ("Piecewise((x, x > c), (c, True))", {"c": 0.5}, "torch.where(x > c, x, torch.full_like(x, c))", [],
             [{"c": -4.0}, {"c": 3.0}]),
    "kinked": ("x + b*Abs(x)", {"b": 0.5}, "x + b*x.abs()", [{"b": 2.0}], [{"b": 0.999}]),
    "scaledexp": ("a*exp(b*x)", {"a": 2.0, "b": 0.5}, "a*torch.exp(b*x)", [{"a": -1.0, "b": 0.5}],
                  [{"a": 0.01, "b": 3.0}]),
    # fitted at a >= 1 with one code; a < 1 needs codes of their own for x < 0 and x >= 0 (signed zeros)
    "leftslope": ("Piecewise((a*x, x < 0), (x, True))", {"a": 2.0}, "torch.where(x < 0, a*x, x)",
                  [{"a": 0.5}, {"a": 0.999}], [{"a": 1.0}, {"a": 40.0}]),
    # one code, the pieces meeting at y = c: c = 0 would need codes of their own (signed zeros: float16
    # x = -6e-8 got b's gradient 2 where autograd gives a = 0.5, review 2), so c keeps its sign
    "moving": ("Piecewise((a*x + c, x < 0), (b*x + c, True))", {"a": 0.5, "b": 2.0, "c": 0.5},
               "torch.where(x < 0, a*x + c, b*x + c)", [{"c": 0.0}, {"c": -0.5}],
               [{"a": 0.5, "b": 2.0, "c": 0.001}, {"a": 3.0, "b": 0.2, "c": 5.0}]),
}

RUNTIME = r"""
import json, sys, numpy as np, torch, invact
from invact.common.params import ParamError, holds
root, cases = sys.argv[1], json.loads(sys.argv[2])
invact.use_root(root)
out = {}
eps = np.finfo(np.float64).eps
for name, (forward, approx, tries) in cases.items():
    rows = []
    for params in tries:
        x = torch.linspace(-6, 6, 481, dtype=torch.float64) + 0.0123
        kinks = [0.0] + [s * v for v in params.values() for s in (1, -1)]
        x = x[torch.stack([(x - k).abs() > 1e-3 for k in kinks]).all(0)].requires_grad_()
        try:
            invact.ops.apply(x, name, params, backend="eager").sum().backward()
        except ParamError as exc:
            rows.append([params, "refused", str(exc)])
            continue
        ours = x.grad.detach().clone()
        x.grad = None
        eval(forward, {"torch": torch, "x": x, **params}).sum().backward()
        want = x.grad.detach()
        # the float64 bound of tests/tolerances.py: certified approximation error + 1e-9 + 16 ulps of |f'|
        excess = ((ours - want).abs() - (approx + 1e-9 + 16 * eps * want.abs())).max().item()
        rows.append([params, "accepted", excess])
    out[name] = rows
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Every case fitted into one tree (the CLI, as a user would)."""
    tree = tmp_path_factory.mktemp("generic_params")
    for name, (formula, params, *_) in CASES.items():
        args = [a for k, v in params.items() for a in ("--param", f"{k}={v}")]
        subprocess.run([sys.executable, "-m", "invact.fitting.cli", "fit", formula, "--name", name, "--root",
                        str(tree), "--fp32-samples", "65536", *args], check=True, capture_output=True, cwd=REPO)
    return tree


def _table(root, name) -> dict:
    return json.loads((root / "generated" / "tables" / f"{name}.json").read_text())


def _inside(table: dict, rng: np.random.Generator, n: int = 6) -> list[dict]:
    """Up to ``n`` random values in [-10, 10] per parameter that the table's param_domain admits (its
    fitted values only when the table is not generic)."""
    if not table["param_generic"]:
        return [dict(table["params"])]
    out = []
    for _ in range(4000):
        values = {k: float(rng.uniform(-10, 10)) for k in table["params"]}
        if all(holds(rel, values) for rel in table["param_domain"]):
            out.append(values)
        if len(out) == n:
            break
    return out


def _run(root, tries: dict) -> dict:
    cases = {name: (CASES[name][2], _table(root, name)["certificate"]["approx_error"], values)
             for name, values in tries.items()}
    out = subprocess.run([sys.executable, "-c", RUNTIME, str(root), json.dumps(cases)], check=True,
                         capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.splitlines()[-1])


def test_shape_changing_values_are_refused(root):
    """The hunt's cases: b > 1 for Max(x, b*x) (and b > 1 for Min), b <= 1 for b*x + Abs(x), b > 1 for
    x + b*Abs(x) (the slope 1 - b turns negative: the structure is no longer the fitted one), a negative
    bound of a clip, a > b for a window, a negative scale of exp: a ParamError naming the parameter (the
    runtime's domain check), never a gradient."""
    results = _run(root, {name: case[3] for name, case in CASES.items() if case[3]})
    for name, rows in results.items():
        for params, verdict, detail in rows:
            assert verdict == "refused", (name, params, detail)
            assert any(k in detail for k in params), (name, params, detail)


def test_generic_tables_match_autograd_across_their_domain(root):
    """At random values inside each stored param_domain, and at values near its boundaries, float64
    gradients are PyTorch autograd's within the certified bound. Max(x, b) and the clips stored their
    breaks as numbers (0.5, -1.0, 1.0) and moved nothing with b; the others kept too weak a domain."""
    rng = np.random.default_rng(7)
    tries = {}
    for name, (_, _, _, _, near) in CASES.items():
        table = _table(root, name)
        assert table["param_generic"], (name, "a table these fixes keep generic is no longer")
        assert all(all(holds(rel, v) for rel in table["param_domain"]) for v in near), (name, table["param_domain"])
        tries[name] = _inside(table, rng) + near
    bad = {name: [r for r in rows if r[1] != "accepted" or r[2] > 0] for name, rows in _run(root, tries).items()}
    assert not any(bad.values()), {k: v for k, v in bad.items() if v}


def test_domains_keep_what_the_structure_relies_on():
    """The relations themselves: a piece condition's x coefficient (Max's b < 1), a constant f' (b - 1 of
    b*x + Abs(x) given its closed forms), the order of two conditions' zeros (a < b, -b < b); implied bounds
    dropped (b > 0 beside b > 1); built-ins unchanged."""
    dom = param_domain(get_spec("Max(x, b*x)", name="m", params={"b": 0.5}))
    assert dom == ["b > 0", "b < 1"]
    import sympy as sp
    b = sp.Symbol("b", real=True)
    assert param_domain(get_spec("b*x + Abs(x)", name="a", params={"b": 2.0}), [b - 1, b + 1]) == ["b > 1"]
    assert param_domain(get_spec("Min(Max(x, a), b)", name="w", params={"a": -1.0, "b": 1.0})) == ["a < b"]
    assert param_domain(get_spec("Max(Min(x, b), -b)", name="c", params={"b": 1.0})) == ["b > 0"]
    assert param_domain(get_spec("Max(x, b*x)", name="m", params={"b": 1.0})) is None   # b = 1: no side
    from invact.fitting.branches import analyze
    for name in ("celu", "elu", "leaky_relu", "selu", "softplus"):   # with the analysis, as build_table calls it
        assert param_domain(get_spec(name), (), analyze(get_spec(name))) == json.loads(
            (REPO / "generated" / "tables" / f"{name}.json").read_text())["param_domain"]


def test_probes_stay_inside_the_domain_and_reach_its_boundaries():
    spec = get_spec("Max(x, b*x)", name="m", params={"b": 0.5})
    probes = [p["b"] for p in _probe_values(spec, ["b > 0", "b < 1"])]
    assert all(0 < b < 1 for b in probes) and min(probes) < 0.01 and max(probes) > 0.99



# ---------------------------------------------------------------------------------------------
# Two branches sharing a code where they meet at y = 0 (bug hunt: a silently wrong float16 gradient).
# fitting/branches.py's _signed_zero_clash gives them codes of their own once the branch that does not
# own y = 0 has |g| < 1 there: its tiny x round a 16-bit y to a signed zero, which y cannot tell from the
# owner's 0. That was decided at the fitted values only: selu (one code, scale = 1.0507 >= 1) took
# scale = 0.13, and float16 x = 1e-7 (y = 0.13*x rounds to +0) got the x <= 0 branch's g = scale*alpha =
# 0.2175 where autograd gives scale = 0.13; b*x + Abs(x) fitted at b = 2 (slope b - 1 = 1 for x < 0) and
# Piecewise((a*x, x < 0), (x, True)) fitted at a = 2 likewise for 1 < b < 2 and a < 1. The domain now keeps
# the non-owner's |g| >= 1 at y = 0 (fitting/param_domain.py: _signed_zero_relations) and generic_holds checks
# the rule at its probes.
#
# float16 gradients are compared bit for bit at |x| <= 2e-7 (float16 subnormals 2^-24 .. 3*2^-24): there
# each branch's g is a constant to far within half a float16 ulp (scale, b - 1, b + 1, a, 1 exactly;
# scale*alpha*exp(x) and the table's y + scale*alpha both within 3e-7 of scale*alpha, which lies nowhere
# near a float16 rounding boundary for the values used), so the table's g and autograd's round to the same
# float16 as long as the table picks the right branch, which is what the signed-zero rule is about.

TINY = [-2e-7, -1e-7, -6e-8, 6e-8, 1e-7, 2e-7]
SELU_FORMULA = "torch.where(x <= 0, scale*alpha*(torch.exp(x) - 1), scale*x)"

SIGNED_ZERO = r"""
import json, sys, numpy as np, torch, invact
from invact.common.params import ParamError
root, cases, tiny = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
if root:
    invact.use_root(root)
eps = np.finfo(np.float64).eps
out = []
for name, forward, defaults, params, approx in cases:
    row = {"name": name, "params": params}
    for dtype in (torch.float16, torch.float64):
        x = torch.tensor(tiny + [-1.5, -0.25, 0.3, 2.0], dtype=dtype, requires_grad=True)
        try:
            invact.ops.apply(x, name, params).sum().backward()
        except ParamError as exc:
            row["refused"] = str(exc)
            break
        ours = x.grad.detach().clone()
        x.grad = None
        eval(forward, {"torch": torch, "x": x, **{**defaults, **params}}).sum().backward()
        want = x.grad.detach()
        key = str(dtype).split(".")[1]
        row[key + "_tiny"] = [ours[:len(tiny)].tolist(), want[:len(tiny)].tolist()]
        if dtype == torch.float64:
            row["float64_excess"] = ((ours - want).abs() - (approx + 1e-9 + 16 * eps * want.abs())).max().item()
    out.append(row)
print(json.dumps(out))
"""


def _signed_zero_run(root, cases) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", SIGNED_ZERO, str(root or ""), json.dumps(cases), json.dumps(TINY)],
                         check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.splitlines()[-1])


def _check_signed_zero(rows, refused: dict) -> None:
    for row in rows:
        label = (row["name"], row["params"])
        if row["name"] in refused and row["params"] in refused[row["name"]][0]:
            assert "refused" in row, (label, "accepted: its float16 gradient at tiny x", row.get("float16_tiny"))
            assert refused[row["name"]][1] in row["refused"], (label, row["refused"])
            continue
        assert "refused" not in row, (label, row.get("refused"))
        ours, want = row["float16_tiny"]
        assert ours == want, (label, "float16 at", TINY, ours, want)
        ours, want = row["float64_tiny"]
        assert ours == want or row["name"] == "selu", (label, "float64 at", TINY, ours, want)
        assert row["float64_excess"] <= 0, (label, row["float64_excess"])


def test_signed_zero_builtin_selu_refuses_scale_below_1():
    """The built-in selu (generated/, one code for x <= 0 and x > 0): scale = 0.13 and 0.5 are refused with
    the ParamError naming 'scale >= 1' (they gave float16 x = 1e-7 the gradient scale*alpha = 0.2175); at
    PyTorch's constants, scale = 1 (|g| = 1 keeps the smallest subnormal) and scale = 3 with a small alpha,
    float16 gradients at tiny x are autograd's bit for bit and float64 within the certified bound."""
    table = json.loads((REPO / "generated" / "tables" / "selu.json").read_text())
    defaults = table["params"]
    tries = [{"scale": 0.13}, {"scale": 0.5}, {"scale": 0.999}, {}, {"scale": 1.0}, {"scale": 3.0, "alpha": 0.2},
             {"scale": 1.0, "alpha": 0.5}]
    rows = _signed_zero_run(None, [["selu", SELU_FORMULA, defaults, p, table["certificate"]["approx_error"]]
                                   for p in tries])
    _check_signed_zero(rows, {"selu": ([{"scale": 0.13}, {"scale": 0.5}, {"scale": 0.999}], "scale >= 1")})
    assert table["param_generic"] and table["n_codes"] == 1 and "scale >= 1" in table["param_domain"]
    # at PyTorch's constants the formula above is F.selu itself
    import torch
    import torch.nn.functional as F
    x = torch.tensor(TINY, dtype=torch.float16, requires_grad=True)
    F.selu(x).sum().backward()
    assert x.grad.tolist() == rows[3]["float16_tiny"][0]


def test_signed_zero_formulas_refuse_a_non_owner_slope_below_1(root):
    """b*x + Abs(x) fitted at b = 2 (x >= 0 owns y = 0; slope b - 1 for x < 0) takes b >= 2 only, Piecewise((a*x,
    x < 0), (x, True)) fitted at a = 2 takes a >= 1 only: b = 1.5 and a = 0.5 gave float16 tiny x < 0 the other
    branch's slope (b + 1 = 2.5, 1) where autograd gives 0.5 and 0.5. Inside, float16 at tiny x is autograd's
    bit for bit."""
    assert _table(root, "absslope")["param_domain"] == ["b >= 2"]
    assert _table(root, "leftslope")["param_domain"] == ["a >= 1"]
    cases = []
    for name, values in (("absslope", [{"b": 1.5}, {"b": 1.25}, {"b": 2.0}, {"b": 3.0}, {"b": 2.5}]),
                         ("leftslope", [{"a": 0.5}, {"a": 0.125}, {"a": 1.0}, {"a": 2.5}, {"a": 40.0}])):
        table = _table(root, name)
        assert table["param_generic"] and table["n_codes"] == 1
        cases += [[name, CASES[name][2], table["params"], p, table["certificate"]["approx_error"]] for p in values]
    _check_signed_zero(_signed_zero_run(root, cases), {"absslope": ([{"b": 1.5}, {"b": 1.25}], "b >= 2"),
                                                        "leftslope": ([{"a": 0.5}, {"a": 0.125}], "a >= 1")})


def test_signed_zero_relations_follow_the_fitted_codes():
    """The relation is derived (the non-owner's f' at the x where y = 0, at least 1 in magnitude): selu's
    'scale >= 1', b*x + Abs(x)'s 'b >= 2' (which implies the closed form's b > 1), 'a >= 1', 'b >= 1' for a
    slope a*b of the owner and b of the other; none where the fitted values already give the two branches
    codes of their own (b = 0.5, a = 0.5) or the non-owner's slope is a number (elu, celu, leaky_relu: 1);
    a table whose two slopes agree only at the fitted values, below 1, is not generic."""
    import sympy as sp

    from invact.fitting.branches import analyze

    def dom(formula, params=None, closed=()):
        spec = get_spec(formula, name="t", params=params) if params is not None else get_spec(formula)
        return param_domain(spec, closed, analyze(spec))

    b = sp.Symbol("b", real=True)
    assert dom("selu") == ["alpha > 0", "scale > 0", "scale >= 1"]
    for name in ("celu", "elu", "leaky_relu", "softplus"):
        assert dom(name) == param_domain(get_spec(name))
    assert dom("b*x + Abs(x)", {"b": 2.0}, [b - 1, b + 1]) == ["b >= 2"]
    assert dom("b*x + Abs(x)", {"b": 0.5}) == ["b > 0"]                     # codes of their own already
    assert dom("Piecewise((a*x, x < 0), (x, True))", {"a": 2.0}) == ["a >= 1"]
    assert dom("Piecewise((a*x, x < 0), (x, True))", {"a": 0.5}) == ["a > 0"]
    assert dom("Piecewise((a*b*x, x <= 0), (b*x, True))", {"a": 3.0, "b": 2.0}) == ["a > 0", "b >= 1"]
    assert dom("Piecewise((-a*x, x <= 0), (-x*b, True))", {"a": 3.0, "b": 2.0}) == ["a > 0", "b >= 1"]
    assert dom("Piecewise((a*x, x <= 0), (b*x**3 + x/2, True))", {"a": 0.5, "b": 1.0}) is None


def test_signed_zero_rule_checked_at_the_probes():
    """generic_holds re-runs the signed-zero rule at its probe values: Piecewise((a*x, x < 0), (x, True))'s
    one-code table fitted at a = 2 does not hold across 'a > 0' (its probe a = 0.25 needs two codes), does
    across 'a >= 1'."""
    from invact.fitting.branches import analyze
    from invact.fitting.param_domain import generic_holds
    from invact.fitting.pipeline import _branch_segments

    spec = get_spec("Piecewise((a*x, x < 0), (x, True))", name="t", params={"a": 2.0})
    analysis = analyze(spec)
    assert analysis.n_codes == 1
    per_branch, exprs = {}, {}
    for br in analysis.branches:
        options, exprs[br.index] = _branch_segments(br, spec, "derivative", 5e-8)
        per_branch[br.index] = options[-1]
    assert not generic_holds(analysis, per_branch, exprs, spec, ["a > 0"], "derivative")
    assert generic_holds(analysis, per_branch, exprs, spec, ["a >= 1"], "derivative")


def test_a_generic_tables_domain_refusal_names_the_fit_for_those_values():
    """Outside a generic table's domain the ParamError says which `invact fit` would try a table for the
    values (as a fixed table's refusal does), under a new name so the generic table stays."""
    import torch

    import invact
    with pytest.raises(ValueError) as info:          # invact.common.params.ParamError, a ValueError
        invact.ops.apply(torch.randn(4), "selu", {"scale": 0.5})
    text = str(info.value)
    assert "needs scale >= 1" in text and "`invact fit selu --param scale=0.5 " in text and "--name NEW`" in text, text
