"""Plain helpers that test files share (the shared fixtures are in conftest.py)."""

from __future__ import annotations

import threading
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


def read_until(stream, found, seconds: float) -> list[str]:
    """Lines of ``stream`` up to the first one for which ``found`` holds, read by a thread so that a
    child that never prints it (or stalls) fails the test after ``seconds`` instead of hanging CI: a
    bare readline loop has no deadline. The caller kills the child on failure, which ends the thread
    (EOF); on success the thread has returned and the stream is the caller's again."""
    lines: list[str] = []

    def read() -> None:
        for line in iter(stream.readline, ""):
            lines.append(line)
            if found(line):
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds)
    assert lines and found(lines[-1]), (f"no such line after {seconds} s" if reader.is_alive() else
                                        "the child ended without it") + ":\n" + "".join(lines)
    return lines
