"""The `invact` command where a CLI hunt found it wrong: a Piecewise undefined at a single point, a plot
that cannot be written where os.access says yes (root), deeply nested or non-regular table files, a
Ctrl-C while the console script imports, and a root whose generated/ is a file. Scratch roots
(tmp_path) and cheap checks: nothing here fits a table."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from invact.fitting import entry, tables
from invact.fitting.errors import TableError
from helpers import CHEAP, invact_cli, snapshot


def _deep_tree(tmp_path: Path) -> tuple[Path, Path]:
    """(a root, its table file nested 100000 lists deep: past Python's recursion limit)."""
    root = tmp_path / "root"
    deep = root / "generated" / "tables" / "deep.json"
    deep.parent.mkdir(parents=True)
    deep.write_text("[" * 100_000 + "]" * 100_000)
    return root, deep


# ---------------------------------------------------------------------------------------------
# 1. a Piecewise undefined at one x: the generated code gave NaN for y and its gradient there

@pytest.mark.parametrize("formula, at", [
    ("Piecewise((x + 1, x < 0), (exp(x), x > 0))", "0"),
    ("Piecewise((x, x < 1), (x, x > 1))", "1"),
])
def test_piecewise_undefined_at_a_single_point_is_refused(tmp_path, capsys, formula, at):
    code, _, err = invact_cli(capsys, "fit", formula, "--name", "gap", *CHEAP, "--root", tmp_path / "r")
    assert code == 2, err
    assert f"undefined (not real-valued) at x = {at}:" in err and f"include x = {at} in one piece" in err, err
    assert not list(tmp_path.rglob("*.json"))


# ---------------------------------------------------------------------------------------------
# 2. a plot's file that cannot be written, whatever os.access says

@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc")
def test_plot_into_proc_is_an_input_error(capsys):
    code, _, err = invact_cli(capsys, "plot", "gelu", "-o", "/proc/invact-test.png")
    assert code == 2, err
    assert "-o/--output /proc/invact-test.png: cannot write there" in err and "internal error" not in err


def test_plot_that_fails_to_save_is_an_input_error(tmp_path, capsys, monkeypatch):
    from invact.fitting import plot

    def refuse(table, path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(plot, "plot_error_curves", refuse)
    out = tmp_path / "e.png"
    code, _, err = invact_cli(capsys, "plot", "gelu", "-o", out)
    assert code == 2, err
    assert f"-o/--output {out}: cannot write there (Permission denied)" in err and "internal error" not in err


# ---------------------------------------------------------------------------------------------
# 3. a table file nested too deeply for Python's json

def test_deeply_nested_table_is_a_table_error(tmp_path, capsys):
    root, deep = _deep_tree(tmp_path)
    for argv in (("generate", "--root", root), ("show", deep)):
        code, _, err = invact_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert f"table file {deep} is nested too deeply" in err, (argv, err)
    code, out, err = invact_cli(capsys, "list", "--root", root)
    assert code == 0, err
    assert "deep" in out and "nested too deeply" in out


def test_fit_beside_a_deeply_nested_table_blames_that_table_not_the_formula(tmp_path, capsys):
    root, deep = _deep_tree(tmp_path)
    code, _, err = invact_cli(capsys, "fit", "x*tanh(x)", "--name", "ok", *CHEAP, "--root", root)
    assert code == 2, err
    assert f"table file {deep} is nested too deeply" in err and "write it shorter" not in err, err


# ---------------------------------------------------------------------------------------------
# 5. Ctrl-C while the console script imports the fitter (sympy: about a second)

def test_console_script_module_does_not_import_sympy():
    """The entry point's module must load before sympy does, so that its handler covers that import."""
    run = subprocess.run([sys.executable, "-c", "import sys, invact.fitting.entry; print('sympy' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_console_script_interrupted_while_importing_exits_130_without_traceback(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(entry, "missing_fit_modules", interrupted)   # the first thing main() runs
    try:
        status = entry.main(["list"])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped the console script's entry point (a traceback)")
    err = capsys.readouterr().err
    assert status == 130
    assert err == "invact: interrupted (SIGINT); nothing was written\n"


# ---------------------------------------------------------------------------------------------
# 6. a root whose generated/ (or generated/tables/) is a file

@pytest.mark.parametrize("blocking", ["generated", "generated/tables"])
def test_root_whose_generated_folder_is_a_file_says_so(tmp_path, capsys, blocking):
    root = tmp_path / "root"
    (root / blocking).parent.mkdir(parents=True, exist_ok=True)
    (root / blocking).write_text("")
    before = snapshot(root)
    code, _, err = invact_cli(capsys, "fit", "x*tanh(x)", "--name", "e", *CHEAP, "--root", root)
    assert code == 2, err
    assert f"{root / blocking} is a file, not a folder" in err and "fit into it with" not in err, err
    assert snapshot(root) == before


# ---------------------------------------------------------------------------------------------
# 7. table files that are not regular files, or far too large

def _load_within(path: Path, seconds: float = 20.0) -> BaseException | None:
    """The error of tables.load_table(path), run by a thread so that a read that blocks fails the test:
    on a timeout the FIFO's write end is opened and closed, which ends the blocked open (EOF)."""
    result: list[BaseException | None] = []

    def load() -> None:
        try:
            tables.load_table(path)
            result.append(None)
        except BaseException as exc:   # noqa: BLE001 - handed to the test
            result.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail(f"load_table({path}) blocked for {seconds} s")
    return result[0]


def test_fifo_table_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "t.json"
    os.mkfifo(fifo)
    exc = _load_within(fifo)
    assert isinstance(exc, TableError) and f"table file {fifo} is not a regular file (a FIFO)" in str(exc)


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_symlink_to_a_device_is_refused(tmp_path, capsys):
    """/dev/null, not /dev/zero (which the old code read until it ran out of memory): the same refusal."""
    link = tmp_path / "z.json"
    link.symlink_to("/dev/null")
    code, _, err = invact_cli(capsys, "show", link)
    assert code == 2, err
    assert f"table file {link} is not a regular file (a character device)" in err


def test_table_file_past_the_size_cap_is_refused(tmp_path, monkeypatch):
    """The cap (64 MiB) lowered to 100 bytes: a 200-byte file is refused by size, not parsed."""
    monkeypatch.setattr(tables, "MAX_TABLE_BYTES", 100, raising=False)
    big = tmp_path / "big.json"
    big.write_text("{" + " " * 198 + "}")
    with pytest.raises(TableError, match="is larger than 100 bytes"):
        tables.load_table(big)


def test_size_cap_is_far_above_the_committed_tables():
    import invact.generated
    largest = max(p.stat().st_size for p in (Path(invact.generated.__file__).parent / "tables").glob("*.json"))
    assert largest * 1000 < tables.MAX_TABLE_BYTES
