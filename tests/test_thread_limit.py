"""OMP_THREAD_LIMIT below torch.get_num_threads() (2026-12-07, hunt C): OpenMP then runs fewer threads
than torch reports, so ATen's parallel_for splits a tensor into other ranges, and the elements its
scalar code computes (the last ``len % (2 * vector)`` of each range) are others. The one-pass forward
computed those ranges from torch.get_num_threads() and gave y not bit for bit PyTorch's (mish and
gelu_tanh in float32, gelu in float16, at 2-4 threads)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from invact import cpu_kernel

# the sizes the hunt found: each range's length leaves a scalar tail, and one or two ranges differ
SCRIPT = r"""
import torch, torch.nn.functional as F
from invact import cpu_kernel, impl_cpu, registry
native = {"mish": F.mish, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu}
checked = 0
for threads in (2, 3, 4):
    torch.set_num_threads(threads)
    for name, f in native.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if impl_cpu.one_pass_kind(registry.module(name), dtype, torch.backends.mkldnn.enabled) is None:
                continue
            for n in (40001, 65573, 98379):
                x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
                got = impl_cpu.one_pass_forward(x, name, [])
                if got is None:
                    continue
                want = f(x)
                assert torch.equal(got[0].view(torch.int16 if dtype != torch.float32 else torch.int32),
                                   want.view(torch.int16 if dtype != torch.float32 else torch.int32)), (name, dtype, n, threads)
                checked += 1
print("checked", checked)
"""


@pytest.mark.skipif(cpu_kernel.library() is None, reason="the one-pass forward needs the AVX-512 kernels")
def test_one_pass_forward_follows_openmps_thread_limit():
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    env.pop("OMP_DYNAMIC", None)    # (with it on no forward runs in one pass: nothing to compare)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) > 0, out.stdout


@pytest.mark.parametrize("text, limit", [(None, None), ("", None), ("3", 3), (" 2 ", 2), ("0", None), ("x", None),
                                         ("-1", None)])
def test_thread_limit_read_as_openmp_reads_it(text, limit):
    assert cpu_kernel._thread_limit(text) == limit
