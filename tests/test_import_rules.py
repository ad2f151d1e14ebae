"""Who may import whom (docs/architecture.md): checked on the source, so a violation in any function
body counts, not only the imports a test happens to execute.

- runtime/ (``invact``) never imports the fitter, scipy, sympy, mpmath, matplotlib or flint;
- generated/ imports only math, torch, triton and the runtime's kernel helpers;
- fitting/ never imports the runtime (torch only to run generated code is allowed where listed);
- common/ (``invact.common``, what both sides share) imports only the Python standard library.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FITTER_ONLY = ("scipy", "sympy", "mpmath", "matplotlib", "flint", "invact.fitting")
RUNTIME_HELPERS = {"invact.bitpack", "invact.fastmath", "invact.selection", "invact.act_triton"}
# The fitter's imports of the runtime: none (what both sides share lives in invact.common).
FITTER_USES_RUNTIME: set[tuple[str, str]] = set()


def _package(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    top = {"runtime": "invact", "fitting": "invact.fitting", "generated": "invact.generated",
           "common": "invact.common"}[rel.parts[0]]
    return ".".join([top, *rel.parts[1:]])


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved; ``from invact
    import x`` counts as ``invact.x``)."""
    here = _package(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _matches(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", _sources("runtime"), ids=lambda p: str(p.relative_to(REPO)))
def test_runtime_imports_no_fitter(path):
    bad = sorted(name for name in imports(path) if _matches(name, FITTER_ONLY))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("path", _sources("generated"), ids=lambda p: str(p.relative_to(REPO)))
def test_generated_imports_only_torch_triton_and_runtime_helpers(path):
    allowed = ("math", "torch", "triton", "invact.generated", "invact.common", *RUNTIME_HELPERS)
    bad = sorted(name for name in imports(path) if not _matches(name, allowed))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_fitter_imports_no_runtime():
    found = set()
    for path in _sources("fitting"):
        for name in imports(path):
            if _matches(name, ("invact",)) and not _matches(name, ("invact.fitting", "invact.generated",
                                                                   "invact.common")):
                found.add((str(path.relative_to(REPO)), ".".join(name.split(".")[:2])))
    assert found == FITTER_USES_RUNTIME


@pytest.mark.parametrize("path", _sources("common"), ids=lambda p: str(p.relative_to(REPO)))
def test_common_imports_only_the_standard_library(path):
    """Both sides import invact.common, so it may depend on neither (nor on torch or numpy)."""
    bad = sorted(name for name in imports(path)
                 if not _matches(name, ("invact.common",)) and name.split(".")[0] not in sys.stdlib_module_names)
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_the_scanner_sees_relative_and_nested_imports():
    """The rules above could pass vacuously if imports() missed imports inside functions."""
    probe = REPO / "runtime" / "ops.py"
    names = imports(probe)
    assert "invact.backends" in names and "torch" in names          # `from . import backends`
    nested = next(p for p in _sources("runtime") if "def _check_table(" in p.read_text())
    assert "invact.common.table_hash.canonical_sha256" in imports(nested)   # inside _check_table's body
