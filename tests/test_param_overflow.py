"""A generic table's g where a parameter's power leaves the dtype's range (parametric hunt): tanh(a*x)/a
(g = 1 - a^2 y^2) accepts every a > 0, and with a = 1e20 the generated code's a*a is inf in float32, so g
was NaN at y = 0 and 0 for every other y (torch's gradient: 1 at x = 0, 0.99 at x = 1e-21): silent. Such
values are refused (ParamError naming the parameter and the dtype), where f' is finite and g is not;
values whose powers stay in range keep working, float64 included. The probe compares the generated g
in float32 with the same code in float64, so a g that is infinite in both (a vertical tangent) is kept."""

from __future__ import annotations

import pytest
import torch

from helpers import CHEAP
from invact.common.params import ParamError


@pytest.fixture(scope="module")
def steep_root(tmp_path_factory):
    from invact.fitting import cli
    root = tmp_path_factory.mktemp("steep")
    assert cli.main(["fit", "tanh(a*x)/a", "--param", "a=2", "--name", "steep", "--root", str(root), *CHEAP]) == 0
    return root


@pytest.fixture
def steep(steep_root, layered):
    import invact
    invact.use_root(steep_root)
    return steep_root


def _grad(a: float, x: torch.Tensor) -> torch.Tensor:
    import invact
    x = x.clone().requires_grad_()
    invact.activation("steep", a=a)(x).sum().backward()
    return x.grad


@pytest.mark.parametrize("dtype, a", [(torch.float32, 1e20), (torch.bfloat16, 2e19), (torch.float16, 1e20)])
def test_a_parameter_whose_power_overflows_is_refused(steep, dtype, a):
    """g is computed in float32 for every dtype but float64 (float64's own range, a > 1.3e154 here, is
    checked against autograd's f': tests/test_param_refusals_truth.py)."""
    with pytest.raises(ParamError, match=r"steep with a=.*overflows in torch\.(float32|bfloat16|float16)"):
        _grad(a, torch.tensor([0.0, 1e-21], dtype=dtype))


@pytest.mark.parametrize("dtype, a", [(torch.float32, 1e15), (torch.float64, 1e20)])
def test_large_parameters_in_range_keep_their_gradient(steep, dtype, a):
    """Against float64 autograd of the formula: x = 0 gives 1 exactly (y = 0, g = 1 - a^2 0); x = 0.5 is
    far in the saturated tail (f' = sech^2(a/2) = 0, g clamped to 0)."""
    x = torch.tensor([0.0, 0.5], dtype=dtype)
    assert _grad(a, x).tolist() == [1.0, 0.0]
