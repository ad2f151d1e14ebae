"""The generated Triton kernels on a CUDA GPU (skipped without one; run with TRITON_INTERPRET=0).

    TRITON_INTERPRET=0 python -m pytest tests/test_cuda.py      (benchmarks/gpu_check.sh runs it)

Tolerances as in tests/test_triton.py, whose interpreter runs the same kernels on the CPU. Built with
enable_fp_fusion=False, correctly rounded division and square roots and invact's own float32 log
(tests/test_triton_offline.py checks the PTX), a fitted table's float32 backward on the GPU is the FMA scheme
(docs/table-format.md: its tl.fma steps fused, nothing else) operation for operation, so it equals the
fitter's exact emulation of that scheme bit for bit (the interpreter, whose tl.fma rounds twice, gives
the scheme without FMA: the CPU eager backward's bits). 16-bit y gather g from the table the CPU eager
code filled: the CPU eager backward's bits.
"""

import os
import warnings

import pytest
import torch

import invact
from invact import backends, bitpack, impl_eager, impl_triton, ops, registry
from kernel_rows import table_edges
from norm_cases import check_kernel_case, kernel_case, run_norm
from triton_tolerances import default_params, formula_error, is_fitted, within

NAMES = ops.names()   # every table; a test taking `name` runs over each (the fixture in conftest.py)
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="set TRITON_INTERPRET=0: compiled kernels"),
    pytest.mark.skipif(not NAMES, reason="no generated activations"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 7, 1023, 1024, 3 * 1024 * 1024 + 9]


@pytest.fixture(autouse=True)
def triton_stays_on():
    """Fail a test after which Triton is off (impl_triton.launched gave up on a kernel that did not build
    or launch: one warning in the whole worker): every later 'triton' call would run the torch code and
    pass without testing a kernel."""
    assert "triton" not in backends._broken, "Triton was turned off before this test"
    yield
    assert "triton" not in backends._broken, "a Triton kernel failed to build or launch: the calls fell back"


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_on_gpu_matches_torch(name, dtype):
    """y within test_triton's tolerance of the torch backend on the same GPU (PyTorch's own forward);
    the packed code identical."""
    g = torch.Generator(device="cuda").manual_seed(0)
    params = default_params(name)
    for n in SIZES:
        x = (torch.randn(n, generator=g, device="cuda") * 4).to(dtype)
        y_t, c_t = torch.ops.invact.forward(x, name, params, "triton")
        y_e, c_e = torch.ops.invact.forward(x.float(), name, params, "eager")
        assert torch.equal(c_t, torch.ops.invact.forward(x, name, params, "eager")[1]), (name, n)
        ulps = 8 if dtype == torch.float32 else 1  # the GPU rounds float32 -> bf16/fp16 to nearest
        assert within(y_t, y_e.to(dtype), ulps, formula_error(x)), (name, dtype, n)


def _fma_scheme_backward(name: str, params: list[float], y, code, go):
    """grad * g(y, code) by the fitter's exact emulation of the FMA scheme (every segment of a fitted
    table is a POLY row), the product in float32 and rounded to go's dtype as the kernel stores it."""
    import numpy as np
    from invact.fitting import tables
    from invact.fitting.model import Table
    table = Table.from_json(tables.load_table(tables.table_path(name)))
    values = dict(zip(table.params, params))
    y32 = y.float().numpy()
    codes = bitpack.unpack(code, registry.module(name).CODE_BITS, y.numel()).numpy()
    g = np.empty_like(y32)
    for cc in table.code_classes:
        m = codes == cc.code
        g[m] = cc.evaluate(y32[m], values, fma=True)
    return (torch.from_numpy(g) * go.float()).to(go.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_on_gpu_matches_cpu_eager(name, dtype):
    """The same (y, code) in. 16-bit y: g is gathered from the table the CPU eager g_kernel filled
    (impl_triton.LUT_MOST_BITS), so every table's gradient equals the CPU eager backward's bit for bit.
    float32 y: the fitted tables' gradient equals the FMA scheme's (the fitter's emulation) bit for
    bit; closed forms (the GPU's exp/log differ by ulps) within test_triton's tolerance of the CPU
    eager backward."""
    g = torch.Generator(device="cuda").manual_seed(1)
    params = default_params(name)
    for n in SIZES:
        x = (torch.randn(n, generator=g, device="cuda") * 4).to(dtype)
        y, code = torch.ops.invact.forward(x, name, params, "triton")
        go = torch.randn(n, generator=g, device="cuda").to(dtype)
        a = torch.ops.invact.backward(go, y, code, name, params, "triton").cpu()
        b = torch.ops.invact.backward(go.cpu(), y.cpu(), code.cpu(), name, params, "eager")
        if dtype != torch.float32 and registry.module(name).CODE_BITS <= impl_triton.LUT_MOST_BITS:
            assert torch.equal(a.isnan(), b.isnan()), (name, dtype, n)
            assert torch.equal(a[~a.isnan()].view(torch.int16), b[~b.isnan()].view(torch.int16)), (name, dtype, n)
        elif is_fitted(name):
            want = _fma_scheme_backward(name, params, y.cpu(), code.cpu(), go.cpu())
            assert torch.equal(a.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               want.view(torch.int16 if dtype != torch.float32 else torch.int32)), (name, dtype, n)
        else:
            ulps = 8 if dtype == torch.float32 else 2
            assert within(a, b, ulps, go.cpu().double().abs() * 2.0**-21), (name, dtype, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_backend_on_gpu(name, dtype, monkeypatch):
    """Where Triton is missing (Windows) GPU tensors run the eager backend: in chunks of
    impl_eager.DEVICE_CHUNK elements (each op a kernel launch), with the CPU eager backward's gradient:
    bit for bit in bfloat16 (the same table of g, moved to the GPU), within test_triton's tolerance in
    float32 (the GPU's exp and log differ by ulps)."""
    sizes = []
    plane_chunks = bitpack.plane_chunks
    monkeypatch.setattr(bitpack, "plane_chunks",
                        lambda n, bits, size: sizes.append(size) or plane_chunks(n, bits, size))
    g = torch.Generator(device="cuda").manual_seed(2)
    params = default_params(name)
    x = (torch.randn(3 * impl_eager.DEVICE_CHUNK + 9, generator=g, device="cuda") * 4).to(dtype)
    y, code = torch.ops.invact.forward(x, name, params, "eager")
    go = torch.randn(x.shape, generator=g, device="cuda").to(dtype)
    a = torch.ops.invact.backward(go, y, code, name, params, "eager").cpu()
    assert sizes == [impl_eager.DEVICE_CHUNK]
    b = torch.ops.invact.backward(go.cpu(), y.cpu(), code.cpu(), name, params, "eager")
    if dtype != torch.float32:
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()].view(torch.int16),
                                                                 b[~b.isnan()].view(torch.int16)), name
    else:
        assert within(a, b, 8, go.cpu().double().abs() * 2.0**-21), name


@pytest.mark.parametrize("fitted", [n for n in NAMES if is_fitted(n)])
def test_fitted_backward_on_gpu_at_special_y(fitted):
    """float32 y where the segment search, u's clamp and NaN handling matter (each row's ends, a
    constant row's (inf - center) * 0 = NaN u at y = +-inf, which max.f32 would turn into the
    bound): the FMA scheme's bits (the fitter's emulation), NaN where it is NaN, for every code."""
    name, params = fitted, default_params(fitted)
    y = table_edges(name)
    bits = registry.module(name).CODE_BITS
    for c in range(1 << bits):
        code = bitpack.pack(torch.full(y.shape, c, dtype=torch.int64), bits)
        go = torch.ones_like(y)
        a = torch.ops.invact.backward(go.cuda(), y.cuda(), code.cuda(), name, params, "triton").cpu()
        want = _fma_scheme_backward(name, params, y, code, go)
        assert torch.equal(a.isnan(), want.isnan()), (name, c, y[a.isnan() != want.isnan()])
        same = a.isnan() | (a.view(torch.int32) == want.view(torch.int32))
        assert same.all(), (name, c, y[~same], a[~same], want[~same])


def test_autograd_channels_last_and_second_device(name):
    """apply() through autograd on a channels-last CUDA tensor, and on cuda:1 while cuda:0 is current
    (Triton launches on the current device: invact makes the tensor's current): the forward op's
    y and code, and the CPU eager backward of that y and code (tolerances as above)."""
    devices = ["cuda:0"] + (["cuda:1"] if torch.cuda.device_count() > 1 else [])
    params = default_params(name)
    for device in devices:
        base = torch.randn(4, 6, 5, 7, device=device).to(memory_format=torch.channels_last)
        x = base.clone().requires_grad_()
        y = ops.apply(x, name, backend="triton")
        y.backward(torch.ones_like(y))
        yt, ct = torch.ops.invact.forward(base, name, params, "triton")
        assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y.detach(), yt)
        ye = torch.ops.invact.forward(base.cpu(), name, params, "eager")[0]
        assert within(yt.cpu(), ye, 8, formula_error(base.cpu()))
        ge = torch.ops.invact.backward(torch.ones_like(ye), yt.cpu(), ct.cpu(), name, params, "eager")
        assert within(x.grad.cpu(), ge, 8, 2.0**-21)


def _cuda(t):
    return None if t is None else t.cuda()


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 67, 1030, 4099])
def test_norm_triton_on_gpu_within_the_bound(n, dtype, rms):
    """invact's layer_norm / rms_norm on the GPU (its Triton forward and backward, no fallback) against
    float64 autograd on the CPU, with the bound of the interpreter's test (tests/test_norms.py::
    test_triton_within_the_bound: norm_cases.check_kernel_case). Gamma with exact zeros and tiny
    values: kept columns go through the kernels."""
    x, w, b, dy = kernel_case(n, dtype, rms, rows=257)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # a fallback from Triton warns
        y, grads = run_norm(_cuda(x), _cuda(w), _cuda(b), _cuda(dy), rms, 1e-5, backend="triton")
    check_kernel_case(x, w, b, dy, y.cpu(), [t.cpu() for t in grads], rms, 1e-5, f"gpu {dtype} n={n}")


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_norm_on_gpu_saves_y_not_x(rms):
    """On the GPU too, autograd keeps y (the output tensor itself) and float32 rstd per row, not x."""
    x = torch.randn(8, 33, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    m = (invact.RMSNorm(33) if rms else invact.LayerNorm(33)).to("cuda", torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = m(x)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert y.untyped_storage().data_ptr() in ptrs and x.untyped_storage().data_ptr() not in ptrs
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.slow
def test_more_than_2_31_elements():
    """bfloat16 gelu on 2**31 + 4099 elements (64-bit offsets): the first and last elements' y, code
    and gradient equal those computed on their slices alone (about 20 GB of GPU memory)."""
    name, n, part = "gelu", 2**31 + 4099, 5000
    if name not in NAMES or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs gelu and 40 GiB of GPU memory")
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    slices = [slice(0, part), slice(n - part, n)]
    x_parts = [x[s].clone() for s in slices]
    y, code = torch.ops.invact.forward(x, name, [], "triton")
    del x
    go = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    grad = torch.ops.invact.backward(go, y, code, name, [], "triton")
    for s, x_part in zip(slices, x_parts):
        index = torch.arange(s.start, s.stop, device="cuda", dtype=torch.int64)
        byte, shift = bitpack.bit_position(index, 1, n)  # tensor arithmetic: the same formulas
        codes = (code[byte].to(torch.int32) >> shift.to(torch.int32)) & 1
        y_s, code_s = torch.ops.invact.forward(x_part, name, [], "triton")
        assert torch.equal(y[s], y_s) and torch.equal(codes, bitpack.unpack(code_s, 1, part))
        assert torch.equal(grad[s], torch.ops.invact.backward(go[s], y_s, code_s, name, [], "triton"))


@pytest.mark.parametrize("name", [n for n in ("softplus", "mish") if n in NAMES])
def test_softplus_and_mish_tails_on_gpu(name):
    """y at x in [-30, -8] (act_triton.log1p, tests/test_cuda_paths_on_cpu.py): within 8 + |x| float32 ulps of
    PyTorch's float64 y: the interpreter's 4, ~3 for ex2.approx's 2^-22.5, and up to |x| for the rounding of
    t = x log2(e) (the GPU's exp is 2^t: a relative error of ln 2 |t| 2^-24 = |x| 2^-24). log(exp(x) + 1)
    was 0 below -17."""
    x = torch.linspace(-30, -8, 4097, device="cuda")
    params = default_params(name)
    y = torch.ops.invact.forward(x, name, params, "triton")[0].cpu()
    ref = torch.ops.invact.forward(x.cpu().double(), name, params, "eager")[0]
    ulp = (torch.nextafter(ref.float().abs(), torch.tensor(float("inf"))) - ref.float().abs()).double()
    assert ((y.double() - ref).abs() <= (8 + x.cpu().double().abs()) * ulp).all(), name


def test_strided_y_and_long_norm_rows_on_gpu():
    """A strided y (y[::2], a direct op call) gives the gradient of its contiguous copy; a norm row longer than
    a Triton block (norm_triton.fits) runs the torch code without turning Triton off (the fixture)."""
    from invact import norm_triton
    name = NAMES[0]
    params = default_params(name)
    x = torch.randn(2 * 4099, device="cuda")
    y = torch.ops.invact.forward(x, name, params, "triton")[0][::2]
    code = torch.ops.invact.forward(x[::2].contiguous(), name, params, "triton")[1]
    go = torch.randn(4099, device="cuda")
    a = torch.ops.invact.backward(go, y, code, name, params, "triton")
    assert torch.equal(a, torch.ops.invact.backward(go, y.contiguous(), code, name, params, "triton"))
    n = norm_triton.MAX_BLOCK + 1
    x = torch.randn(2, n, device="cuda", requires_grad=True)
    y = invact.functional.layer_norm(x, (n,), backend="triton")
    y.sum().backward()
    assert torch.allclose(y, torch.nn.functional.layer_norm(x.detach(), (n,)), atol=1e-5)


def test_norm_parameters_on_another_device_refused():
    """A CPU weight with a CUDA input raises, naming both devices, as torch's norms do (the kernel would read
    a CPU pointer; the fixture checks Triton stays on)."""
    x, w = torch.randn(4, 8, device="cuda"), torch.ones(8)
    with pytest.raises(RuntimeError, match="weight.*cuda:0.*cpu"):
        invact.functional.layer_norm(x, (8,), w, backend="triton")

