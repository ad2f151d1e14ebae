"""The custom ops (invact.ops) over every generated activation: opcheck, gradients, compile, memory."""

import ast
import math
from pathlib import Path

import mpmath
import numpy as np
import pytest
import sympy
import torch
import torch.nn.functional as F

import invact
import tolerances as tol
from invact import backends, bitpack, impl_eager, ops, registry

NAMES = ops.names()   # every table; a test taking `name` runs over each (the fixture in conftest.py)
pytestmark = pytest.mark.skipif(not NAMES, reason="no generated activations (run `invact generate`)")
EAGER = "eager"
table = tol.table


def torch_reference(name: str, x: torch.Tensor) -> torch.Tensor:
    """PyTorch's own forward of the activation (META torch_forward); user tables without one skip."""
    ref = tol.torch_reference(name, x)
    if ref is None:
        pytest.skip("user table without a PyTorch forward")
    return ref


def sample_x(name: str, n: int = 6000, seed: int = 0) -> torch.Tensor:
    """float64 inputs over [-10, 10], dense near 0, plus the forward-code breaks and their neighbours."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.linspace(-10, 10, n // 2, dtype=torch.float64),
                   torch.randn(n // 2, generator=g, dtype=torch.float64) * 2])
    for b in table(name)["forward_code"]["x_breaks"]:
        v = float(eval(str(b["value"]), {"__builtins__": {}}, dict(table(name)["params"])))  # noqa: S307
        x = torch.cat([x, v + torch.linspace(-1e-3, 1e-3, 41, dtype=torch.float64)])
    return x


# ------------------------------------------------------------------------------------------------
# forward

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_forward_bitwise_equal_to_pytorch(name, dtype):
    x = sample_x(name).to(dtype)
    assert torch.equal(ops.apply(x, name, backend=EAGER), torch_reference(name, x))


def test_opcheck(name):
    x = torch.randn(3, 5, dtype=torch.float32, requires_grad=True)
    params = [float(v) for v in ops.info(name)["params"].values()]
    torch.library.opcheck(torch.ops.invact.forward.default, (x, name, params, EAGER))
    y, code = torch.ops.invact.forward(x.detach(), name, params, EAGER)
    torch.library.opcheck(torch.ops.invact.backward.default, (torch.randn_like(y), y, code, name, params, EAGER))


# ------------------------------------------------------------------------------------------------
# gradients: end to end against PyTorch autograd on x

# floor, references and bounds: tests/tolerances.py (shared with test_properties and benchmarks/fuzz.py)
information_floor, _derivative64 = tol.information_floor, tol.derivative64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradient_parity(name, dtype):
    """|ours - go f'(x)| <= |go| (floor + approximation + float32 evaluation) + rounding of the result
    (tests/tolerances.py, gradient_bound, derives each term):

    - floor: the information floor per element (see information_floor); docs/floors.md's table gives its
      size: GELU bf16 1.56e-2, fp16 6.57e-3, fp32 4.31e-5 near the branch point, ~1e-4 elsewhere.
    - approximation + float32 evaluation: the table's certificate (approx_error, float32_eval_error),
      relative where |f'| > 1; 4 float32 ulps of |f'| + 1 more for libm differences (torch.sqrt is
      not correctly rounded on CPU).
    - rounding: g * grad_out is computed in float32 then rounded once to dtype: half an ulp of the
      result in dtype (plus the float32 rounding of the product).
    """
    x = sample_x(name).to(dtype).requires_grad_()
    y = ops.apply(x, name, backend=EAGER)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    y.backward(go)
    x64, go64, y64 = x.detach().double().numpy(), go.double().numpy(), y.detach().double().numpy()
    ours = x.grad.double().numpy()
    exact, bound, floor = tol.gradient_bound(name, dtype, x64, y64, go64, ours)
    err = np.abs(ours - exact)
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (f"x={x64[worst]!r} y={y64[worst]!r} err={err[worst]:.3g} "
                                  f"bound={bound[worst]:.3g} floor={floor[worst]:.3g}")


def _exact_route(name: str) -> bool:
    return all(b["route"] in ("exact", "constant") for b in table(name)["branches"])


def test_float64_gradients(name):
    """float64: exact-route tables pass torch.autograd.gradcheck; fitted ones match float64 autograd.

    Fitted tables approximate g to the certified approx_error (<= ~5e-8), so finite differences
    (gradcheck's atol 1e-5 would hide little) are replaced by a direct comparison with PyTorch's float64
    autograd at atol = approx_error + 1e-9 (float64 evaluation of float32 coefficients, and the
    float64 information floor ~sqrt(2 f'' 1e-17) ~ 3e-9 next to a branch point is below that).
    """
    x = sample_x(name, n=200).requires_grad_()
    if _exact_route(name):
        x = (x[(x - x.round()).abs() > 1e-3] * 0.97).detach().requires_grad_()  # away from kinks
        assert torch.autograd.gradcheck(lambda v: ops.apply(v, name, backend=EAGER), (x,))
        return
    ops.apply(x, name, backend=EAGER).sum().backward()
    want = _derivative64(name, x.detach().numpy())
    floor = information_floor(name, x.detach().numpy(), ops.apply(x.detach(), name, backend=EAGER).numpy())
    atol = table(name)["certificate"]["approx_error"] + 1e-9 + floor
    assert np.all(np.abs(x.grad.numpy() - want) <= atol)


# ------------------------------------------------------------------------------------------------
# shapes, layouts, dtypes, errors

@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (7,), (3, 5, 2)])
def test_shapes(name, shape):
    x = torch.randn(shape, dtype=torch.float32, requires_grad=True)
    y = ops.apply(x, name, backend=EAGER)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_memory_formats_and_strides(name):
    """y keeps PyTorch's layout; the code follows y's memory order; backward is layout-independent."""
    base = torch.randn(2, 3, 4, 5)
    params = [float(v) for v in ops.info(name)["params"].values()]
    for x in (base.to(memory_format=torch.channels_last), base[:, :, ::2, 1:], base.transpose(1, 3)):
        y, code = torch.ops.invact.forward(x, name, params, EAGER)
        ref = torch_reference(name, x)
        assert y.stride() == ref.stride() and torch.equal(y, ref)
        _, code_c = torch.ops.invact.forward(x.contiguous(), name, params, EAGER)
        go = torch.randn_like(y)
        got = torch.ops.invact.backward(go, y, code, name, params, EAGER)
        want = torch.ops.invact.backward(go.contiguous(), y.contiguous(), code_c, name, params, EAGER)
        assert got.stride() == y.stride()
        # same y values and codes; torch's float32 sqrt is not correctly rounded and its result
        # depends on the element's position (vector body vs tail): a few float32 ulps
        torch.testing.assert_close(got, want, rtol=4 * 2.0**-23, atol=4 * 2.0**-24)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_inputs_raise_type_error(dtype):
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        ops.apply(torch.zeros(3, dtype=dtype), NAMES[0])


def test_unknown_name_and_backend():
    with pytest.raises(ValueError, match="known: " + NAMES[0]):
        ops.apply(torch.zeros(3), "no_such_activation")
    with pytest.raises(ValueError, match="unknown activation"):
        ops.info("no_such_activation")
    with pytest.raises(ValueError, match="backend must be one of triton, compiled, eager"):
        ops.apply(torch.zeros(3), NAMES[0], backend="cuda")


def test_unavailable_backend_names_argument(monkeypatch):
    monkeypatch.setattr(backends, "available", lambda device_type: ["eager"])
    with pytest.raises(ValueError, match=r"backend='compiled' is not available for cpu tensors; available: eager"):
        ops.apply(torch.zeros(3), NAMES[0], backend="compiled")
    monkeypatch.setenv(backends.ENV, "triton")
    with pytest.raises(ValueError, match="INVACT_BACKEND='triton' is not available"):
        ops.apply(torch.zeros(3), NAMES[0])


def test_params(name):
    meta = ops.info(name)
    with pytest.raises(ValueError, match="not a parameter"):
        ops.apply(torch.zeros(3), name, params={"no_such_param": 1.0})
    for key, value in meta["params"].items():
        changed = {**meta["params"], key: value * 1.5 + 0.25}
        if not meta["param_generic"]:
            with pytest.raises(ValueError, match=f"invact fit {name} --param {key}="):
                ops.apply(torch.zeros(3), name, params=changed)
            continue
        x = torch.randn(100, dtype=torch.float64)  # a generic table follows the parameters
        got = ops.apply(x, name, params=changed, backend=EAGER)
        read = {n.id for n in ast.walk(ast.parse(meta["torch_forward"], mode="eval")) if isinstance(n, ast.Name)}
        if key in read:   # PyTorch's own function of the parameters: its bits
            want = eval(meta["torch_forward"], {"F": F, "torch": torch, "x": x, **changed})  # noqa: S307
            assert torch.equal(got, want)
        else:             # F.selu fixes alpha and scale: the formula, to float64 rounding (4 ulps)
            symbols = {n: sympy.Symbol(n, real=True) for n in ("x", *changed)}
            f = sympy.lambdify(symbols["x"], sympy.sympify(meta["formula"], locals=symbols).subs(
                {symbols[k]: v for k, v in changed.items()}), modules="mpmath")
            with mpmath.workdps(40):
                want = torch.tensor([float(f(mpmath.mpf(float(v)))) for v in x], dtype=torch.float64)
            assert ((got - want).abs() <= 4 * torch.finfo(torch.float64).eps * want.abs()).all()
        if meta["param_domain"]:
            with pytest.raises(ValueError, match="needs"):
                ops.apply(x, name, params={key: -abs(value) - 1.0}, backend=EAGER)


def test_in_place_change_of_saved_output_is_caught(name):
    x = torch.randn(10, requires_grad=True)
    y = ops.apply(x, name, backend=EAGER)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("backend", ["compiled", "triton"])
def test_plain_training_path_equals_the_custom_ops(name, backend):
    """apply's direct autograd path (plain eager tensors, every backend: Triton's under the interpreter
    here) is the one taken, gives the custom ops' y and gradient bit for bit, and saves the same two
    tensors (y and the code)."""
    if backend not in backends.available("cpu"):
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1")
    params = [float(v) for v in ops.info(name)["params"].values()]
    x = torch.randn(1000, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        saved = []
        y = ops.apply(x, name, backend=backend)
    assert type(y.grad_fn).__name__ == "_DirectBackward"
    go = torch.randn(1000)
    (gx,) = torch.autograd.grad(y, x, go)
    y_op, code = torch.ops.invact.forward(x.detach(), name, params, backend)
    assert torch.equal(y, y_op) and len(saved) == 2 and torch.equal(saved[1], code)
    assert torch.equal(gx, torch.ops.invact.backward(go, y_op, code, name, params, backend))


def test_double_backward_raises_clearly():
    x = torch.randn(10, requires_grad=True)
    (g,) = torch.autograd.grad(ops.apply(x, NAMES[0], backend=EAGER).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_autocast_runs_in_input_dtype(name):
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        y = ops.apply(h, name, backend=EAGER)
    assert h.dtype == y.dtype == torch.bfloat16
    assert torch.equal(y, ops.apply(h.detach(), name, backend=EAGER))
    y.float().sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


# ------------------------------------------------------------------------------------------------
# memory: exactly y and the packed code are saved

def _saved_bytes(fn, params=()) -> tuple[int, list[torch.Tensor], object]:
    """Bytes of tensors saved for backward by fn(), de-duplicated by storage (parameters apart)."""
    seen, kept = {}, []
    skip = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), kept, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_only_output_and_code(name, dtype):
    x = torch.randn(64, 129, dtype=dtype, requires_grad=True)
    nbytes, kept, y = _saved_bytes(lambda: ops.apply(x, name, backend=EAGER))
    bits = ops.info(name)["code_bits"]
    assert nbytes == y.numel() * y.element_size() + math.ceil(y.numel() * bits / 8)
    assert any(t is y or t.data_ptr() == y.data_ptr() for t in kept)
    nothing, _, _ = _saved_bytes(lambda: ops.apply(x.detach(), name, backend=EAGER))
    assert nothing == 0


def test_linear_act_linear_saved_bytes(name):
    """Linear(256,1024) -> act -> Linear(1024,256) on (64,256) fp32 keeps x, y and the code only."""
    torch.manual_seed(0)
    l1, l2 = torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)
    x = torch.randn(64, 256)
    nbytes, _, _ = _saved_bytes(lambda: l2(ops.apply(l1(x), name, backend=EAGER)).sum(),
                                 [*l1.parameters(), *l2.parameters()])
    bits = ops.info(name)["code_bits"]
    assert nbytes == 64 * 256 * 4 + 64 * 1024 * 4 + math.ceil(64 * 1024 * bits / 8)


# ------------------------------------------------------------------------------------------------
# torch.compile (slow: a few activations only)

def _compile_names() -> list[str]:
    fitted = [n for n in NAMES if not all(b["route"] in ("exact", "constant") for b in table(n)["branches"])]
    return sorted(set(fitted[:1] + NAMES[:1]))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_compile_fullgraph_matches_eager(backend):
    for act in _compile_names():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
        x = torch.randn(5, 16)

        def run(inp):
            return model[1](ops.apply(model[0](inp), act, backend=backend)).square().sum()

        grads = []
        for fn in (run, torch.compile(run, fullgraph=True)):
            model.zero_grad()
            fn(x).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # matmul order may differ when compiled


@pytest.mark.slow
def test_compiled_backend_matches_eager_backend():
    """The compiled backward is the same float32 scheme (inductor may contract to FMA: a few ulps)."""
    act = _compile_names()[-1]
    x = sample_x(act, n=2000).float()
    y, code = torch.ops.invact.forward(x, act, [float(v) for v in ops.info(act)["params"].values()], "eager")
    params = [float(v) for v in ops.info(act)["params"].values()]
    yc, codec = torch.ops.invact.forward(x, act, params, "compiled")
    assert torch.equal(y, yc) and torch.equal(code, codec)
    go = torch.randn_like(y)
    a = torch.ops.invact.backward(go, y, code, act, params, "eager")
    b = torch.ops.invact.backward(go, y, code, act, params, "compiled")
    torch.testing.assert_close(a, b, rtol=4 * 2.0**-23, atol=4 * 2.0**-24)


def test_eager_chunks_across_bit_planes(name, monkeypatch):
    """Large tensors run the eager backward in chunks within bit planes: same result as one chunk."""
    x = sample_x(name, n=1000).float()
    params = [float(v) for v in ops.info(name)["params"].values()]
    y, code = torch.ops.invact.forward(x, name, params, EAGER)
    go = torch.randn_like(y)
    whole = torch.ops.invact.backward(go, y, code, name, params, EAGER)
    monkeypatch.setattr(impl_eager, "CHUNK", 48)
    # torch's sqrt rounding depends on the position within a vector: compare to a few ulps
    torch.testing.assert_close(torch.ops.invact.backward(go, y, code, name, params, EAGER), whole,
                               rtol=4 * 2.0**-23, atol=4 * 2.0**-24)


def test_eager_chunk_size_by_device():
    """CPU chunks stay in cache; elsewhere each op is a kernel launch, so chunks are larger (the GPU
    check, tests/test_cuda.py::test_eager_backend_on_gpu, runs them)."""
    assert impl_eager.chunk_size(torch.empty(1)) == impl_eager.CHUNK < impl_eager.DEVICE_CHUNK
    assert impl_eager.chunk_size(torch.empty(1, device="meta")) == impl_eager.DEVICE_CHUNK


def test_use_root_loads_activations_from_another_tree(tmp_path, monkeypatch):
    """invact.use_root(ROOT): ROOT/generated (what `invact fit --root ROOT` writes) wins over the
    installed tables; a root without generated code is refused naming the folder."""
    import shutil

    import invact.generated as pkg
    src = Path(pkg.__file__).parent
    shutil.copytree(src, tmp_path / "generated", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pkg, "__path__", list(pkg.__path__))
    try:
        invact.use_root(tmp_path)
        assert Path(registry.module("tanh").__file__).is_relative_to(tmp_path)
        x = torch.randn(50, requires_grad=True)
        invact.functional.tanh(x).sum().backward()
        torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)
    finally:
        monkeypatch.undo()
        invact.use_root(src.parent)  # back to the installed tree (its generated/ is src)
    assert Path(registry.module("tanh").__file__).parent == src
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        invact.use_root(tmp_path / "nowhere")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_eager_16_bit_lookup_table_is_g_kernel(name, dtype):
    """The eager (and compiled C) backward of 16-bit y gathers g from a table that the generated
    g_kernel filled for every 16-bit y and code. Checked against g_kernel on sample y in float32:
    bit for bit for tables of polynomial pieces (only correctly rounded float32 arithmetic); within
    4 float32 ulps where closed forms call torch.exp/log/sqrt/erf/tanh, which MKL evaluates to about
    an ulp with results that depend on an element's position in the tensor."""
    mod = registry.module(name)
    params = [float(v) for v in ops.info(name)["params"].values()]
    y, code = torch.ops.invact.forward(sample_x(name).to(dtype), name, params, EAGER)
    codes = bitpack.unpack(code, mod.CODE_BITS, y.numel()) if mod.CODE_BITS else torch.zeros_like(y, dtype=torch.int32)
    lut = impl_eager.lookup_table(mod, dtype, tuple(params), torch.device("cpu"))
    got = lut[(y.view(torch.int16).to(torch.int32) & 0xFFFF) | (codes << 16)]
    k = ops.module_constants(mod, dtype, torch.device("cpu"), tuple(params))
    want = mod.g_kernel(y, codes if mod.CODE_BITS else None, k.y_thresholds, k.poly, **k.params)
    exact = getattr(mod, "FUSED_CPU", False)
    tol = 0 if exact else 4 * 2.0**-23
    torch.testing.assert_close(got, want, rtol=tol, atol=tol / 2, equal_nan=True)
    go = torch.randn_like(y)
    torch.testing.assert_close(torch.ops.invact.backward(go, y, code, name, params, EAGER), (got * go).to(dtype),
                               rtol=0, atol=0, equal_nan=True)


def _where_of_a_parameter(y, *, a=1.0, s=1.0):
    """SELU's g in miniature: a parameter both in arithmetic and alone in a torch.where."""
    return torch.where(y > 0, s, a * s + y)


def test_compiled_code_follows_every_parameter_value():
    """backends.compiled with floats that change between calls: torch 2.13 made such a float dynamic
    and baked its traced value into the torch.where (the third call returned the second's s: SELU's
    compiled backward kept a stale scale with the C kernels off). Floats are specialised constants,
    guarded: each call gives the eager function's bits."""
    torch._dynamo.reset()
    fn = backends.compiled(_where_of_a_parameter)
    y = torch.tensor([1.0, -1.0, 2.5], dtype=torch.float64)
    for a, s in ((2.0, 1.05), (1.67, 0.5), (0.25, 3.0), (2.0, 1.05)):
        assert torch.equal(fn(y, a=a, s=s), _where_of_a_parameter(y, a=a, s=s)), (a, s)
