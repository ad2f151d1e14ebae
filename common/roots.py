"""Project roots, for the fitter (``invact fit --root``) and the runtime (``invact.use_root``): the check that
a folder is a root, and the command hints that name one (``--root ROOT`` and ``invact fit ...``), shell-quoted
so that a hint pasted into a shell runs as printed, whatever the path or formula holds.

A root is a folder whose ``generated/`` holds ``tables/`` (what ``invact fit --root ROOT`` writes) and, for
the runtime, ``registry.py`` (what ``invact generate --root ROOT`` writes).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path

from .catalog import BY_NAME
from .params import DEFAULT_TOLERANCE

__all__ = ["ROOT_ENV", "RootError", "NoSuchRoot", "RootIsAFile", "NotARoot", "check_root", "root_option",
           "fit_options", "fit_hint"]

ROOT_ENV = "INVACT_ROOT"   # the fitter's --root and the runtime's root when neither is given


class RootError(OSError):
    """A folder that is not a project root; the message names it (as given) and the fix."""


class NoSuchRoot(RootError, FileNotFoundError):
    """The root does not exist."""


class RootIsAFile(RootError, NotADirectoryError):
    """The root is a file (or anything else that is no folder)."""


class NotARoot(RootError, FileNotFoundError):
    """A folder without the generated/ layout of a root."""


def check_root(root: str | os.PathLike, label: str = "root", needs_registry: bool = False,
               create: bool = False) -> Path:
    """``root`` resolved, if it is a folder whose ``generated/`` holds ``tables/`` (and ``registry.py`` where
    ``needs_registry``); otherwise a :class:`RootError` whose message starts ``LABEL ROOT:``. ``create``
    (``invact fit``, which makes the layout) also accepts a folder without ``generated/`` and a new
    folder inside an existing one."""
    path = Path(root).resolve()
    if create and not path.exists() and path.parent.is_dir():
        return path
    where = f"{label} {os.fspath(root)}"
    holds = "generated/registry.py and generated/tables/" if needs_registry else "generated/tables/"
    layout = f"a root is a folder holding {holds}, as `invact fit NAME --root DIR` makes"
    if path.exists() and not path.is_dir():
        raise RootIsAFile(f"{where}: is a file, not a folder ({layout})")
    if not path.is_dir():
        raise NoSuchRoot(f"{where}: no such folder ({layout})")
    generated = path / "generated"
    if create and not generated.exists():
        return path
    option = root_option(root)
    blocking = next((p for p in (generated, generated / "tables") if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise NotARoot(f"{where}: {blocking} is a file, not a folder, so {path} is not an invact root ({layout}); "
                       "move that file away or choose another root")
    if not (generated / "tables").is_dir():
        raise NotARoot(f"{where}: {path} has no generated/tables/ folder, so it is not an invact root; fit "
                       f"into it with `invact fit NAME{option}`")
    if needs_registry and not (generated / "registry.py").is_file():
        raise NotARoot(f"{where}: {path} has no generated/registry.py (its tables have no generated code); run "
                       f"`invact generate{option}`")
    return path


def root_option(root: str | os.PathLike | None, installed: str | os.PathLike | None = None) -> str:
    """`` --root ROOT`` (ROOT absolute and shell-quoted) for a command hint; "" for None or the ``installed``
    tree (the default root of both the fitter and the runtime)."""
    if root is None:
        return ""
    path = Path(root).resolve()
    if installed is not None and path == Path(installed).resolve():
        return ""
    return f" --root {shlex.quote(str(path))}"


def fit_options(params: Mapping[str, object] | None = None, tolerance: object = None,
                target: str = "derivative") -> str:
    """The options of an ``invact fit`` hint: ``--param K=V`` for each of ``params``, ``--tolerance`` where
    ``tolerance`` is a number other than the CLI's default, ``--target`` for another target (shell-quoted)."""
    options = [f"--param {shlex.quote(f'{k}={v!r}')}" for k, v in (params or {}).items()]
    if type(tolerance) in (int, float) and tolerance != DEFAULT_TOLERANCE:
        options.append(f"--tolerance {tolerance!r}")
    if target != "derivative":
        options.append(f"--target {shlex.quote(target)}")
    return "".join(f" {o}" for o in options)


def fit_hint(name: str, formula: object = None, params: Mapping[str, object] | None = None,
             tolerance: object = None, target: str = "derivative", root: str | os.PathLike | None = None,
             installed: str | os.PathLike | None = None) -> str:
    """The ``invact fit`` command that (re)fits table ``name``: a built-in by its name, with only the
    parameters that differ from its defaults; another table by ``formula`` (shell-quoted; ``FORMULA`` as a
    placeholder) and ``--name``, or by its name alone when ``formula`` is None (the CLI refits a table of
    that name from its stored formula). Options as :func:`fit_options`, then :func:`root_option`."""
    params = dict(params or {})
    if name in BY_NAME:
        defaults = BY_NAME[name].params
        params = {k: v for k, v in params.items() if defaults.get(k) != v}
        what = name
    else:
        what = name if formula is None else f"{shlex.quote(str(formula))} --name {name}"
    return f"invact fit {what}{fit_options(params, tolerance, target)}{root_option(root, installed)}"
