"""Stamps of generated code, the constants' thresholds, and torch's mode stack.

- A generated module's stamp was taken just after its import: a rewrite by another process (`invact
  generate`) between the import's read and the stamp went unseen, and the old code ran as if checked.
  The stamp is taken before the import, and a file rewritten meanwhile is read again.
- That second read loaded the first read's cached .pyc where the rewrite kept the size and the mtime's
  second (Python's check of a .pyc): the old code ran as current, in this process and in new ones.
  Generated code is compiled from its source at every import, and no .pyc is written.
- refresh() or use_root() in one thread while another imported a generated module removed it from
  sys.modules mid-import: importlib raised a raw KeyError. They wait for the import now (one lock).
- :func:`invact.registry.refresh` (every ``names()`` / ``info()``, so every module built or patched)
  stat'ed every imported module: ~300 us per call with the 30 built-in modules on a loaded 2-core machine.
  The modules are looked at only where their folder's stamp changed (invact writes every file by a rename
  into its folder), a folder changed too recently to be trusted (a coarse clock's tick) excepted.
- ``module_constants`` computed the thresholds twice (once in the parameter probe).
- ``invact.modes._exit_mode`` takes a route off torch's mode stack below other modes with torch's private
  ``torch.overrides._pop_mode`` / ``_push_mode`` (PyTorch has no public API for it): a torch without
  them, or where they no longer do that, raises ModeStackError instead of leaving a mode entered or
  dropping another one."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.overrides import TorchFunctionMode

import invact
from invact import constants, modes, registry
from invact.fitting.tables import replace_text
from helpers import CHEAP, invact_cli

TREE_TABLES = ()   # conftest.py's `tree`: an empty root, the tests fit into it
HAND_EDIT = "HAND_EDITED = True  # a line `invact generate` removes\n"


@pytest.fixture
def lin(tree, capsys, layered) -> Path:
    """torch_lin.py of activation lin (3*x) fitted into ``tree``, which is in use; its path."""
    status, _, err = invact_cli(capsys, "fit", "3*x", "--name", "lin", "--root", tree, *CHEAP)
    assert status == 0, err
    invact.use_root(tree)
    return tree / "generated" / "torch_lin.py"


def _rewrite_on_import(monkeypatch, times: int, rewrite: Callable[[], object]) -> None:
    """``rewrite()`` is called right after torch_lin is imported (when the registry checks it), the first
    ``times`` times: another process writing the file between the import's read and what follows."""
    real, left = registry._check_api, [times]

    def checking(mod: ModuleType, dotted: str, api: tuple[str, ...]) -> None:
        real(mod, dotted, api)
        if dotted.endswith(".torch_lin") and left[0] > 0:
            left[0] -= 1
            rewrite()
    monkeypatch.setattr(registry, "_check_api", checking)


def test_a_module_rewritten_while_it_is_imported_is_read_again(lin, capsys, monkeypatch):
    """A hand-edited torch_lin.py is mended by `invact generate` (another process) just after the import
    read it: the process kept the edited code, its stamp being the mended file's (refresh() saw no
    change). The module returned now is the mended file's."""
    lin.write_text(lin.read_text() + HAND_EDIT)
    _rewrite_on_import(monkeypatch, 1, lambda: invact_cli(capsys, "generate", "--root", lin.parent.parent))
    mod = registry.module("lin")
    assert HAND_EDIT not in lin.read_text()
    assert not hasattr(mod, "HAND_EDITED"), "the code read before `invact generate` rewrote it is in use"
    assert not registry.refresh()


def _write_at(path: Path, text: str, mtime_ns: int) -> None:
    """Write ``text`` to ``path`` by a rename (as invact writes), its mtime set to ``mtime_ns``."""
    replace_text(path, text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_same_size_rewrite_in_the_same_second_is_read_again_not_its_cached_bytecode(lin, monkeypatch):
    """Python trusts a cached .pyc when the source has its size and its mtime's whole second. The hand edit
    was mended by a rewrite of the same size within that second: the read again loaded the first read's
    .pyc, the stamps then agreed, and the hand-edited code ran as current (and in new processes, from
    the .pyc). Now generated code is compiled from its source, and no .pyc is written."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)   # users' default (this machine's env sets it)
    text, second = lin.read_text(), (time.time_ns() // 10**9 - 10) * 10**9
    mended = "#" * (len(HAND_EDIT) - 1) + "\n"
    _write_at(lin, text + HAND_EDIT, second + 100_000_000)
    _rewrite_on_import(monkeypatch, 1, lambda: _write_at(lin, text + mended, second + 300_000_000))
    mod = registry.module("lin")
    assert lin.stat().st_size == len(text + HAND_EDIT) and HAND_EDIT not in lin.read_text()
    assert not hasattr(mod, "HAND_EDITED"), "the hand-edited code's cached bytecode is in use"
    assert not registry.refresh()
    assert not Path(importlib.util.cache_from_source(str(lin))).exists(), "a .pyc a new process would trust"


def test_use_root_in_another_thread_waits_for_an_import(lin, monkeypatch):
    """use_root (it forgets the generated modules) in another thread while torch_lin's code runs: it
    deleted the module from sys.modules mid-import, and importlib raised a raw KeyError. Now it waits for
    the import (the import waits for it 0.5 s, time enough for it to finish where it does not wait)."""
    other, waiting = threading.Thread(target=invact.use_root, args=(lin.parent.parent,)), []
    hook = ModuleType("_invact_test_during_import")
    hook.run = lambda: (other.start(), other.join(timeout=0.5), waiting.append(other.is_alive()))
    monkeypatch.setitem(sys.modules, hook.__name__, hook)
    lin.write_text(lin.read_text() + f"import {hook.__name__}\n{hook.__name__}.run()\n")
    mod = registry.module("lin")
    other.join(timeout=10)
    assert waiting == [True], "use_root forgot the generated modules while one was imported"
    assert not other.is_alive(), "use_root did not finish after the import"
    assert mod.NAME == "lin" and "invact.generated.torch_lin" not in sys.modules   # forgotten after it


def test_a_module_rewritten_at_every_read_is_seen_changed_by_refresh(lin, monkeypatch):
    """A file rewritten after each read (the reads again give up): the next refresh() sees it changed,
    as it sees a rewrite after the import, and the next use reads the file again."""
    text = lin.read_text()
    writes = iter(range(1, 10))
    _rewrite_on_import(monkeypatch, 9, lambda: replace_text(lin, text + "#\n" * next(writes)))
    used = registry.module("lin")
    assert registry.refresh(), "the file changed after its import read it, and refresh() did not see it"
    assert registry.module("lin") is not used


def _module_stats(monkeypatch) -> list[str]:
    """The generated modules' files registry._file_stamp looks at from now on (a list filled as it goes)."""
    seen, real = [], registry._file_stamp

    def recording(path):
        seen.append(str(path))
        return real(path)
    monkeypatch.setattr(registry, "_file_stamp", recording)
    return seen


def _age(folder: Path, seconds: float) -> None:
    """Set ``folder``'s mtime ``seconds`` before now."""
    then = time.time_ns() - int(seconds * 1e9)
    os.utime(folder, ns=(then, then))


def test_refresh_looks_at_the_modules_only_when_their_folder_changed(lin, monkeypatch):
    """With 30 modules imported, refresh() cost ~300 us (a stat per module); with their folders unchanged
    it looks at no module file now, and a rewrite (a rename into the folder, as invact writes) is seen."""
    used = registry.module("lin")
    _age(lin.parent, 60)   # well past any clock tick (registry._RACY_NS)
    seen = _module_stats(monkeypatch)
    assert not registry.refresh()
    assert str(lin) in seen, "the first refresh after the import checks the module"
    seen.clear()
    assert not registry.refresh()
    assert [p for p in seen if Path(p).suffix == ".py" and Path(p).name != "registry.py"] == [], seen
    replace_text(lin, lin.read_text() + "# rewritten\n")
    assert registry.refresh()
    assert registry.module("lin") is not used


def test_a_folder_changed_within_a_clock_tick_keeps_the_modules_looked_at(lin, monkeypatch):
    """A folder whose mtime is recent is not trusted as unchanged: a rename in the same tick of a coarse
    clock leaves the mtime as it was (here: set back by hand), and the rewrite is still seen."""
    registry.module("lin")
    folder_stamp = os.stat(lin.parent)
    assert not registry.refresh()
    replace_text(lin, lin.read_text() + "# rewritten in the same tick\n")
    os.utime(lin.parent, ns=(folder_stamp.st_atime_ns, folder_stamp.st_mtime_ns))
    assert registry.refresh()


@pytest.mark.parametrize("name, values", [("elu", (0.5,)), ("softplus", (2.0, 20.0)), ("gelu", ())])
def test_module_constants_computes_the_thresholds_once(name, values, monkeypatch):
    """The parameter probe takes the thresholds module_constants uses (it computed its own too)."""
    calls, real = [], constants._thresholds

    def counting(*args):
        calls.append(args)
        return real(*args)
    monkeypatch.setattr(constants, "_thresholds", counting)
    mod = registry.module(name)
    k = constants.module_constants.__wrapped__(mod, torch.float32, torch.device("cpu"), values)
    assert len(calls) == 1, calls
    assert k.x_thresholds == real(mod, torch.float32, k.params)[1]


class _Mode(TorchFunctionMode):
    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def __repr__(self) -> str:
        return f"_Mode({self.tag})"


@contextlib.contextmanager
def _entered(*tags: str):
    """Modes entered in order (the last on top); whatever the test leaves of them is popped at the end."""
    depth = torch._C._len_torch_function_stack()
    entered = [_Mode(t) for t in tags]
    for m in entered:
        m.__enter__()
    try:
        yield entered
    finally:
        while torch._C._len_torch_function_stack() > depth:
            torch._C._pop_torch_function_stack()


def _stack() -> list:
    return [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]


def test_exit_mode_takes_a_mode_from_below_others_in_their_order():
    """What invact relies on of torch's private stack API: a route entered below a user's modes is taken
    off, theirs staying in order; the top one leaves by its own __exit__; one already off is left alone."""
    with _entered("a", "b", "c") as (a, b, c):
        modes._exit_mode(a)
        assert _stack()[-2:] == [b, c]
        modes._exit_mode(c)
        assert _stack()[-1] is b and c not in _stack()
        modes._exit_mode(a)
        assert _stack()[-1] is b


@pytest.mark.parametrize("missing", ["_get_current_function_mode_stack", "_pop_mode", "_push_mode"])
def test_exit_mode_without_torch_private_stack_api_raises(missing, monkeypatch):
    """A torch without one of the private functions: a typed error naming it, never a mode left entered."""
    with _entered("a", "b") as (a, _):
        monkeypatch.delattr(torch.overrides, missing)
        with pytest.raises(RuntimeError, match=rf"lacks torch\.overrides\.{missing}\b") as raised:
            modes._exit_mode(a)
        assert isinstance(raised.value, modes.ModeStackError)


def test_exit_mode_raises_where_torch_private_stack_api_changed(monkeypatch):
    """A _push_mode that no longer pushes: the user's mode above the route was dropped silently; now
    ModeStackError says which stack was left and which was expected."""
    with _entered("a", "b") as (a, _):
        monkeypatch.setattr(torch.overrides, "_push_mode", lambda mode: None)
        with pytest.raises(RuntimeError, match=r"changed behaviour") as raised:
            modes._exit_mode(a)
        assert isinstance(raised.value, modes.ModeStackError)
        assert "not [" in str(raised.value) and "_Mode" in str(raised.value)


def test_a_module_read_again_is_the_packages_attribute_too():
    """After the registry forgets its modules (a refit seen), the module it reads again is also what
    `from invact.generated import torch_NAME` gives: the package's attribute was left at the first
    module (importlib binds it; the source-only import did not), with the old table's constants."""
    import invact.generated as pkg
    from invact import registry
    first = registry.module("gelu")
    child = first.__name__.rpartition(".")[2]
    registry._forget()
    again = registry.module("gelu")
    assert again is not first
    assert getattr(pkg, child) is again
