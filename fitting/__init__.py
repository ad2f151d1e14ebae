"""invact.fitting — the offline fitter: formula -> branches -> certified coefficient tables.

The names from :mod:`.formulas` are imported on first use: that module imports sympy (about a second),
and the ``invact`` console script must be able to catch a Ctrl-C during that import (:mod:`.entry`).
"""
from importlib import import_module

from .errors import SpecError

__all__ = ["BUILTINS", "ActivationSpec", "SpecError", "get_spec"]

_FROM_FORMULAS = ("BUILTINS", "ActivationSpec", "get_spec")


def __getattr__(name: str):
    if name not in _FROM_FORMULAS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(".formulas", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
