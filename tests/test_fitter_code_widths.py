"""Fitter fixes from bug hunt P: code widths the runtime can pack; parameter domains of exact
parameter-generic tables."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from invact.common.params import ParamError
from invact.fitting.branches import analyze
from invact.fitting.errors import TableError
from invact.fitting.formulas import get_spec
from invact.fitting.param_domain import param_domain
from invact.fitting.tables import _structure_problem, code_bits_for, dump_table, load_table

REPO = Path(__file__).resolve().parents[1]
RUNTIME_BITS = (1, 2, 4, 8)   # invact.runtime.bitpack.BITS


def _fit(formula, name, root, *args):
    cmd = [sys.executable, "-m", "invact.fitting.cli", "fit", formula, "--name", name, "--root", str(root),
           "--fp32-samples", "65536", *args]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    return root


@pytest.mark.parametrize("n,bits", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 4), (8, 4), (16, 4), (17, 8), (256, 8),
                                    (257, None)])
def test_code_bits_are_widths_the_runtime_packs(n, bits):
    assert code_bits_for(n) == bits
    assert bits is None or bits == 0 or bits in RUNTIME_BITS


def test_five_branch_quintic_gets_four_bits():
    a = analyze(get_spec("x**5 - 5*x**3 + 4*x", name="quint"))
    assert (a.n_codes, a.code_bits) == (5, 4)     # was 3 bits, which no backend packs


def test_table_with_three_code_bits_is_refused_on_load(tmp_path):
    table = json.loads((REPO / "generated" / "tables" / "gelu.json").read_text())
    table["n_codes"] = 5
    table["code_classes"] = [copy.deepcopy(table["code_classes"][0]) for _ in range(5)]
    table["code_bits"] = 3
    problem = _structure_problem(table)
    assert problem and "code_bits 3, expected 4" in problem and "refit" in problem
    path = tmp_path / "generated" / "tables" / "gelu.json"
    path.parent.mkdir(parents=True)
    path.write_text(dump_table(table))
    with pytest.raises(TableError, match="code_bits 3"):
        load_table(path)


def test_builtin_tables_load_unchanged():
    for path in sorted((REPO / "generated" / "tables").glob("*.json")):
        assert load_table(path)["code_bits"] in (0, 1)


def test_five_code_table_trains(tmp_path):
    # a zigzag of slopes +-1 (exact pieces): 5 branches sharing y in [-1, 1], 5 codes -> 4 bits
    root = _fit("x - (Abs(x+3) - Abs(x+1) + Abs(x-1) - Abs(x-3))", "zz", tmp_path / "zz")
    out = subprocess.run([sys.executable, "-c", f"""
import torch, invact
invact.use_root({str(root)!r})
assert invact.ops.info('zz')['code_bits'] == 4
x = (torch.linspace(-5, 5, 101) + 0.013).requires_grad_()
invact.functional.apply(x, 'zz', backend='eager').sum().backward()
r = x.detach().clone().requires_grad_()
(r - ((r + 3).abs() - (r + 1).abs() + (r - 1).abs() - (r - 3).abs())).sum().backward()
print((x.grad - r.grad).abs().max().item())
"""], check=True, capture_output=True, text=True, cwd=REPO)
    # slopes are exactly +-1 and the table's pieces are the exact constants: no rounding at all
    assert float(out.stdout.split()[-1]) == 0.0


def test_param_domain_keeps_signs():
    assert param_domain(get_spec("b*x**2", name="sq", params={"b": 1.0})) == ["b > 0"]
    assert param_domain(get_spec("b*x**2", name="sq", params={"b": -1.0})) == ["b < 0"]
    assert param_domain(get_spec("softplus")) == ["beta > 0", "threshold >= 18"]   # built-ins unchanged
    assert param_domain(get_spec("selu")) == ["alpha > 0", "scale > 0"]


def test_param_domain_even_powers_and_divisions():
    """An even power of a parameter keeps no sign (b**2*x at b=-1 refused b=1, which is as valid); a relation
    dividing by a parameter expression that is 0 does not hold (ZeroDivisionError escaped the runtime's
    ParamError and the fitter's SpecError)."""
    from invact.common.params import check_params
    assert param_domain(get_spec("b**2*x + x", name="e", params={"b": -1.0})) == []
    domain = param_domain(get_spec("x/(1 + 1/b)", name="d", params={"b": 1.0}))
    assert check_params("d", {"b": 1.0}, {"b": 2.0}, domain) == {"b": 2.0}
    with pytest.raises(ParamError):
        check_params("d", {"b": 1.0}, {"b": 0.0}, domain)


def test_generic_square_refuses_negative_parameter(tmp_path):
    root = _fit("b*x**2", "sq", tmp_path / "sq", "--param", "b=1")
    table = load_table(root / "generated" / "tables" / "sq.json")
    assert table["param_generic"] and table["param_domain"] == ["b > 0"]
    out = subprocess.run([sys.executable, "-c", f"""
import torch, invact
from invact.common.params import ParamError
invact.use_root({str(root)!r})
x = torch.tensor([-1.5, -0.3, 0.7, 2.0], requires_grad=True)
try:
    invact.functional.apply(x, 'sq', b=-1.0)
except ParamError as e:
    print('refused', e)
y = invact.functional.apply(x, 'sq', backend='eager', b=2.0); y.sum().backward()
print('err', (x.grad - 4 * x.detach()).abs().max().item())
"""], check=True, capture_output=True, text=True, cwd=REPO)
    assert "refused" in out.stdout and "b > 0" in out.stdout
    # g = 2 sqrt(b) sqrt(y) in float32: a few ulps of |g| <= 8 (1e-5 covers ~20 ulps)
    assert float(out.stdout.split()[-1]) < 1e-5
