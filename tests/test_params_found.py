"""Parameter-generic tables whose param_domain let through values that change the formula's shape (bug hunt:
a silently wrong gradient). `Max(x, b*x)` fitted at b = 0.5 was stored valid for every b > 0: for b > 1 the
arguments of Max swap sides and x.grad was [2, 2, 1, 1] where autograd gives [1, 1, 2, 2]; `b*x + Abs(x)`
fitted at b = 2 took b = 0.5 and gave every x < 0 the slope b + 1 instead of b - 1. A generic table's domain
now keeps the sign of every quantity its branch structure relies on (a constant f', which side of a piece
condition's zero each piece takes, the order of those zeros) and the fitter compares the generic table with
the analysis at values spread over the domain (fitting/pipeline.py: _param_domain, _generic_holds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from invact.common.params import holds
from invact.fitting.formulas import get_spec
from invact.fitting.pipeline import _param_domain, _probe_values

REPO = Path(__file__).resolve().parents[1]

# name: (formula, fitted parameters, PyTorch's own forward of it (x and the parameters), values that change
# its shape (refused), values inside its domain near the boundaries (accepted))
CASES = {
    "leakymax": ("Max(x, b*x)", {"b": 0.5}, "torch.maximum(x, b*x)", [{"b": 2.0}, {"b": 1.5}, {"b": -0.5}],
                 [{"b": 0.999}, {"b": 0.001}]),
    "absslope": ("b*x + Abs(x)", {"b": 2.0}, "b*x + x.abs()", [{"b": 0.5}, {"b": 0.999}, {"b": 1.0}, {"b": -2.0}],
                 [{"b": 1.001}, {"b": 50.0}]),
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
    tree = tmp_path_factory.mktemp("params_found")
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
    dom = _param_domain(get_spec("Max(x, b*x)", name="m", params={"b": 0.5}))
    assert dom == ["b > 0", "b < 1"]
    import sympy as sp
    b = sp.Symbol("b", real=True)
    assert _param_domain(get_spec("b*x + Abs(x)", name="a", params={"b": 2.0}), [b - 1, b + 1]) == ["b > 1"]
    assert _param_domain(get_spec("Min(Max(x, a), b)", name="w", params={"a": -1.0, "b": 1.0})) == ["a < b"]
    assert _param_domain(get_spec("Max(Min(x, b), -b)", name="c", params={"b": 1.0})) == ["b > 0"]
    assert _param_domain(get_spec("Max(x, b*x)", name="m", params={"b": 1.0})) is None   # b = 1: no side
    for name in ("celu", "elu", "leaky_relu", "selu", "softplus"):
        assert _param_domain(get_spec(name)) == json.loads(
            (REPO / "generated" / "tables" / f"{name}.json").read_text())["param_domain"]


def test_probes_stay_inside_the_domain_and_reach_its_boundaries():
    spec = get_spec("Max(x, b*x)", name="m", params={"b": 0.5})
    probes = [p["b"] for p in _probe_values(spec, ["b > 0", "b < 1"])]
    assert all(0 < b < 1 for b in probes) and min(probes) < 0.01 and max(probes) > 0.99
