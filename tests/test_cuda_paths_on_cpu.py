"""Findings of a review of the CUDA / Triton paths, each pinned where it runs without a GPU (Triton's
interpreter, TRITON_INTERPRET=1 from conftest.py; tests/test_cuda.py has their GPU side): a strided y
read as dense, an out-of-memory error that turned Triton off, norm rows longer than a Triton block,
the norm kernels' warps, the CPU kernel built for CUDA weights, softplus's and mish's far negative
tail, the GPU benchmark's timing and figures, norm parameters on another device."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import invact
from invact import backends, norm_cpu, norm_triton, ops, registry
from triton_tolerances import default_params, needs_interpreter

ROOT = Path(__file__).resolve().parents[1]
NAMES = ops.names()


@pytest.fixture
def triton_on(monkeypatch):
    """Triton tried afresh (an earlier failure in this process would skip it), and still on after the test."""
    monkeypatch.setattr(backends, "_broken", set())
    yield
    assert "triton" not in backends._broken


def _strided_cases(dtype: torch.dtype):
    """(y, its contiguous copy) pairs: 1-D with stride 2, 2-D with strides (10, 2)."""
    base = (torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    return [base.reshape(-1)[::2], base[0, :, ::2]]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # float32: the scheme; bfloat16: the lookup
@pytest.mark.parametrize("name", [n for n in ("silu", "tanh") if n in NAMES])
def test_strided_y_backward_reads_its_elements(name, dtype, triton_on):
    """A direct backward call with a strided y (or code) gives the gradient of its contiguous copy bit for
    bit: the kernels read data pointers, so impl_triton makes y, grad and code contiguous first (y[::2]
    was read as y[:n], gradients off by up to 1.8)."""
    params, bits = default_params(name), registry.module(name).CODE_BITS
    for x in _strided_cases(dtype):
        y, code = torch.ops.invact.forward(x.contiguous(), name, params, "eager")
        y_strided = torch.empty(y.shape + (2,), dtype=dtype)[..., 0]
        y_strided.copy_(y)
        code_strided = torch.empty(code.numel() * 2, dtype=torch.uint8)[::2]
        code_strided.copy_(code)
        go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        want = torch.ops.invact.backward(go, y, code, name, params, "triton")
        got = torch.ops.invact.backward(go.t().contiguous().t() if go.dim() == 2 else go, y_strided,
                                        code_strided if bits else code, name, params, "triton")
        assert not y_strided.is_contiguous() and torch.equal(got, want), (name, dtype, tuple(x.shape))


@needs_interpreter
def test_out_of_memory_propagates_and_leaves_triton_on(monkeypatch, triton_on):
    """impl_triton.launched's rule: torch.OutOfMemoryError (here from a launch's allocation) is raised as it is,
    and Triton stays on (it was taken for a kernel that did not build: Triton off for the whole process, every
    later call on the torch code without a word); other errors still fall back (tests/test_triton.py)."""
    name = NAMES[0]
    mod = registry.triton_module(name)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(mod, "forward", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        torch.ops.invact.forward(torch.randn(8), name, default_params(name), "triton")
    monkeypatch.setattr(norm_triton, "forward", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        invact.functional.layer_norm(torch.randn(2, 8), (8,), backend="triton")


def test_rows_fit_one_block_up_to_tritons_largest():
    """norm_triton.fits: a row is one block of next_power_of_2(N) elements, at most Triton's 2^20."""
    assert norm_triton.MAX_BLOCK == 2**20
    assert norm_triton.fits(1) and norm_triton.fits(2**20) and not norm_triton.fits(2**20 + 1)


@needs_interpreter
def test_rows_longer_than_a_block_run_the_torch_code(monkeypatch, triton_on):
    """N = 2^20 + 1 (LayerNorm([C, H, W]) reaches it): the launchers decline before any kernel is built, the
    torch code runs with no warning, and Triton stays on for everything else (it raised "numel exceeds triton
    maximum tensor numel" and was turned off)."""
    launched = []
    monkeypatch.setattr(norm_triton, "_forward_kernel", _Recorder(launched))
    monkeypatch.setattr(norm_triton, "_backward_kernel", _Recorder(launched))
    n = 2**20 + 1
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(0)).requires_grad_()
    w = torch.ones(n, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        y = invact.functional.layer_norm(x, (n,), w, backend="triton")
        y.backward(torch.ones_like(y))
    assert not launched
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = F.layer_norm(xr, (n,), wr)
    yr.backward(torch.ones_like(yr))
    assert torch.allclose(y, yr, atol=1e-5) and torch.allclose(x.grad, xr.grad, atol=1e-4)


class _Recorder:
    """A kernel stand-in: records each launch's keyword arguments, launches nothing."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


@pytest.mark.parametrize("kernel, expected", [
    ("forward", {16: 4, 2048: 4, 4096: 8, 8192: 16, 2**20: 16}),
    ("backward", {16: 4, 1024: 4, 2048: 8, 4096: 16, 8192: 32, 2**20: 32})])
def test_warps_grow_with_the_block(kernel, expected):
    """The backward at 8 elements a thread (ptxas -v, sm_90: 4 warps spilled from N = 2048 on, 255
    registers), the forward at 16; at least 4 warps (they launched with 4 at every size)."""
    assert {block: norm_triton.warps(block, kernel) for block in expected} == expected


def test_launches_pass_the_warps(monkeypatch):
    """Both launchers pass num_warps for their block (the kernels replaced by recorders: meta tensors)."""
    forward, backward = [], []
    monkeypatch.setattr(norm_triton, "_forward_kernel", _Recorder(forward))
    monkeypatch.setattr(norm_triton, "_backward_kernel", _Recorder(backward))
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, w = torch.empty(64, 4096, **meta), torch.empty(4096, **meta)
    y, _, rstd = norm_triton.forward(x, w, None, 1e-5, True, 0.0, None, torch.bfloat16)
    norm_triton.backward(x, y, rstd, torch.empty(64, 0, **meta), torch.empty(0, dtype=torch.int64, device="meta"),
                         w, None, True, 0.0)
    assert forward[0]["num_warps"] == 8 and backward[0]["num_warps"] == 16
    assert forward[0]["enable_fp_fusion"] is False and backward[0]["enable_fp_fusion"] is False


def test_all_recoverable_builds_nothing_for_device_weights(monkeypatch):
    """norm_cpu.all_recoverable checks the parameters' device before the C kernel library (a CUDA-only user
    paid its build, ~30-60 CPU-seconds, at the first norm)."""
    built = []
    monkeypatch.setattr(norm_cpu, "library", lambda: built.append(1))
    assert norm_cpu.all_recoverable(torch.ones(8, device="meta"), None, 0.0, 1.0, 1e-38) is None
    assert not built


def _ulps(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|y - ref| in units of the last place of float32 at ref (ref float64)."""
    r = ref.float().abs()
    return (y.double() - ref).abs() / (torch.nextafter(r, torch.tensor(float("inf"))) - r).double()


@needs_interpreter
@pytest.mark.parametrize("name, reference", [("softplus", F.softplus), ("mish", F.mish)])
def test_far_negative_tail_within_4_ulps(name, reference, triton_on):
    """y at x in [-30, -8] within 4 float32 ulps of PyTorch's float64 y: the interpreter's exp (numpy's, within
    an ulp), act_triton.log1p's series (within 2^-24 / 7 and its roundings), mish's tanh (z + z^3 P(z^2)
    there: z) and the product by x, each at most one ulp; measured 3.4 (mish), 2.7 (softplus). The GPU's exp
    adds up to |x| ulps (tests/test_cuda.py). log(exp(x) + 1) had a relative error of 0.17 at -15 and gave 0
    below -17."""
    if name not in NAMES:
        pytest.skip(f"no {name}")
    x = torch.linspace(-30, -8, 4097)
    y = torch.ops.invact.forward(x, name, default_params(name), "triton")[0]
    assert _ulps(y, reference(x.double())).max() <= 4, name


@needs_interpreter
@pytest.mark.parametrize("name", [n for n in ("softplus", "mish") if n in NAMES])
def test_log1p_forward_special_values(name, triton_on):
    """Where y overflows or is not a number, the same y as PyTorch's (inf, NaN, x past softplus's threshold);
    elsewhere within the forward tests' 8 ulps."""
    x = torch.tensor([-200.0, -100.0, -50.0, -0.0, 0.0, 1e-3, 5.0, 50.0, 88.0, 89.0, 100.0,
                      float("inf"), -float("inf"), float("nan")])
    params = default_params(name)
    y = torch.ops.invact.forward(x, name, params, "triton")[0]
    ref = torch.ops.invact.forward(x, name, params, "eager")[0]
    finite = ref.isfinite()
    assert torch.equal(y[~finite].nan_to_num(), ref[~finite].nan_to_num()), (y, ref)
    assert _ulps(y[finite], ref[finite].double()).max() <= 8, (y, ref)


def test_forward_printer_emits_log1p_and_g_keeps_log():
    """The code generator prints log(1 + a) as act_triton.log1p(a) in forwards only, and log(1 + exp(z))
    as the softplus max(z, 0) + log1p(exp(-|z|)) everywhere (exp(z) overflows from z = 88.7 in float32);
    generated/ has log1p in softplus and mish, and no other Triton forward has a log of 1 plus something."""
    from invact.fitting.codegen import printer
    e = printer.parse("log(x + 1)", "x", [])
    assert printer.to_triton(e, "x", reciprocals=True, forward=True) == "act_triton.log1p(x)"
    assert printer.to_triton(e, "x") == "tl.log(x + 1.0)"
    e = printer.parse("log(exp(beta*x) + 1)/beta", "x", ["beta"])
    stable = "act_triton.log1p(tl.exp(-tl.abs(param_beta*x))) + tl.maximum(param_beta*x, 0.0"
    assert stable in printer.to_triton(e, "x", reciprocals=True, forward=True)
    assert stable in printer.to_triton(e, "x")
    for name in NAMES:
        f_x = _triton_forward(name)
        assert "tl.log(" not in f_x, name
        assert ("act_triton.log1p(" in f_x) == (name in ("softplus", "mish")), name


def _triton_forward(name: str) -> str:
    """The generated Triton module's text up to its code and g functions: f_x."""
    return Path(registry.triton_module(name).__file__).read_text().split("def code_x")[0].split("def g_y")[0]


def _load(path: Path):
    """A benchmark script as a module (registered: dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(f"_benchmark_{path.stem}", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_estimate_takes_the_devices_figures():
    """benchmarks/gpu_devices.py: an H100's figures on an H100 (ptx_estimate.py assumed an H200's 4.8 TB/s
    everywhere), the H200's where the device is unknown or absent."""
    devices = _load(ROOT / "benchmarks" / "gpu_devices.py")
    assert devices.gpu_key("NVIDIA H100 80GB HBM3") == "h100"
    assert devices.gpu_key("NVIDIA H100 PCIe") == "h100-pcie"
    assert devices.gpu_key("NVIDIA H200") == "h200" == devices.gpu_key("Tesla T4") == devices.DEFAULT
    assert devices.GPUS["h100"].hbm_bytes_s < devices.GPUS["h200"].hbm_bytes_s
    if not torch.cuda.is_available():
        assert devices.current_key() == "h200"


def test_benchmark_timer_rounds():
    """benchmarks/activations.py's side_by_side (what gpu_check.sh runs; on CUDA it times back-to-back calls
    between CUDA events): two warm-up rounds and the timed ones, a median per function; the script takes
    its arguments."""
    bench = _load(ROOT / "benchmarks" / "activations.py")
    calls = []
    medians = bench.side_by_side({"a": lambda: calls.append(1)}, 1)
    assert set(medians) == {"a"} and len(calls) == 3            # two warm-up rounds and one timed
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "activations.py"), "--help"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--norms" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("arg", ["weight", "bias"])
def test_norm_parameters_on_another_device_refused(arg, monkeypatch):
    """A weight or bias on another device than x raises before any kernel launches, naming it and both
    devices, as torch's norms refuse (Triton's launcher raised "Pointer argument cannot be accessed",
    which turned Triton off; a weight on another GPU would have been read through its pointer)."""
    monkeypatch.setattr(norm_triton, "forward", lambda *a, **k: pytest.fail("launched"))
    x = torch.randn(2, 8)
    params = {"weight": torch.ones(8), "bias": torch.zeros(8)}
    params[arg] = torch.empty(8, device="meta")
    with pytest.raises(RuntimeError, match=f"{arg} must be on the input's device cpu, got {arg} on meta"):
        invact.functional.layer_norm(x, (8,), params["weight"], params["bias"], backend="triton")
    if arg == "weight":
        with pytest.raises(RuntimeError, match="weight must be on the input's device cpu"):
            invact.functional.rms_norm(x, (8,), params["weight"], backend="triton")


@needs_interpreter
@pytest.mark.parametrize("name, reference", [("elu", F.elu), ("celu", F.celu), ("selu", F.selu)])
def test_exp_minus_one_near_zero_within_4_ulps(name, reference, triton_on):
    """ELU-type forwards at x in [-40, 0), through the tiny magnitudes where exp(x) - 1 cancels (it gave y = 0
    for x in (-6e-8, 0)), within 4 float32 ulps of PyTorch's float64 y: act_triton.expm1's series (truncation
    below 2^-24 / 5.5, Horner's roundings ~1 ulp) or exp(x) - 1 past |x| = 1/2 (1 - e^x exact, exp's ulp
    times at most 1.55), then the products by alpha and scale, each at most one ulp. -0.0 keeps its sign."""
    if name not in NAMES:
        pytest.skip(f"no {name}")
    mags = torch.logspace(-38, 0, 2000, dtype=torch.float64).float()
    x = torch.cat([-mags, torch.linspace(-40, -0.5, 2000)])
    params = default_params(name)
    y = torch.ops.invact.forward(x, name, params, "triton")[0]
    ref = torch.ops.invact.forward(x.double(), name, params, "eager")[0]
    assert torch.allclose(ref, reference(x.double()), rtol=1e-15, atol=0)   # the eager float64 y is torch's
    assert _ulps(y, ref).max() <= 4, name
    zero = torch.ops.invact.forward(torch.tensor([-0.0]), name, params, "triton")[0]
    assert torch.signbit(zero).item(), name


def test_forward_printer_emits_expm1():
    from invact.fitting.codegen import printer
    e = printer.parse("alpha*(exp(x) - 1)", "x", ["alpha"])
    assert "act_triton.expm1(x)" in printer.to_triton(e, "x", reciprocals=True, forward=True)
    assert "tl.exp(x) - 1.0" in printer.to_triton(e, "x")
    for name in NAMES:
        assert "tl.exp(x) - 1.0" not in _triton_forward(name), name
