"""API misuse found by a sweep: each bad argument gets a clear error naming it (never a silent wrong
result, never an error swallowed into a report), and errors carry torch's types too."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invact
import invact.functional as IF
from invact.common.params import ParamError


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 4))


# 1. backend= is checked where it is given ---------------------------------------------------------

BUILDERS = {
    "GELU": lambda b: invact.GELU(backend=b),
    "Softplus": lambda b: invact.Softplus(2.0, backend=b),
    "Activation": lambda b: invact.Activation("silu", backend=b),
    "activation": lambda b: invact.activation("gelu", backend=b),
    "LayerNorm": lambda b: invact.LayerNorm(4, backend=b),
    "RMSNorm": lambda b: invact.RMSNorm(4, backend=b),
}


@pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS)
@pytest.mark.parametrize("bad", ["bogus", "EAGER", ""])
def test_unknown_backend_refused_at_construction(build, bad):
    with pytest.raises(ValueError, match="backend must be one of triton, compiled, eager"):
        build(bad)


@pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS)
def test_backend_of_another_type_is_a_type_error(build):
    with pytest.raises(TypeError, match="backend must be a str"):
        build(1)


@pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS)
def test_triton_accepted_at_construction(build):
    """A module may be built on the CPU and moved to CUDA: availability is checked at the forward."""
    assert build("triton").backend == "triton"


def test_patch_refuses_unknown_backend_before_any_swap():
    model = _mlp()
    with pytest.raises(ValueError, match="backend must be one of"):
        invact.patch(model, backend="eagre")
    assert type(model[1]) is nn.GELU and type(model[2]) is nn.LayerNorm


def test_patch_backend_error_raises_with_example():
    model = _mlp()
    with pytest.raises(ValueError, match="backend must be one of"):
        invact.patch(model, backend="eagre", example=torch.randn(2, 4))
    assert type(model[1]) is nn.GELU


def test_env_backend_any_case_argument_lower_case(monkeypatch):
    monkeypatch.setenv("INVACT_BACKEND", "EAGER")
    x = torch.randn(3, requires_grad=True)
    invact.GELU()(x).sum().backward()
    with pytest.raises(ValueError, match="names are lower case"):
        invact.GELU(backend="EAGER")


# 2. nested invact.memory ---------------------------------------------------------------------------

def test_nested_memory_counts_in_both():
    model = _mlp()
    with invact.memory(model) as outer:
        with invact.memory(model) as inner:
            model(torch.randn(4, 4))
    assert inner.total > 0
    assert outer.total == inner.total and outer.by_module == inner.by_module


def test_outer_counts_inner_block_and_its_own():
    model = _mlp()
    with invact.memory(model) as outer:
        model(torch.randn(4, 4))
        with invact.memory(model) as inner:
            model(torch.randn(4, 4))
    assert outer.total > inner.total > 0


def test_foreign_hook_inside_is_reported():
    model = _mlp()
    with pytest.warns(RuntimeWarning, match="saved-tensor hook not invact's"):
        with invact.memory(model) as counter:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                model(torch.randn(4, 4))
    assert counter.incomplete and "innermost hook" in counter.incomplete
    assert "incomplete" in str(counter)


def test_foreign_hook_inside_without_model_is_reported():
    model = _mlp()
    with pytest.warns(RuntimeWarning, match="not counted"):
        with invact.memory():
            with torch.autograd.graph.save_on_cpu():
                model(torch.randn(4, 4))


def test_non_reentrant_checkpoint_inside_is_no_foreign_hook():
    """torch.utils.checkpoint(use_reentrant=False) installs its own saved-tensor hook, which keeps only the
    region's inputs (the rest is recomputed in backward): the count (those inputs) is complete, and was
    reported incomplete with a warning. Exactly the regions' inputs: the second's, a (16, 4) float32, and
    the first's, x, a leaf requiring grad (without a model: counted with the parameters)."""
    from torch.utils.checkpoint import checkpoint
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with invact.memory() as counter:
            x = torch.randn(16, 4, requires_grad=True)
            checkpoint(model, checkpoint(model, x, use_reentrant=False), use_reentrant=False).sum().backward()
    assert counter.incomplete is None
    assert (counter.total, counter.parameters) == (16 * 4 * 4, 16 * 4 * 4), counter.by_module


def test_plain_block_does_not_warn():
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with invact.memory(model) as counter:
            model(torch.randn(4, 4))
    assert counter.incomplete is None and counter.total > 0


def test_reentering_an_open_counter_raises():
    counter = invact.memory()
    with counter:
        with pytest.raises(RuntimeError, match="already open"):
            with counter:
                pass


# 3. softplus parameters that overflow the dtype ----------------------------------------------------

@pytest.mark.parametrize("dtype,beta", [(torch.float32, 1e-40), (torch.float32, 1e-300),
                                        (torch.bfloat16, 1e-40), (torch.float16, 1e-6)])
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_softplus_beta_overflowing_dtype_refused(dtype, beta, backend):
    x = torch.linspace(-5, 5, 11, dtype=dtype, requires_grad=True)
    with pytest.raises(ParamError, match=rf"beta={beta!r}.*{dtype}"):
        IF.softplus(x, beta=beta, backend=backend)


@pytest.mark.parametrize("dtype,beta", [(torch.float32, 1e-38), (torch.float64, 1e-300), (torch.float16, 1e-4)])
def test_softplus_small_beta_in_range_matches_torch(dtype, beta):
    x = torch.linspace(-5, 5, 11, dtype=dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    IF.softplus(a, beta=beta, backend="eager").sum().backward()
    F.softplus(b, beta=beta).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-3, rtol=1e-3)


# 4. compare's argument ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["x", None, 3])
def test_compare_needs_saved_bytes(bad):
    with pytest.raises(TypeError, match="baseline must be a SavedBytes"):
        invact.memory().compare(bad)


# 5. route_functional's only --------------------------------------------------------------------------

def test_route_functional_one_name():
    assert invact.route_functional("gelu").only == {"gelu"}
    assert invact.route_functional(["gelu", "silu"]).only == {"gelu", "silu"}


@pytest.mark.parametrize("bad", [5, 1.5, [1], [None]])
def test_route_functional_bad_only(bad):
    with pytest.raises(TypeError, match="only"):
        invact.route_functional(bad)


def test_route_functional_unknown_name():
    with pytest.raises(ValueError, match="only"):
        invact.route_functional("gelux")


# 6. boolean flags ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,bad", [(f, b) for f in ("force", "norms", "functional", "autocast_output")
                                      for b in ("no", "x", 2, None) if (f, b) != ("autocast_output", None)])
def test_patch_flags_need_bool(flag, bad):
    model = _mlp()
    with pytest.raises(TypeError, match=flag):
        invact.patch(model, **{flag: bad})
    assert type(model[1]) is nn.GELU and type(model[2]) is nn.LayerNorm


@pytest.mark.parametrize("value", [False, 0, np.False_, torch.tensor(False)])
def test_patch_flags_take_bool_like_false(value):
    model = _mlp()
    invact.patch(model, norms=value)
    assert type(model[2]) is nn.LayerNorm and type(model[1]) is not nn.GELU


@pytest.mark.parametrize("cls", [invact.LayerNorm, invact.RMSNorm])
def test_norm_autocast_output_needs_bool(cls):
    with pytest.raises(TypeError, match="autocast_output"):
        cls(4, autocast_output="x")
    assert cls(4, autocast_output=1).autocast_output is True


def test_functional_norm_autocast_output_needs_bool():
    with pytest.raises(TypeError, match="autocast_output"):
        IF.layer_norm(torch.randn(2, 4), (4,), autocast_output="no")


def test_functional_inplace_needs_bool():
    x = torch.randn(3)
    with pytest.raises(TypeError, match="inplace must be True or False"):
        IF.silu(x, inplace="no")
    torch.testing.assert_close(IF.silu(x, inplace=0), F.silu(x))
    with pytest.raises(ValueError, match="inplace=True is not supported"):
        IF.silu(x, inplace=True)


# 7. error types that are torch's too ----------------------------------------------------------------

NORM_CASES = {
    "shape mismatch": (lambda x: IF.layer_norm(x, (4,)), RuntimeError, "normalized_shape"),
    "weight shape": (lambda x: IF.layer_norm(x, (3,), torch.ones(4)), RuntimeError, "weight"),
    "bias shape": (lambda x: IF.layer_norm(x, (3,), None, torch.ones(4)), RuntimeError, "bias"),
    "rms weight shape": (lambda x: IF.rms_norm(x, (3,), torch.ones(2)), RuntimeError, "weight"),
    "float shape": (lambda x: IF.layer_norm(x, [3.0]), TypeError, "normalized_shape"),
    "list weight": (lambda x: IF.layer_norm(x, (3,), [1.0, 1.0, 1.0]), TypeError, "weight"),
    "module input": (lambda x: invact.LayerNorm(4)(x), RuntimeError, "normalized_shape"),
}


@pytest.mark.parametrize("call,torch_type,name", NORM_CASES.values(), ids=NORM_CASES)
def test_norm_errors_are_torch_types_and_value_errors(call, torch_type, name):
    x = torch.randn(2, 3)
    with pytest.raises(torch_type, match=name) as caught:
        call(x)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("approximate", [None, 1])
def test_gelu_approximate_of_another_type(approximate):
    with pytest.raises(TypeError, match="approximate") as caught:
        invact.GELU(approximate=approximate)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(TypeError):
        IF.gelu(torch.randn(3), approximate=approximate)


def test_gelu_approximate_unknown_text_stays_value_error():
    with pytest.raises(ValueError, match="approximate"):
        invact.GELU(approximate="foo")


# 8. unexpected keywords name the class, as torch.nn's do --------------------------------------------

@pytest.mark.parametrize("name", ["GELU", "Softplus", "SiLU", "LeakyReLU"])
def test_unexpected_keyword_names_the_class(name):
    with pytest.raises(TypeError, match=rf"{name}\.__init__\(\) got an unexpected keyword argument 'bogus'"):
        getattr(invact, name)(bogus=1)


@pytest.mark.parametrize("root, error, text", [(None, TypeError, "root must be a folder's path"),
                                               (5, TypeError, "root must be a folder's path"),
                                               ("", TypeError, "not empty"),
                                               ("a-file", NotADirectoryError, "is a file, not a folder"),
                                               ("no-such-folder", FileNotFoundError, "no such folder")])
def test_use_root_names_what_is_wrong(root, error, text, tmp_path):
    """invact.use_root(None / 5) raised pathlib's "expected str, bytes or os.PathLike"; '' was the current
    folder; a file was "no such folder"."""
    (tmp_path / "a-file").write_text("not a root")
    if root in ("a-file", "no-such-folder"):
        root = tmp_path / root
    with pytest.raises(error, match=text):
        invact.use_root(root)
