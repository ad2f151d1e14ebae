"""A table refitted (or its code regenerated) by another process while this one runs: the Triton kernels
never mix the new table with the old one's constants, `invact generate` mends a refused module without a
restart, and a per-table C kernel of the new table is named as such, then loaded once the process reads
the new table. The "other process" is the `invact` command run in this one (:func:`helpers.invact_cli`):
it changes only files on disk, as another process would. Cheap fits (``CHEAP``) into scratch roots."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import invact
from invact import backends, cpu_kernel, kernel_cache, registry, table_c
from helpers import CHEAP, invact_cli
from triton_tolerances import needs_interpreter, within

TREE_TABLES = ()   # conftest.py's `tree`: an empty root, the tests fit into it


def _fit(capsys, root, *argv: str) -> None:
    status, _, err = invact_cli(capsys, "fit", *argv, "--root", root, *CHEAP)
    assert status == 0, err


def _grad(act, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    act(x).backward(torch.ones_like(x))
    return x.grad


@needs_interpreter
def test_triton_never_mixes_a_refitted_table_with_the_one_in_use(tree, capsys, layered):
    """An activation made (torch code of k, b=2, imported) before another process refitted k (b=0.5),
    its Triton kernels imported at the first call after it: they are the new table's, and the backward
    ran them with the old table's thresholds and POLY, silently (0.037 off). The call raises now and the
    registry is read again, Triton staying on; an activation made then computes the new table. Triton
    against the eager backend: 8 float32 ulps of |g| plus 2^-21 (k's closed form: the interpreter's tanh
    and exp differ from torch's by ulps; tests/test_triton.py's bound), where the mix was 0.037 off."""
    _fit(capsys, tree, "x + b*tanh(x)", "--param", "b=2", "--name", "k")
    invact.use_root(tree)
    before = invact.activation("k", backend="triton")
    _fit(capsys, tree, "k", "--param", "b=0.5")
    x = torch.linspace(-6, 6, 4001)
    with pytest.raises(RuntimeError, match="its table changed on disk") as refused:
        _grad(before, x)
    assert isinstance(refused.value, registry.TableRefittedError), refused.value
    assert "triton" in backends.available("cpu")
    after = invact.activation("k", backend="triton")
    assert after.params == {"b": 0.5}, after
    assert registry.triton_module("k").TABLE_SHA256 == registry.module("k").TABLE_SHA256
    g, eager = _grad(after, x), _grad(invact.activation("k", backend="eager"), x)
    assert within(g, eager, 8, 2.0**-21), (g - eager).abs().max()


def _interrupted_refit(capsys, root, *argv: str) -> None:
    """A refit killed after writing the table, before the code: the table is new, the code the old one's."""
    code = root / "generated" / "torch_lin.py"
    kept = code.read_bytes()
    _fit(capsys, root, *argv)
    code.write_bytes(kept)


def test_invact_generate_mends_a_refused_module_without_a_restart(tree, capsys, layered):
    """After a fit killed between the table and the code, `invact.activation` refuses the code, naming
    `invact generate`; once that ran (another process), the same process takes it: the refused module
    was kept in sys.modules, and every later import returned it (a restart, or another use_root,
    cleared it)."""
    _fit(capsys, tree, "3*x", "--name", "lin")
    _interrupted_refit(capsys, tree, "2*x", "--name", "lin", "--replace")
    invact.use_root(tree)
    with pytest.raises(ImportError, match="invact generate"):
        invact.activation("lin")
    assert invact_cli(capsys, "generate", "--root", tree)[0] == 0
    assert torch.equal(_grad(invact.activation("lin"), torch.linspace(-1, 1, 5)), torch.full((5,), 2.0))


def test_code_rewritten_by_invact_generate_is_read_again(tree, capsys, layered):
    """The code of a module in use rewritten on disk by `invact generate` (here: mending a hand edit),
    the table unchanged: the next registry read (names(), info(), creating an activation) imports it
    again. The registry's stamp watched only registry.py and tables/, which generate leaves alone."""
    _fit(capsys, tree, "3*x", "--name", "lin")
    code = tree / "generated" / "torch_lin.py"
    code.write_text(code.read_text() + "# edited by hand\n")
    invact.use_root(tree)
    used = registry.module("lin")
    assert invact_cli(capsys, "generate", "--root", tree)[0] == 0
    assert "# edited by hand" not in code.read_text()
    assert registry.refresh()
    assert registry.module("lin") is not used


@pytest.mark.skipif(cpu_kernel._compiler() is None or not cpu_kernel.enabled(),
                    reason="no C compiler, or INVACT_CPU_KERNEL=0: no per-table C kernel to load")
def test_c_kernel_of_a_table_refitted_elsewhere_is_named_so_and_loads_after_a_refresh(tree, capsys, layered,
                                                                                      monkeypatch):
    """Another process refits k while this one runs k's old code: c_k.c is the new table's, and it was
    called "stale C kernel ... run `invact generate`" (the file is current; this process is behind).
    The warning says so; once the registry is read again (creating the activation) the new code's
    kernel loads: it is not off for the rest of the process."""
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tree.parent / "cache"))
    monkeypatch.setattr(kernel_cache, "_warned", set())
    _fit(capsys, tree, "x + b*tanh(x)", "--param", "b=0.5", "--name", "k")
    invact.use_root(tree)
    old = registry.module("k")
    _fit(capsys, tree, "k", "--param", "b=2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert table_c.library(old) is None
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "k was refitted on disk since this process imported it" in messages[0], messages
    assert "invact generate" not in messages[0], messages
    invact.activation("k")
    assert registry.module("k").TABLE_SHA256 != old.TABLE_SHA256
    assert table_c.library(registry.module("k")) is not None


def test_a_c_file_of_another_table_is_still_called_stale(tree, capsys, layered, monkeypatch):
    """A C file made from neither the module's table nor the one on disk (copied from elsewhere) keeps
    the fix `invact generate`. The kernels are switched on for it (INVACT_CPU_KERNEL=0 returns before the
    file is read): the C file is checked before anything is built."""
    monkeypatch.setattr(kernel_cache, "_warned", set())
    monkeypatch.setenv(cpu_kernel.SWITCH_ENV, "1")
    if cpu_kernel._compiler() is None:        # the C file is checked before anything is built
        monkeypatch.setattr(cpu_kernel, "_compiler", lambda: "/nonexistent/cc")
    _fit(capsys, tree, "x + b*tanh(x)", "--param", "b=0.5", "--name", "k")
    _fit(capsys, tree, "3*x", "--name", "lin")
    invact.use_root(tree)
    shutil.copy(tree / "generated" / "c_lin.c", tree / "generated" / "c_k.c")
    with pytest.warns(RuntimeWarning, match=r"stale C kernel c_k\.c .*run `invact generate`"):
        assert table_c.library(registry.module("k")) is None
