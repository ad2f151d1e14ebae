"""A jump between branches is judged relative to the formula's own scale (fitting/branches.py).

The gap allowed between the two sides' y at a piece boundary is 1e-9 relative to y there plus float64's
noise of each side's y (JUMP_NOISE roundings of the magnitudes it adds up, and of the boundary x times
f'): all of it scales with f, so c*f gets f's verdict for every c. It was 1e-9*(1 + |y|), absolute near
y = 0, so a 1e-10 jump at y = 0 passed as continuous.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sympy")

from invact.fitting import SpecError, get_spec  # noqa: E402
from invact.fitting.branches import analyze  # noqa: E402

SCALES = ("1e-8", "1", "1e8")

JUMPS = [
    "Piecewise((x, x < 0), (x + 1e-10, True))",
    "Piecewise((0, x < 0), (x + 1e-10, True))",            # relu with a jump
    "Piecewise((exp(x) - 1, x < 0), (x + 1e-10, True))",   # the jump is far above exp(x) - 1's noise
    "Piecewise((x - 1, x < 1), (x - 1 + 1e-10, True))",    # at x = 1: x's rounding moves y by 1e-16 only
]
CONTINUOUS = [
    "Piecewise((exp(x) - 1, x < 0), (x, True))",
    "Piecewise((x**3 - 0.001, x < 0.1), (0.03*(x - 0.1), True))",   # 1.5e-19 apart at x = 0.1: float noise
    "Piecewise((x**2 - 2, x < sqrt(2)), (2*sqrt(2)*(x - sqrt(2)), True))",   # the boundary is a float
    "Piecewise((log(1 + exp(x)), x < 20), (x, True))",     # softplus's threshold: 2e-9 at y = 20
]


def _verdict(formula: str) -> str:
    try:
        analyze(get_spec(formula, "p", {}))
    except SpecError as exc:
        assert "discontinuous" in str(exc), exc
        return "jump"
    return "continuous"


@pytest.mark.parametrize("formula", JUMPS)
@pytest.mark.parametrize("c", SCALES)
def test_a_small_jump_is_refused_at_every_scale(formula, c):
    assert _verdict(f"{c}*({formula})") == "jump"


@pytest.mark.parametrize("formula", CONTINUOUS)
@pytest.mark.parametrize("c", SCALES)
def test_a_continuous_formula_passes_at_every_scale(formula, c):
    assert _verdict(f"{c}*({formula})") == "continuous"
