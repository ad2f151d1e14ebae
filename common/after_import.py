"""Run a function right after a module's first import, without importing it: how ``import invact``
registers its custom ops once torch is imported (torch.export.load and torch.jit.load need them before
they load a program that calls them), while the fitter's command line, which never loads one, cancels
that and keeps its torch import lean; and how a first import of one of invact's torch-dependent
submodules imports torch before that submodule (:func:`import_first`), so the registration never
runs while an invact module is half imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.util import find_spec, spec_from_loader

__all__ = ["after_import", "cancel", "import_first"]


class _Hook:
    """A one-shot sys.meta_path finder for ``name``: the spec the other finders give, its loader's
    ``exec_module`` followed by ``then()`` for this import only."""

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        try:
            spec = find_spec(fullname)  # the finders after this one
            loader = spec.loader
            execute = loader.exec_module

            def exec_module(module):
                try:
                    execute(module)
                finally:
                    del loader.exec_module  # the loader's own again
                self.then()

            loader.exec_module = exec_module
        except Exception:  # noqa: BLE001 - no spec, or a loader that takes no attribute: the import goes
            return None    # on as if this finder were not there (the call is then left to the caller)
        return spec


def after_import(name: str, then: Callable[[], None]) -> None:
    """Call ``then()`` now if top-level module ``name`` is imported, else right after its first import
    completes (an exception from ``then`` propagates to that import: catch inside it)."""
    if name in sys.modules:
        then()
    else:
        sys.meta_path.insert(0, _Hook(name, then))


def cancel(name: str) -> None:
    """Drop the pending :func:`after_import` calls for ``name``."""
    sys.meta_path[:] = [f for f in sys.meta_path if not (isinstance(f, _Hook) and f.name == name)]


class _Imported:
    """The loader of a module that importing another one (a finder's side effect) already imported:
    hands that module back, unexecuted, with its own spec again. (The import system loads the spec of
    a module already in sys.modules, not the finder's: that module carries this loader's meanwhile.)"""

    def __init__(self, module) -> None:
        self.module, self.spec = module, module.__spec__

    def create_module(self, spec):
        return self.module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec  # the import system set ours


class _First:
    """A sys.meta_path finder: before the first import of a direct submodule of ``package`` not in
    ``exempt``, import ``first``; if that imported the submodule too, hand it back as it is."""

    def __init__(self, first: str, package: str, exempt: frozenset[str]) -> None:
        self.first, self.package, self.exempt = first, package, exempt

    def find_spec(self, fullname, path, target=None):
        parent, _, child = fullname.rpartition(".")
        if parent != self.package or child in self.exempt or self.first in sys.modules:
            return None
        __import__(self.first)
        module = sys.modules.get(fullname)
        if module is None:
            return None
        module.__spec__ = spec = spec_from_loader(fullname, _Imported(module))
        return spec


def import_first(first: str, package: str, exempt: set[str]) -> None:
    """Import ``first`` before any direct submodule of ``package`` but those named in ``exempt``, where
    it is not imported yet. invact's submodules import torch at their top: without this, the first of
    them imported before torch was half imported when torch's import ran invact's registration
    (:func:`after_import`), which needs them whole."""
    sys.meta_path.insert(0, _First(first, package, frozenset(exempt)))
