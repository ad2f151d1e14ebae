"""Generate ``generated/registry.py``: activation name -> generated module names."""

from __future__ import annotations

from .writer import Writer, header

__all__ = ["generate_registry"]


def generate_registry(names: list[str]) -> str:
    """Source text of the registry over ``names`` (sorted)."""
    w = Writer()
    w(header("generated/tables/*.json").rstrip("\n"))
    w('"""Activation name -> generated modules (torch always; Triton imported only when available)."""', "")
    for var, prefix in (("TORCH", "torch"), ("TRITON", "triton")):
        with w.block(f"{var} = {{"):
            for name in sorted(names):
                w(f"{name!r}: 'invact.generated.{prefix}_{name}',")
        w("}")
    return w.text()
