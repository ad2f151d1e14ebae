"""The scan's refusals come fast and say what they saw, and a change of f finer than the scans resolve is
a ScaleError (exit 2), not an internal error nor a wrong table. Each test failed before its fix;
expectations come from the mathematics of each formula."""

from __future__ import annotations

import numpy as np
import pytest

sp = pytest.importorskip("sympy")

from invact.fitting import scan  # noqa: E402
from invact.fitting.branches import analyze  # noqa: E402
from invact.fitting.errors import ScaleError, SpecError  # noqa: E402
from invact.fitting.formulas import X, get_spec  # noqa: E402
from invact.fitting.model import Table  # noqa: E402
from invact.fitting.pipeline import build_table  # noqa: E402
from invact.fitting.reference import BranchReference  # noqa: E402

TOL = 5e-8
PRODUCT_49 = "x*" + "*".join(f"(1+x/{k})" for k in range(1, 50))   # roots 0, -1, ..., -49: f' has 49 sign changes
PRECISE_CALLS = 8   # far fewer than the ~100 evalf calls of f' (about 0.8 s each) the 49-factor product took


@pytest.fixture
def precise_counted(monkeypatch):
    """scan's 15-digit evaluation, counted; more than PRECISE_CALLS calls fail the test at once."""
    calls = []

    def counted(expr, x):
        calls.append(x)
        if len(calls) > PRECISE_CALLS:
            raise AssertionError(f"numeric.precise called more than {PRECISE_CALLS} times")
        return real(expr, x)
    real = scan.precise
    monkeypatch.setattr(scan, "precise", counted)
    return calls


# --- 1. many sign changes of f': refused without evalf of each, and by their number ---------------

@pytest.mark.parametrize("formula, words, absent", [
    (PRODUCT_49, "f' changes sign 49 times", "infinitely"),
    (PRODUCT_49, "f has more than 17 monotone branches there (at least 50; the fitter handles up to 17", "appears"),
    ("sin(x)", "the function appears to have infinitely many monotone branches", "more than 17"),
])
def test_many_sign_changes_are_refused_without_evalf_of_each(precise_counted, formula, words, absent):
    """A polynomial with 49 extrema took 77 s (evalf of its long f' at both sides of every change) and
    was said to have 'infinitely many' branches; sin(x)'s changes go on out to |x| ~ 1e9 and beyond."""
    with pytest.raises(SpecError) as info:
        analyze(get_spec(formula, "t", {}))
    text = str(info.value)
    assert words in text and absent not in text, text
    assert len(precise_counted) == 0


def test_a_few_too_many_sign_changes_are_counted_and_not_called_infinite():
    """sin(x)*exp(-x**2) has 18 sign changes of f' that float64 resolves (|x| <= 25.2, where
    exp(-x**2) is still a normal number): 17 are the most, 18 are refused after the 15-digit check
    of each, as a finite number."""
    with pytest.raises(SpecError) as info:
        analyze(get_spec("sin(x)*exp(-x**2)", "t", {}))
    text = str(info.value)
    assert "f' changes sign 18 times" in text and "more than 17 monotone branches there (at least 19" in text, text
    assert "infinitely" not in text, text


def test_float64_noise_in_f_prime_is_not_counted_as_sign_changes():
    """x/sqrt(1 + x**2): f' = (1 + x^2)^(-3/2) > 0, but float64's 1/sqrt(1 + x^2) - x^2/(1 + x^2)^(3/2)
    cancels far out and changes sign ~100 times; none of those moves by under 1e-6 when x moves by 4
    ulps, and f there is 1 to float64's last digits, so none counts towards the fast refusal."""
    (branch,) = analyze(get_spec("x/sqrt(1 + x**2)", "t", {})).branches
    fp = sp.diff(branch.expr, X)
    grid = scan.scan_grid(-np.inf, np.inf)
    values = scan.numeric(fp)(grid)
    assert np.sum(np.sign(values[:-1]) * np.sign(values[1:]) < 0) > scan.FAST_REFUSAL
    assert scan._stable_changes(scan.numeric(branch.expr), scan.numeric(fp), grid).size == 0


def test_a_formula_is_lambdified_once():
    """lambdify prints its expression, which for f' of a 400-factor product (160,000 factors) takes
    tens of seconds; the analysis asks for float64 f' in several steps (the real-valuedness check,
    the scan): printing it again took about 25 s of that formula's 60 s refusal."""
    first, again = (sp.diff(get_spec(PRODUCT_49, "t", {}).expr, X) for _ in range(2))
    assert scan.numeric(first) is scan.numeric(again)


# --- 2. a change of f finer than the scans resolve ----------------------------------------------------

def test_a_rise_at_a_scan_point_finer_than_the_fit_is_a_scale_error():
    """x + tanh(1e20*x)/1e20: g = 1 + sech(1e20 x)^2 is 2 at y = 0 and 1 from |y| ~ 1e-19; the scan sees
    f' = 2 at its point 0 and 1 at the next, the fit's samples miss the rise, and its proof failed with
    an internal CertificationError."""
    with pytest.raises(ScaleError) as info:
        build_table(get_spec("x + tanh(1e20*x)/1e20", "q", {}), fp32_samples=4096)
    text = str(info.value)
    assert "finer than the scan's grid resolves" in text and "near x in [" in text, text
    assert "rescale x in the formula" in text and "or shift it nearer 0" in text, text


def test_a_scale_error_names_the_parameter_setting_the_scale():
    with pytest.raises(ScaleError) as info:
        build_table(get_spec("x + tanh(a*x)/a", "q", {"a": 1e20}), fp32_samples=4096)
    assert "a = 1e+20" in str(info.value), str(info.value)


def test_unresolved_changes_close_in_on_the_rise():
    """From the scan's grid the mismatch of f's step and f' is followed down to f's own scale of change:
    about 1e-20 for tanh(1e20*x)/1e20 (f' there is 1 + sech(1e20 x)^2), about 1e-6 for a = 1e6; the
    rise is at x = 0, inside each interval or at its end."""
    for a, scale in ((1e20, 1e-20), (1e6, 1e-6)):
        (b,) = analyze(get_spec(f"x + tanh({a:g}*x)/{a:g}", "q", {})).branches
        ref = BranchReference(b)
        found = scan.unresolved_changes(ref.f, ref.fp, *b.x_range)
        assert found and all(lo <= 0.0 <= hi and scale / 10 < hi - lo < scale * 10 for lo, hi in found), found


def test_a_rise_the_fit_resolves_still_fits():
    """x + tanh(1e6*x)/1e6 rises within |x| ~ 1e-6, which the fit's pieces follow: fitted and certified
    within the tolerance, as before the scale check."""
    table = Table.of(build_table(get_spec("x + tanh(1e6*x)/1e6", "q", {}), fp32_samples=4096))
    assert table.certificate["approx_error"] <= TOL


def test_a_rise_between_neighbouring_float32_values_is_a_scale_error_not_a_table():
    """x + tanh(1e12*(x - 1))/1e12: g(1) = f'(1) = 2 while g is 1 at the float32 values next to y = 1
    (their x are ~1e-7 from 1, 1e5 times the rise's scale); a constant tail g = 1 was written with a
    certificate whose float32 error was 0.49."""
    with pytest.raises(ScaleError) as info:
        build_table(get_spec("x + tanh(1e12*(x - 1))/1e12", "q", {}), fp32_samples=4096)
    text = str(info.value)
    assert "at y = 1," in text and "near x = 1 " in text and "three neighbouring float32 values" in text, text
