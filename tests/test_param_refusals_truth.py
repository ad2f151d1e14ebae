"""A refusal of an activation's parameters says what is true (parametric hunt):

* outside a table's domain, the hint names an `invact fit` command only where the fitter takes the values
  for that formula (a built-in's catalog domain: `invact.ELU(alpha=-1.0)` used to name `invact fit elu
  --param alpha=-1.0 --name NEW`, which the fitter refuses), and says what a fit without --name does (a
  built-in's is refused, a formula table's replaces it: not "it would replace this one" for both);
* one probe of the forward at x = -1, 0, 1 refuses y's overflow first, then a g that is not finite;
* in float64 too: tanh(a*x)/a with a = 1e200 (a*a is inf in float64) gave NaN gradients, silently.
"""

from __future__ import annotations

import shlex
import shutil

import pytest
import torch

from helpers import CHEAP
from invact.common.catalog import BY_NAME
from invact.common.params import ParamError
from test_param_overflow import steep_root  # noqa: F401 - the root of tanh(a*x)/a, a fixture

# built-in values outside the catalog domain, the relations `invact fit NAME --param ...` checks first
OUTSIDE_FITTER_DOMAIN = [("elu", {"alpha": -1.0}), ("celu", {"alpha": -1.0}), ("leaky_relu", {"negative_slope": -0.1}),
                         ("softplus", {"threshold": 5.0}), ("selu", {"scale": -1.0})]


def _refusal(name: str, **params: float) -> str:
    import invact
    with pytest.raises(ParamError) as caught:
        invact.activation(name, **params)
    return str(caught.value)


def _commands(message: str) -> list[list[str]]:
    """The `invact fit ...` commands a message names (between backticks), split as a shell splits them."""
    return [shlex.split(text) for text in message.split("`")[1::2] if text.startswith("invact fit")]


@pytest.fixture
def steep(steep_root, tmp_path, layered):
    """A copy of the root of tanh(a*x)/a fitted at a = 2 (a generic table, domain a > 0) in use: a test
    may refit it."""
    import invact
    root = shutil.copytree(steep_root, tmp_path / "root")
    invact.use_root(root)
    return root


# --- 1. no command the fitter refuses -----------------------------------------------------------------

@pytest.mark.parametrize("name, params", OUTSIDE_FITTER_DOMAIN)
def test_values_the_fitter_refuses_get_no_fit_command(name, params):
    """The fitter refuses these values for the built-in's formula before fitting (its domain check), so
    the runtime names no command, and says which relations the fitter needs."""
    from invact.fitting.errors import SpecError
    from invact.fitting.formulas import get_spec
    with pytest.raises(SpecError, match="needs"):
        get_spec(name, "new", params)
    message = _refusal(name, **params)
    assert not _commands(message), message
    assert "no refit can hold these values" in message and all(rel in message for rel in BY_NAME[name].domain), message


# --- 2. what a fit without --name does ----------------------------------------------------------------

def test_builtin_hint_says_a_fit_without_name_is_refused(tmp_path):
    """selu with scale = 0.5 is outside its table's domain (scale >= 1) but inside the fitter's (scale > 0):
    the hint names the fit under --name NEW, whose parameters the fitter takes, and says that the same fit
    without --name is refused, as the CLI does (exit 2, before any fit)."""
    from invact.fitting import cli
    from invact.fitting.formulas import get_spec
    message = _refusal("selu", scale=0.5)
    assert "would replace" not in message and "without --name the fit is refused" in message, message
    [command] = _commands(message)
    assert command[:3] == ["invact", "fit", "selu"] and command[-2:] == ["--name", "NEW"], message
    values = dict(option.split("=") for option in command[4:-2:2])
    assert get_spec("selu", "new", {k: float(v) for k, v in values.items()}).params["scale"] == 0.5
    assert cli.main([*command[1:-2], "--root", str(tmp_path), *CHEAP]) == 2


def test_formula_table_hint_command_refits_it_as_printed(steep):
    """tanh(a*x)/a at a = 2 holds a > 0; a = -1 is refused with the command that refits the table itself
    (its formula table's name, no --name): run as printed, the table then holds a = -1 (domain a < 0), and
    the gradient is g(y) = 1 - y^2 of the saved y within the table's certified float32 error."""
    import invact
    from invact.fitting import cli
    message = _refusal("steep", a=-1.0)
    assert "replacing the table fitted at {'a': 2.0} for a > 0" in message, message
    [command] = _commands(message)
    assert command == ["invact", "fit", "steep", "--param", "a=-1.0", "--root", str(steep)], message
    assert cli.main([*command[1:], *CHEAP]) == 0
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    y = invact.activation("steep", a=-1.0)(x)
    y.sum().backward()
    bound = invact.ops.info("steep")["certificate"]["float32_eval_error"]
    assert torch.allclose(x.grad.double(), 1 - y.detach().double() ** 2, rtol=0, atol=bound)
    assert "a < 0" in _refusal("steep", a=2.0)


# --- 3. one probe of the forward ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_probe_evaluates_the_forward_once_in_the_dtype(dtype, monkeypatch):
    """Building the constants of new parameters evaluates the forward once in the tensors' dtype (y's
    overflow and g's check share it; the float32 check's reference is one float64 evaluation more)."""
    from invact import constants, registry
    mod = registry.module("softplus")
    calls = []
    forward = mod.forward
    monkeypatch.setattr(mod, "forward", lambda x, **kw: calls.append(x.dtype) or forward(x, **kw))
    constants.module_constants(mod, dtype, torch.device("cpu"), (1.2345, 20.0))
    assert calls.count(dtype) == 1, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_overflow_of_y_is_refused_before_g(dtype):
    """softplus with log(2)/beta beyond the dtype's largest value: y = inf (its g would not be finite
    either); the refusal names y's overflow."""
    beta = 1e-40 if dtype == torch.float32 else 1e-310
    import invact
    with pytest.raises(ParamError, match=rf"softplus with beta={beta!r}, threshold=20.0 overflows {dtype} \(y = inf"):
        invact.activation("softplus", beta=beta)(torch.zeros(2, dtype=dtype))


# --- 4. float64's own range ---------------------------------------------------------------------------

def test_a_parameter_beyond_float64_is_refused_in_float64(steep):
    """a = 1e200: a*a is inf in float64, so the generated g = 1 - a^2 y^2 is NaN for every y, where f'
    (autograd of the forward) is 0, 1, 0 at x = -1, 0, 1: refused, naming the parameter, the dtype and
    both values."""
    import invact
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ParamError, match=r"steep with a=1e\+200: its gradient overflows in torch\.float64 \(g is "
                                         r"\[nan, nan, nan\] .* f' = \[0\.0, 1\.0, 0\.0\]"):
        invact.activation("steep", a=1e200)(x)


def test_a_parameter_within_float64_keeps_its_gradient(steep):
    """a = 1e150: a*a = 1e300 is finite; torch's gradient is 1 at x = 0 (y = 0: g = 1 exactly) and 0 at
    x = 1, where g = 1 - a^2 y^2 with a y = 1 up to its roundings (y = tanh(a)/a, then the products: each
    2^-53 relative, doubled by the square): within 8 float64 half-ulps of 1 (2^-50)."""
    import invact
    x = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    invact.activation("steep", a=1e150)(x).sum().backward()
    assert x.grad[0] == 1.0 and abs(x.grad[1]) <= 2.0 ** -50, x.grad


@pytest.mark.parametrize("name", [n for n, e in BY_NAME.items() if e.params])
@pytest.mark.parametrize("scale", [1e-200, 1e-30, 1e-3, 1.0, 1e3, 1e30, 1e200])
def test_builtin_parameters_in_range_are_not_refused_in_float64(name, scale):
    """Every built-in parameter scaled by ``scale`` (inside its table's domain) where torch's forward and
    its gradient are finite at x = -1, 0, 1: float64 builds its constants, its f' reference is finite."""
    from invact import constants, registry
    params = {k: v * scale for k, v in BY_NAME[name].params.items()}
    try:
        values = constants.param_values(name, params)
    except ParamError:
        pytest.skip("outside the table's domain")
    mod = registry.module(name)
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    y = mod.forward(x, **dict(zip(mod.PARAM_ARGS, values)))
    try:
        (grad,) = torch.autograd.grad(y.sum(), x)
    except RuntimeError:   # celu's backward with alpha = 1e200: 1/alpha cannot be converted to float
        pytest.skip("torch's own gradient fails there")
    if not (torch.isfinite(y).all() and torch.isfinite(grad).all()):
        pytest.skip("torch's own forward or gradient is not finite there")
    constants.table_constants(name, torch.float64, "cpu", params)
