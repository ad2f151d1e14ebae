"""invact.fastmath: where is torch.where bit for bit; sqrt is correctly rounded; log is the scheme's."""

import math

import numpy as np
import pytest
import torch

from invact import fastmath

SPECIAL = [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40, 3.0, -2.5]
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
            torch.bfloat16: torch.int16, torch.int32: torch.int32, torch.int64: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def _operands(dtype, n, gen):
    if dtype.is_floating_point:
        a = torch.cat([torch.randn(n, generator=gen, dtype=torch.float64), torch.tensor(SPECIAL * 3)]).to(dtype)
        b = torch.cat([torch.randn(n, generator=gen, dtype=torch.float64), torch.tensor(SPECIAL[::-1] * 3)]).to(dtype)
        scalars = (1.5, -0.0, 0.1, float("nan"))
    else:
        a = torch.randint(-2**30, 2**30, (n + 30,), generator=gen, dtype=dtype)
        b = torch.randint(-5, 5, (n + 30,), generator=gen, dtype=dtype)
        scalars = (3, -1, 0)
    return a, b, scalars


@pytest.mark.parametrize("dtype", list(INT_VIEW))
def test_where_is_torch_where_bit_for_bit(dtype):
    """Tensor/tensor, tensor/scalar, scalar/tensor and 0-d operands, NaN payloads and signs, signed
    zeros, subnormals; conditions of every density (the blend has no branch to mispredict)."""
    gen = torch.Generator().manual_seed(0)
    a, b, scalars = _operands(dtype, 4000, gen)
    for density in (0.0, 0.01, 0.5, 1.0):
        cond = torch.rand(a.shape, generator=gen) < density
        cases = [(a, b), (a, b[:1].reshape(())), (b[:1].reshape(()), a)]
        cases += [(a, s) for s in scalars] + [(s, b) for s in scalars]
        for x, y in cases:
            want, got = torch.where(cond, x, y), fastmath.where(cond, x, y)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(_bits(got), _bits(want)), (dtype, density, type(x), type(y))


def test_where_promotes_as_torch_where_and_broadcasts():
    cond = torch.tensor([[True], [False]])
    for x, y in [(torch.arange(3, dtype=torch.int32), 0.5), (torch.ones(3, dtype=torch.bfloat16), torch.zeros(3)),
                 (torch.ones(3, dtype=torch.float16), 2), (torch.ones(3), torch.zeros((), dtype=torch.float64))]:
        want, got = torch.where(cond, x, y), fastmath.where(cond, x, y)
        assert got.dtype == want.dtype and got.shape == want.shape == (2, 3) and torch.equal(got, want)
    # bool and complex results, and scalar-only operands, are torch.where's own
    assert torch.equal(fastmath.where(cond, torch.tensor(True), False), torch.where(cond, True, False))
    assert torch.equal(fastmath.where(cond, 1.0, 2.0), torch.where(cond, 1.0, 2.0))


def test_where_compiles_to_torch_where():
    """Under torch.compile the blend is not traced: Inductor gets torch.where (one vector blend)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    backend = CompileCounterWithBackend("eager")
    seen = []

    def capture(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return backend(gm, inputs)
    fn = torch.compile(lambda c, x, y: fastmath.where(c, x, y), backend=capture, fullgraph=True)
    c, x = torch.rand(64) < 0.5, torch.randn(64)
    assert torch.equal(fn(c, x, 0.0), torch.where(c, x, 0.0))
    assert any("where" in t for t in seen) and not any("xor" in t for t in seen), seen


def test_sqrt_is_correctly_rounded():
    """Every float32 result r of fastmath.sqrt(a) is the float32 nearest sqrt(a), on random floats of
    every scale: no neighbour of r is closer to the float64 root (within 2^-52 relative, far closer
    than any float32 midpoint). torch.sqrt fails this on ~0.6 % of floats (MKL's vsSqrt)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.exp(torch.empty(20000, dtype=torch.float64).uniform_(-80, 80, generator=gen)).float()
    r = fastmath.sqrt(a)
    for av, rv in zip(a.tolist()[:3000], r.tolist()[:3000]):
        lo, hi = np.nextafter(np.float32(rv), np.float32(0)), np.nextafter(np.float32(rv), np.float32(np.inf))
        exact = math.sqrt(av)  # float64: within 2^-52 relative, far closer than the float32 midpoints
        assert abs(exact - rv) <= min(abs(exact - float(lo)), abs(exact - float(hi))), (av, rv)
