"""Checks of the public API's arguments that several parts share (modules, norms, functional forms,
patch), and the errors they raise.

Each error class derives from the type invact always raised and from the one PyTorch raises for the
same mistake, so code catching either catches it: :class:`ShapeError` (``ValueError`` and torch's
``RuntimeError`` for a shape that does not match), :class:`ArgumentTypeError` (``ValueError`` and
``TypeError`` for an argument of the wrong type).
"""

from __future__ import annotations

__all__ = ["ShapeError", "ArgumentTypeError", "flag"]


class ShapeError(ValueError, RuntimeError):
    """A shape that does not match (``normalized_shape`` and the input, a weight and ``normalized_shape``)."""


class ArgumentTypeError(ValueError, TypeError):
    """An argument of a type invact does not take (torch raises TypeError there)."""


def flag(value: object, name: str) -> bool:
    """``value`` as a bool: True/False, NumPy's and 0-d tensors' booleans, or the integers 0 and 1;
    :class:`TypeError` naming ``name`` for anything else (the text ``'no'`` is not False)."""
    if isinstance(value, bool):
        return value
    item = value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value
    if isinstance(item, bool) or (isinstance(item, int) and item in (0, 1)):
        return bool(item)
    raise TypeError(f"{name} must be True or False, got {value!r}")
