"""Two review findings. (1) The parameter probe of a float64 table (invact.constants: f' of the forward as
the reference for the generated g) ran backward-mode autograd, whose saved tensors went through whatever
saved-tensor hooks were active at an activation's first use with new parameters: a non-reentrant
checkpoint then saw a different number of saved tensors in recomputation (CheckpointError), and a user's
pack hook got the probe's tensor. (2) The runtime read the table next to generated code with json.loads
of the whole file: a table nested past the recursion limit raised a bare RecursionError, a FIFO hung."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import invact


def test_first_use_of_new_parameters_inside_a_checkpoint_saves_nothing_of_the_probe():
    """softplus at a beta no other test uses, first built inside a non-reentrant checkpoint in float64:
    the backward runs, and its gradient is torch's own within float64's rounding of the exact table
    (softplus's g is closed-form: a few operations, 2^-50 relative)."""
    act = invact.activation("softplus", beta=1.3717)
    x = torch.linspace(-3, 3, 8, dtype=torch.float64, requires_grad=True)
    checkpoint(lambda t: act(t * 2), x, use_reentrant=False).sum().backward()
    xr = x.detach().requires_grad_()
    torch.nn.functional.softplus(xr * 2, beta=1.3717).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=2.0**-50, atol=2.0**-50)


def test_a_user_pack_hook_sees_only_the_model_tensors():
    seen = []
    x = torch.randn(8, dtype=torch.float64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(tuple(t.shape)) or t, lambda t: t):
        invact.activation("elu", alpha=0.7713)(x)
    assert (3,) not in seen, seen


@pytest.fixture
def broken_copy(tmp_path, layered):
    """A copy of the installed generated tree whose relu2 table file is replaced by the caller."""
    import shutil

    import invact.generated
    src = os.path.dirname(invact.generated.__file__)
    root = tmp_path / "root"
    shutil.copytree(src, root / "generated", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_a_deeply_nested_table_next_to_code_is_an_import_error(broken_copy):
    (broken_copy / "generated/tables/relu2.json").write_text("[" * 200000 + "]" * 200000)
    invact.use_root(broken_copy)
    with pytest.raises(ImportError, match="RecursionError|relu2"):
        invact.activation("relu2")(torch.ones(2))


def test_a_fifo_table_next_to_code_does_not_hang(broken_copy):
    table = broken_copy / "generated/tables/relu2.json"
    table.unlink()
    os.mkfifo(table)
    invact.use_root(broken_copy)
    outcome = []

    def use():
        try:
            invact.activation("relu2")(torch.ones(2))
        except Exception as error:  # noqa: BLE001 - the test reads what was raised
            outcome.append(error)

    worker = threading.Thread(target=use, daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():     # the old code blocks in open(): unblock it by opening the FIFO's write end
        os.close(os.open(table, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO table blocked")
    assert outcome and isinstance(outcome[0], ImportError) and "not a regular file" in str(outcome[0]), outcome
