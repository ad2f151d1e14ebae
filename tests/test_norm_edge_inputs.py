"""Norm cases a bug hunt found: a zero-width normalized shape, NumPy integers in normalized_shape, a plain
FakeTensorMode, and RMSNorm's forward on a non-contiguous input (torch's bits: the mean of squares reduced
in the input's own layout). Forwards are compared with torch's bit for bit: invact's forward is torch's own
computation (README), so any difference is a bug, not rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import invact
from invact import functional as IF

BACKENDS = ("eager", "compiled")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape,normalized", [((5, 0), (0,)), ((3, 0, 4), (0, 4)), ((2, 3, 0), (0,))])
def test_zero_width(backend, rms, shape, normalized):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(normalized, dtype=torch.float64, requires_grad=True)
    ours = IF.rms_norm(x, normalized, w, backend=backend) if rms else IF.layer_norm(x, normalized, w, backend=backend)
    ref = F.rms_norm(x, normalized, w) if rms else F.layer_norm(x, normalized, w)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    gx, gw = torch.autograd.grad(ours.sum() + (w ** 2).sum(), (x, w))
    assert gx.shape == x.shape and gw.shape == w.shape
    module = (invact.RMSNorm if rms else invact.LayerNorm)(normalized, dtype=torch.float64)
    assert module(x).shape == x.shape


@pytest.mark.parametrize("rms", [False, True])
def test_numpy_normalized_shape(rms):
    x = torch.randn(4, 8)
    for shape in (np.int64(8), (np.int64(8),), [np.int32(8)], torch.Size([8]), torch.tensor(8)):
        fn = IF.rms_norm if rms else IF.layer_norm
        ref = F.rms_norm(x, (8,)) if rms else F.layer_norm(x, (8,))
        assert torch.equal(fn(x, shape), ref)
    mod, theirs = (invact.RMSNorm, torch.nn.RMSNorm) if rms else (invact.LayerNorm, torch.nn.LayerNorm)
    assert torch.equal(mod(np.int64(8))(x), theirs(np.int64(8))(x))
    model = torch.nn.Sequential(theirs(np.int64(8)))
    invact.patch(model)
    assert torch.equal(model(x), ref)
    with pytest.raises(ValueError, match="normalized_shape"):
        fn(x, (8.0,))


@pytest.mark.parametrize("rms", [False, True])
def test_plain_fake_tensor_mode(rms):
    with FakeTensorMode():
        x = torch.randn(4, 8, requires_grad=True)
        norm = (invact.RMSNorm if rms else invact.LayerNorm)(8)
        y = norm(x)
        assert y.shape == (4, 8) and y.dtype == torch.float32
        with torch.no_grad():
            assert (IF.rms_norm(x, (8,)) if rms else IF.layer_norm(x, (8,))).shape == (4, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rms_forward_non_contiguous_is_torchs(backend, dtype):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    cases = [(randn(16, 9).t(), (16,)),                       # transposed rows
             (randn(4, 16, 3).permute(0, 2, 1), (16,)),       # permuted 3-d
             (randn(6, 5, 4).transpose(0, 2), (5, 6)),        # two normalized dims
             (randn(8, 32)[:, ::2], (16,))]                   # a step
    for x, normalized in cases:
        w = randn(*normalized)
        assert not x.is_contiguous()
        ref = F.rms_norm(x, normalized, w)
        assert torch.equal(IF.rms_norm(x, normalized, w, backend=backend), ref)
        xg = x.detach().requires_grad_()
        assert torch.equal(IF.rms_norm(xg, normalized, w, backend=backend), ref)


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True])
def test_backward_under_another_default_dtype(rms, default):
    """torch.set_default_dtype(float64 / bfloat16): the CPU backward's float32 buffers took the default dtype,
    so dgamma and dbeta were garbage (float64: the C kernel's float32 read as doubles) or the heap was
    overrun (bfloat16: a crash). The gradients do not depend on the default dtype: bit for bit those under
    float32's, with a kept column (gamma_0 = 0) too."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 32, generator=g)
    w, b, dy = torch.randn(32, generator=g), torch.randn(32, generator=g), torch.randn(16, 32, generator=g)
    w[0] = 0.0

    def grads():
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = IF.rms_norm(xs, (32,), ws, 1e-6) if rms else IF.layer_norm(xs, (32,), ws, bs)
        return torch.autograd.grad(y, (xs, ws) if rms else (xs, ws, bs), dy)

    want = grads()
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        got = grads()
    finally:
        torch.set_default_dtype(before)
    for a, b_ in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b_)

