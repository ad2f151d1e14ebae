"""Trust boundaries: formulas and table text are parsed by a whitelist (never run as Python), roots
are checked and layered over the installed tables, generated code is tied to its table by sha256,
and the tables folder's lock covers code generation. Cheap formulas and scratch roots (tmp_path)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import invact
import invact.generated
from invact import backends, constants, ops, registry
from invact.fitting import cli, tables
from invact.fitting.errors import SpecError
from invact.fitting.codegen.printer import PARAM_PREFIX, mangle
from invact.fitting.expressions import check_text, is_reserved
from invact.fitting.formulas import get_spec
from helpers import invact_cli

INVACT = Path(sys.executable).with_name("invact")
REPO = Path(invact.generated.__file__).parent               # the installed generated/ (never written)
EVIL = "__import__('os').system('touch PWNED')"


def run(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in (env or os.environ).items()}
    return subprocess.run([str(INVACT), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


# ------------------------------------------------------------------------------------------------
# 5. formulas

def test_formula_with_python_code_runs_nothing(tree, tmp_path):
    res = run("fit", f"{EVIL} + x", "--name", "p", "--root", tree, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "'__import__' is an unknown function" in res.stderr
    assert not (tmp_path / "PWNED").exists()
    assert sorted(p.name for p in (tree / "generated" / "tables").iterdir()) == ["gelu.json", "tanh.json"]


@pytest.mark.parametrize("text, token", [
    ("x.real", ".real"), ("[x][0]", "[x][0]"), ("lambda: x", "lambda: x"), ("x if x else 1", "x if x else 1"),
    ("x + 'a'", "'a'"), ("x + 1j", "1j"), ("x @ x", "@"), ("x // 2", "//"), ("exp(x=1)", "exp(x=1)"),
    ("exp", "exp"), ("getattr(x, 'y')", "getattr"), ("0 < x < 1", "0 < x < 1"), ("x == 1", "x == 1"),
    ("x*\uff45xp(x)", "\uff45"),
])
def test_formula_whitelist_names_the_token(text, token):
    with pytest.raises(SpecError) as info:
        get_spec(text, name="f")
    assert repr(token) in str(info.value), str(info.value)


@pytest.mark.parametrize("text", ["x*sigmoid(x)", "asinh(x) + atanh(x/(1 + Abs(x)))", "x + 0.1*atan(x)",
                                  "Piecewise((0, x <= 0), (x, True))", "x^3 + x", "max(x, 0) + min(x, 0)/10",
                                  "x + erfc(x) + Heaviside(x) + sign(x) + softplus(x) + cosh(x) + E + pi",
                                  "-x*sigmoid(x)", "acos(tanh(x)) + asin(tanh(x)) + tan(x) + sin(x) + cos(x)"])
def test_formula_whitelist_accepts_the_documented_functions(text):
    get_spec(text, name="f")


def test_fit_help_lists_the_functions(capsys):
    with pytest.raises(SystemExit):                      # --help exits through argparse
        cli.build_parser().parse_args(["fit", "--help"])
    out = capsys.readouterr().out
    for name in ("asinh", "atanh", "erfc", "Heaviside", "Piecewise", "sigmoid", "softplus", "never run"):
        assert name in out, name


def test_leading_minus_is_a_formula(tree, capsys):
    """'-x*k' parses as a formula (refused for its unknown symbol), not as an unknown option."""
    status, _, err = invact_cli(capsys, "fit", "-x*k", "--name", "neg", "--root", tree)
    assert status == 2 and "unknown symbols ['k']" in err, err
    status, _, err = invact_cli(capsys, "--root", tree, "fit", "--name", "neg", "-x*k")
    assert status == 2 and "unknown symbols ['k']" in err, err


# ------------------------------------------------------------------------------------------------
# 12. parameter names

@pytest.mark.parametrize("formula, param, message", [
    ("x*sigmoid(y*x)", "y=1.3", "--param 'y'"),
    ("x*sigmoid(1.3*x)", "x=1", "--param 'x'"),
    ("x*sigmoid(exp*x)", "exp=1.3", "--param 'exp'"),
    ("x*sigmoid(backend*x)", "backend=1.3", "--param 'backend'"),   # invact.activation(name, *, backend)
    ("x*sigmoid(Float*x)", "Float=1.3", "--param 'Float'"),         # sympy's parser calls Float(...)
    ("x*sigmoid(_b*x)", "_b=1.3", "--param '_b'"),
    ("x*sigmoid(1.3*x)", "alpha=1.3", "does not contain"),
])
def test_reserved_and_unused_parameters_refused_before_fitting(tree, capsys, formula, param, message):
    status, out, err = invact_cli(capsys, "fit", formula, "--param", param, "--name", "k", "--root", tree)
    assert status == 2 and message in err and "analysing" not in err, err
    assert sorted(p.name for p in (tree / "generated" / "tables").iterdir()) == ["gelu.json", "tanh.json"]


def _identifiers(source: str) -> set[str]:
    """Every name a module binds or reads: variables, arguments, keywords, functions, imports."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            out.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.alias):
            out.add(node.asname or node.name.split(".")[0])
    return out


def test_generated_code_keeps_parameters_apart_from_its_own_names():
    """Generated code calls parameter NAME ``param_NAME`` (printer.mangle), and none of its own names
    starts with that prefix, so no parameter name can shadow a local, function or module it uses
    (which is why RESERVED holds no name of the generated code): in every generated module the names
    with the prefix are exactly its table's mangled parameters, and no bare parameter name occurs."""
    modules = sorted(REPO.glob("t*_*.py"))
    assert any(tables.load_table(REPO / "tables" / f"{p.stem.split('_', 1)[1]}.json")["params"] for p in modules)
    for path in modules:
        table = tables.load_table(REPO / "tables" / f"{path.stem.split('_', 1)[1]}.json")
        names = _identifiers(path.read_text())
        assert {n for n in names if n.startswith(PARAM_PREFIX)} == {mangle(p) for p in table["params"]}, path.name
        assert not names & set(table["params"]), (path.name, names & set(table["params"]))
    for name in ("b", "k", "t", "s0", "poly", "grad", "code", "thr", "g_kernel", "torch", "BLOCK", "F"):
        assert not is_reserved(name), name


# parameters named like the generated code's locals, functions and modules (b, k, t, s0, poly, grad:
# Triton's byte index, the plane loop, the transformed y, a class's segment index, the POLY table, the
# module function); the reference is the formula in torch ops, differentiated by autograd
NAMED_LIKE_LOCALS = [
    ("x*sigmoid(b*x)", {"b": 1.3}, lambda x, p: x * torch.sigmoid(p["b"] * x)),     # fitted polynomials
    ("Piecewise(((b + s0)*x, x < 0), ((k + t + poly*grad)*x, True))",                # closed forms
     {"b": 0.05, "s0": 0.05, "k": 0.5, "t": 0.25, "poly": 0.5, "grad": 0.5},
     lambda x, p: torch.where(x < 0, (p["b"] + p["s0"]) * x, (p["k"] + p["t"] + p["poly"] * p["grad"]) * x)),
]


@pytest.mark.slow
@pytest.mark.parametrize("formula, params, reference", NAMED_LIKE_LOCALS)
def test_parameters_named_like_generated_locals_fit_and_run(tree, layered, capsys, formula, params, reference):
    """A formula whose parameters are named like the generated code's own names fits, generates and
    runs: forward and backward through invact.activation(name, **params) match autograd of the
    formula (float64, eager), and the Triton kernels give the eager backend's code and gradient."""
    argv = [a for n, v in params.items() for a in ("--param", f"{n}={v}")]
    status, _, err = invact_cli(capsys, "fit", formula, *argv, "--name", "named", "--fp32-samples", "4096",
                                "--root", tree)
    assert status == 0, err
    invact.use_root(tree)
    table = tables.load_table(tree / "generated" / "tables" / "named.json")
    x = (torch.linspace(-8, 8, 4001, dtype=torch.float64) + 1e-3).requires_grad_()
    go = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # a table for any values (param_generic) also with other ones: the values reach the code
    for values in [params] + ([{n: 1.5 * v for n, v in params.items()}] if table["param_generic"] else []):
        x.grad = None
        invact.activation("named", backend="eager", **values)(x).backward(go)
        xr = x.detach().requires_grad_()
        y_ref = reference(xr, values)
        y_ref.backward(go)
        # forward: the printed formula in float64, other operations than the reference's: a few ulps
        y = invact.activation("named", backend="eager", **values)(x.detach())
        torch.testing.assert_close(y, y_ref.detach(), rtol=1e-13, atol=1e-300)
        # backward: the certified approximation error, relative above |f'| = 1 (tests/tolerances.py),
        # plus 1e-8 for the float64 evaluation of float32-rounded coefficients (1e-9) and the float64
        # floor next to a branch point (sqrt(2 f'' 1e-17) ~ 3e-9)
        bound = (table["certificate"]["approx_error"] * xr.grad.abs().clamp_min(1.0) + 1e-8) * go.abs()
        assert bool(((x.grad - xr.grad).abs() <= bound).all()), (values, (x.grad - xr.grad).abs().max())
    if not backends.triton_importable() or os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton_tolerances import formula_error, is_fitted, within
    values = [float(v) for v in params.values()]
    x32, go32 = x.detach().float(), go.float()
    y_e, c_e = torch.ops.invact.forward(x32, "named", values, "eager")
    y_t, c_t = torch.ops.invact.forward(x32, "named", values, "triton")
    a = torch.ops.invact.backward(go32, y_e, c_e, "named", values, "triton")
    b = torch.ops.invact.backward(go32, y_e, c_e, "named", values, "eager")
    assert "triton" in backends.available("cpu")                        # the kernels ran, no fallback
    # as tests/test_triton.py: the same code; y within 8 float32 ulps plus the formula's cancellation;
    # fitted tables' gradients bit for bit, closed forms 8 ulps plus |go| 2**-21 (exp/log differ)
    assert torch.equal(c_t, c_e)
    assert within(y_t, y_e, 8, formula_error(x32))
    fitted = is_fitted("named")
    assert torch.equal(a, b) if fitted else within(a, b, 8, go32.double().abs() * 2.0**-21)


# ------------------------------------------------------------------------------------------------
# 6. table text

def _planted(tree: Path, name: str, edit) -> Path:
    """A table whose text was replaced and its sha256 recomputed (anyone can: it is no signature)."""
    path = tree / "generated" / "tables" / f"{name}.json"
    table = tables.load_table(path)
    edit(table)
    return tables.write_table(table, path)


@pytest.mark.parametrize("edit", [
    lambda t: t.__setitem__("torch_forward", f"{EVIL} or F.gelu(x)"),
    lambda t: t["code_classes"][0]["segments"].__setitem__(0, dict(
        t["code_classes"][0]["segments"][0], kind="exact", expr=f"{EVIL} + y")),
    lambda t: t.__setitem__("param_domain", [f"{EVIL} > 0"]),
    lambda t: t.__setitem__("formula", f"{EVIL} + x"),
    lambda t: t["forward_code"]["x_breaks"][0].__setitem__("value", EVIL),
    lambda t: t["code_classes"][0]["segments"][1]["transform"].__setitem__("kind", f"log\n{EVIL}"),
    lambda t: t["forward_code"]["x_breaks"][0].__setitem__("side", f"left\n{EVIL}"),
], ids=["torch_forward", "segment expr", "param_domain", "formula", "break value", "transform kind", "side"])
def test_table_text_is_data(tree, tmp_path, edit, capsys, monkeypatch):
    """Planted text in any field that reaches code or a parser: `invact generate` refuses the table
    naming the file; nothing runs. (The transform kind was printed into a comment line of the
    generated module, where a newline would have started a line of code.) In process, from tmp_path:
    planted code that ran would leave tmp_path/PWNED."""
    path = _planted(tree, "gelu", edit)
    monkeypatch.chdir(tmp_path)
    status, _, err = invact_cli(capsys, "generate", "--root", tree)
    assert status == 2, err
    assert str(path) in err and ("not an accepted expression" in err or "malformed" in err
                                 or "side is not" in err), err
    assert "touch PWNED" not in err.split(";")[-1]                   # the hint proposes no planted text
    assert not (tmp_path / "PWNED").exists()
    assert not (tree / "generated" / "registry.py").exists()


def test_runtime_param_domain_is_compared_not_evaluated():
    assert constants.holds("alpha > 0", {"alpha": 1.0}) and not constants.holds("alpha > 0", {"alpha": -1.0})
    assert constants.holds("-alpha + 2*beta/4 <= 1", {"alpha": 1.0, "beta": 2.0})
    for bad in (f"{EVIL} > 0", "alpha.real > 0", "alpha", "0 < alpha < 1", "unknown > 0"):
        with pytest.raises(ValueError, match="param_domain"):
            constants.holds(bad, {"alpha": 1.0})


# ------------------------------------------------------------------------------------------------
# 11. a broken table elsewhere stops a fit before it starts; a tampered one is not proposed again

def test_corrupt_unrelated_table_stops_fit_before_fitting(tree, capsys):
    bad = tree / "generated" / "tables" / "tanh.json"
    bad.write_text(bad.read_text().replace('"tolerance": 5e-08', '"tolerance": 1e-07'))
    status, out, err = invact_cli(capsys, "fit", "2*x", "--name", "lin", "--root", tree)
    assert status == 2 and str(bad) in err and "changed after invact wrote it" in err, err
    assert "analysing branches" not in err                 # stopped before the fit began
    assert not (tree / "generated" / "tables" / "lin.json").exists()


def test_tampered_formula_is_not_proposed(tree):
    path = tree / "generated" / "tables" / "mine.json"
    table = tables.load_table(tree / "generated" / "tables" / "tanh.json")
    table.update(name="mine", formula=f"x + 0*{EVIL.replace(chr(39), '')}")
    path.write_text(tables.dump_table(table).replace('"tolerance": 5e-08', '"tolerance": 1e-07'))
    with pytest.raises(tables.TableError) as info:
        tables.load_table(path)
    text = str(info.value)
    assert str(path) in text and "changed after invact wrote it" in text and "__import__" not in text, text


# ------------------------------------------------------------------------------------------------
# 13. plot output checked first

@pytest.mark.parametrize("output, message", [("missing/dir/x.png", "does not exist"), ("x.txt", "unsupported"),
                                             (".", "unsupported")])
def test_plot_output_checked_before_work(tree, tmp_path, capsys, monkeypatch, output, message):
    import invact.fitting.plot as plot

    def never(*args, **kwargs):
        raise AssertionError("plotted before checking the output path")
    monkeypatch.setattr(plot, "plot_error_curves", never)
    status, _, err = invact_cli(capsys, "plot", "gelu", "--root", tree, "-o", tmp_path / output)
    assert status == 2 and message in err and "-o/--output" in err, err


# ------------------------------------------------------------------------------------------------
# 3. code and table stay a consistent pair

def test_new_table_with_old_code_is_refused_with_the_fix(tree, layered):
    """A fit killed after writing its table, before the code: the runtime refuses the module."""
    assert run("generate", "--root", tree, cwd=tree).returncode == 0
    _planted(tree, "tanh", lambda t: t.__setitem__("tolerance", 1e-7))   # the new table, old code
    invact.use_root(tree)
    with pytest.raises(ImportError) as info:
        registry.module("tanh")
    text = str(info.value)
    assert str(tree / "generated" / "torch_tanh.py") in text and f"invact generate --root {tree}" in text, text
    assert run("generate", "--root", tree, cwd=tree).returncode == 0
    invact.use_root(tree)
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    ops.apply(x, "tanh", backend="eager").sum().backward()
    # tanh's table is the closed form 1 - y**2: float64 rounding only (assert_close's float64 default)
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)


def test_every_generated_module_carries_its_tables_sha():
    for path in sorted(REPO.glob("t*_*.py")):
        table = tables.load_table(REPO / "tables" / f"{path.stem.split('_', 1)[1]}.json")
        assert f"TABLE_SHA256 = {table['sha256']!r}" in path.read_text(), path


def test_generate_waits_for_the_tables_lock(tree):
    """Code generation holds the tables folder's lock: a generate started while another process holds
    it waits (so a concurrent fit cannot list the tables, then remove a module another fit added)."""
    folder = tree / "generated" / "tables"
    with tables.locked(folder):
        proc = subprocess.Popen([str(INVACT), "generate", "--root", str(tree)], cwd=tree, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(4.0)                                  # imports plus a generation take ~2 s here
        assert proc.poll() is None and not (tree / "generated" / "registry.py").exists()
    # a hang guard (the lock never seen released), 600 s: the generate took ~3 s here after the lock was
    # freed; starting a process that imports torch took up to 2 min on this 2-core machine at a load of 9
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert (tree / "generated" / "registry.py").exists()


@pytest.mark.slow
def test_concurrent_fits_and_generates_keep_every_entry(tree):
    """Two fits of different cheap formulas and a generate loop at once: each fit returns with its
    own module and registry entry present, and the end state is what a fresh generate writes."""
    env = dict(os.environ, INVACT_ROOT=str(tree))
    fits = [subprocess.Popen([str(INVACT), "fit", f, "--name", n, "--fp32-samples", "4096"], env=env, cwd=tree,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for f, n in (("2*x", "lin2"), ("3*x", "lin3"))]
    while any(p.poll() is None for p in fits):
        assert run("generate", cwd=tree, env=env).returncode == 0
    for proc, name in zip(fits, ("lin2", "lin3")):
        _, err = proc.communicate()
        assert proc.returncode == 0, err
    registry = (tree / "generated" / "registry.py").read_text()
    for name in ("gelu", "tanh", "lin2", "lin3"):
        assert f"'{name}'" in registry and (tree / "generated" / f"torch_{name}.py").is_file(), name
    before = {p.name: p.read_bytes() for p in (tree / "generated").glob("*.py")}
    assert run("generate", cwd=tree, env=env).returncode == 0
    assert {p.name: p.read_bytes() for p in (tree / "generated").glob("*.py")} == before


# ------------------------------------------------------------------------------------------------
# 7. roots

def test_use_root_layers_over_the_installed_tables(tree, layered):
    """A root with one activation: it is added, and every installed one stays (GELU, patch)."""
    (tree / "generated" / "tables" / "gelu.json").unlink()
    assert run("generate", "--root", tree, cwd=tree).returncode == 0
    invact.use_root(tree)
    assert Path(registry.module("tanh").__file__).parent == tree / "generated"
    assert Path(registry.module("gelu").__file__).parent == REPO
    x = torch.randn(32, requires_grad=True)
    invact.GELU()(x).sum().backward()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    invact.patch(model)
    assert not any(type(m) is torch.nn.GELU for m in model.modules())


@pytest.mark.parametrize("how", ["option", "environment"])
@pytest.mark.parametrize("layout", ["missing", "empty"])
def test_root_that_is_not_a_project_tree_is_an_error(tmp_path, how, layout):
    root = tmp_path / "nowhere"
    if layout == "empty":
        root.mkdir()
    env = dict(os.environ, INVACT_ROOT=str(root)) if how == "environment" else dict(os.environ)
    res = run(*(["list"] if how == "environment" else ["--root", root, "list"]), cwd=tmp_path, env=env)
    assert res.returncode == 2 and str(root) in res.stderr and res.stdout == "", res.stderr
    with pytest.raises(FileNotFoundError, match="nowhere"):
        invact.use_root(root)


def test_hints_name_the_root(tree, capsys):
    status, out, _ = invact_cli(capsys, "list", "--root", tree)
    assert status == 0 and f"invact fit silu --root {tree}" in out
    status, _, err = invact_cli(capsys, "show", "silu", "--root", tree)
    assert status == 2 and f"invact fit silu --root {tree}" in err


def test_bad_expressions_in_check_text():
    check_text("alpha > 0", (), ("alpha",), relation=True)
    with pytest.raises(SpecError, match="one comparison"):
        check_text("alpha", (), ("alpha",), relation=True)


def test_invact_root_in_the_runtime_layers_or_fails(tree, tmp_path):
    """$INVACT_ROOT: a valid root is layered (its tanh, the installed gelu); a missing one raises at
    every use instead of silently falling back to the installed tables."""
    (tree / "generated" / "tables" / "gelu.json").unlink()
    assert run("generate", "--root", tree, cwd=tree).returncode == 0
    code = ("import torch, invact; from invact import registry\n"
            "for _ in range(2):\n"
            "    try:\n"
            "        print(registry.module('tanh').__file__, registry.module('gelu').__file__)\n"
            "    except FileNotFoundError as e:\n"
            "        print('refused', e)\n")
    for root, want in ((tree, f"{tree}/generated/torch_tanh.py {REPO}/torch_gelu.py"),
                       (tmp_path / "missing", f"refused root {tmp_path / 'missing'}: no such folder")):
        env = dict(os.environ, INVACT_ROOT=str(root), TRITON_INTERPRET="1")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                             timeout=300)
        lines = res.stdout.splitlines()
        assert res.returncode == 0 and len(lines) == 2 and all(line.startswith(want) for line in lines), res


def test_whitelist_and_sympy_namespace_agree():
    """Every whitelisted name maps to sympy, and the parser's namespace holds nothing else."""
    from invact.fitting.expressions import CONSTANTS, FUNCTIONS
    from invact.fitting.formulas import SYMPY_FUNCTIONS
    assert set(FUNCTIONS) | set(CONSTANTS) == set(SYMPY_FUNCTIONS)


def test_fit_creates_a_new_root_but_not_its_parent(tmp_path, capsys):
    """`invact fit --root NEW` makes the layout in a new folder; a root whose parent is missing is refused
    before any work (a mistyped path)."""
    status, _, err = invact_cli(capsys, "fit", "x*k", "--name", "f", "--root", tmp_path / "no" / "new")
    assert status == 2 and "no such folder" in err, err
    status, _, err = invact_cli(capsys, "fit", "x*k", "--name", "f", "--root", tmp_path / "new")
    assert status == 2 and "unknown symbols ['k']" in err, err     # got past the root check
