"""Table files (docs/table-format.md): deterministic JSON, validation on load, atomic locked writes.

The file layout is readable (one key per line, lists of numbers on one line, keys in the documented
order) and deterministic: the same table dict always gives the same bytes. ``sha256`` is taken over
the *canonical content* — compact JSON with sorted keys, without the ``sha256`` key — so any edit of a
value is detected while the layout may change between invact versions.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..common import roots, table_hash
from ..common.roots import ROOT_ENV
from ..common.table_hash import canonical_sha256
from .errors import TableError, WriteError

try:  # POSIX only; elsewhere writes are still atomic, just not serialised between processes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["FORMAT", "FORMAT_VERSION", "TARGETS", "TableError", "dump_table", "load_table",
           "write_table", "replace_text", "replace_files", "check_writable", "probe_folder", "locked", "project_root",
           "installed_root", "check_root", "root_option", "root_of", "tables_dir", "table_path", "list_tables",
           "name_of", "fit_command", "as_float", "CODE_BITS", "MAX_CODES", "code_bits_for"]

FORMAT = "invact-table"
FORMAT_VERSION = 1
TARGETS = ("derivative", "inverse")
# Widths the runtime's planar code packing supports (invact.runtime.bitpack.BITS: a byte holds 8/bits
# codes, so bits must divide 8); 0 = one code, nothing stored.
CODE_BITS = (0, 1, 2, 4, 8)
MAX_CODES = 2 ** CODE_BITS[-1]

# Keys in the order docs/table-format.md lists them (any dict level); others follow, sorted.
_KEY_ORDER = [
    "format", "format_version", "invact_version", "name", "formula", "params", "param_generic",
    "param_domain", "torch_forward", "nan_gradients", "target", "tolerance", "n_branches", "n_codes",
    "code_bits", "forward_code", "branches", "code_classes", "certificate",
    "index", "code", "kind", "value", "side", "expr", "x_breaks", "codes", "x_range", "y_range", "branch",
    "direction", "route", "lower_end", "upper_end", "singularities", "tails", "y_from", "to",
    "y_breaks", "segments", "transform", "origin", "sign", "center", "scale", "coeffs", "den",
    "c0_lo", "error", "method", "approx_error", "float32_eval_error", "float32_fma_eval_error", "checks",
    "bf16_eval_error", "fp16_eval_error", "fp32_eval_error", "bf16_fma_eval_error", "fp16_fma_eval_error",
    "fp32_fma_eval_error", "fp32_samples", "fp32_exhaustive",
    "sha256",
]
_RANK = {k: i for i, k in enumerate(_KEY_ORDER)}


def code_bits_for(n_codes: int) -> int | None:
    """The stored width of a table's code: the smallest of :data:`CODE_BITS` that holds ``n_codes``
    codes (5-16 codes -> 4 bits, 17-256 -> 8), or None past :data:`MAX_CODES`."""
    return next((b for b in CODE_BITS if n_codes <= 2 ** b), None)

# Required top-level keys and their JSON types (bool is checked apart: it is an int in Python).
_NUMBER = (int, float)
_REQUIRED: dict[str, tuple[type, ...]] = {
    "format": (str,), "format_version": (int,), "invact_version": (str,), "name": (str,),
    "formula": (str,), "params": (dict,), "param_generic": (bool,), "param_domain": (list,),
    "torch_forward": (str, type(None)), "nan_gradients": (dict,), "target": (str,), "tolerance": _NUMBER,
    "n_branches": (int,), "n_codes": (int,), "code_bits": (int,), "forward_code": (dict,),
    "branches": (list,), "code_classes": (list,), "certificate": (dict,), "sha256": (str,),
}


# --------------------------------------------------------------------------------------------
# serialisation

def _plain(obj: Any, where: str = "table") -> Any:
    """JSON-ready copy: tuples and arrays -> lists, numpy scalars -> Python, ±inf -> "inf"/"-inf"."""
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if hasattr(obj, "tolist") and not isinstance(obj, (int, float)):  # numpy scalar or array
        return _plain(obj.tolist(), where)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            raise ValueError(f"{where} is NaN; a table holds finite numbers or 'inf'/'-inf'")
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return float(obj)
    raise TypeError(f"{where} has type {type(obj).__name__}; expected a JSON number, string, list or dict")


def _ordered(d: dict) -> list[str]:
    return sorted(d, key=lambda k: (_RANK.get(k, len(_RANK)), k))


def _scalar(v: Any) -> bool:
    return not isinstance(v, (dict, list))


def _layout(obj: Any, indent: int) -> str:
    """Readable deterministic JSON: one key per line; lists of scalars and short flat dicts inline."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict):
        if all(map(_scalar, obj.values())):
            flat = "{" + ", ".join(f"{json.dumps(k)}: {_layout(obj[k], 0)}" for k in _ordered(obj)) + "}"
            if len(flat) <= 100:
                return flat
        items = [f"{inner}{json.dumps(k)}: {_layout(obj[k], indent + 2)}" for k in _ordered(obj)]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(map(_scalar, obj)):
            return "[" + ", ".join(json.dumps(v) for v in obj) + "]"
        return "[\n" + ",\n".join(inner + _layout(v, indent + 2) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)  # float repr: shortest round trip, float32 values exact


_digest = canonical_sha256  # the runtime recomputes it alike (invact.common.table_hash)


def dump_table(table: dict) -> str:
    """The file text of ``table``, with ``sha256`` (re)computed; same dict -> same bytes."""
    plain = _plain({k: v for k, v in table.items() if k != "sha256"})
    plain["sha256"] = _digest(plain)
    return _layout(plain, 0) + "\n"


def as_float(value: float | str) -> float:
    """A number of a table as a float (``"inf"``/``"-inf"`` strings included)."""
    return float(value)


# --------------------------------------------------------------------------------------------
# locations

def project_root(root: str | os.PathLike | None = None) -> Path:
    """The tree holding ``generated/``: ``root``, else $INVACT_ROOT, else the installed package's."""
    if root is None:
        root = os.environ.get(ROOT_ENV) or None
    elif isinstance(root, str) and not root.strip():
        raise TableError(f"root {root!r} is empty; give a folder (the current one is '.'), or leave it "
                         f"out for ${ROOT_ENV} or the installed package's")
    if root is not None:
        return Path(root).resolve()
    return installed_root()


def installed_root() -> Path:
    """The tree of the installed ``invact.generated`` package (what no --root means)."""
    import invact.generated
    return Path(invact.generated.__file__).resolve().parent.parent


def check_root(root: str | os.PathLike | None = None, create: bool = False) -> Path:
    """:func:`project_root`, refused (:class:`TableError`) unless it is a project tree: an existing
    folder with ``generated/tables/`` (what ``invact fit --root`` writes and ``invact.use_root``
    reads). ``create``: a folder without ``generated/``, or a new folder in an existing one, is
    accepted (``invact fit`` creates the layout). The runtime checks its roots alike
    (:func:`invact.common.roots.check_root`)."""
    given = root if root is not None else os.environ.get(ROOT_ENV) or None
    path = project_root(root)
    if given is None:
        return path
    source = "--root" if root is not None else f"${ROOT_ENV}"
    try:
        return roots.check_root(given, source, create=create)
    except roots.RootError as exc:
        raise TableError(str(exc)) from None


def root_option(root: str | os.PathLike | None) -> str:
    """`` --root ROOT`` (shell-quoted) for a hint, or "" when ``root`` is None or the installed tree."""
    return roots.root_option(root, installed_root())


def root_of(path: str | os.PathLike) -> Path | None:
    """The project tree of a table file in ``ROOT/generated/tables/``, else None."""
    folder = Path(path).resolve().parent
    if folder.name == "tables" and folder.parent.name == "generated":
        return folder.parent.parent
    return None


def tables_dir(root: str | os.PathLike | None = None) -> Path:
    """``generated/tables`` of :func:`project_root` (the repository's, or the installed package's)."""
    return project_root(root) / "generated" / "tables"


def table_path(name: str, target: str = "derivative", root: str | os.PathLike | None = None) -> Path:
    """``NAME.json`` (derivative target) or ``NAME.inverse.json`` in :func:`tables_dir`."""
    if not isinstance(name, str) or not name.isidentifier():
        raise TableError(f"table name must be a Python identifier, got {name!r}")
    if target not in TARGETS:
        raise TableError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    suffix = ".json" if target == "derivative" else ".inverse.json"
    return tables_dir(root) / f"{name}{suffix}"


def name_of(path: str | os.PathLike) -> tuple[str, str]:
    """(name, target) of a table file name."""
    stem = Path(path).name.removesuffix(".json")
    if stem.endswith(".inverse"):
        return stem.removesuffix(".inverse"), "inverse"
    return stem, "derivative"


def list_tables(root: str | os.PathLike | None = None, target: str | None = None) -> list[Path]:
    """Table files in :func:`tables_dir`, sorted by name; only one target's when ``target`` is set."""
    folder = tables_dir(root)
    if not folder.is_dir():
        return []
    paths = sorted(p for p in folder.glob("*.json") if name_of(p)[0].isidentifier())
    return [p for p in paths if target is None or name_of(p)[1] == target]


def fit_command(name: str, target: str = "derivative", table: dict | None = None,
                root: str | os.PathLike | None = None) -> str:
    """The ``invact fit`` command line that regenerates a table with its parameters and tolerance (in
    ``root`` when that is not the installed tree); ``FORMULA`` stands for a formula that ``table`` does not
    give. Built as the runtime's hints are (:func:`invact.common.roots.fit_hint`)."""
    formula = "FORMULA" if table is None else table.get("formula", name)
    table = table or {}
    return roots.fit_hint(name, formula, table.get("params"), table.get("tolerance"), target, root,
                          installed_root())


# --------------------------------------------------------------------------------------------
# loading and validation

def load_table(path: str | os.PathLike, text: str | None = None) -> dict:
    """Read and validate a table file; :class:`TableError` names the file and the fix on any problem.

    ``text``: the file's content about to be written (validated as if read from ``path``).
    Infinite bounds stay the strings ``"inf"``/``"-inf"`` (see :func:`as_float`).
    """
    path = Path(path)
    name, target = name_of(path)
    root = root_of(path)
    hint = f"regenerate it with `{fit_command(name, target, root=root)}`"
    try:
        text = _read_table_file(path) if text is None else text
    except FileNotFoundError:
        raise TableError(f"table file {path} does not exist; create it with `{fit_command(name, target, root=root)}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TableError(f"table file {path} cannot be read ({exc}); {hint}") from None
    with _too_deep(path, hint):
        try:
            table = json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            raise TableError(f"table file {path} is not valid JSON (truncated or corrupt: {exc}); {hint}") from None
        problem = _problem(table, name, target)
        if problem:
            raise TableError(f"table file {path} {problem}; {_problem_hint(table, name, target, root, hint)}")
    return table


def _problem_hint(table: Any, name: str, target: str, root: Path | None, hint: str) -> str:
    """The fix for a table that parsed but has a problem (built only for the error: it hashes and checks the
    table again): its own fit command where invact wrote it as it is, else where to get a trusted one."""
    if _intact(table):
        return f"regenerate it with `{fit_command(name, target, _with_safe_formula(table), root)}`"
    if isinstance(table, dict) and isinstance(table.get("sha256"), str):
        # changed after invact wrote it: its formula is not to be trusted, nor proposed
        refit = f"`{fit_command(name, target, root=root)}`"
        return "restore it from where it came, or delete it and refit it " + (
            f"with {refit}" if _builtin(name) else f"from a formula you trust ({refit})")
    return hint


MAX_TABLE_BYTES = table_hash.MAX_TABLE_BYTES   # a module attribute: tests lower it


def _read_table_file(path: Path) -> str:
    """:func:`invact.common.table_hash.read_table_text` of ``path``, refusals as :class:`TableError`."""
    try:
        return table_hash.read_table_text(path, MAX_TABLE_BYTES)
    except table_hash.TableFileError as exc:
        raise TableError(str(exc)) from None


@contextlib.contextmanager
def _too_deep(path: Path, hint: str) -> Iterator[None]:
    """Python's recursion limit or memory, hit while parsing or checking a table file (JSON nested
    thousands deep), as a :class:`TableError` naming the file."""
    try:
        yield
    except (RecursionError, MemoryError) as exc:
        raise TableError(f"table file {path} is nested too deeply or too large to read "
                         f"({type(exc).__name__}); {hint}") from None


def _intact(table: Any) -> bool:
    """A JSON object whose sha256 matches its content (as invact wrote it)."""
    return isinstance(table, dict) and isinstance(table.get("sha256"), str) and table["sha256"] == _digest(table)


def _with_safe_formula(table: dict) -> dict | None:
    """``table`` if its formula and parameters pass :func:`_formula_problem` (it may be proposed in a hint)."""
    return table if _formula_problem(table) is None else None


def _builtin(name: str) -> bool:
    from .formulas import BUILTINS
    return name in BUILTINS


def _reject_constant(token: str):
    raise ValueError(f"{token} is not allowed")


def _problem(table: Any, name: str, target: str) -> str | None:
    """What is wrong with a parsed table file, or None."""
    if not isinstance(table, dict):
        return f"holds a JSON {type(table).__name__}, expected an object"
    if table.get("format") != FORMAT:
        return f"is not an invact table (format {table.get('format')!r}, expected {FORMAT!r})"
    if table.get("format_version") != FORMAT_VERSION:
        return (f"has format_version {table.get('format_version')!r}; this invact reads version "
                f"{FORMAT_VERSION}")
    for key, types in _REQUIRED.items():
        if key not in table:
            return f"lacks the key {key!r}"
        value = table[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            return f"has {key!r} of type {type(value).__name__}, expected {expected}"
    if table["sha256"] != _digest(table):
        return ("was changed after invact wrote it: its content does not match its sha256 (edited by "
                "hand, corrupted or tampered with)")
    if table["name"] != name or table["target"] != target:
        return (f"holds table {table['name']!r} (target {table['target']!r}) but its file name says "
                f"{name!r} ({target!r})")
    return _structure_problem(table) or _code_value_problem(table) or _expression_problem(table)


def _code_value_problem(table: dict) -> str | None:
    """Values that reach generated code other than as expressions must be of their few kinds:
    break sides, integer codes, transform kinds and signs, numbers."""
    fc = table["forward_code"]
    breaks = list(fc["x_breaks"]) + [b for cls in table["code_classes"] for b in cls.get("y_breaks", [])]
    if not all(isinstance(b, dict) and b.get("side") in ("left", "right") for b in breaks):
        return "has a break whose side is not 'left' or 'right'"
    if not all(type(c) is int and 0 <= c < table["n_codes"] for c in fc["codes"]):
        return f"has forward_code codes that are not integers in [0, {table['n_codes']})"
    from .model import KINDS
    for c, cls in enumerate(table["code_classes"]):
        for s, seg in enumerate(cls["segments"]):
            problem = KINDS[seg["kind"]].value_problem(seg, f"code_classes[{c}].segments[{s}]")
            if problem:
                return problem
    return None


def _formula_problem(table: dict) -> str | None:
    """What `invact fit` would refuse in a table's formula and parameters, or None: parameter names
    (ASCII identifiers, not reserved), numeric values, the formula's text (the expression whitelist),
    and every parameter occurring in the parsed formula (the rule `invact fit --param` applies)."""
    from .errors import SpecError
    from .expressions import check_param_names, parse, symbol_names
    params = table.get("params")
    if not isinstance(params, dict):
        return "has no params object"
    names = tuple(params)
    try:
        check_param_names(names, what="params")
    except SpecError as exc:
        return f"has an invalid parameter name ({exc})"
    bad = [k for k, v in params.items() if not isinstance(v, _NUMBER) or isinstance(v, bool)]
    if bad:
        return f"has a non-numeric value for parameter {bad[0]!r}"
    try:
        used = symbol_names(parse(table.get("formula"), ("x",), names, "formula"))
    except SpecError as exc:
        return f"holds text that is not an accepted expression ({exc})"
    try:
        check_param_names(names, used, "params")
    except SpecError as exc:
        return f"lists a parameter its formula does not use ({exc})"
    return None


def _expression_problem(table: dict) -> str | None:
    """Every text of a table that becomes code or is parsed (formula, param_domain, torch_forward,
    break and constant values, segment expressions) must pass the expression whitelist
    (:mod:`.expressions`): tables are data, and anything else is refused."""
    from .errors import SpecError
    from .expressions import check_text, check_torch_forward
    from .model import segment_texts
    problem = _formula_problem(table)
    if problem:
        return problem
    names = tuple(table["params"])
    try:
        for rel in table["param_domain"]:
            check_text(rel, (), names, "param_domain", relation=True)
        check_torch_forward(table["torch_forward"], params=names)
        texts = [(b.get("value"), (), "forward_code break") for b in table["forward_code"]["x_breaks"]]
        for c, cls in enumerate(table["code_classes"]):
            texts += [(b.get("value"), (), f"code_classes[{c}] break") for b in cls["y_breaks"]]
            for seg in cls["segments"]:
                texts += segment_texts(seg, f"code_classes[{c}]")
        for text, variables, what in texts:
            if isinstance(text, bool) or not isinstance(text, (str, *_NUMBER)):
                return f"has a {what} of type {type(text).__name__}, expected a number or expression string"
            if isinstance(text, str) and text not in ("inf", "-inf"):
                check_text(text, variables, names, what)
    except SpecError as exc:
        return f"holds text that is not an accepted expression ({exc})"
    return None


def _structure_problem(table: dict) -> str | None:
    from .model import nan_gradients_problem, segment_problem
    problem = nan_gradients_problem(table["nan_gradients"], table["torch_forward"])
    if problem:
        return problem
    fc = table["forward_code"]
    if not isinstance(fc.get("x_breaks"), list) or not isinstance(fc.get("codes"), list) \
            or len(fc["codes"]) != len(fc["x_breaks"]) + 1:
        return "has a forward_code without x_breaks and one more codes than breaks"
    if table["n_codes"] != len(table["code_classes"]) or table["n_branches"] > len(table["branches"]):
        return "has n_codes / n_branches that disagree with its code_classes / branches"
    if not 1 <= table["n_codes"] <= MAX_CODES:
        return f"has n_codes {table['n_codes']}; the runtime stores 1 to {MAX_CODES} codes"
    bits = code_bits_for(table["n_codes"])
    if table["code_bits"] != bits:
        why = (f"the runtime packs codes of {', '.join(map(str, CODE_BITS[1:]))} bits only (8/bits a byte); "
               "refit it with this invact" if table["code_bits"] not in CODE_BITS else "")
        return (f"has code_bits {table['code_bits']}, expected {bits} for {table['n_codes']} codes"
                + (f" ({why})" if why else ""))
    for c, cls in enumerate(table["code_classes"]):
        segs = cls.get("segments") if isinstance(cls, dict) else None
        if cls.get("code") != c or not isinstance(segs, list) or not segs \
                or len(cls.get("y_breaks", ())) != len(segs) - 1:
            return f"has a malformed code_classes[{c}] (code, segments, one fewer y_breaks than segments)"
        for s, seg in enumerate(segs):
            problem = segment_problem(seg, f"code_classes[{c}].segments[{s}]") if isinstance(seg, dict) else \
                f"has a malformed segment code_classes[{c}].segments[{s}] (not an object)"
            if problem:
                return problem
            problem = _branch_problem(table["branches"], seg, c, f"code_classes[{c}].segments[{s}]")
            if problem:
                return problem
    return None


def _branch_problem(branches: list, seg: dict, code: int, where: str) -> str | None:
    """A segment's ``branch`` must index ``branches`` and name a branch of the segment's own code: the
    branch's direction decides generated code (a closed form is clamped to its sign,
    :func:`.codegen.analysis.signed`), and an index out of range would crash code generation."""
    b = seg.get("branch")
    if type(b) is not int or not 0 <= b < len(branches):
        return (f"has a segment {where} whose branch {b!r} is not an index of its {len(branches)} "
                "branches")
    branch = branches[b]
    if not isinstance(branch, dict) or branch.get("code") != code:
        got = branch.get("code") if isinstance(branch, dict) else branch
        return (f"has a segment {where} of code {code} whose branch {b} has code {got!r}: a segment "
                "belongs to a branch of its own code class")
    if branch.get("direction") not in ("increasing", "decreasing", "constant"):
        return (f"has a branch {b} (of segment {where}) whose direction {branch.get('direction')!r} is "
                "not 'increasing', 'decreasing' or 'constant'")
    return None


# --------------------------------------------------------------------------------------------
# writing

_HELD = threading.local()   # folders this thread holds the lock on (the lock is reentrant per thread)


@contextlib.contextmanager
def locked(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive inter-process lock on ``folder`` (flock on the directory: no lock file left),
    reentrant within a thread: code generation holds it across the table write and the code."""
    key = str(Path(folder).resolve())
    held = _HELD.__dict__.setdefault("folders", set())
    if fcntl is None or key in held:  # pragma: no cover - no flock, or already held here
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(key)
        yield
    finally:
        held.discard(key)
        os.close(fd)  # closing releases the lock


WRITE_FIX = "write into a tree you can write with `--root DIR` (or INVACT_ROOT=DIR)"


def check_writable(*folders: Path) -> None:
    """Each folder is created if missing and must take a new file (one is made and removed), checked
    before a long fit: :class:`WriteError` names the folder and the fix otherwise."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe_folder(folder)
        except OSError as exc:
            raise WriteError(f"cannot write to {exc.filename or folder} ({exc.strerror or exc}); "
                             f"{WRITE_FIX}") from None


def probe_folder(folder: Path) -> None:
    """Make and remove a file in the existing ``folder``: an OSError where it takes none (read-only,
    /proc, no permission), which ``os.access`` does not tell for root."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".invact-probe.", suffix=".tmp")
    os.close(fd)
    os.unlink(probe)


def write_table(table: dict, path: str | os.PathLike) -> Path:
    """Write ``table`` to ``path`` atomically (temp file in the same folder, fsync, os.replace).

    Concurrent writers are serialised by a lock on the folder, so readers only ever see a complete
    table: the last writer's. Returns the path.
    """
    path = Path(path)
    text = dump_table(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent):
        replace_text(path, text, sync=True)
        _fsync_dir(path.parent)
    return path


def replace_text(path: Path, text: str, sync: bool = False) -> None:
    """Write ``text`` to ``path`` atomically: a temp file in the same folder (fsync'd when ``sync``),
    then os.replace; readers see the old file or the new one, never a part."""
    tmp = _staged(path, text.encode("utf-8"), sync)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def replace_files(texts: dict[Path, str | None]) -> None:
    """Write each ``path: text`` (None: remove the file) all or nothing, in the given order: every new
    text and a copy of every file it replaces or removes are staged first (fsync'd temp files next to
    them), then renamed into place; an error at any step removes the temps and puts back each file
    already replaced, then propagates (a process killed between two renames leaves the files renamed
    so far: the runtime refuses code whose table changed, naming `invact generate`)."""
    staged: dict[Path, tuple[str | None, str | None]] = {}   # path -> (new text's temp, backup)
    done: list[Path] = []
    try:
        for path, text in texts.items():
            new = None if text is None else _staged(path, text.encode("utf-8"))
            staged[path] = (new, None)
            if path.exists():
                staged[path] = (new, _staged(path, path.read_bytes()))
        for path, (new, _) in staged.items():
            _put(new, path)
            done.append(path)
    except Exception:      # a kill runs nothing, and signals are deferred while tables and code are written
        for path in reversed(done):
            with contextlib.suppress(OSError):
                _put(staged[path][1], path)
        raise
    finally:
        for temp in (t for pair in staged.values() for t in pair if t is not None):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
    for folder in {p.parent for p in done}:
        _fsync_dir(folder)


def _put(temp: str | None, path: Path) -> None:
    """Rename ``temp`` to ``path``, or remove ``path`` when ``temp`` is None."""
    if temp is None:
        os.unlink(path)
    else:
        os.replace(temp, path)


def _staged(path: Path, data: bytes, sync: bool = True) -> str:
    """A temp file next to ``path`` holding ``data`` (mode 0644, fsync'd when ``sync``); its name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
