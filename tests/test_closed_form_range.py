"""Closed-form segments evaluate their g on y clamped into the segment's range where the expression
is not real just past an end of it (invact.fitting.codegen.analysis.range_clamp): a float32 y rounded
past a minimum or maximum gave a NaN gradient.

hrat = x/(1 + |x|)^2 has its extrema -1/4 and 1/4 at x = -1 and 1, and float32 rounds y = f(x) next
to them to -0.25000003 and 0.25000003, where g's sqrt(4y + 1) and sqrt(1 - 4y) are NaN (246 of 40,001
grid points on each side were NaN). quart = x^4 - c, c = float32(0.3) = 0.30000001192092896 (exact
in float32, so y + c does not cancel a rounded constant: with 0.3 itself its float32 closed form was
3e-6 off next to the end and is fitted now, tests/test_fitter_branch_points_and_minima.py), has its minimum -c at x = 0,
where the bfloat16 forward gives -0.30078125, past it; its g = 4 (y + c)^(3/4) is printed as
exp(3 log(y + c)/4), whose log was NaN there. parab = x^2 - a keeps its parameter: its clamp is the
parameter expression -a.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import invact
from invact import ops
from invact.fitting.certify import branch_reference
from invact.fitting.cli import main
from invact.fitting.tables import load_table, table_path
from triton_tolerances import needs_interpreter, within

# name: formula, x of its extrema, its y range
CASES = {"hrat": ("x/(1 + Abs(x))**2", (-1.0, 1.0), (-0.25, 0.25)),
         "quart": ("x**4 - 0.30000001192092896", (0.0,), (-0.30000001192092896, float("inf")))}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    import invact.generated as pkg
    before = list(pkg.__path__)
    path = tmp_path_factory.mktemp("closed_form_range")
    for name, (formula, *_) in CASES.items():
        assert main(["--root", str(path), "fit", formula, "--name", name, "--fp32-samples", "4096"]) == 0
    assert main(["--root", str(path), "fit", "x**2 - a", "--param", "a=2", "--name", "parab",
                 "--fp32-samples", "4096"]) == 0
    invact.use_root(path)
    yield path
    pkg.__path__[:] = before
    invact.use_root(Path(before[0]).parent)


def _grid(name: str) -> torch.Tensor:
    """40,001 float32 x within 0.01 of each extremum of ``name``."""
    return torch.cat([torch.linspace(c - 0.01, c + 0.01, 40_001, dtype=torch.float64)
                      for c in CASES[name][1]]).float()


def _inside32(end: float, lower: bool) -> float:
    """The float32 next to a range's end inside the range (the end where it is a float32)."""
    v = np.float32(end)
    if (v < end) if lower else (v > end):
        v = np.nextafter(v, np.float32(np.inf if lower else -np.inf))
    return float(v)


def _bound(table: dict, x: np.ndarray, y: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """tests/tolerances.py's float32 bound (certified approximation and float32 evaluation errors,
    4 float32 ulps of |f'| + 1, the information floor) for a table of a user formula. The floor is
    measured from y clamped to the float32 values of x's branch's range: a y past the range is the
    end's value to any table."""
    floor = np.zeros_like(x)
    for i, b in enumerate(table["branches"]):
        lo, hi = (float(v) for v in b["x_range"])
        ylo, yhi = (_inside32(float(v), k == 0) for k, v in enumerate(b["y_range"]))
        on = (x >= lo) & (x <= hi)
        floor[on] = np.maximum(floor[on], np.abs(branch_reference(table, i)(np.clip(y[on], ylo, yhi)) - fp[on]))
    cert = table["certificate"]
    ulps = 4 * np.spacing((np.abs(fp) + 1).astype(np.float32)).astype(np.float64)
    return (cert["approx_error"] + cert["float32_eval_error"]) * np.maximum(1.0, np.abs(fp)) + ulps + floor


@pytest.mark.parametrize("name", ["hrat"])   # (quart's float32 y never passes -c, an exact float32: bfloat16's does)
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_gradients_next_to_extrema_are_finite(root, name, backend):
    """float32 x next to the extrema, where y rounds past them too (the eager torch code and the
    compiled backend, whose float32 backward on CPU is the table's generated C): every gradient finite,
    each g that of y clamped to the float32 range (bit for bit: the same g inside it), and hrat's
    within the float32 bound of float64 autograd."""
    x = _grid(name)
    lo, hi = CASES[name][2]
    xb = x.clone().requires_grad_()
    y = ops.apply(xb, name, None, backend)
    y.backward(torch.ones_like(y))
    g, yv = xb.grad.double().numpy(), y.detach().double().numpy()
    assert ((yv < lo) | (yv > hi)).any(), "no y rounded past an extremum: the grid no longer tests the clamp"
    assert np.isfinite(g).all(), x[~np.isfinite(g)][:4]
    y, code = torch.ops.invact.forward(x, name, [], backend)
    clamped = y.clamp(_inside32(lo, True), _inside32(hi, False))
    go = torch.ones_like(y)
    assert torch.equal(torch.ops.invact.backward(go, y, code, name, [], backend),
                       torch.ops.invact.backward(go, clamped, code, name, [], backend))
    if name == "hrat":
        xt = x.double().requires_grad_()
        (xt / (1 + xt.abs()) ** 2).sum().backward()
        fp = xt.grad.numpy()
        bad = np.abs(g - fp) > _bound(load_table(table_path(name, root=root)), x.double().numpy(), yv, fp)
        assert not bad.any(), (x[bad][:4], g[bad][:4], fp[bad][:4])


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_bfloat16_y_rounded_past_the_minimum(root, backend):
    """quart's minimum -c rounds to bfloat16 -0.30078125, past it, where g was exp(3 log(-0.00078)/4), NaN."""
    x = _grid("quart").bfloat16().requires_grad_()
    y = ops.apply(x, "quart", None, backend)
    y.backward(torch.ones_like(y))
    assert (y.double() < CASES["quart"][2][0]).any() and x.grad.isfinite().all()


@pytest.mark.parametrize("name", CASES)
def test_nan_and_past_range_y(root, name):
    """Each code's closed form at y given directly: NaN y still gives NaN g (the clamps keep NaN); y
    past a finite end of the range, far past it or infinite, gives a finite g (the end's, as a fitted
    segment's clamped u does), in float32 and float64."""
    lo, hi = CASES[name][2]
    past = [v for v in (lo - 1e-7, lo - 1.0, -1e30, -float("inf")) if lo > -1e30] + \
           [v for v in (hi + 1e-7, hi + 1.0, 1e30, float("inf")) if hi < 1e30]
    for x0 in (-5.0, 5.0):   # a code of each side
        x = torch.full((1 + len(past),), x0)
        for dtype in (torch.float32, torch.float64):
            _, code = torch.ops.invact.forward(x.to(dtype), name, [], "eager")
            y = torch.tensor([float("nan"), *past], dtype=dtype)
            for backend in ("eager", "compiled"):
                g = torch.ops.invact.backward(torch.ones_like(y), y, code, name, [], backend)
                assert g[0].isnan() and g[1:].isfinite().all(), (x0, backend, dtype, g)


@needs_interpreter
@pytest.mark.parametrize("name", CASES)
def test_triton_gradients_next_to_extrema_are_finite(root, name):
    """The Triton backward (interpreter) of the same y and code: finite, within test_triton's
    closed-form bound of the eager one (8 float32 ulps of g plus 2**-21)."""
    y, code = torch.ops.invact.forward(_grid(name), name, [], "eager")
    go = torch.ones_like(y)
    a = torch.ops.invact.backward(go, y, code, name, [], "triton")
    b = torch.ops.invact.backward(go, y, code, name, [], "eager")
    assert a.isfinite().all() and b.isfinite().all()
    assert within(a, b, 8, 2.0**-21)


@pytest.mark.parametrize("a", [2.0, 3.0])
def test_parameter_generic_end(root, a):
    """x^2 - a keeps its parameter (g = +-2 sqrt(y + a)): its clamp is at -a, a parameter expression,
    so y past the minimum of a table used at another a than fitted (3) gives the end's g too."""
    x = torch.tensor([-5.0, -5.0, 5.0, 5.0])
    _, code = torch.ops.invact.forward(x, "parab", [a], "eager")
    y = torch.tensor([-a - 1e-6, float("nan"), -a - 1.0, -a + 1.0])
    want = torch.tensor([0.0, float("nan"), 0.0, 2.0])
    backends = ["eager", "compiled"] + (["triton"] if needs_interpreter.args[0] is False else [])
    for backend in backends:
        g = torch.ops.invact.backward(torch.ones(4), y, code, "parab", [a], backend)
        assert torch.equal(g.isnan(), want.isnan()) and torch.equal(g[~g.isnan()], want[~want.isnan()]), (backend, g)
