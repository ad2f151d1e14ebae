"""Code generation: tables in generated/tables/*.json -> torch and Triton modules and a registry.

``generate_all`` is what ``invact generate`` runs. Output is deterministic (sorted inputs, no
timestamps, absolute paths or versions), so the committed generated/ equals a fresh generation.
"""

from __future__ import annotations

from pathlib import Path

from ..tables import list_tables, load_table, project_root
from .analysis import Plan, analyze
from .registry_gen import generate_registry
from .torch_gen import generate_torch
from .triton_gen import generate_triton

__all__ = ["generate_all", "generate_files", "Plan", "analyze"]

_PREFIXES = ("torch_", "triton_")


def generate_files(root: Path) -> dict[str, str]:
    """Root-relative path -> text of every generated file for the tables under ``root``."""
    out: dict[str, str] = {}
    names = []
    for path in list_tables(root, target="derivative"):
        table = load_table(path)
        plan = analyze(table, path.relative_to(root))
        names.append(plan.name)
        out[f"generated/torch_{plan.name}.py"] = generate_torch(plan)
        out[f"generated/triton_{plan.name}.py"] = generate_triton(plan)
    out["generated/registry.py"] = generate_registry(names)
    return out


def generate_all(root: Path | None = None) -> list[Path]:
    """Write the generated modules under ``root`` (default: the project root); remove stale ones.

    Returns the paths of all generated files (files whose content is unchanged are not rewritten).
    """
    root = project_root(root)
    files = generate_files(root)
    folder = root / "generated"
    for old in sorted(folder.glob("*.py")):
        rel = f"generated/{old.name}"
        if old.name.startswith(_PREFIXES) and rel not in files:
            old.unlink()
    written = []
    for rel, text in sorted(files.items()):
        path = root / rel
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
