"""Formula and table text found by bug hunts A and D: constants sympy would take hours to compute
(10**10**10), table parameters the formula does not use (a parameter F turned the generated forward's
F.elu into param_F.elu), parameter names equal after Python's NFKC normalisation (alpha and its
full-width twin: "duplicate argument" in generated code), and line breaks in a formula. Parsing only
and scratch roots (tmp_path); one `invact` subprocess, with a timeout, for the command that hung."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import invact.generated
from invact.common.table_hash import canonical_sha256
from invact.fitting import expressions, tables
from invact.fitting.errors import SpecError, TableError
from invact.fitting.expressions import check_text
from invact.fitting.formulas import BUILTINS, parse_formula
from helpers import invact_cli

INVACT = Path(sys.executable).with_name("invact")
REPO = Path(invact.generated.__file__).parent               # the installed generated/ (never written)
ZOO = Path(__file__).resolve().parent.parent / "benchmarks" / "zoo.toml"
HUGE = ["x*10**10**10", "x*10^10^10", "x**(10**10**10)", "x*10**-10**10", "x*(10**10)**(10**10)",
        "x*(1 + 10**-20)**10**30", "x*sqrt(2)**10**10", "x*2**Max(3, 10**40)",
        "x*2**((10**17 + 10**35) - 10**35)", "Piecewise((x, x > 10**10**10), (0, True))",
        # a float inside the exponent may leave the power exact (review): only a float base or exponent is one
        "x + 10**Max(0.5, 10**10)", "x + 7**(2*10**5 + 0*1.0)"]


def planted(tmp_path: Path, name: str, edit) -> Path:
    """Root tmp_path/root holding the installed table ``name`` edited by ``edit``, its sha256
    recomputed (anyone can: it is no signature), as a hand-written or older table would be."""
    folder = tmp_path / "root" / "generated" / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    table = copy.deepcopy(json.loads((REPO / "tables" / f"{name}.json").read_text()))
    edit(table)
    table.pop("sha256")
    table["sha256"] = canonical_sha256(table)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(table, indent=1))
    return path


# ------------------------------------------------------------------------------------------------
# 1. constants too large to compute

@pytest.mark.parametrize("formula", HUGE)
def test_huge_constant_powers_are_refused_before_sympy(formula):
    start = time.monotonic()
    with pytest.raises(SpecError, match=r"more than 10000 digits"):
        check_text(formula, ("x",), (), "formula", xor=True)
    with pytest.raises(SpecError, match=r"more than 10000 digits"):
        parse_formula(formula)
    assert time.monotonic() - start < 5


def test_fit_of_a_huge_constant_exits_2_at_once(tmp_path):
    """`invact fit 'x*10**10**10'` built a 10**10-digit integer in sympy (killed after 120 s)."""
    root = tmp_path / "root"
    try:
        res = subprocess.run([str(INVACT), "fit", "x*10**10**10", "--name", "a", "--root", str(root)],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        pytest.fail("invact fit 'x*10**10**10' still runs after 120 s")
    assert res.returncode == 2, res.stderr
    assert "'10**10**10' has more than 10000 digits" in res.stderr, res.stderr
    assert not (root / "generated" / "tables" / "a.json").exists()


def test_table_with_a_huge_constant_is_refused_on_load(tmp_path, capsys):
    path = planted(tmp_path, "elu", lambda t: t.__setitem__(
        "formula", "Piecewise((alpha*(exp(x) - 1), x <= 0), (x + 0*10**10**10, True))"))
    with pytest.raises(TableError, match=r"'10\*\*10\*\*10' has more than 10000 digits") as info:
        tables.load_table(path)
    assert str(path) in str(info.value)
    status, _, err = invact_cli(capsys, "generate", "--root", tmp_path / "root")
    assert status == 2 and "10**10**10" in err, err


LEGITIMATE = ["x**5", "2**x", "exp(x)**2", "1e-6*x", "10**-6*x", "x*10**(-6)", "x*2**-1000", "x*10**300",
              "x*2**2**5", "x^3 + 2^-3*x", "x*2**(1/sqrt(2))", "x*2**(1/(1 + 10**-6))", "x*(-2)**3",
              "x*(1/3)**40", "x*pi**2*E**-3", "x + 0.044715*x**3", "x*(1 + 10**-500)**2",
              # a float makes the power a Float to sympy (computed at once); 2**20000 has 6021 digits
              "x*1.0001**100000", "x*(-1.001)**100000", "x*2**20000/2**20000"]


@pytest.mark.parametrize("formula", LEGITIMATE)
def test_ordinary_constants_still_parse(formula):
    expr, _ = parse_formula(formula)
    assert "x" in {s.name for s in expr.free_symbols}


def test_zoo_and_builtin_formulas_pass_the_new_checks():
    """Every row of benchmarks/zoo.toml and every built-in table's formula still parses (a row expected
    to be refused is refused later, by the fitter, not by these checks)."""
    with open(ZOO, "rb") as fh:
        rows = tomllib.load(fh)["activation"]
    assert len(rows) >= 70
    for row in rows:
        parse_formula(row["formula"])
    paths = sorted((REPO / "tables").glob("*.json"))
    assert {tables.name_of(p)[0] for p in paths} >= set(BUILTINS)
    for path in paths:
        tables.load_table(path)


# ------------------------------------------------------------------------------------------------
# 2. table parameters the formula does not use

def test_table_parameter_unused_by_its_formula_is_refused(tmp_path, capsys):
    """A parameter F that elu's formula does not use: generated code renamed F.elu to param_F.elu and
    the forward failed ("'float' object has no attribute 'elu'")."""
    path = planted(tmp_path, "elu", lambda t: t.__setitem__("params", {"alpha": 1.0, "F": 2.0}))
    with pytest.raises(TableError, match=r"does not use .*'F': the formula does not contain this parameter"):
        tables.load_table(path)
    status, _, err = invact_cli(capsys, "generate", "--root", tmp_path / "root")
    assert status == 2 and str(path) in err and "'F'" in err, err
    assert not (tmp_path / "root" / "generated" / "torch_elu.py").exists()


@pytest.mark.parametrize("params, formula, match", [
    ({"alpha": 1.0, "b": 2.0}, "Piecewise((alpha*(exp(x) - 1), x <= 0), (x + b - b, True))",
     r"'b': the formula does not contain this parameter"),
    ({"alpha": 1.0, "F": 1.0}, "Piecewise((F*alpha*(exp(x) - 1), x <= 0), (x, True))",
     r"torch_forward 'F.elu\(x, alpha\)' is elu's, whose parameters are"),
], ids=["cancelled", "builtin forward"])
def test_parameters_the_formula_or_forward_does_not_take_are_refused(tmp_path, params, formula, match):
    """The rule `invact fit --param` applies, on the parsed formula's symbols (b - b is 0), and a
    built-in's torch_forward needs that built-in's parameters: F.elu(x, alpha) with a parameter F used
    by the formula would still become param_F.elu."""
    path = planted(tmp_path, "elu", lambda t: (t.__setitem__("params", params), t.__setitem__("formula", formula)))
    with pytest.raises(TableError, match=match):
        tables.load_table(path)


# ------------------------------------------------------------------------------------------------
# 3. parameter names: ASCII identifiers

def test_parameter_names_equal_after_nfkc_are_refused_in_tables(tmp_path):
    """alpha and ａlpha (full-width a) both became param_alpha: "SyntaxError: duplicate argument"."""
    path = planted(tmp_path, "elu", lambda t: t.__setitem__("params", {"alpha": 1.0, "ａlpha": 2.0}))
    with pytest.raises(TableError, match=r"'ａlpha': parameter names must be ASCII identifiers"):
        tables.load_table(path)


def test_non_ascii_parameter_is_refused_naming_the_rule(tmp_path, capsys):
    status, _, err = invact_cli(capsys, "fit", "alpha*x + x", "--param", "alpha=1", "--param", "ａlpha=2",
                                "--name", "k", "--root", tmp_path / "root")
    assert status == 2 and "parameter names must be ASCII identifiers" in err, err


# ------------------------------------------------------------------------------------------------
# 4. line breaks

def test_line_breaks_in_a_formula_are_spaces():
    multi, _ = parse_formula("x *\n sigmoid(x)")
    one, _ = parse_formula("x * sigmoid(x)")
    assert multi == one
    assert parse_formula("\tx*\r\n  tanh(x)\n")[0] == parse_formula("x*tanh(x)")[0]


def test_line_break_in_a_formula_reaches_the_next_check(tmp_path, capsys):
    """It was "could not be parsed (SyntaxError: invalid syntax)"; now the formula is read on and the
    unknown symbol is named."""
    status, _, err = invact_cli(capsys, "fit", "x *\n b", "--name", "k", "--root", tmp_path / "root")
    assert status == 2 and "unknown symbols ['b']" in err, err


def test_line_break_in_table_text_is_named(tmp_path):
    path = planted(tmp_path, "elu", lambda t: t.__setitem__(
        "formula", "Piecewise((alpha*(exp(x) - 1), x <= 0),\n (x, True))"))
    with pytest.raises(TableError, match=r"contains a line break '\\n': write it on one line"):
        tables.load_table(path)
    with pytest.raises(SpecError, match=r"contains the control character '\\x00'"):
        check_text("x\x00", ("x",))


# ------------------------------------------------------------------------------------------------
# 5. a Max/Min whose crossing sympy cannot solve

@pytest.mark.parametrize("formula", ["Max(tanh(x), 0.1*x)", "Min(x, 2*sigmoid(x))"])
def test_max_of_functions_crossing_without_a_closed_form_says_so(tmp_path, capsys, formula):
    """It was sympy's own "cannot split the real line into intervals for condition set ConditionSet(...)"."""
    status, _, err = invact_cli(capsys, "fit", formula, "--name", "k", "--root", tmp_path / "root")
    assert status == 2 and "has no closed-form solution for x" in err and "write a Piecewise" in err, err
    assert "ConditionSet" not in err


# ------------------------------------------------------------------------------------------------
# 6. the whitelist walk, construct by construct (a formula with x and a parameter a)

@pytest.mark.parametrize("text", [
    "(x > 0) & (x < 1)", "((x > 0) | (x < -1)) & (x < 2)", "Piecewise((x, x > 0), (0, True))", "log(x, 2)",
    "Max(x, 1, a)", "-x + +x*pi/E", "a*x**2.5 - 1e3"])
def test_the_whitelist_accepts(text):
    check_text(text, ("x",), ("a",))


def test_a_caret_is_a_power_only_where_asked():
    check_text("a*x^2", ("x",), ("a",), xor=True)
    with pytest.raises(SpecError, match=r"'\^' is not allowed; allowed: "):
        check_text("a*x^2", ("x",), ("a",))


@pytest.mark.parametrize("text, refusal", [
    ("(x > 0) & 1", "'&' joins conditions only"),
    ("1 | (x > 0)", "'|' joins conditions only"),
    ("(x > ~x) & 1", "'~' is not allowed"),               # the left side is walked before the right is judged
    ("x % 2", "'%' is not allowed"),
    ("~x", "'~' is not allowed"),
    ("not x", "'not' is not allowed"),
    ("x < 1 < 2", "'x < 1 < 2' is not allowed (one comparison: < <= > >=)"),
    ("x == 1", "'==' is not allowed (one comparison: < <= > >=)"),
    ("exp", "'exp' must be called"),
    ("exp(x=1)", "'exp(x=1)' is not allowed (positional arguments only)"),
    ("exp(*x)", "'exp(*x)' is not allowed (positional arguments only)"),
    ("exp()", "'exp()' is not allowed (positional arguments only)"),
    ("log(x, 2, 3)", "'log(x, 2, 3)' has 3 arguments: log takes 1 or 2 arguments"),
    ("sqrt(x, 2)", "'sqrt(x, 2)' has 2 arguments: sqrt takes 1 argument"),
    ("x.real(1)", "'.real' is an unknown function"),
    ("'s' * x", "\"'s'\" is not allowed"),
    ("None", "'None' is not allowed"),
    ("False", "'False' is not allowed"),
    ("1j*x", "'1j' is not allowed"),
    ("x if x > 0 else 0", "'x if x > 0 else 0' is not allowed"),
    ("x[0]", "'x[0]' is not allowed"),
    ("[x]", "'[x]' is not allowed"),
    ("x.real", "'.real' is not allowed"),
    ("Piecewise((x, x > 0), (k, True))", "'k' is not a known name"),
    ("~x + foo(1)", "'foo' is an unknown function"),      # an unknown name first, wherever it is
])
def test_the_whitelist_refuses_naming_the_token(text, refusal):
    with pytest.raises(SpecError) as info:
        check_text(text, ("x",), ("a",))
    assert str(info.value) == f"formula {text!r}: {refusal}; allowed: {expressions.allowed_summary()}"
