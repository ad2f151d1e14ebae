"""Tolerances of Triton kernels against the torch backend, and what decides them (tests/test_triton.py,
test_cuda.py): the reasoning behind each number is in test_triton's docstrings."""

from __future__ import annotations

import os

import pytest
import torch

from invact import backends, ops, registry

# Triton kernels on CPU tensors run only in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py).
needs_interpreter = pytest.mark.skipif(
    not backends.triton_importable() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton with TRITON_INTERPRET=1 (set in conftest.py)")

MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def within(a: torch.Tensor, b: torch.Tensor, ulps: float, abs_floor) -> bool:
    """|a - b| <= ulps ulps of dtype at max(|a|, |b|) (subnormal spacing included) + abs_floor."""
    fi = torch.finfo(a.dtype)
    scale = 2.0 ** -MANTISSA_BITS[a.dtype]
    tol = ulps * (scale * torch.maximum(a.abs(), b.abs()).double() + fi.tiny * fi.eps) + abs_floor
    return bool(((a.double() - b.double()).abs() <= tol).all())


def formula_error(x: torch.Tensor) -> torch.Tensor:
    """The forward formula's absolute float32 error where it cancels (x (1 + erf(z)) / 2, x << 0):
    a few ulps of 1 times max(1, |x|)."""
    return 16 * 2.0**-24 * x.double().abs().clamp_min(1.0)


def default_params(name: str) -> list[float]:
    """The table's default parameters, as the ops take them."""
    return [float(v) for v in ops.info(name)["params"].values()]


def is_fitted(name: str) -> bool:
    """Every segment a polynomial row (FUSED_CPU): the backward is the float32 scheme alone, so
    Triton's gradient equals the eager backend's bit for bit."""
    return bool(getattr(registry.module(name), "FUSED_CPU", False))
