"""The sha256 of a table's canonical content (docs/table-format.md), computed alike on both sides, and
the reading of a table file both sides share.

The fitter writes it into every table and generated module (``TABLE_SHA256``); the runtime
recomputes it from the table file next to generated code and refuses code made from another table.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

__all__ = ["canonical_sha256", "read_table_text", "TableFileError", "MAX_TABLE_BYTES"]

MAX_TABLE_BYTES = 64 * 2**20   # tables are ~10 KiB (the largest committed one 13 KiB): far more is no table


class TableFileError(ValueError):
    """A table path that is not a regular file, or one too large to be a table."""


def read_table_text(path: Path, limit: int = MAX_TABLE_BYTES) -> str:
    """The UTF-8 text of the regular file at ``path`` (symlinks followed), opened without blocking: a FIFO,
    device or folder is refused, as is a file past ``limit`` bytes (:class:`TableFileError`)."""
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise TableFileError(f"table file {path} is not a regular file ({_file_kind(info.st_mode)}); a table "
                                 "is a JSON file written by `invact fit`")
        data = b"" if info.st_size > limit else fh.read(limit + 1)   # + 1: one growing
    if info.st_size > limit or len(data) > limit:
        raise TableFileError(f"table file {path} is larger than {limit:,} bytes; a table is a JSON "
                             "file of a few KiB written by `invact fit`")
    return data.decode("utf-8")


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((word for test, word in kinds if test(mode)), "not a plain file")


def canonical_sha256(table: dict) -> str:
    """sha256 of compact JSON with sorted keys of ``table`` without its ``sha256`` key (values must be
    JSON-ready: no NaN or infinity)."""
    body = {k: v for k, v in table.items() if k != "sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
