"""What the C kernels may be handed, and what they store (findings of a sanitizer hunt on the CPU kernels).

* ``invact::backward`` refuses, on every backend, a ``grad_output`` without y's shape and a ``code`` that
  is not the uint8 packed code of y's elements: the C kernels read as many of each as y has elements, so
  a short one was read past its end (ASan: heap-buffer-overflow), where the eager backend raised a
  broadcast error naming neither. The kernels' own call sites decline such buffers too.
* ``invact_float_to_half`` (csrc/invact_bf16.h) shifted by 2^32 - 1 for |f| in [0.5, 1): undefined
  behaviour, checked here with UBSan, the values against torch's conversion.
* bfloat16 NaN products: the per-table kernels store them as the eager backward's torch.mul does, bit
  for bit, NaN payloads included (ATen's AVX2 and AVX-512 kernels: 0xFFFF everywhere), natively and under
  ``ATEN_CPU_CAPABILITY=avx2`` (a subprocess, as tests/test_configurations.py runs its subsets).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from invact import cpu_kernel, impl_cpu, impl_table_c, ops, registry, table_c
from invact.arguments import ArgumentTypeError, ShapeError
from invact.impl_eager import EAGER

ROOT = Path(__file__).parents[1]
CSRC = ROOT / "runtime" / "csrc"
CAPABILITY_ENV = "INVACT_TEST_CAPABILITY"   # set in the subprocess: the ATen capability it must run under
needs_compiler = pytest.mark.skipif(not cpu_kernel.enabled() or cpu_kernel._compiler() is None,
                                    reason="the C kernels are off or there is no C compiler")


def _forward(dtype: torch.dtype, n: int = 4096, name: str = "gelu", params=()) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)
    return torch.ops.invact.forward(x, name, list(params), "eager")


# ---- invact::backward's arguments

@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_refuses_a_short_code(backend, dtype):
    y, code = _forward(dtype)
    with pytest.raises(ShapeError, match=r"code must hold 512 bytes .* got shape \(16,\)"):
        torch.ops.invact.backward(torch.ones_like(y), y, code[:16].clone(), "gelu", [], backend)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_refuses_a_short_grad_output(backend, dtype):
    y, code = _forward(dtype)
    with pytest.raises(ShapeError, match=r"grad_output must have y's shape \(4096,\), got \(16,\)"):
        torch.ops.invact.backward(torch.ones(16, dtype=dtype), y, code, "gelu", [], backend)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_backward_refuses_a_grad_output_of_another_shape(backend):
    """Same element count, another shape: autograd always hands y's shape, so anything else is a mistake."""
    y, code = _forward(torch.float32)
    with pytest.raises(ShapeError, match="grad_output must have y's shape"):
        torch.ops.invact.backward(torch.ones(64, 64), y, code, "gelu", [], backend)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_backward_refuses_a_code_that_is_not_uint8(backend):
    y, code = _forward(torch.float32)
    with pytest.raises(ArgumentTypeError, match="code must be the uint8 code .* got torch.int32"):
        torch.ops.invact.backward(torch.ones_like(y), y, code.to(torch.int32), "gelu", [], backend)


def test_backward_refuses_a_code_for_a_table_without_one():
    """elu has no code (CODE_BITS 0): its forward returns no bytes, and a code of some is refused."""
    y, code = _forward(torch.float32, 64, "elu", [1.0])
    assert code.numel() == 0
    with pytest.raises(ShapeError, match="code must hold 0 bytes"):
        torch.ops.invact.backward(torch.ones_like(y), y, torch.zeros(8, dtype=torch.uint8), "elu", [1.0], "eager")


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_backward_takes_what_the_forward_gave(backend):
    """The checks pass the forward's own outputs: every size of a bit plane, empty and 2-d y included."""
    for shape in [(0,), (1,), (7,), (9,), (3, 5)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        y, code = torch.ops.invact.forward(x, "gelu", [], backend)
        got = torch.ops.invact.backward(torch.ones_like(y), y, code, "gelu", [], backend)
        assert got.shape == y.shape


# ---- the C kernels' call sites: buffers they would overrun are declined, nothing read

def _short_buffers(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """(y, its code, an out buffer, [(grad, code) pairs each too short in one buffer])."""
    y, code = _forward(dtype)
    short = [(torch.ones_like(y), code[:16].clone()), (torch.ones(16, dtype=dtype), code)]
    return y, code, torch.empty_like(y), short


@needs_compiler
def test_table_c_declines_buffers_it_would_overrun():
    mod = registry.module("gelu")
    k = ops.module_constants(mod, torch.float32, torch.device("cpu"), ())
    y, code, out, short = _short_buffers(torch.float32)
    assert table_c.run(mod, out, torch.ones_like(y), y, code, k.y_thresholds, k.poly, ())  # the full ones run
    for grad, c in short:
        assert not table_c.run(mod, out, grad, y, c, k.y_thresholds, k.poly, ())
    y, code, out, short = _short_buffers(torch.bfloat16)
    lut = impl_cpu.lookup_table(mod, torch.bfloat16, (), torch.device("cpu"))
    assert table_c.run_lookup(mod, out, torch.ones_like(y), y, code, lut)
    for grad, c in short:
        assert not table_c.run_lookup(mod, out, grad, y, c, lut)
    assert not table_c.run_lookup(mod, torch.empty(16, dtype=torch.bfloat16), torch.ones_like(y), y, code, lut)


@pytest.mark.skipif(cpu_kernel.library() is None,
                    reason="no fused C kernel: INVACT_CPU_KERNEL=0, no AVX-512 as ATen sees it, or no C compiler")
def test_cpu_kernel_declines_buffers_it_would_overrun():
    mod = registry.module("gelu")
    table = impl_cpu.fused_table(mod, ())
    y, code, out, short = _short_buffers(torch.float32)
    assert table is not None and cpu_kernel.run(table, out, torch.ones_like(y), y, code, mod.CODE_BITS)
    for grad, c in short:
        assert not cpu_kernel.run(table, out, grad, y, c, mod.CODE_BITS)
    y, code, out, short = _short_buffers(torch.bfloat16)
    lut = impl_cpu.lookup_table(mod, torch.bfloat16, (), torch.device("cpu"))
    assert cpu_kernel.run_lookup(lut, out, torch.ones_like(y), y, code, mod.CODE_BITS)
    for grad, c in short:
        assert not cpu_kernel.run_lookup(lut, out, grad, y, c, mod.CODE_BITS)


# ---- invact_float_to_half: no undefined behaviour, IEEE values

HALF_PROGRAM = r"""
#include <stdio.h>
#include "invact_bf16.h"
/* every bfloat16 pattern as the high half of a float, with a few low halves: every exponent (|f| in
 * [0.5, 1) among them: a shift by 2^32 - 1 before), halfway cases and NaN payloads */
int main(void) {
    static const uint32_t low[] = {0x0000u, 0x0001u, 0x0FFFu, 0x1000u, 0x1001u, 0x2000u, 0x8000u, 0xFFFFu};
    for (uint32_t hi = 0; hi < 0x10000u; hi++)
        for (int k = 0; k < 8; k++) {
            uint32_t b = hi << 16 | low[k];
            float f;
            memcpy(&f, &b, sizeof f);
            uint16_t h = invact_float_to_half(f);
            fwrite(&h, sizeof h, 1, stdout);
        }
    return 0;
}
"""


@pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C compiler")
def test_float_to_half_has_no_undefined_behaviour(tmp_path):
    """Built with UBSan (any report aborts) and run over every exponent; the results are IEEE's (torch's
    float32 -> float16, NaN for NaN: payloads are the kernels' own, checked against vcvtps2ph elsewhere)."""
    compiler = cpu_kernel._compiler()
    program, exe = tmp_path / "half.c", tmp_path / "half"
    program.write_text(HALF_PROGRAM)
    flags = ["-O2", "-fsanitize=undefined", "-fno-sanitize-recover=all", f"-I{CSRC}"]
    probe = subprocess.run([compiler, *flags, "-x", "c", "-", "-o", str(tmp_path / "probe")],
                           input="int main(void) { return 0; }", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the compiler cannot build with -fsanitize=undefined: {probe.stderr[-300:]}")
    subprocess.run([compiler, *flags, str(program), "-o", str(exe)], check=True, capture_output=True)
    done = subprocess.run([str(exe)], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    got = torch.frombuffer(bytearray(done.stdout), dtype=torch.int16).view(torch.float16)
    low = torch.tensor([0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x8000, 0xFFFF], dtype=torch.int64)
    f = ((torch.arange(1 << 16, dtype=torch.int64).unsqueeze(1) << 16 | low).reshape(-1)
         .to(torch.int32).view(torch.float32))  # wraps to the same 32 bits
    want = f.to(torch.float16)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


# ---- bfloat16 NaN products, bit for bit the eager backward's

NAN_TABLES = [("gelu", ()), ("elu", (1.0,)), ("softplus", (1.0, 20.0))]  # a lookup with a code; direct16; a lookup
NAN_SIZES = (1, 7, 8, 9, 33, 1029)   # vector bodies and scalar tails of the 8- and 16-lane loops
NAN_PATTERNS = (0x7FC0, 0xFFC0, 0x7FC1, 0xFFFF, 0x7F81, 0xFF80 | 0x41)  # quiet, negative, payloads, signalling


def _nan_case(name: str, params: tuple, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad, y, code) of bfloat16 with NaN grads of several payloads and NaN y: NaN products."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 4
    x[::5] = math.nan
    y, code = torch.ops.invact.forward(x.to(torch.bfloat16), name, list(params), "eager")
    grad = torch.randn(n, generator=g).to(torch.bfloat16)
    picks = torch.tensor(NAN_PATTERNS, dtype=torch.int32)[torch.arange(n) % len(NAN_PATTERNS)]
    grad.view(torch.int16)[1::3] = picks[1::3].to(torch.int16)
    return grad, y, code


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _check_nan_bits() -> int:
    """Each C implementation's bfloat16 backward against the eager one, bits and NaN payloads; how many answered."""
    answered = 0
    for name, params in NAN_TABLES:
        for n in NAN_SIZES:
            grad, y, code = _nan_case(name, params, n)
            want = EAGER.backward(grad, y, code, name, list(params))
            assert want.isnan().any()
            for impl in (impl_cpu.CPU, impl_table_c.TABLE_C):
                got = impl.backward(grad, y, code, name, list(params))
                if got is None:
                    continue
                answered += 1
                differ = (_bits(got) != _bits(want)).nonzero().flatten()[:4].tolist()
                assert not differ, (type(impl).__name__, name, n, [(i, hex(_bits(got)[i].item() & 0xFFFF),
                                                                     hex(_bits(want)[i].item() & 0xFFFF)) for i in differ])
    return answered


@needs_compiler
def test_bfloat16_nan_products_as_eager():
    """Native capability (and the subprocess's): every implementation that answers stores NaN as eager."""
    expected = os.environ.get(CAPABILITY_ENV)
    if expected is not None:
        assert torch.backends.cpu.get_cpu_capability() == expected
    assert _check_nan_bits() > 0


@needs_compiler
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512" or CAPABILITY_ENV in os.environ,
                    reason="runs where ATen's capability can be narrowed to avx2 (an AVX-512 CPU)")
def test_bfloat16_nan_products_as_eager_under_avx2(tmp_path):
    """The same under ATEN_CPU_CAPABILITY=avx2: ATen's AVX2 kernels (0xFFFF for every NaN) and the
    per-table kernels built for AVX2 (lut_vector, its scalar tail, bf16_block)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", CAPABILITY_ENV: "AVX2",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           f"{Path(__file__).relative_to(ROOT)}::test_bfloat16_nan_products_as_eager"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]
