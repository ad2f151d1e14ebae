"""A small sample of benchmarks/fuzz.py (the same functions): random tensors of every activation and
dtype against PyTorch, nothing outside tolerance; and the fuzzer notices a wrong table.

The full run (10**4 tensors per activation and dtype, a few minutes) is `python benchmarks/fuzz.py`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tolerances  # noqa: F401 - benchmarks/fuzz.py then shares this module (and its caches)
from invact import impl_compiled, ops, registry

_spec = importlib.util.spec_from_file_location("invact_bench_fuzz",
                                               Path(__file__).parents[1] / "benchmarks" / "fuzz.py")
FZ = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))   # dataclasses need it there
_spec.loader.exec_module(FZ)

NAMES = ops.names()
pytestmark = pytest.mark.skipif(not NAMES, reason="no generated activations (run `invact generate`)")
CASES = 100          # per activation and dtype: 6000 tensors of <= 512 elements, ~15 s on 2 cores


@pytest.mark.parametrize("dtype", list(FZ.DTYPES))
def test_fuzz_sample_within_tolerance(dtype):
    for name in NAMES:
        stats = FZ.fuzz(name, FZ.DTYPES[dtype], CASES, seed=1, max_numel=512)
        assert stats.cases == CASES and stats.forward_mismatches == 0
        assert stats.bad_cases == 0, "\n".join(stats.examples)


def test_every_distribution_and_layout_is_drawn():
    """make_case covers every distribution (checked through values()) and sizes 0 and 1 occur."""
    rng = np.random.default_rng(0)
    sizes = {FZ.make_case(rng, "gelu" if "gelu" in NAMES else NAMES[0], torch.float32, 64).numel()
             for _ in range(400)}
    assert 0 in sizes and 1 in sizes and max(sizes) > 32
    for dist in FZ.DISTRIBUTIONS:
        v = FZ.values(rng, NAMES[0], torch.float16, 1000, dist)
        assert v.dtype == torch.float16 and v.numel() == 1000
    specials = FZ.values(rng, NAMES[0], torch.float32, 4000, "specials")
    assert specials.isnan().any() and specials.isinf().any()
    with pytest.raises(ValueError, match="dist must be one of"):
        FZ.values(rng, NAMES[0], torch.float32, 3, "cauchy")


def test_regions():
    name = "gelu" if "gelu" in NAMES else NAMES[0]
    x = np.array([-0.75, 0.5, 20.0, -1e5, np.nan, 0.0, 1e-40])
    got = [FZ.REGIONS[r] for r in FZ.regions(name, x)]
    if name == "gelu":
        assert got == ["branch", "body", "tails", "far", "special", "special", "special"]


def test_fuzzer_catches_a_wrong_table(monkeypatch):
    """The same run with GELU's g off by 3e-6 (relative): tensors outside tolerance, exit status 1."""
    if "gelu" not in NAMES:
        pytest.skip("no gelu table")
    mod = registry.module("gelu")
    wrong = mod.grad_kernel

    def grad_kernel(out, *args, **kwargs):
        wrong(out, *args, **kwargs)
        out.mul_(1 + 3e-6)

    monkeypatch.setattr(mod, "grad_kernel", grad_kernel)
    impl_compiled.kernels.cache_clear()
    try:
        assert FZ.fuzz("gelu", torch.float32, 20, seed=1, max_numel=256).bad_cases > 0
        assert FZ.main(["--cases", "5", "--names", "gelu", "--dtypes", "float32"]) == 1
    finally:
        monkeypatch.undo()
        impl_compiled.kernels.cache_clear()


def test_command_line(capsys):
    assert FZ.main(["--cases", "3", "--names", NAMES[0], "--dtypes", "float32,bfloat16", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "float32:" in out and "bfloat16:" in out and "0 tensors outside tolerance" in out
    with pytest.raises(SystemExit) as info:
        FZ.main(["--names", "gleu"])
    assert info.value.code == 2 and "unknown activation gleu; known: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        FZ.main(["--dtypes", "float8"])
