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
import torch.autograd.forward_ad as fwAD
from torch.utils.checkpoint import checkpoint

import invact
from invact.common.params import ParamError
from test_param_overflow import steep_root  # noqa: F401 - the root of tanh(a*x)/a, a fixture


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


# --- the second review: the probe in the caller's modes, compiled autograd under invact.memory ----------

@pytest.fixture
def steep(steep_root, tmp_path, layered):
    """A copy of tanh(a*x)/a fitted at a = 2 (generic, a > 0) in use: a = 1e200 overflows float64's a*a."""
    import shutil
    root = shutil.copytree(steep_root, tmp_path / "root")
    invact.use_root(root)
    return root


@pytest.mark.parametrize("context", [torch.inference_mode, fwAD.dual_level], ids=["inference_mode", "dual_level"])
def test_the_float64_refusal_holds_when_first_built_in_the_callers_mode(steep, context):
    """The constants (and the refusal) are cached per parameter set: built first in a validation pass under
    inference mode, or inside a user's dual level, the probe found no f' and refused nothing, for good."""
    act = invact.activation("steep", a=1e200)
    with context(), pytest.raises(ParamError, match="overflows in torch.float64"):
        act(torch.tensor([0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_autograd_inside_a_memory_block_runs(backend):
    """An eager forward inside invact.memory, its backward under compiled autograd: the unpack hook traced
    by Dynamo read the version counter as changed (a false 'modified by an inplace operation'). The
    gradient is eager autograd's without the block, within float32 reassociation of compiled code
    (a few ulps of the largest term: 1e-5 relative to the gradient's scale)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), invact.GELU(), torch.nn.Linear(16, 8))
    x = torch.randn(4, 8)
    model(x).sum().backward()
    want = model[0].weight.grad.clone()
    model.zero_grad()
    with invact.memory(model):
        out = model(x)
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend=backend)):
            out.sum().backward()
    torch.testing.assert_close(model[0].weight.grad, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
