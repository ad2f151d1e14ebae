"""Generated code computes two forms so that float32 keeps their accuracy, and certification evaluates
them as emitted (invact.fitting.scheme: power_form, power64, emitted_form).

z4 = 0.1 x^4 has the exact table g = 2.2493653007614 y^(3/4). Its power was printed as
exp(3 log(y) / 4) in float32, |3/4 log(y)| ulps off (g 5e-6 relative off near y = 1e38, 1.4e-7
certified: certification took numpy's float32 power); it is float64's pow rounded once to float32
now (fastmath.power, pow in C, exp and log in float64 in Triton), and certification computes that.

sph = softplus(x)/2: softplus was printed as log(1 + exp(x)), inf from x = 88.7 in float32 (y inf,
the gradient NaN); it is max(x, 0) + log1p(exp(-|x|)) in every printer now.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import invact
from invact import ops
from invact.fitting.cli import main
from invact.fitting.model import Segment
from invact.fitting.tables import load_table, table_path
from triton_tolerances import needs_interpreter

BACKENDS = ["eager", "compiled"] + (["triton"] if needs_interpreter.args[0] is False else [])
# the float32 forward of sph, max(x, 0) + log1p(exp(-|x|)) halved, in units of u = 2^-24 relative to y:
# exp and log1p within 1 ulp (2u) each (SLEEF's u10 functions, glibc's scalar ones are closer), log1p's
# condition number <= 1 passing exp's error on, the log term <= y, the sum's rounding u, the half exact:
# 2 + 2 + 1 = 5
Y_UNITS = 5


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    import invact.generated as pkg
    before = list(pkg.__path__)
    path = tmp_path_factory.mktemp("stable_forms")
    assert main(["--root", str(path), "fit", "0.1*x**4", "--name", "z4"]) == 0
    assert main(["--root", str(path), "fit", "softplus(x)*0.5", "--name", "sph", "--fp32-samples", "4096"]) == 0
    invact.use_root(path)
    yield path
    pkg.__path__[:] = before
    invact.use_root(Path(before[0]).parent)


def _z4_y() -> torch.Tensor:
    """float32 y = f(x) of z4 over y in [1e-30, 1e38], both signs of x (both code classes)."""
    x = torch.logspace(np.log10(5.7e-8), np.log10(5.6e9), 200_001, dtype=torch.float64).float()
    x = torch.cat([x, -x])
    y, _ = torch.ops.invact.forward(x, "z4", [], "eager")
    keep = (y >= 1e-30) & (y <= 1e38)
    return x[keep]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fractional_power_within_certificate(root, backend):
    """g of every float32 y (stored by the forward) against float64's exact g = 0.4 (10 y)^(3/4) (signed
    by the branch): within the certified float32 evaluation error (absolute below |g| = 1, relative
    above), where exp(3 log(y) / 4) was 5e-6 relative off near 1e38."""
    x = _z4_y()
    y, code = torch.ops.invact.forward(x, "z4", [], "eager")
    g = torch.ops.invact.backward(torch.ones_like(y), y, code, "z4", [], backend).double()
    want = 0.4 * (10 * y.double()) ** 0.75 * x.sign().double()
    cert = load_table(table_path("z4", root=root))["certificate"]["float32_eval_error"]
    err = ((g - want).abs() / want.abs().clamp(min=1)).max().item()
    assert err <= cert, (backend, err, cert)


def test_certification_evaluates_the_emitted_power(root):
    """The table model's float32 closed form (what certification measures) is the generated eager
    g: bit for bit but where float64's pow in torch and numpy round differently (within one float32
    ulp there). The old emulation took numpy's float32 power, tens of ulps from exp(3 log(y) / 4)."""
    x = _z4_y()
    x = x[x > 0]
    y, code = torch.ops.invact.forward(x, "z4", [], "eager")
    g = torch.ops.invact.backward(torch.ones_like(y), y, code, "z4", [], "eager").numpy()
    [segment] = load_table(table_path("z4", root=root))["code_classes"][0]["segments"]
    emulated = Segment.from_json(segment).evaluate(y.numpy())
    assert emulated.dtype == np.float32
    ulps = np.abs(g.astype(np.float64) - emulated) / np.spacing(np.abs(emulated))
    assert ulps.max() <= 1 and (ulps == 0).mean() > 0.999, (ulps.max(), (ulps == 0).mean())


X_LARGE = [90.0, 100.0, 1000.0, 1e30, -90.0, -100.0, -1000.0, -1e30]


@pytest.mark.parametrize("backend", BACKENDS)
def test_softplus_forward_and_gradient_do_not_overflow(root, backend):
    """y = softplus(x)/2 and its gradient at large |x| (log(1 + exp(x)) was inf from x = 88.7, the
    gradient NaN): y within Y_UNITS * 2^-24 relative of float64's (plus the smallest subnormal's ulps:
    exp(-90) is subnormal), the gradient within the table's certified bound of sigmoid(x)/2."""
    x = torch.tensor(X_LARGE, requires_grad=True)
    y = ops.apply(x, "sph", None, backend)
    y.sum().backward()
    xd = torch.tensor(X_LARGE, dtype=torch.float64)
    want_y, want_g = 0.5 * torch.nn.functional.softplus(xd), 0.5 * torch.sigmoid(xd)
    assert y.isfinite().all() and x.grad.isfinite().all(), (backend, y, x.grad)
    tiny = torch.finfo(torch.float32).tiny * torch.finfo(torch.float32).eps
    tol = Y_UNITS * (2.0**-24 * want_y.abs() + tiny)
    assert ((y.double() - want_y).abs() <= tol).all(), (backend, y, want_y)
    cert = load_table(table_path("sph", root=root))["certificate"]
    bound = (cert["approx_error"] + cert["float32_eval_error"]) * want_g.abs().clamp(min=1)
    assert ((x.grad.double() - want_g).abs() <= bound).all(), (backend, x.grad, want_g)


def test_softplus_closed_form_is_certified_as_printed():
    """A closed form holding log(1 + exp(y)) is evaluated by certification as the stable softplus the
    printers write (log(1 + exp(y)) in float32 was inf from y = 88.7), within 2 float32 ulps of float64."""
    from invact.fitting.codegen.printer import TorchGPrinter, parse, to_triton
    from invact.fitting.scheme import closed_form_fn
    y = np.float32([-1000.0, -20.0, -1.0, 0.0, 1.0, 20.0, 90.0, 1000.0, 1e30])
    got = closed_form_fn("2*log(1 + exp(y))", ())(y).astype(np.float64)
    want = 2 * np.logaddexp(0.0, y.astype(np.float64))
    assert (np.abs(got - want) <= 2 * np.spacing(np.float32(want)).astype(np.float64) + 1e-45).all(), got
    e = parse("2*log(1 + exp(y))", "y", ())
    for text in (TorchGPrinter("y").doprint(e), to_triton(e, "y")):
        assert "log1p" in text and "exp(-" in text, text
