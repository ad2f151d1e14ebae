"""Generated Triton kernels (run by Triton's CPU interpreter here) against the torch backend.

The interpreter runs kernels element by element in numpy; it reports neither ignored strides nor
out-of-bounds accesses, so ragged sizes and non-contiguous inputs are compared with torch explicitly.
"""


import pytest
import torch

from invact import backends, bitpack, impl_triton, layout, ops, registry
from triton_tolerances import default_params, formula_error, is_fitted, needs_interpreter, within

NAMES = ops.names()   # every table; a test taking `name` runs over each (the fixture in conftest.py)
pytestmark = [
    pytest.mark.skipif(not NAMES, reason="no generated activations"),
    needs_interpreter,
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 7, 1023, 1024, 2 * 1024 + 9]


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_torch(name, dtype):
    """y: Triton evaluates the formula in float32 (its erf/exp/tanh differ from ATen's by a few
    float32 ulps; tanh is Cephes' tanhf in tl operations), then rounds to dtype. Formulas like
    x (1 + erf(z)) / 2 cancel for x << 0, so the float32 error is absolute: a few ulps of 1 times max(1, |x|); we allow
    16 * 2**-24 * max(1, |x|) plus 8 float32 ulps of |y|. bf16: the interpreter TRUNCATES float32 ->
    bf16 (docs/floors.md) where torch rounds to nearest, so one bf16 ulp, two with the float32 difference
    crossing a rounding boundary; fp16 likewise 2 ulps. The reference for narrow dtypes is PyTorch's
    forward in float32 rounded once to dtype (what the kernel computes): PyTorch's own bf16 forward of
    a compound expression (x * sigmoid(1.702 x)) rounds after every op. The packed code must be
    identical."""
    g = torch.Generator().manual_seed(0)
    for n in SIZES:
        x = (torch.randn(n, generator=g) * 4).to(dtype)
        y_t, c_t = torch.ops.invact.forward(x, name, default_params(name), "triton")
        _, c_e = torch.ops.invact.forward(x, name, default_params(name), "eager")
        y_e = torch.ops.invact.forward(x.float(), name, default_params(name), "eager")[0].to(dtype)
        assert torch.equal(c_t, c_e), (name, n)
        ulps = 8 if dtype == torch.float32 else 2
        assert within(y_t, y_e, ulps, formula_error(x)), (name, dtype, n, (y_t.double() - y_e.double()).abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_torch(name, dtype):
    """Same y and code in, grad_in out. Fitted tables (every segment a polynomial row): both run the
    float32 scheme operation for operation (correctly rounded sqrt, invact's own log, no FMA), so
    float32 and float16 gradients are equal bit for bit; bfloat16 too but for the final rounding,
    which the interpreter truncates (docs/floors.md): one bf16 ulp. Closed forms: the interpreter's
    exp/log differ from torch's by ulps: 8 float32 ulps of |g go| plus |go| 2**-21 absolute (the
    cancelling last step of the scheme); narrow dtypes: one ulp for the final rounding plus that."""
    g = torch.Generator().manual_seed(1)
    fitted = is_fitted(name)
    for n in SIZES:
        x = (torch.randn(n, generator=g) * 4).to(dtype)
        y, code = torch.ops.invact.forward(x, name, default_params(name), "eager")
        go = torch.randn(n, generator=g).to(dtype)
        a = torch.ops.invact.backward(go, y, code, name, default_params(name), "triton")
        b = torch.ops.invact.backward(go, y, code, name, default_params(name), "eager")
        if fitted and dtype != torch.bfloat16:
            assert torch.equal(a, b) and torch.equal(a.isnan(), b.isnan()), (name, dtype, n)
            continue
        ulps = (1 if fitted else 2) if dtype != torch.float32 else 8
        floor = 0.0 if fitted else go.double().abs() * 2.0**-21
        assert within(a, b, ulps, floor), (name, dtype, n, (a - b).abs().max())


def test_non_contiguous_and_autograd(name):
    """Strided and channels-last inputs: same layout, values and codes as the torch backend; the
    backward through apply() equals the backward op on the same (y, code) (tolerances as above)."""
    base = torch.randn(2, 6, 5, 7)
    params = default_params(name)
    for x in (base[:, ::2, :, 1:], base.to(memory_format=torch.channels_last), base.transpose(0, 2)):
        yt, ct = torch.ops.invact.forward(x, name, params, "triton")
        ye, ce = torch.ops.invact.forward(x, name, params, "eager")
        assert yt.stride() == ye.stride() and torch.equal(ct, ce)
        assert within(yt, ye, 8, formula_error(x))
        xt = x.detach().requires_grad_()
        y = ops.apply(xt, name, backend="triton")
        go = torch.randn_like(y)
        y.backward(go)
        assert torch.equal(xt.grad, torch.ops.invact.backward(go, yt, ct, name, params, "triton"))
        assert within(xt.grad, torch.ops.invact.backward(go, yt, ct, name, params, "eager"), 8,
                       go.abs() * 2.0**-21)


@pytest.mark.parametrize("n", [1031])
def test_many_programs_give_one_programs_results(name, n):
    """Launched with a small block, the kernels run many programs (the last one ragged, and with a
    code each covers `block` bytes of every bit plane): the same y, code and gradient as one program."""
    params = default_params(name)
    mod = registry.triton_module(name)
    k = ops.table_constants(name, torch.float32, "cpu")
    x = torch.randn(n, generator=torch.Generator().manual_seed(2)) * 4
    go = torch.randn(n, generator=torch.Generator().manual_seed(3))
    results = []
    for block in (64, 4096):
        y, code = torch.empty_like(x), layout.empty_code(x, registry.module(name).CODE_BITS)
        mod.forward(x, y, code, k.x_threshold_tensor, params, block=block)
        gx = torch.empty_like(x)
        mod.backward(go, y, code, gx, k.y_thresholds, k.poly, params, block=block)
        results.append((y, code, gx))
    for a, b in zip(*results):
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_empty_and_fp64_fall_back():
    name = NAMES[0]
    x = torch.zeros(0)
    assert ops.apply(x, name, backend="triton").shape == (0,)
    x64 = torch.randn(10, dtype=torch.float64)
    assert torch.equal(ops.apply(x64, name, backend="triton"), ops.apply(x64, name, backend="eager"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_special_values_match_torch(name, dtype):
    """NaN, +-inf, +-0 and the largest values: the same code as the torch backend (a NaN x takes the
    code torch's comparison gives it), and a gradient NaN exactly where torch's is, equal at
    infinities, within the backward tolerance above elsewhere (which covers the finite values that
    generated code gives at NaN y, Plan.nan_values: relu 1, leaky_relu its slope, hardswish 0)."""
    fi = torch.finfo(dtype)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, fi.max, -fi.max, 1.0, -1.0] * 3,
                     dtype=dtype)
    params = default_params(name)
    y, code = torch.ops.invact.forward(x, name, params, "eager")
    assert torch.equal(torch.ops.invact.forward(x, name, params, "triton")[1], code)
    go = torch.linspace(-2, 2, x.numel()).to(dtype)
    a = torch.ops.invact.backward(go, y, code, name, params, "triton")
    b = torch.ops.invact.backward(go, y, code, name, params, "eager")
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[a.isinf()], b[a.isinf()]), (name, a, b)
    ok = torch.isfinite(a)
    assert torch.equal(ok, torch.isfinite(b)) and within(a[ok], b[ok], 8, go[ok].double().abs() * 2.0**-21)


def test_launches_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device, not its arguments' device: both ops make the
    tensors' device current around the launch (on CPU tensors the guard does nothing)."""
    import contextlib
    name = NAMES[0]
    assert isinstance(impl_triton.device_guard(torch.device("cpu")), contextlib.nullcontext)
    guard = impl_triton.device_guard(torch.device("cuda", 1))  # constructing it needs no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    seen = []
    real = impl_triton.device_guard
    monkeypatch.setattr(impl_triton, "device_guard", lambda device: seen.append(device) or real(device))
    x = torch.randn(10, requires_grad=True)
    ops.apply(x, name, backend="triton").sum().backward()
    assert seen == [x.device, x.device]


def test_a_failing_kernel_falls_back_with_one_warning(monkeypatch):
    """A Triton kernel that does not build or launch: one RuntimeWarning naming the error and the
    backend used instead, the same values as that backend, and Triton is not tried again."""
    import warnings

    from invact import backends
    monkeypatch.setattr(backends, "_broken", set())
    name = NAMES[0]
    mod = registry.triton_module(name)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel image for this device")
    monkeypatch.setattr(mod, "forward", broken)
    monkeypatch.setattr(mod, "backward", broken)
    instead = backends.instead_of_triton("cpu")
    x = torch.randn(100, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=f"'triton' backend failed.*no kernel image.*the {instead} backend"):
        y = ops.apply(x, name, backend="triton")
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        y.backward(torch.ones_like(y))
        y2 = ops.apply(x, name, backend="triton")
    assert not [w for w in later if "backend failed" in str(w.message)]
    assert calls == [1]
    assert backends.resolve("triton", "cpu") == instead
    x_ref = x.detach().clone().requires_grad_()
    y_ref = ops.apply(x_ref, name, backend=instead)
    y_ref.backward(torch.ones_like(y_ref))
    assert torch.equal(y, y_ref) and torch.equal(y2, y_ref) and torch.equal(x.grad, x_ref.grad)


def test_norm_kernels_launch_guarded_and_fall_back_once(monkeypatch):
    """invact.norms launches its Triton kernels as the activations do (impl_triton.launched): inside
    the tensors' device guard (which restores the caller's current device; no torch.cuda.set_device),
    and a kernel that fails warns once and leaves the torch code's values."""
    import warnings

    from invact import norm_triton, norms
    monkeypatch.setattr(backends, "_broken", set())
    seen = []
    real = impl_triton.device_guard
    monkeypatch.setattr(impl_triton, "device_guard", lambda device: seen.append(device) or real(device))
    x = torch.randn(6, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    norms.layer_norm(x, (40,), w, None, backend="triton").sum().backward()
    assert seen == [x.device, x.device]

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this device")
    monkeypatch.setattr(norm_triton, "forward", broken)
    monkeypatch.setattr(norm_triton, "backward", broken)
    x.grad = w.grad = None
    with pytest.warns(RuntimeWarning, match="'triton' backend failed.*no kernel image"):
        y = norms.layer_norm(x, (40,), w, None, backend="triton")
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        y.sum().backward()
    assert not [m for m in later if "backend failed" in str(m.message)]
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = norms.layer_norm(xr, (40,), wr, None, backend="eager")
    y_ref.sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(x.grad, xr.grad) and torch.equal(w.grad, wr.grad)


def test_16_bit_backward_is_the_eager_lookup(name, monkeypatch):
    """16-bit y: the kernel gathers g from the table of every 16-bit y and code that the eager
    g_kernel filled (invact.impl_eager.lookup_table), for closed forms and fitted tables alike, so
    float16 gradients equal the eager backend's bit for bit (one float32 product, rounded once);
    bfloat16 within the one ulp of the interpreter's truncating conversion (docs/floors.md), where the
    result is a normal number (the interpreter's conversion of subnormal products is not even that; a
    GPU's cvt.rn.bf16.f32 is, tests/test_cuda.py). Every code
    class and y's every 16-bit pattern; 8 planes' worth of ragged elements."""
    calls = []
    from invact import act_triton
    original = act_triton.lut_backward
    monkeypatch.setattr(act_triton, "lut_backward", lambda *a, **k: calls.append(1) or original(*a, **k))
    params, bits = default_params(name), registry.module(name).CODE_BITS
    for dtype in (torch.float16, torch.bfloat16):
        y = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)[:65531]
        codes = torch.randint(0, max(1, registry.module(name).META["n_codes"]), y.shape,
                              generator=torch.Generator().manual_seed(5), dtype=torch.int32)
        code = bitpack.pack(codes, bits) if bits else layout.empty_code(y, 0)
        go = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
        a = torch.ops.invact.backward(go, y, code, name, params, "triton")
        b = torch.ops.invact.backward(go, y, code, name, params, "eager")
        assert torch.equal(a.isnan(), b.isnan()), (name, dtype)
        ok = ~a.isnan()
        if dtype == torch.float16:
            assert torch.equal(a[ok].view(torch.int16), b[ok].view(torch.int16)), (name, dtype)
        else:  # the interpreter's float32 -> bfloat16 conversion of subnormal products is not a rounding
            fin = ok & a.isfinite()  # (0.6289 * 9.18e-41 gave 3.03e-39): normal results only
            normal = fin & (b.double().abs() >= torch.finfo(dtype).tiny)
            assert torch.equal(a[ok & ~fin], b[ok & ~fin]) and within(a[normal], b[normal], 1, 0.0), (name, dtype)
    assert len(calls) == 2


def test_wide_codes_keep_the_scheme(monkeypatch):
    """Codes wider than impl_triton.LUT_MOST_BITS (a table of 2^(16 + bits) floats) run the table's
    float32 scheme instead: no lookup."""
    name = next(n for n in NAMES if registry.module(n).CODE_BITS)
    monkeypatch.setattr(impl_triton, "LUT_MOST_BITS", 0)
    monkeypatch.setattr("invact.act_triton.lut_backward", lambda *a, **k: pytest.fail("the lookup ran"))
    y, code = torch.ops.invact.forward(torch.randn(100).to(torch.float16), name, default_params(name), "eager")
    g = torch.ops.invact.backward(torch.ones_like(y), y, code, name, default_params(name), "triton")
    assert torch.isfinite(g).all()
