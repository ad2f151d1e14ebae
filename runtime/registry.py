"""The generated modules: which activations exist, where their code lives, importing it safely.

``invact.generated``'s path is a list of folders, the first folder's entry winning: :func:`use_root`
(or $INVACT_ROOT, at first use) puts a root's ``generated/`` in front of the installed one. A folder's
``registry.py`` is read as data; its torch_NAME.py / triton_NAME.py modules are imported, checked for
the names the runtime uses and for the sha256 of the table next to them.

Public: :func:`use_root`, :func:`names`, :func:`info`. Documented internals (the other runtime
modules and the tests use them): :func:`module` and :func:`triton_module` (the generated modules of
an activation), :func:`generated_file` and :func:`root_option` (for error messages), and
:func:`per_root`, the cache decorator for anything computed from generated code (``use_root`` clears
those caches). A fit in another process is seen without a restart: :func:`names`, :func:`info` and an
unknown name in :func:`module` read the registry again when a registry.py or tables/ folder, or a
generated module this process imported (`invact generate` rewrote it; its file is looked at when its
folder changed), changed on disk (its mtime and size); a known name's module is a cache hit with no
check. A module refused at import is not kept: the next use reads its file again. :func:`triton_module`
is always of the table of :func:`module`'s code (:class:`TableRefittedError` otherwise). Generated modules
are compiled from their source at every import, never from a cached .pyc (:class:`_SourceOnlyLoader`).
Thread-safe: reading the registry again, forgetting it and importing take one lock (:data:`_LOCK`); a
known name's module (a cache hit) takes none.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from .common import roots
from .common.roots import ROOT_ENV  # the fitter's --root: a tree whose generated/ holds tables and code

__all__ = ["ROOT_ENV", "use_root", "names", "info", "module", "refresh", "triton_module", "generated_file", "root_option",
           "per_root", "TORCH_API", "TRITON_API", "TableRefittedError", "table_of", "table_sha256", "TABLE_READ_ERRORS"]

# what the runtime uses of a generated torch module; one from another invact version may lack it
TORCH_API = ("META", "NAME", "PARAMS", "PARAM_ARGS", "CODE_BITS", "CLASSES", "POLY", "forward", "code_kernel",
             "g_kernel", "code_packed", "grad_kernel", "TABLE_SHA256")
TRITON_API = ("forward", "backward", "SEARCH_LEVELS", "TABLE_SHA256")  # g_y(..., CLAMP) came with SEARCH_LEVELS

_ENV_APPLIED = False  # $INVACT_ROOT is layered once per process, at first use
_CACHES: list = []    # functools caches of values computed from generated code: use_root clears them
_STAMP: tuple = ()    # what a fit or `invact generate` changes on disk, when the registry was read
_IMPORTED: dict[str, tuple | None] = {}  # file of each generated module imported -> its stamp before the import
_CODE_STAMP: tuple | None = None   # generated folders' stamps when _IMPORTED was last found current (None: not)
_LOCK = threading.RLock()  # refresh, _forget, use_root, _import_generated: sys.modules and the stamps change together
_RACY_NS = 2_000_000_000   # a folder's mtime this close to now may be shared by a change still to come (coarse clocks)
# of table_sha256: unreadable, not a regular file or too large (TableFileError), not JSON, nested past the
# recursion limit, or without the fields
TABLE_READ_ERRORS = (OSError, ValueError, KeyError, AttributeError, TypeError, RecursionError, MemoryError)


class TableRefittedError(RuntimeError):
    """An activation's table changed on disk (refitted) while this process computes with its earlier
    version, and what was asked would mix the two."""


def per_root(maxsize: int | None = None) -> Callable[[Callable], Callable]:
    """``functools.lru_cache(maxsize)`` whose cache :func:`use_root` clears (values computed from
    generated modules must not outlive the modules)."""
    def decorate(fn: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        _CACHES.append(cached)
        return cached
    return decorate


@per_root()
def _registry() -> ModuleType:
    """TORCH / TRITON: activation name -> generated module, merged over every folder of
    ``invact.generated``'s path, the first folder's entry winning: a root given to :func:`use_root`
    (or $INVACT_ROOT) is layered over the installed tables, never hiding them. A registry file is
    read as data (``ast.literal_eval``), not imported."""
    global _ENV_APPLIED, _STAMP
    root = os.environ.get(ROOT_ENV)
    if root and not _ENV_APPLIED:
        use_root(root)        # a root that is not a project tree raises here, at every use
        _ENV_APPLIED = True
    import invact.generated as pkg
    _STAMP = _stamp()     # before reading: a change made meanwhile is seen at the next refresh
    merged = ModuleType("invact.generated.registry")
    merged.TORCH, merged.TRITON = {}, {}
    for folder in reversed(list(pkg.__path__)):
        path = Path(folder) / "registry.py"
        if path.is_file():
            entries = _read_registry(path)
            merged.TORCH.update(entries["TORCH"])
            merged.TRITON.update(entries["TRITON"])
    return merged


def _read_registry(path: Path) -> dict[str, dict[str, str]]:
    """The TORCH and TRITON dicts of a generated registry.py, as literals; ImportError otherwise."""
    import ast
    found: dict[str, dict[str, str]] = {"TORCH": {}, "TRITON": {}}
    try:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] in (["TORCH"], ["TRITON"]):
                value = ast.literal_eval(node.value)
                if not isinstance(value, dict) or not all(
                        isinstance(k, str) and k.isidentifier() and isinstance(v, str)
                        and v.startswith("invact.generated.") and v.count(".") == 2 for k, v in value.items()):
                    raise ValueError(f"{node.targets[0].id} is not a dict of names to invact.generated modules")
                found[node.targets[0].id] = value
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError) as error:
        raise ImportError(f"generated registry {path} cannot be read ({type(error).__name__}: {error}); "
                          f"run `invact generate{root_option(path.parent.parent)}` to rebuild it") from error
    return found


def _stamp() -> tuple:
    """(mtime, size) of each registry.py and tables/ folder of ``invact.generated``'s path: a fit
    renames its table into tables/ (a refit changes no registry entry), a new name changes registry.py."""
    import invact.generated as pkg
    return tuple(_file_stamp(os.path.join(folder, part)) for folder in pkg.__path__
                 for part in ("registry.py", "tables"))


def _file_stamp(path: str | os.PathLike) -> tuple[int, int] | None:
    """(mtime in ns, size) of ``path``, None where it cannot be read: what a rename into place changes."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def refresh() -> bool:
    """Forget the registry, the generated modules and every value computed from them when a fit or
    `invact generate` (in another process) changed them on disk since they were read (the registry,
    the tables, or the code of a module imported here); True if so."""
    with _LOCK:
        if _registry.cache_info().currsize == 0 or (_stamp() == _STAMP and not _imported_changed()):
            return False
        _forget()
        return True


def _imported_changed() -> bool:
    """Whether the file of a generated module imported here changed since its import. `invact fit` and
    `invact generate` write every file by a rename into its folder (fitting.tables.replace_files), which
    changes the folder's mtime: the files are looked at only where a folder's stamp changed since they
    were last found current. That stamp is taken before them, and kept only where its mtime is older than
    :data:`_RACY_NS` (a later change within the same tick of a coarse clock would leave it as it is)."""
    global _CODE_STAMP
    import invact.generated as pkg
    folders = tuple(_file_stamp(folder) for folder in pkg.__path__)
    if folders == _CODE_STAMP:
        return False
    changed = any(_file_stamp(f) != s for f, s in list(_IMPORTED.items()))  # a copy: imports in other threads
    settled = time.time_ns() - _RACY_NS
    _CODE_STAMP = None if changed or any(s is None or s[0] > settled for s in folders) else folders
    return changed


def _forget() -> None:
    """Drop the generated modules from sys.modules (the next use imports them from the path in use), their
    stamps and every :func:`per_root` cache."""
    global _CODE_STAMP
    with _LOCK:
        for mod in [m for m in sys.modules if m.startswith("invact.generated.")]:
            del sys.modules[mod]  # re-import from the new path
        _IMPORTED.clear()
        _CODE_STAMP = None
        for cached in _CACHES:
            cached.cache_clear()


def use_root(root: str | os.PathLike) -> None:
    """Layer ``root``/generated (what ``invact fit --root ROOT`` wrote) over the installed activations
    (and over roots used before): its names win, every other name stays available. $INVACT_ROOT does
    the same at first use.

    Trust: this IMPORTS PYTHON CODE from ``root``/generated (the torch_*.py and triton_*.py modules),
    like unpickling a file: use only roots you would run code from. Raises FileNotFoundError naming
    the folder and the command that makes it one when ``root`` is not a project tree (no such folder,
    no ``generated/tables/``: ``invact fit``, or no ``generated/registry.py``: ``invact generate``),
    NotADirectoryError for a file (the check the fitter makes of --root, :mod:`invact.common.roots`),
    TypeError for what is no path (an empty string included: it is not taken for the current folder)."""
    import invact.generated as pkg
    if not isinstance(root, (str, os.PathLike)) or not str(root).strip():
        raise TypeError(f"root must be a folder's path (str or os.PathLike, not empty), got {root!r}")
    folder = roots.check_root(root, needs_registry=True) / "generated"
    with _LOCK:
        if str(folder) in pkg.__path__:
            pkg.__path__.remove(str(folder))
        pkg.__path__.insert(0, str(folder))
        _forget()


def fit_options(params: dict, tolerance: object, root: Path) -> str:
    """The options after `invact fit NAME` that fit ``params`` at ``tolerance`` into ``root`` (a
    ``--tolerance`` only where it is not the CLI's default), for hints in error messages."""
    return roots.fit_options(params, tolerance) + root_option(root)


def root_option(root: Path) -> str:
    """`` --root ROOT`` (shell-quoted) for a hint about generated code in ``root``, "" for the installed
    tree."""
    return roots.root_option(root, _installed_root())


def _installed_root() -> Path:
    """The tree of the installed ``invact.generated`` package (its first folder before any root)."""
    import invact.generated as pkg
    return Path(pkg.__file__).parent.parent


def names() -> list[str]:
    """Names of the activations with generated code, sorted (read again if a fit changed them)."""
    refresh()
    return sorted(getattr(_registry(), "TORCH", {}))


@per_root()
def module(name: str) -> ModuleType:
    """The generated torch module of activation ``name``; ValueError listing the known names (after
    reading the registry again if a fit changed it since)."""
    table = getattr(_registry(), "TORCH", {})
    if isinstance(name, str) and name not in table and refresh():
        table = getattr(_registry(), "TORCH", {})
    if not isinstance(name, str) or name not in table:
        raise ValueError(_unknown(name))
    return _import_generated(table[name], TORCH_API)


def _unknown(name: object) -> str:
    """Why ``name`` is no activation: unknown (the known names), or a table without code (a registry
    replaced by a reinstall or an upgrade: `invact generate` registers it)."""
    import invact.generated as pkg
    roots = [str(Path(p).parent) for p in pkg.__path__[:-1]]
    where = f"; roots in use: {', '.join(roots)}" if roots else ""
    folder = next((Path(p) for p in pkg.__path__ if isinstance(name, str) and name.isidentifier()
                   and (Path(p) / "tables" / f"{name}.json").is_file()), None)
    if folder is not None:
        return (f"activation {name!r} has a table, {folder / 'tables' / f'{name}.json'}, but no generated code "
                f"(the registry was replaced, e.g. by reinstalling or upgrading invact); run "
                f"`invact generate{root_option(folder.parent)}` to register it{where}")
    return (f"unknown activation {name!r}; known: {', '.join(names()) or 'none (run `invact generate`)'} (fit a "
            f"new one with `invact fit FORMULA --name NAME`)" + where)


@per_root()
def triton_module(name: str) -> ModuleType:
    """The generated Triton module of activation ``name`` (imports Triton), of the table :func:`module`'s
    code was made from. Where that table was refitted on disk since :func:`module` imported it (the
    Triton code is the new table's), TableRefittedError: the registry is read again, so the next call
    runs the new table, never one table's kernels with the other's constants."""
    code = module(name)
    kernels = _import_generated(_registry().TRITON[name], TRITON_API)
    if kernels.TABLE_SHA256 != code.TABLE_SHA256:
        _forget()
        raise TableRefittedError(
            f"activation {name!r}: its table changed on disk (refitted) since this process imported its torch "
            "code, and its Triton code is the new table's (never run with the old one's constants); create the "
            "activation again, or restart, to compute with the new table")
    return kernels


def info(name: str) -> dict:
    """The META dict of activation ``name`` (a copy); unknown names raise ValueError listing the known.
    Read again if a fit changed the tables since (a table refitted for other parameters)."""
    refresh()
    return dict(module(name).META)


_IMPORT_TRIES = 3   # reads of a generated module rewritten while it is imported, before the next refresh sees it


def _import_generated(name: str, api: tuple[str, ...]) -> ModuleType:
    """Import generated code; broken or stale files raise ImportError naming the file and the fix. The file's
    stamp is taken before the import reads it: a file rewritten meanwhile (`invact generate` in another
    process) is read again, and one rewritten at every try is seen as changed by the next :func:`refresh`.
    Each read compiles the source (:class:`_SourceOnlyLoader`): a same-size rewrite within the second of the
    file's mtime is read, never the earlier code's cached .pyc."""
    with _LOCK:
        for _ in range(_IMPORT_TRIES):
            spec = _spec(name)
            before = _file_stamp(spec.origin) if spec is not None and spec.origin else None
            mod = _import_checked(name, api, spec)
            if _file_stamp(mod.__file__) == before:
                break
            sys.modules.pop(name, None)   # rewritten while it was read
        _IMPORTED[mod.__file__] = before
        return mod


def _spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """The spec the import of generated module ``name`` reads (None if none is found)."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


class _SourceOnlyLoader(importlib.machinery.SourceFileLoader):
    """Loads a generated module from its source, never from a cached .pyc, and writes none: Python trusts
    a .pyc whose source has the same size and the same mtime in whole seconds, so a same-size rewrite
    (`invact generate` mending a hand edit) within that second would run the earlier code. Without the
    source's stats, ``SourceLoader.get_code`` compiles the source bytes (~1 ms for the largest module)."""

    def path_stats(self, path: str) -> dict:
        raise OSError(f"{path}: generated code is compiled from its source")


def _import_source(name: str, spec: importlib.machinery.ModuleSpec | None = None) -> ModuleType:
    """Generated module ``name``: the one in sys.modules, else imported from ``spec`` (found here if None)
    by :class:`_SourceOnlyLoader` (removed from sys.modules if its code raises, as importlib does)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = spec or importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    if isinstance(spec.loader, importlib.machinery.SourceFileLoader):
        spec = importlib.util.spec_from_file_location(name, spec.origin, loader=_SourceOnlyLoader(name, spec.origin))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, mod)     # as importlib binds it: `from invact.generated import torch_x`
    return mod


def _import_checked(name: str, api: tuple[str, ...], spec: importlib.machinery.ModuleSpec | None = None) -> ModuleType:
    """Import generated module ``name`` (from ``spec`` where given) and check it (:func:`_check_api`,
    :func:`_check_table`)."""
    try:
        mod = _import_source(name, spec)
    except (ImportError, SyntaxError) as error:
        where, fix = generated_file(name)
        raise ImportError(f"generated code {where} cannot be imported ({type(error).__name__}: {error}); "
                          f"{fix} to rebuild it from its table") from error
    try:
        _check_api(mod, name, api)
        _check_table(mod, name)
    except ImportError:
        sys.modules.pop(name, None)  # refused: the next import reads the file again (`invact generate` mends it)
        raise
    return mod


def _check_api(mod: ModuleType, dotted: str, api: tuple[str, ...]) -> None:
    """Generated code must define the names the runtime uses; ImportError with the fix otherwise."""
    missing = [a for a in api if not hasattr(mod, a)]
    if missing:
        where, fix = generated_file(dotted)
        raise ImportError(f"generated code {where} lacks {', '.join(missing)} (made by another invact "
                          f"version?); {fix} to rebuild it from its table")


def _check_table(mod: ModuleType, dotted: str) -> None:
    """Generated code must come from the table file next to it (generated/tables/NAME.json): its
    TABLE_SHA256 is the sha256 of that table's content, recomputed here (docs/table-format.md). A
    mismatch never computes with the other table: ImportError with the fix, `invact generate` for a
    table invact wrote after the code (a fit interrupted between the two), else (a table missing,
    corrupt or edited by hand) the `invact fit` command that rebuilds it."""
    table = table_of(Path(mod.__file__))
    where, fix = generated_file(dotted)
    try:
        stored, digest = table_sha256(table)
    except TABLE_READ_ERRORS as error:
        raise ImportError(f"generated code {where} has no readable table {table} ({type(error).__name__}: "
                          f"{error}); refit it with {_refit_hint(mod, table)}") from None
    if digest != mod.TABLE_SHA256:
        if digest == stored:
            raise ImportError(f"generated code {where} was made from another version of {table} (the table "
                              f"changed after the code was generated, e.g. a fit was interrupted); {fix} to "
                              "rebuild the code from the table")
        raise ImportError(f"generated code {where} was made from another version of {table}, and the table "
                          "was changed after invact wrote it (its content does not match its sha256: edited by "
                          f"hand or corrupted); restore it, or refit it with {_refit_hint(mod, table)}")


def table_of(code: Path) -> Path:
    """The table generated file ``code`` (torch_NAME.py, triton_NAME.py, c_NAME.c) is made from:
    generated/tables/NAME.json next to it."""
    return code.parent / "tables" / f"{code.stem.split('_', 1)[1]}.json"


def table_sha256(table: Path) -> tuple[str, str]:
    """(the sha256 that table file ``table`` stores, the sha256 of its content): equal where invact wrote
    it (docs/table-format.md); one of :data:`TABLE_READ_ERRORS` where it cannot be read."""
    import json

    from .common.table_hash import canonical_sha256, read_table_text
    body = json.loads(read_table_text(table))
    stored = body.pop("sha256")
    return stored, canonical_sha256(body)


def _refit_hint(mod: ModuleType, table: Path) -> str:
    """The `invact fit` command that rebuilds ``table``, with the formula and parameters the code ``mod``
    was generated from (quoted, never evaluated), or FORMULA where the code does not give them."""
    from .common.catalog import BY_NAME
    name = table.stem
    meta = getattr(mod, "META", None)
    meta = meta if isinstance(meta, dict) else {}
    formula, params = meta.get("formula"), meta.get("params")
    known = isinstance(formula, str) and formula.strip()
    hint = roots.fit_hint(name, formula if known else "FORMULA", params if isinstance(params, dict) else {},
                          meta.get("tolerance"), root=table.parent.parent.parent, installed=_installed_root())
    if name in BY_NAME:
        return f"`{hint}`"
    if not known:
        return f"`{hint}` (its formula is unknown: the generated code does not give it)"
    return f"`{hint}` (the formula its code was made from)"


def generated_file(dotted: str) -> tuple[str, str]:
    """(the file behind generated module ``dotted``, the command that rebuilds it), for error messages."""
    import invact.generated as pkg
    short = dotted.rsplit(".", 1)[-1]
    where = next((str(Path(p) / f"{short}.py") for p in pkg.__path__ if (Path(p) / f"{short}.py").is_file()),
                 f"{short}.py in {list(pkg.__path__)}")
    fix = f"run `invact generate{root_option(Path(where).parent.parent)}`"
    return where, fix

