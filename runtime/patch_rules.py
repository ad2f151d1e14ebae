"""What :func:`invact.patch` recognises by class: (module of the class, class name) -> :class:`Rule`, from
the activation catalog (:mod:`invact.common.catalog`). Classes are matched exactly (a subclass may override
forward) and looked up in ``sys.modules``, so nothing is imported here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .common.catalog import CATALOG, LEFT
from .modules import ROWS_BY_CLASS, TORCH_STYLE_CLASSES

__all__ = ["Rule", "inplace", "RULES", "NOT_ELEMENTWISE", "ACTIVATION_MODULES", "rule_for", "recognised_base"]


@dataclass(frozen=True)
class Rule:
    """How a recognised class is replaced: its table (or how to read it from the module), its parameters,
    whether PyTorch already saves its output, and a remark for the report."""

    table: Callable[[nn.Module], str] | str | None      # None: an activation without a table
    params: Callable[[nn.Module], dict[str, float]] = lambda m: {}
    saves_output: Callable[[nn.Module], bool] = lambda m: False  # PyTorch already saves y
    note: str = ""                                       # why it is left (table None), or a remark


def inplace(m: nn.Module) -> bool:
    """Whether ``m`` was built with ``inplace=True``."""
    return bool(getattr(m, "inplace", False))


_SAVES_OUTPUT: dict[str, Callable[[nn.Module], bool]] = {
    "always": lambda m: True, "inplace": inplace, "never": lambda m: False}


def _key(qualified: str) -> tuple[str, str]:
    module, name = qualified.rsplit(".", 1)
    return module, name


def _catalog_rules() -> dict[tuple[str, str], Rule]:
    """A torch.nn class reads its table (selecting fields) and parameters from its attributes, as the
    invact class of the same name does; other libraries' classes name one table at its defaults."""
    rules: dict[tuple[str, str], Rule] = {}
    for cls in TORCH_STYLE_CLASSES:
        rows = ROWS_BY_CLASS[cls.__name__]
        if rows[0].torch is not None:
            rules[_key(rows[0].torch)] = Rule(
                cls._fixed_table or (lambda m, cls=cls: cls._table_of(**{k: getattr(m, k) for k in cls._fields})),
                lambda m, cls=cls: {k: getattr(m, k) for k in cls._params},
                _SAVES_OUTPUT[rows[0].saves_output])
    for row in CATALOG:
        for rule in row.rules:
            rules[_key(rule.cls)] = Rule(row.name, saves_output=_SAVES_OUTPUT[row.saves_output], note=rule.note)
    for rule in LEFT:
        rules[_key(rule.cls)] = Rule(None, note=rule.note)
    return rules


RULES: dict[tuple[str, str], Rule] = _catalog_rules()
# torch.nn.modules.activation classes that are not elementwise: not activations in invact's sense
NOT_ELEMENTWISE = {"MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d", "GLU"}
ACTIVATION_MODULES = {module for module, _ in RULES}


def rule_for(cls: type) -> Rule | None:
    """The rule of exactly ``cls`` (not of a base class), or None."""
    rule = RULES.get((cls.__module__, cls.__qualname__))
    if rule is None:
        return None
    # the class must be the one that module defines (not a look-alike with the same names)
    mod = sys.modules.get(cls.__module__)
    return rule if mod is not None and getattr(mod, cls.__qualname__, None) is cls else None


def recognised_base(cls: type) -> type | None:
    """The first base class of ``cls`` that a rule replaces (by a table), or None."""
    for base in cls.__mro__[1:]:
        if rule_for(base) is not None and RULES[(base.__module__, base.__qualname__)].table is not None:
            return base
    return None
