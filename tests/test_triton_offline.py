"""The generated Triton kernels built for a GPU (sm_90) without one: tests/triton_offline.py.

The interpreter (tests/test_triton.py) runs the kernels' operations in numpy, which neither contracts
a * b + c into an FMA nor approximates a division or a square root, as a GPU build does by default
(div.full.f32 and sqrt.approx.f32 are within 2 ulps, not correctly rounded). A build without them
computes what the interpreter computes for these operations, except the FMA scheme's explicit tl.fma
steps (fused on GPUs, rounded twice by the interpreter): the float32 schemes the certificates cover,
and torch's correctly rounded division and square root. Launch options are read off the
generated launchers themselves, so a launcher that drops enable_fp_fusion=False fails here.
"""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from invact import backends, ops, registry

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not backends.triton_importable(), reason="needs triton"),
    pytest.mark.skipif(not ops.names(), reason="no generated activations"),
]
SCRIPT = Path(__file__).with_name("triton_offline.py")


@pytest.fixture(scope="module")
def report():
    import triton.backends
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_every_kernel_compiles_for_sm90(report):
    assert sorted(report) == ops.names()
    for name, kernels in report.items():
        searched = registry.triton_module(name).SEARCH_LEVELS > 0  # then g_y's counting build too
        assert sorted(kernels) == ["backward", *["backward_counted"] * searched, "forward"], name
        for kernel, cases in kernels.items():
            assert sorted(cases) == ["bfloat16", "float16-int64", "float32"], (name, kernel)


def _fused_steps(name: str) -> int:
    """The FMA scheme's fused steps per element in the table's backward (docs/table-format.md): the
    POLY rows' degree (Horner's degree - 1 steps and u N'(u) + c0_lo) plus the denominator's degree."""
    found = re.search(r"act_triton\.row\(t, P, s, NSEG, (\d+), (\d+), CLAMP\)", inspect.getsource(registry.triton_module(name)))
    return int(found[1]) + int(found[2]) if found and int(found[1]) else 0


def test_fma_only_where_the_fma_scheme_fuses_no_approximate_division(report):
    """Every launch passes enable_fp_fusion=False: no contraction, so the only fma.rn.f32 are the FMA
    scheme's explicit tl.fma steps (invact.act_triton.row), a multiple of the steps per element in the
    backward (each thread evaluates several elements) and none in the forward; no kernel has an
    approximate division or square root (libdevice's erf and tl.exp keep their own ex2.approx)."""
    for name, kernels in report.items():
        steps = _fused_steps(name)
        for kernel, cases in kernels.items():
            for case, found in cases.items():
                assert found["options"] == {"enable_fp_fusion": False}, (name, kernel, case, found["options"])
                bad = {i: found["ptx"][i] for i in ("div.full.f32", "sqrt.approx.f32") if found["ptx"][i]}
                assert not bad, (name, kernel, case, bad)
                fma = found["ptx"]["fma.rn.f32"]
                if kernel.startswith("backward") and steps:
                    assert fma > 0 and fma % steps == 0, (name, kernel, case, fma, steps)
                else:
                    assert fma == 0, (name, kernel, case, fma)


def test_the_scheme_builds_its_square_root_correctly_rounded(report):
    """The sqrt transform of the fitted tables (docs/table-format.md) is sqrt.rn in every build:
    the check above would pass as well for a kernel with no square root at all."""
    fitted = [n for n in ops.names() if any(kind == "sqrt" for kind, _, _ in getattr(registry.module(n), "TRANSFORMS", ()))]
    assert fitted
    for name in fitted:
        for kernel in ("backward", "backward_counted"):
            for case, found in report[name].get(kernel, {}).items():
                assert found["ptx"]["sqrt.rn.f32"] > 0, (name, kernel, case)


def test_the_clamp_of_u_keeps_nan(report):
    """u's clamp (act_triton.row) is max.NaN.f32 / min.NaN.f32 on each side the table keeps
    (invact.impl_triton.clamps): a NaN u (a constant row at y = +-inf) stays NaN, as torch.clamp
    and the C kernels keep it, where max.f32 / min.f32 would return the bound; sides left out
    leave no instruction."""
    from invact import impl_triton, u_clamp
    from invact.constants import param_values
    for name in ops.names():
        mod = registry.module(name)
        if not getattr(mod, "TRANSFORMS", ()):
            continue
        kept = impl_triton.clamps(mod, param_values(name, None))  # as launched: the default parameters
        for kernel in ("backward", "backward_counted"):
            for case, found in report[name].get(kernel, {}).items():
                ptx = found["ptx"]
                assert (ptx["max.NaN.f32"] > 0) == bool(kept & u_clamp.LOWER), (name, kernel, case, kept, ptx)
                assert (ptx["min.NaN.f32"] > 0) == bool(kept & u_clamp.UPPER), (name, kernel, case, kept, ptx)


def test_no_integer_division_and_vector_memory_access(report):
    """Offsets are sums and products (each program covers a range of code bytes and the matching
    element of every plane): no 64-bit division or remainder, which GPUs emulate in dozens of
    instructions per element. Where the size is a multiple of 128 (the planes then start 16-byte
    aligned, and Triton's specialisation knows it) every kernel loads and stores 16-byte vectors."""
    for name, kernels in report.items():
        for kernel, cases in kernels.items():
            for case, found in cases.items():
                ptx = found["ptx"]
                assert not any(ptx[i] for i in ("div.s64", "rem.s64", "div.u64", "rem.u64")), (name, kernel, case)
                if case != "float16-int64":
                    assert ptx["ld.global.v4"] and ptx["st.global.v4"], (name, kernel, case, ptx)
