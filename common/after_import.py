"""Run a function right after a module's first import, without importing it: how ``import invact``
registers its custom ops once torch is imported (torch.export.load and torch.jit.load need them before
they load a program that calls them), while the fitter's command line, which never loads one, cancels
that and keeps its torch import lean.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.util import find_spec

__all__ = ["after_import", "cancel"]


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
