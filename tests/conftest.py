"""Shared test set-up. TRITON_INTERPRET must be set before any module defining kernels is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch._dynamo  # noqa: E402

# One test process compiles each activation's generated code for every dtype, parameter set and
# torch thread count (a Dynamo guard: tests switch to one thread), beyond Dynamo's 8 variants per
# function; past that Dynamo runs the code eagerly, whose float64 rounding differs from Inductor's, and
# bit-for-bit comparisons of two calls then compare two implementations (measured:
# test_vmap_composes[silu-compiled] with INVACT_CPU_KERNEL=0 after the ops and flush-denormal tests).
torch._dynamo.config.recompile_limit = 64
