"""Clear errors for bad input and faults that tests/test_ops.py, test_tables.py and test_cli.py do not
already cover: non-tensor and non-float inputs through every entry point, $INVACT_BACKEND, empty
tensors on the compiled backend, meta tensors, and generated code that is missing, broken or stale.

Covered elsewhere: dtype TypeError via ops.apply (test_ops.test_non_float_inputs_raise_type_error),
unknown name and backend argument, unavailable backend (test_ops), damaged / missing / other-version
table files naming the file and the `invact fit` command (test_tables.test_load_rejects_damaged_files,
test_cli.test_damaged_table_exit_2), a root without generated code (test_ops.test_use_root_...).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import invact
import invact.functional as IF
from invact import backends, ops
from invact.common.params import ParamError

NAMES = ops.names()
pytestmark = pytest.mark.skipif(not NAMES, reason="no generated activations (run `invact generate`)")
NON_FLOAT = [torch.uint8, torch.int16, torch.complex128, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", NON_FLOAT, ids=str)
def test_non_float_inputs_through_every_entry_point(dtype):
    """Functional wrappers and modules reach the same TypeError naming x and the accepted dtypes
    (PyTorch itself refuses most of these; it promotes integers for sigmoid/tanh and keeps them for
    relu, but no integer tensor can carry a gradient)."""
    x = torch.zeros(3, dtype=dtype)
    for call in (lambda: IF.silu(x), lambda: invact.GELU()(x), lambda: IF.apply(x, NAMES[0]),
                 lambda: invact.activation(NAMES[-1])(x)):
        with pytest.raises(TypeError, match=r"x must be float16, bfloat16, float32 or float64, got " + str(dtype)):
            call()


@pytest.mark.parametrize("value", [3.0, [1.0, 2.0], None])
def test_non_tensor_input(value):
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got " + type(value).__name__):
        ops.apply(value, NAMES[0])


def _nested_and_sparse():
    # the strided layout: a jagged one runs on its values (tests/test_nested.py)
    nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)], layout=torch.strided)
    return [("nested", nested), ("sparse", torch.randn(4, 8).to_sparse())]


@pytest.mark.parametrize("kind, x", _nested_and_sparse(), ids=["nested", "sparse"])
def test_nested_and_sparse_inputs_refused_by_name(kind, x):
    """A clear TypeError naming the input and its layout (torch's internal "NestedTensorImpl doesn't support
    strides" before), for activations (every entry point's op) and the norms."""
    for call in (lambda: IF.gelu(x), lambda: invact.SiLU()(x), lambda: ops.apply(x, "tanh"),
                 lambda: IF.layer_norm(x, (8,)), lambda: IF.rms_norm(x, (8,))):
        with pytest.raises(TypeError, match=f"dense \\(strided\\) tensor, got a {kind if kind == 'nested' else ''}"):
            call()


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV, "cuda")
    with pytest.raises(ValueError, match=r"INVACT_BACKEND must be one of triton, compiled, eager .*got 'cuda'"):
        ops.apply(torch.zeros(3), NAMES[0])
    with pytest.raises(ValueError, match=r"INVACT_BACKEND must be one of"):
        invact.activation(NAMES[0])(torch.zeros(3))


def test_unknown_name_lists_known_through_functional():
    with pytest.raises(ValueError, match="unknown activation 'gleu'; known: " + ", ".join(NAMES)):
        IF.apply(torch.zeros(3), "gleu")


@pytest.mark.skipif("compiled" not in backends.available("cpu"), reason="no C++ compiler for inductor")
def test_empty_tensor_backward_on_compiled_backend():
    """A zero-element backward on the compiled backend asked bitpack.plane_chunks for chunks of 0
    elements (range(0, 0, 0): ValueError); found by test_properties. Exact-route table: cheap compile."""
    name = "relu" if "relu" in NAMES else NAMES[0]
    x = torch.zeros(0, 3, requires_grad=True)
    ops.apply(x, name, backend="compiled").sum().backward()
    assert x.grad.shape == (0, 3)


def test_meta_tensors_like_pytorch():
    """Shape inference on the meta device (models built with init_empty_weights) works as in PyTorch
    (ops.apply once asked torch.is_autocast_enabled('meta'), which raises)."""
    x = torch.zeros(4, 3, device="meta")
    y = ops.apply(x, NAMES[0], backend="eager")
    assert y.device.type == "meta" and y.shape == x.shape


# ------------------------------------------------------------------------------------------------
# generated code that is broken or from another invact version

@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A copy of the installed generated/ under tmp_path, loaded with invact.use_root; restored after."""
    import invact.generated as pkg
    src = Path(pkg.__file__).parent
    shutil.copytree(src, tmp_path / "generated", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pkg, "__path__", list(pkg.__path__))
    yield tmp_path / "generated"
    monkeypatch.undo()
    invact.use_root(src.parent)


def _damage(folder: Path, name: str, how: str) -> Path:
    path = folder / f"torch_{name}.py"
    if how == "syntax":
        path.write_text("def broken(:\n")
    else:                                   # another invact version: the kernel API renamed
        path.write_text(path.read_text().replace("def grad_kernel(", "def grad_kernel_v0("))
    return path


@pytest.mark.parametrize("how", ["syntax", "stale"])
def test_broken_generated_code_names_file_and_fix(tree, how):
    name = "tanh" if "tanh" in NAMES else NAMES[0]
    path = _damage(tree, name, how)
    invact.use_root(tree.parent)
    with pytest.raises(ImportError) as info:
        x = torch.randn(3, requires_grad=True)
        ops.apply(x, name, backend="eager").sum().backward()
    assert str(path) in str(info.value) and "invact generate" in str(info.value)


def test_triton_module_from_before_the_segment_search_names_file_and_fix(tree):
    """A generated Triton module without SEARCH_LEVELS was made before g_y took act_triton.row's CLAMP:
    importing it says so, naming the file and `invact generate` (rather than a kernel that fails to
    build at its first launch)."""
    pytest.importorskip("triton")
    from invact import registry
    name = "silu" if "silu" in NAMES else NAMES[0]
    path = tree / f"triton_{name}.py"
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if not line.startswith("SEARCH_LEVELS")))
    invact.use_root(tree.parent)
    with pytest.raises(ImportError, match="SEARCH_LEVELS") as info:
        registry.triton_module(name)
    assert str(path) in str(info.value) and "invact generate" in str(info.value)


def test_compiled_backend_that_fails_falls_back_with_one_warning(monkeypatch):
    """torch.compile failing (no working compiler, an Inductor bug): one RuntimeWarning, then the
    function runs eagerly, now and on later calls."""
    import warnings

    from invact import backends
    monkeypatch.setattr(backends, "_broken", set())

    def failing_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("C++ compile error")
        return run
    monkeypatch.setattr(torch, "compile", failing_compile)
    # inductor_options() asks Inductor for the vector width before torch.compile is called, which
    # builds probes with the C++ compiler: without one it raises first (InvalidCxxCompiler; with CXX=""
    # a PermissionError) and the warning names that instead of the failure simulated here. The fixed
    # options keep this test about the fallback itself, on any machine.
    monkeypatch.setattr(backends, "inductor_options", lambda: dict(backends.INDUCTOR_OPTIONS))
    double = backends.compiled(lambda t: t * 2)
    t = torch.arange(4.0)
    with pytest.warns(RuntimeWarning, match="'compiled' backend failed.*C\\+\\+ compile error.*eager"):
        assert torch.equal(double(t), t * 2)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        assert torch.equal(double(t), t * 2)
    assert not [w for w in later if "backend failed" in str(w.message)]
    assert backends.resolve("compiled", "cpu") == "eager"


def test_a_triton_that_does_not_import_is_named_not_hidden(tmp_path):
    """An installed Triton whose import raises (a broken install, a CUDA/driver mismatch) was taken
    for no Triton at all: backend='triton' said only "not available". Where Triton would run, one
    warning names the import error, and the activation runs on the next backend."""
    import subprocess
    import sys

    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('libcuda.so.1: cannot open')\n")
    script = """
import warnings, torch, invact
from invact import backends
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    usable = backends.available("cpu")
    y = invact.GELU(backend="triton")(torch.ones(3, requires_grad=True))
print(repr((usable, [str(w.message) for w in seen if "backend failed" in str(w.message)], y.sum().item() > 0)))
"""
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    usable, warned, ran = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 (our own print)
    assert "triton" not in usable and ran
    assert len(warned) == 1 and "ImportError: libcuda.so.1: cannot open" in warned[0], warned


@pytest.mark.parametrize("name", ops.names())
def test_failed_compile_of_a_table_gives_the_eager_gradient(monkeypatch, name):
    """Where Inductor's code runs (no C kernel: the compiled backend's last implementation), the call
    whose compile failed runs the generated functions eagerly with the compiled backend's arguments
    (thresholds as floats, its compile-time constants): the eager backend's y, code and gradient, bit
    for bit. (The eager segment count read its thresholds as a tensor: AttributeError.)"""
    from invact import impl_compiled
    monkeypatch.setattr(backends, "_broken", set())
    impl_compiled.kernels.cache_clear()

    def failing_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("C++ compile error")
        return run
    monkeypatch.setattr(torch, "compile", failing_compile)
    params = [float(v) for v in ops.info(name)["params"].values()]
    x = torch.randn(3 << 13, generator=torch.Generator().manual_seed(0)) * 4  # past selection.COUNTED_FROM
    go = torch.randn_like(x)
    try:
        with pytest.warns(RuntimeWarning, match="'compiled' backend failed"):
            y, code = impl_compiled.COMPILED.forward(x, name, params)
            got = impl_compiled.COMPILED.backward(go, y, code, name, params)
    finally:
        impl_compiled.kernels.cache_clear()  # their failed compiles are this test's alone
    y_eager, code_eager = torch.ops.invact.forward(x, name, params, "eager")
    assert torch.equal(y, y_eager) and torch.equal(code, code_eager)
    assert torch.equal(got, torch.ops.invact.backward(go, y, code, name, params, "eager"))


@pytest.mark.parametrize("make, argument", [
    (lambda x: invact.Softplus(beta=[2]), "beta"),
    (lambda x: invact.Softplus(beta="2"), "beta"),           # torch.nn.Softplus takes no text either
    (lambda x: invact.LeakyReLU(None), "negative_slope"),
    (lambda x: invact.functional.elu(x, 1j), "alpha"),
    (lambda x: invact.functional.elu(x, torch.tensor(1j)), "alpha"),     # float() raised RuntimeError
    (lambda x: invact.functional.celu(x, torch.ones(2)), "alpha"),
    (lambda x: invact.functional.layer_norm(x.reshape(2, 2), (2,), None, None, "1e-5"), "eps"),
    (lambda x: invact.functional.rms_norm(x.reshape(2, 2), (2,), None, [1e-5]), "eps"),
])
def test_a_parameter_that_is_not_a_real_number_is_named(make, argument):
    """A parameter that is not a real number (text, a list, None, complex) is refused with a ParamError
    (a ValueError) naming it, not float()'s TypeError that names nothing, and never converted from text."""
    with pytest.raises(ParamError, match=f"^{argument} must be a real number, got") as info:
        make(torch.randn(4))
    assert info.value.argument == argument


def test_a_parameter_that_requires_grad_is_refused_not_dropped():
    """A learnable tensor as a parameter (ELU's alpha, a module's beta set to an nn.Parameter) would be read
    as a float and get no gradient, silently; torch.nn.functional refuses it too (alpha must be a Number).
    Refused with a ParamError naming it at every entry point; a tensor that needs no gradient still works."""
    x = torch.randn(8, requires_grad=True)
    p = torch.nn.Parameter(torch.tensor(1.5))
    softplus = invact.Softplus()
    softplus.beta = torch.nn.Parameter(torch.tensor(2.0))
    for call, argument in ((lambda: IF.elu(x, alpha=p), "alpha"), (lambda: softplus(x), "beta"),
                           (lambda: invact.activation("leaky_relu", negative_slope=p), "negative_slope")):
        with pytest.raises(ParamError, match=f"{argument}'? is a tensor that requires grad.*p.detach") as info:
            call()
        assert argument in info.value.argument
    assert p.grad is None
    y = IF.elu(x, alpha=p.detach())
    torch.testing.assert_close(y, torch.nn.functional.elu(x, alpha=1.5), rtol=0, atol=0)


def test_softplus_threshold_whose_jump_is_visible_is_refused():
    """torch's softplus jumps down at beta x = threshold (from log1p(e^t) / beta to t / beta): y in the
    overlap comes from both pieces, and a gradient from y alone is off by up to 1 / (1 + e^t) there
    (0.27 at t = 1). invact takes threshold >= 18 (1.5e-8: below float32's half ulp of 1, so its float32
    gradient is torch's rounding there) and refuses less, naming the argument, at every entry point;
    patch leaves such a module with the reason, and the functional route leaves the call to torch."""
    for make in (lambda: invact.Softplus(beta=1.0, threshold=5.0),
                 lambda: IF.softplus(torch.randn(4, requires_grad=True), 1.0, 17.5),
                 lambda: invact.activation("softplus", threshold=1.0)):
        with pytest.raises(ParamError, match="threshold >= 18"):
            make()
    invact.Softplus(threshold=18.0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Softplus(threshold=5.0), torch.nn.Linear(4, 4))
    report = invact.patch(model)
    assert not report.replaced and "threshold >= 18" in str(report)
    x = torch.linspace(-3, 8, 64, requires_grad=True)
    with invact.route_functional() as router:
        (routed,) = torch.autograd.grad(torch.nn.functional.softplus(x, 1.0, 1.0).sum(), x)
    (torch_grad,) = torch.autograd.grad(torch.nn.functional.softplus(x, 1.0, 1.0).sum(), x)
    assert not sum(router.routed.values()) and torch.equal(routed, torch_grad)
