"""The `invact` command through real processes: exit codes, messages, fits into a temporary tree."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import invact.generated
from invact.fitting import cli, tables
from helpers import CHEAP, invact_cli, read_until, snapshot

INVACT = Path(sys.executable).with_name("invact")
REPO_TABLES = Path(invact.generated.__file__).parent / "tables"   # never written by these tests
COMMANDS = ["list", "fit", "certify", "show", "plot", "generate"]


def run(*args, root: Path | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    """`invact ARGS` (or `python -c CODE ARGS`) in a subprocess, outside the repository."""
    env = dict(os.environ, INVACT_ROOT=str(root)) if root else dict(os.environ)
    cmd = [sys.executable, "-c", code, *args] if code else [str(INVACT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=300)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_for_every_command(command, capsys):
    argv = [command, "--help"] if command else ["--help"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: invact") and (command is None or f"invact {command}" in out)
    if command is None:
        assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize("argv, message", [
    ([], "usage: invact"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["fit", "gelu", "--param", "alpha"], "expected NAME=VALUE"),
    (["fit", "gelu", "--tolerance", "-1"], "expected a positive float"),
    (["fit", "gelu", "--fp32-samples", "1.5"], "expected a positive int"),
    (["fit", "gelu", "--target", "second"], "invalid choice: 'second'"),
    (["plot", "gelu"], "-o/--output"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_console_script(tree):
    """The installed `invact` script: a success (0) and an input error (2), stderr one line."""
    listing = run("list", root=tree)
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert "certified" in lines["gelu"] and " 2/1 " in lines["gelu"]
    assert "not fitted: invact fit silu" in lines["silu"]
    bad = run("fit", "bogus", root=tree)
    assert bad.returncode == 2 and bad.stderr.startswith("invact: error: unknown activation 'bogus'")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_version(capsys):
    status, out, _ = invact_cli(capsys, "--version")
    assert status == 0 and out.startswith("invact 0.")


def test_show(tree, capsys):
    status, out, _ = invact_cli(capsys, "show", "gelu", "--root", tree)
    assert status == 0 and "x*(erf(sqrt(2)*x/2) + 1)/2" in out
    assert "sqrt at y=-0.1699712" in out and "poly degree" in out and "fp32-stratified" in out


@pytest.mark.parametrize("argv, message", [
    (["fit", "bogus"], "unknown activation 'bogus'"),
    (["fit", "x*y", "--name", "f"], "unknown symbols ['y']"),
    (["fit", "x/(1+abs(x))"], "needs a name: add --name"),
    (["fit", "x**2", "--name", "gelu"], "'gelu' is a built-in"),
    (["fit", "x**2", "--name", "not-an-identifier"], "must be a Python identifier"),
    (["fit", "elu", "--param", "beta=2"], "'beta' is not a parameter of 'elu'"),
    (["fit", "elu", "--param", "alpha=-1"], "needs alpha > 0"),
    (["fit", "x**", "--name", "f"], "formula 'x**' could not be parsed (SyntaxError"),
    (["fit", "x*(1+", "--name", "f"], "formula 'x*(1+' could not be parsed (SyntaxError"),
    (["fit", "x*k", "--name", "f"], "unknown symbols ['k']"),
    (["fit", "silu", "--tolerance", "1e-9"], "below what float32 coefficients can represent; use --tolerance 2e-8"),
    (["show", "silu"], "does not exist; create it with `invact fit silu --root "),   # hints name the root
    (["certify", "silu", "--target", "inverse"], "invact fit silu --target inverse"),
])
def test_input_errors_exit_2(tree, capsys, argv, message):
    status, out, err = invact_cli(capsys, *argv, "--root", tree)
    assert status == 2 and out == ""
    assert err.startswith("invact: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (tree / "generated" / "tables").iterdir()) == ["gelu.json", "tanh.json"]


@pytest.mark.parametrize("formula, message", [
    ("sin(x)", "infinitely many monotone branches"),
    ("sqrt(x)", "not real-valued"),
    ("1/x", "not real-valued (or not finite)"),
    ("exp(x*asinh(x))", "grows without bound"),   # g/y = asinh(x) + x/sqrt(1 + x^2) grows without bound
])
def test_analysis_errors_exit_2(tree, capsys, formula, message):
    """Refused once branch analysis has started: progress lines, then one error line; nothing written."""
    status, out, err = invact_cli(capsys, "fit", formula, "--name", "f", "--root", tree)
    lines = err.strip().splitlines()
    assert status == 2 and out == "" and lines[-1].startswith("invact: error: ") and message in lines[-1], err
    assert all(line.startswith("invact: [") for line in lines[:-1]), err
    assert sorted(p.name for p in (tree / "generated" / "tables").iterdir()) == ["gelu.json", "tanh.json"]


def test_damaged_table_exit_2(tree, capsys):
    path = tree / "generated" / "tables" / "gelu.json"
    path.write_text(path.read_text().replace('"tolerance": 5e-08', '"tolerance": 1e-07'))
    status, _, err = invact_cli(capsys, "show", "gelu", "--root", tree)
    assert status == 2 and str(path) in err and "sha256" in err and "invact fit gelu" in err
    status, out, _ = invact_cli(capsys, "list", "--root", tree)
    assert status == 0 and "invalid table" in out


def test_internal_error_exit_1(capsys, monkeypatch):
    def boom(args):
        raise ZeroDivisionError("simulated bug")
    monkeypatch.setattr(cli, "cmd_list", boom)
    status, _, err = invact_cli(capsys, "list")
    assert status == 1 and "internal error: ZeroDivisionError: simulated bug" in err and "--debug" in err
    assert "Traceback" not in err
    status, _, err = invact_cli(capsys, "list", "--debug")
    assert status == 1 and "Traceback" in err


@pytest.mark.slow
def test_fit_certify_plot_in_a_temporary_tree(tree, capsys):
    """A cheap exact-route fit writes a valid table and regenerates code, only under INVACT_ROOT."""
    repo_before = snapshot(REPO_TABLES)
    fit = run("fit", "sigmoid", "--fp32-samples", "65536", root=tree)
    assert fit.returncode == 0, fit.stderr
    path = tree / "generated" / "tables" / "sigmoid.json"
    assert f"wrote {path}" in fit.stdout and "sigmoid: analysing branches" in fit.stderr
    table = tables.load_table(path)
    assert table["certificate"]["checks"][-1] == "fp32-stratified-65536"
    assert (tree / "generated" / "torch_sigmoid.py").is_file() and (tree / "generated" / "registry.py").is_file()
    status, _, err = invact_cli(capsys, "certify", "sigmoid", *CHEAP, "--root", tree)
    assert status == 0, err
    assert "left" in err and "100%" in err                                  # progress bar with ETA
    assert tables.load_table(path)["certificate"]["checks"][-1] == "fp32-stratified-4096"
    png = tree / "sigmoid.png"
    status, _, err = invact_cli(capsys, "plot", path, "-o", png)
    assert status == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert snapshot(REPO_TABLES) == repo_before


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.slow
def test_interrupted_fits_leave_the_tree_unchanged(tree):
    """SIGINT and SIGTERM during a fit: exit 130 / 143, no table, no temp file, no code written."""
    before = snapshot(tree)
    env = dict(os.environ, INVACT_ROOT=str(tree))
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        # as a foreground job: pytest-xdist workers may ignore SIGINT, and children inherit SIG_IGN
        procs[sig] = subprocess.Popen([str(INVACT), "fit", "silu"], env=env, cwd="/", text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_signals)
    try:
        for sig, proc in procs.items():
            # until the fit of the second branch has begun: mid-fit on a machine of any speed. Read with
            # a deadline (a hang guard, 300 s: the two fits got there in ~15 s here under load), so a
            # fit that never prints the line fails instead of hanging CI
            read_until(proc.stderr, lambda line: "silu: branch 1 (" in line, 300)
            proc.send_signal(sig)
        for sig, proc in procs.items():
            _, err = proc.communicate(timeout=120)     # a hang guard: exiting took ~1 s here
            assert proc.returncode == 128 + sig, err
            assert f"interrupted ({sig.name})" in err
    finally:
        for proc in procs.values():                    # a failed check leaves no fit running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert snapshot(tree) == before


SIGNAL_IN_TORCH_IMPORT = """
import os, signal, sys
class SendOnce:                      # SIGTERM from inside torch's import, where pybind11 code calls Python
    sent = False
    def find_spec(self, name, path=None, target=None):
        if name == "torch.distributed" and not SendOnce.sent:
            SendOnce.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
sys.meta_path.insert(0, SendOnce())
from invact.fitting import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_signal_during_torch_import_exits_143(tree):
    """The fit imports torch for PyTorch's NaN gradients: a SIGTERM there exits 143 with nothing
    written. It once aborted the process (SIGABRT from pybind11) when the handler ran inside torch's
    C++, a moment no test can time; test_interrupts checks that no handler runs inside an import."""
    before = snapshot(tree)
    fit = run("fit", "silu", root=tree, code=SIGNAL_IN_TORCH_IMPORT)
    assert fit.returncode == 128 + signal.SIGTERM, fit.stderr
    assert "interrupted (SIGTERM)" in fit.stderr and "terminate called" not in fit.stderr
    assert snapshot(tree) == before


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_information_floors_match_design(name):
    """plot.information_floor reproduces docs/floors.md's measured floors (drawn by `invact plot`).

    bf16/fp16: docs/floors.md gives 3 digits (1 %). fp32: the worst x sits next to the branch point, where
    the result depends on how close the grid comes to the x whose f(x) rounds worst; grid spacing
    8e-6 vs docs/floors.md's unknown grid moves it by up to ~10 %.
    """
    from invact.fitting import plot
    table = tables.load_table(REPO_TABLES / f"{name}.json")
    for dtype, rel in (("bf16", 0.01), ("fp16", 0.01), ("fp32", 0.15)):
        want = plot.DESIGN_FLOORS[name][dtype]
        assert plot.information_floor(table, dtype) == pytest.approx(want, rel=rel), dtype


def test_failed_generation_restores_the_table(tree, capsys, monkeypatch):
    """If code generation fails, the previous table stays (the code is computed before the write)."""
    import invact.fitting.codegen as codegen

    def broken(root=None, pending=None, note=None):
        raise RuntimeError("codegen bug")
    monkeypatch.setattr(codegen, "generate_all", broken)
    path = tree / "generated" / "tables" / "tanh.json"
    before = path.read_bytes()
    status, _, err = invact_cli(capsys, "certify", "tanh", *CHEAP, "--root", tree)
    assert status == 1 and "RuntimeError: codegen bug" in err
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["gelu.json", "tanh.json"]


def test_generate(tree, capsys):
    status, out, err = invact_cli(capsys, "generate", "--root", tree)
    assert status == 0, err
    assert f"under {tree / 'generated'}" in out
    for name in ("torch_gelu.py", "triton_tanh.py", "registry.py"):
        assert (tree / "generated" / name).is_file()


@pytest.mark.slow
def test_concurrent_fits_of_one_name(tree):
    """Two `invact fit` processes on the same name at once: both succeed, one complete valid table
    remains, no temp files, and the generated code is that table's (a fresh `invact generate` changes
    no byte: code and table come from the same run)."""
    env = dict(os.environ, INVACT_ROOT=str(tree))
    # different sample counts: different certificates, so the tables (and META's sha256) differ
    procs = [subprocess.Popen([str(INVACT), "fit", "sigmoid", "--fp32-samples", n], env=env, cwd="/", text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in ("65536", "32768")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    folder = tree / "generated"
    tables.load_table(folder / "tables" / "sigmoid.json")
    assert not [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    after_fits = snapshot(folder)
    assert run("generate", root=tree).returncode == 0
    assert snapshot(folder) == after_fits


@pytest.mark.parametrize("where", ["before", "after"])
def test_root_before_or_after_the_command(tree, capsys, where):
    # a value given before the command must survive the subcommand's own parsing
    argv = ["--root", tree, "generate"] if where == "before" else ["generate", "--root", tree]
    status, out, err = invact_cli(capsys, *argv)
    assert status == 0, err
    assert f"under {tree / 'generated'}" in out
    assert (tree / "generated" / "registry.py").is_file()


# issue 14 item 4: a missing parameter set names the command that fits it, and that command works
FIT_CHECK = """
import sys, invact
try:
    invact.activation("k", b=float(sys.argv[1]))
except ValueError as error:
    print(error)
"""
GRAD_CHECK = """
import json, sys, torch, invact
act, b = invact.activation("k", b=2.0), 2.0
x = torch.linspace(-6, 6, 4001, dtype=torch.float32, requires_grad=True)
y = act(x)
y.sum().backward()
x64 = x.detach().double().requires_grad_()
(x64 + b * torch.tanh(x64)).sum().backward()
print(json.dumps({"meta": invact.ops.info("k"), "grad": x.grad.tolist(), "ref": x64.grad.tolist(),
                  "y_err": (y.detach().double() - (x64 + b * torch.tanh(x64))).abs().tolist()}))
"""


def test_missing_parameter_set_names_the_command_that_fits_it(tmp_path):
    """`x + b*tanh(x)` has no closed-form inverse, so its table holds one value of b. Asking for another
    prints an `invact fit` command; running it as printed refits the table (replacing b=0.5) and the
    activation then works with b=2 and its gradient is right; b=0.5 is then the missing set."""
    first = run("fit", "x + b*tanh(x)", "--param", "b=0.5", "--name", "k", "--fp32-samples", "65536",
                "--root", str(tmp_path))
    assert first.returncode == 0, first.stderr
    refused = run("2.0", code=FIT_CHECK, root=tmp_path)
    message = refused.stdout
    assert "fitted for {'b': 0.5} only" in message and "replacing that set" in message, refused.stderr
    command = shlex.split(message.split("`")[1])
    assert command == ["invact", "fit", "k", "--param", "b=2.0", "--root", str(tmp_path)], message
    refit = subprocess.run([str(INVACT), *command[1:]], capture_output=True, text=True, cwd="/",
                           timeout=300, env={k: v for k, v in os.environ.items() if k != "INVACT_ROOT"})
    assert refit.returncode == 0, refit.stderr
    out = run(code=GRAD_CHECK, root=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["meta"]["params"] == {"b": 2.0} and data["meta"]["formula"] == "b*tanh(x) + x"
    # end-to-end bound (docs/floors.md, "Information floor"): the certified float32 error of g at the stored y,
    # plus |dg/dy| * (error of the stored y against float64); |dg/dy| = |f''/f'^2| <= b*4/(3*sqrt(3))
    # since f' = 1 + b*sech^2 >= 1 and |d sech^2/dx| = 2 tanh sech^2 <= 4/(3*sqrt(3)); plus one float32
    # rounding of the gradient (2**-24 relative)
    fp32_err = data["meta"]["certificate"]["float32_eval_error"]
    for grad, ref, y_err in zip(data["grad"], data["ref"], data["y_err"]):
        bound = fp32_err + 2.0 * 4 / (3 * 3 ** 0.5) * y_err + 2 ** -24 * abs(ref)
        assert abs(grad - ref) <= bound, (grad, ref, bound)
    again = run("0.5", code=FIT_CHECK, root=tmp_path)
    assert "fitted for {'b': 2.0} only" in again.stdout and "--param b=0.5" in again.stdout
