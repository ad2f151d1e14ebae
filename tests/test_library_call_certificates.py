"""A closed form's float32 certificate bounds every library whose exp, log, ... is within the
function's ulp bound (invact.fitting.scheme.LIBRARY_ULPS), not numpy's float32 functions alone.

softplus's g = 1 - exp(-beta*y) was certified with numpy's float32 exp (2.4 ulps off at y = 0.339):
at y = 0.346537321805954 (where the C kernels' expf missed by 1.47e-7) and over [0.25, 0.5] the
certification measured one library's result, so the error of another expf within 1 ulp (SLEEF's u10,
what ATen and the C kernels call) was not bounded point by point. Here the expf results within 1 ulp of
the exact value are enumerated independently: the two float32 values around exp(-y) (there, in
[0.61, 0.78], the ulp is 2^-24 and exp(-y) is never a float32), each giving g = 1 - e exactly
(Sterbenz). The certification's per-point error must reach the worst of them, up to the two float64
references' rounding (REF_SLACK).
"""

import json
import shutil
from pathlib import Path

import mpmath
import numpy as np
import pytest

from helpers import invact_cli
from invact.fitting import certify
from invact.fitting.model import Table
from invact.fitting.scheme import closed_form_fn
from test_recertify_builtins import ABSOLUTE, RELATIVE, _figures

GENERATED = Path(__file__).resolve().parents[1] / "generated"
SOFTPLUS = GENERATED / "tables" / "softplus.json"
HUNTED_Y = 0.346537321805954      # the C kernels' expf gave g 1.47e-7 off here (certificate: 1.34e-7)
# the issue's bound on every float32 figure of a certificate (docs/table-format.md, CERT: "both must
# stay within the issue's bound (2.5e-7)"; tests/test_certificates.py F32_BOUND)
F32_BOUND = 2.5e-7
REF_SLACK = 1e-15                 # float64 references of g ~ 0.3: a few 2^-53 apart


@pytest.fixture(scope="module")
def softplus():
    table = Table.of(json.loads(SOFTPLUS.read_text()))
    assert table.params == {"beta": 1.0, "threshold": 20.0}      # g = 1 - exp(-y)
    return table, certify.branch_reference(table, 0)


def _float32_around(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float32 values just below and just above float64 ``v`` (none of them a float32)."""
    near = v.astype(np.float32)
    below = np.where(near.astype(np.float64) < v, near, np.nextafter(near, np.float32(-np.inf)))
    return below, np.nextafter(below, np.float32(np.inf))


def _worst_one_ulp_expf(y32: np.ndarray) -> np.ndarray:
    """max |g~ - g| over the expf results within 1 ulp of exp(-y), for y in [0.25, 0.5]."""
    v = np.exp(-y32.astype(np.float64))
    assert ((v > 0.5) & (v < 1.0)).all()                     # one binade: ulp 2^-24, two candidates
    exact_g = -np.expm1(-y32.astype(np.float64))
    return np.max([np.abs((np.float32(1) - e).astype(np.float64) - exact_g) for e in _float32_around(v)], axis=0)


def test_certified_error_at_the_hunted_y_covers_every_expf_within_one_ulp(softplus):
    table, ref = softplus
    y = np.float32(HUNTED_Y)
    mpmath.mp.dps = 40
    v = mpmath.exp(-mpmath.mpf(float(y)))
    below, above = _float32_around(np.array([float(v)]))
    worst = max(abs(float(mpmath.mpf(float(np.float32(1) - e[0])) - (1 - v))) for e in (below, above))
    _, certified = certify.worst_value(table, 0, ref, np.array([y]))
    assert certified >= worst - REF_SLACK, (certified, worst)
    cert = table.certificate
    assert min(cert["float32_eval_error"], cert["float32_fma_eval_error"]) >= worst


def test_certified_errors_over_a_dense_sweep_cover_every_expf_within_one_ulp(softplus):
    table, ref = softplus
    lo, hi = (np.array(v, dtype=np.float32).view(np.int32) for v in (0.25, 0.5))
    y32 = np.arange(lo, hi + 1, 7, dtype=np.int32).view(np.float32)    # every 7th float32 y: 1.2 M
    owned, plain, fused = certify._value_errors(table, 0, ref, y32)
    assert owned.size == y32.size
    worst = _worst_one_ulp_expf(y32)
    short = np.minimum(plain, fused) < worst - REF_SLACK
    assert not short.any(), (int(short.sum()), y32[short][:5])
    assert table.certificate["float32_eval_error"] >= worst.max()


def test_softplus_certificate_meets_the_design_bound():
    cert = json.loads(SOFTPLUS.read_text())["certificate"]
    figures = [cert["float32_eval_error"], cert["float32_fma_eval_error"]] + [
        b[k] for b in cert["branches"] for k in certify.EVAL_KEYS]
    assert max(figures) <= F32_BOUND, figures


def test_softplus_certificate_is_current(tmp_path, capsys):
    """Library calls are evaluated from float64 now (not a CPU's float32 exp): re-certifying a copy
    gives the committed figures (tests/test_recertify_builtins.py does this for IEEE-only closed forms)."""
    shutil.copytree(GENERATED, tmp_path / "generated")
    status, _, err = invact_cli(capsys, "certify", "softplus", "--root", tmp_path, "--no-generate")
    assert status == 0, err
    again = _figures(tmp_path / "generated" / "tables" / "softplus.json")
    assert again == pytest.approx(_figures(SOFTPLUS), rel=RELATIVE, abs=ABSOLUTE)


@pytest.mark.parametrize("name", ["exp", "log", "tanh", "erf", "atan", "sinh", "cosh", "asinh"])
def test_every_library_function_is_evaluated_and_spread_by_its_ulps(name):
    """Each function a table expression may call (log1p only in the stable softplus, below) is evaluated
    from float64 (erf was printed as math.erf, a NameError), and its spread is the least and the
    greatest float32 within LIBRARY_ULPS of the exact value."""
    from invact.fitting.scheme import LIBRARY_ULPS
    y = np.float32([0.3, 0.7, 1.3, 2.9])
    form = closed_form_fn(f"{name}(y)", ())
    assert form.calls == 1
    exact = np.array([float(getattr(mpmath, name)(mpmath.mpf(float(v)))) for v in y])
    assert (form(y) == exact.astype(np.float32)).all()
    lo, hi = form.spread(y)
    ulp = np.ldexp(1.0, np.frexp(exact)[1] - 24)                # float32's ulp at the exact value
    u = LIBRARY_ULPS[name]
    assert (np.abs(lo - exact) <= u * ulp).all() and (np.abs(hi - exact) <= u * ulp).all()
    assert (np.abs(np.nextafter(lo, np.float32(-np.inf)) - exact) > u * ulp).all()
    assert (np.abs(np.nextafter(hi, np.float32(np.inf)) - exact) > u * ulp).all()


def test_spread_takes_the_binade_the_exact_value_lies_in():
    """exp(-1e-30) is 1 in float64 but below 1: the floats within 1 ulp are 1 - 2^-24 and 1 (not
    1 + 2^-23); tanh(30) likewise stays at most 1. A result keeps the exact value's sign and finiteness."""
    from invact.fitting.scheme import ulps_apart
    lo, hi = closed_form_fn("exp(-y)", ()).spread(np.float32([1e-30]))
    assert (lo[0], hi[0]) == (np.float32(1 - 2.0**-24), np.float32(1))
    assert closed_form_fn("tanh(y)", ()).spread(np.float32([30.0]))[1][0] == np.float32(1)
    tiny = np.float32(2.0**-149)
    assert ulps_apart(np.array([1e-46]), np.array([tiny]), -2)[0] == 0    # not -2^-149
    assert ulps_apart(np.array([1e39]), np.array([np.float32(np.inf)]), -1)[0] == np.inf
    top = np.finfo(np.float32).max
    assert ulps_apart(np.array([float(top)]), np.array([top]), 1)[0] == top


def test_two_calls_are_spread_in_every_combination():
    """Stable softplus max(y, 0) + log1p(exp(-|y|)): exp and log1p, 9 combinations, exact for a g~
    monotone in each result: the spread is the extremes of the four corners."""
    form = closed_form_fn("log(1 + exp(y))", ())
    assert form.calls == 2
    y = np.linspace(-3, 3, 101, dtype=np.float32)
    lo, hi = form.spread(y)
    corners = [form(y, (a, b)) for a in (-1, 1) for b in (-1, 1)]
    assert (lo == np.min(corners, axis=0)).all() and (hi == np.max(corners, axis=0)).all()
    assert (lo <= form(y)).all() and (form(y) <= hi).all()
