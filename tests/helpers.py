"""Plain helpers that test files share (the shared fixtures are in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from invact.fitting import cli

CHEAP = ("--fp32-samples", "4096")   # few float32 samples: a cheap certificate, for the tests' small formulas


def invact_cli(capsys, *argv) -> tuple[int, str, str]:
    """`invact ARGV` in this process (the same main() the console script runs): (status, stdout, stderr)."""
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), to compare a tree before and after a command."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def snapshot_without_pycache(root: Path) -> dict[str, bytes]:
    """:func:`snapshot` less ``__pycache__/`` (byte code Python writes when a test imports generated code)."""
    return {path: data for path, data in snapshot(root).items() if "__pycache__" not in Path(path).parts}
