"""The sha256 of a table's canonical content (docs/table-format.md), computed alike on both sides.

The fitter writes it into every table and generated module (``TABLE_SHA256``); the runtime
recomputes it from the table file next to generated code and refuses code made from another table.
"""

from __future__ import annotations

import hashlib
import json

__all__ = ["canonical_sha256"]


def canonical_sha256(table: dict) -> str:
    """sha256 of compact JSON with sorted keys of ``table`` without its ``sha256`` key (values must be
    JSON-ready: no NaN or infinity)."""
    body = {k: v for k, v in table.items() if k != "sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
