"""Jagged nested tensors (layout=torch.jagged): activations run on ``x.values()`` and rewrap with x's structure.

PyTorch runs its elementwise ops on a jagged tensor's values (``torch.nested._internal.ops``), so invact's
forward gives PyTorch's values bit for bit (its forward is PyTorch's own), and the gradient that reaches x
through ``values()`` is within the certified bound of tests/tolerances.py (gradient_bound). Nested tensors
of the strided layout and sparse tensors stay refused with a TypeError naming the input.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invact
import invact.functional as IF
import tolerances as tol
from invact import ops
from invact.saved import SavedBytes

pytestmark = pytest.mark.skipif("gelu" not in ops.names(), reason="no generated gelu table")


def _jagged(*rows: int, width: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.nested.nested_tensor([torch.randn(n, width) * 4 for n in rows], layout=torch.jagged)


def _holes() -> torch.Tensor:
    """A jagged tensor with lengths (holes between its rows): a view of a padded batch."""
    torch.manual_seed(0)
    return torch.nested.narrow(torch.randn(2, 10, 8) * 4, 1, torch.tensor([0, 3]), torch.tensor([2, 4]),
                               layout=torch.jagged)


def _transposed() -> torch.Tensor:
    """Ragged dimension 2 (values laid out non-contiguously)."""
    return _jagged(2, 3).transpose(1, 2)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("make", [lambda: _jagged(2, 3), _holes, _transposed], ids=["plain", "holes", "transposed"])
def test_jagged_activation_is_torchs_on_the_values(make, backend):
    x = make().detach().requires_grad_()
    xt = make().detach().requires_grad_()
    y, theirs = IF.gelu(x, backend=backend), F.gelu(xt)
    assert y.is_nested and y.layout is torch.jagged and y.shape == x.shape
    assert y.offsets() is x.offsets() and (y + x).shape == x.shape   # the same nested size
    assert torch.equal(y.values(), theirs.values())
    go = torch.randn_like(y.values())
    y.values().backward(go)
    theirs.values().backward(go)
    c = tol.compare("gelu", torch.float32, x.values().detach().double().numpy(), y.values().detach().double().numpy(),
                    go.double().numpy(), xt.grad.values().double().numpy(), x.grad.values().double().numpy())
    assert not c.value_bad.any() and not c.pattern_bad.any()


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


def test_a_patched_model_takes_a_jagged_tensor():
    """The patched model on a jagged tensor is the patched model on its values, bit for bit, gradients too."""
    model = _mlp()
    invact.patch(model)
    assert isinstance(model[1], invact.GELU)
    x = _jagged(2, 3).requires_grad_()
    y = model(x)
    assert y.is_nested and y.offsets() is x.offsets()
    y.values().sum().backward()
    dense = x.values().detach().requires_grad_()
    want = model(dense)
    want.sum().backward()
    assert torch.equal(y.values(), want) and torch.equal(x.grad.values(), dense.grad)


def test_patch_measures_a_jagged_example():
    """The example step runs with the swaps (it failed on the activation's layout check before), its
    measurement counts a jagged tensor's bytes, its values' (every saved jagged tensor counted 0 B), and
    the GELU, whose input the next Linear does not keep, is swapped for what it frees."""
    model, x = _mlp(), _jagged(2, 3)
    report = invact.patch(model, example=x)
    assert not [entry for entry in report.left if "fails" in entry.reason], report
    assert len(report) == 1 and report.replaced[0].freed, report
    assert report.measured["patched_bytes"] < report.measured["baseline_bytes"], report
    assert torch.equal(model(x).values(), _mlp()(x).values())


@pytest.mark.parametrize("make", [lambda: invact.GELU(), lambda: invact.LayerNorm(8), lambda: invact.RMSNorm(8)],
                         ids=["gelu", "layer_norm", "rms_norm"])
def test_a_jagged_input_saves_what_its_values_would(make):
    """The saved bytes of a jagged x's forward are those of the same op on its values as a dense tensor:
    y and the code (or rstd), never x (``x.values()``'s own backward saved the whole x, which kept the
    input alive: more than PyTorch's op saves)."""
    module, x = make(), _jagged(3, 5).requires_grad_()
    dense = x.values().detach().requires_grad_()
    with SavedBytes() as on_jagged:
        y = module(x)
    with SavedBytes() as on_values:
        module(dense)
    assert on_jagged.total == on_values.total > 0, (on_jagged.total, on_values.total)
    (grad,) = torch.autograd.grad(y.values().sum(), x)
    assert grad.is_nested and torch.equal(grad.offsets(), x.offsets())


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("make", [lambda: torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)]),
                                  lambda: torch.randn(4, 8).to_sparse()], ids=["strided_nested", "sparse"])
def test_other_layouts_stay_refused(make):
    x = make()
    with pytest.raises(TypeError, match=r"invact activation 'gelu': x must be a dense \(strided\) tensor"):
        IF.gelu(x)
