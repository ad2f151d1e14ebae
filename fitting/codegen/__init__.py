"""Code generation: tables in generated/tables/*.json -> torch and Triton modules, C kernels and a registry.

``generate_all`` is what ``invact generate`` runs. Output is deterministic (sorted inputs, no
timestamps, absolute paths or versions), so the committed generated/ equals a fresh generation.
Every module carries the sha256 of its table (``TABLE_SHA256``), which the runtime checks.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable
from pathlib import Path

from ..errors import SpecError, TableError
from ..tables import dump_table, list_tables, load_table, locked, name_of, project_root, replace_files
from .analysis import Plan, plan_table
from .c_gen import generate_c
from .printer import parse, to_torch, to_triton
from .registry_gen import generate_registry
from .torch_gen import generate_torch
from .triton_gen import generate_triton
from .writer import is_generated

__all__ = ["generate_all", "generate_files", "Plan", "plan_table", "check_printable", "check_table_printable"]


def check_printable(formula, what: str) -> None:
    """Raise SpecError when generated code cannot compute ``formula`` (sympy, in x): the torch and
    Triton printers are asked, so what they print is the one definition of what is supported."""
    problem = _print_problem(formula)
    if problem is not None:
        raise SpecError(f"{what}: {problem}; generated code computes the forward from the formula")


@functools.lru_cache(maxsize=1024)
def _print_problem(formula) -> str | None:
    """Why the printers cannot print ``formula``, or None. Cached: a fit checks every table of its
    tree before the fit (a broken one refuses it early) and generates their code after."""
    try:
        to_torch(formula, "x")
        to_triton(formula, "x", reciprocals=True, forward=True)
    except ValueError as exc:
        return str(exc)
    return None


def check_table_printable(path: Path, table: dict) -> None:
    """TableError naming ``path`` when the code of derivative table ``table`` (loaded) cannot be generated."""
    if name_of(path)[1] != "derivative":
        return
    try:
        check_printable(parse(table["formula"], "x", tuple(table.get("params") or ())), f"formula {table['formula']!r}")
    except SpecError as exc:
        raise TableError(f"table file {path}: {exc}") from None

_PREFIXES = ("torch_", "triton_", "c_")


def generate_files(root: Path, pending: dict[Path, dict] | None = None) -> dict[str, str]:
    """Root-relative path -> text of every generated file for the tables under ``root``.

    ``pending``: table path -> table about to be written there, used in place of that file (tables
    outside ``root``'s generated/tables have no code here)."""
    root = Path(root).resolve()
    folder = (root / "generated" / "tables").resolve()
    pending = {Path(p).resolve(): t for p, t in (pending or {}).items()}
    paths = {p.resolve() for p in list_tables(root, target="derivative")}
    paths |= {p for p in pending if name_of(p)[1] == "derivative" and p.parent == folder}
    out: dict[str, str] = {}
    names = []
    for path in sorted(paths):
        table = load_table(path, dump_table(pending[path])) if path in pending else load_table(path)
        check_table_printable(path, table)
        try:
            plan = plan_table(table, path.relative_to(root))
        except SpecError as exc:
            raise TableError(f"table file {path}: {exc}") from None
        names.append(plan.name)
        out[f"generated/torch_{plan.name}.py"] = generate_torch(plan)
        out[f"generated/triton_{plan.name}.py"] = generate_triton(plan)
        out[f"generated/c_{plan.name}.c"] = generate_c(plan)
    out["generated/registry.py"] = generate_registry(names)
    return out


def _write_order(rel: str) -> tuple[int, str]:
    """Triton modules and C kernels, then torch modules, then the registry: the runtime checks every module against
    its table, so a process killed between two writes leaves code it refuses (with the fix), never
    code it runs with another table; a new name is registered only once its modules exist."""
    name = Path(rel).name
    return (0 if name.startswith(("triton_", "c_")) else 1 if name.startswith("torch_") else 2), rel


def generate_all(root: Path | None = None, pending: dict[Path, dict] | None = None,
                 note: Callable[[str], None] | None = None) -> list[Path]:
    """Write the generated modules under ``root`` (default: the project root); remove stale ones
    (files that no table claims and that carry invact's generated header; ``note``, default a
    warning, names files that look generated but lack it, which are kept).

    ``pending`` (table path -> table): tables to write first, under the same lock as the code (a
    concurrent fit or generate waits, so it can neither see half of this update nor remove a module
    this one adds). The code is computed before anything is written: if generation fails, nothing
    changes. Every file is staged before any is renamed into place, so an OSError (a read-only folder,
    a full disk) leaves the tables and code as they were (:func:`..tables.replace_files`). Returns the
    paths of all generated files (files whose content is unchanged are not rewritten)."""
    root = project_root(root)
    folder = root / "generated"
    (folder / "tables").mkdir(parents=True, exist_ok=True)
    pending = {Path(p).resolve(): t for p, t in (pending or {}).items()}
    with contextlib.ExitStack() as stack:
        for tables_folder in sorted({(folder / "tables").resolve(), *(p.parent for p in pending)}):
            tables_folder.mkdir(parents=True, exist_ok=True)
            stack.enter_context(locked(tables_folder))
        files = generate_files(root, pending)
        texts: dict[Path, str | None] = {path: dump_table(table) for path, table in pending.items()}
        written = []
        for rel in sorted(files, key=_write_order):
            path = root / rel
            if not path.exists() or path.read_text(encoding="utf-8") != files[rel]:
                texts[path] = files[rel]
            written.append(path)
        texts.update(dict.fromkeys(_stale(folder, files, note)))
        replace_files(texts)
    return written


def _stale(folder: Path, files: dict[str, str], note: Callable[[str], None] | None) -> list[Path]:
    """The files of ``folder`` named like generated code that no table claims and that carry invact's
    generated header (to remove); others named so (a user's own ``torch_*.py``) are kept, named in a note."""
    stale, foreign = [], []
    for old in sorted([*folder.glob("*.py"), *folder.glob("c_*.c")]):
        if old.name.startswith(_PREFIXES) and f"generated/{old.name}" not in files:
            (stale if is_generated(_first_line(old)) else foreign).append(old)
    if foreign:
        msg = (f"kept {', '.join(str(p) for p in foreign)}: named like generated code but without invact's "
               "generated header, so not invact's to remove")
        (note or functools.partial(warnings.warn, stacklevel=3))(msg)
    return stale


def _first_line(path: Path) -> str:
    """The first line of ``path`` ("" when it cannot be read as text)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline()
    except (OSError, UnicodeDecodeError):
        return ""

