"""A rise of f between the scan's grid points (0 and 0.006 near 0) that float64 sees nothing of at
those points is a ScaleError (exit 2) naming where it is, not an internal CertificationError; one that
falls between float32 values, where the table is right at every float32 input, is still written.
Expectations come from the mathematics of each formula; each refusal test failed before its fix."""

from __future__ import annotations

import re

import numpy as np
import pytest

sp = pytest.importorskip("sympy")

from helpers import CHEAP, invact_cli  # noqa: E402

from invact.fitting import scan  # noqa: E402
from invact.fitting.branches import analyze  # noqa: E402
from invact.fitting.errors import ScaleError  # noqa: E402
from invact.fitting.formulas import get_spec  # noqa: E402
from invact.fitting.model import Table  # noqa: E402
from invact.fitting.pipeline import build_table  # noqa: E402
from invact.fitting.reference import BranchReference  # noqa: E402

TREE_TABLES = ()
PROOF_RISE = "x + tanh(1e20*(x - 1e-5))/1e20"    # g = 1 + sech(1e20 (x - 1e-5))^2: 2 within 1e-20 of 1e-5
WIDE_RISE = "x + tanh(1e8*(x - 0.001))/1e4"      # g = 1 + 1e4 sech(1e8 (x - 0.001))^2: 1e4 at x = 0.001
INTERVAL = re.compile(r"at a point of x in \[([-+0-9.e]+), ([-+0-9.e]+)\]")


def test_a_rise_inside_a_fitted_piece_that_its_proof_finds_is_a_scale_error(tmp_path, capsys):
    """The rise at 1e-5 lies inside the fitted piece on |y| < 4.6e-5, between the scan's points 0 and
    0.006 and between the fit's float64 samples; the piece's proof finds g's error of about 1 there:
    that was an internal CertificationError naming the whole piece. Now exit 2, naming a part of x
    (much narrower than the piece's 9.2e-5) that holds the rise at x = 1e-5 (to within its width 1e-20)."""
    status, _, err = invact_cli(capsys, "fit", PROOF_RISE, "--name", "hid", "--root", tmp_path / "r",
                                "--no-generate", *CHEAP)
    assert status == 2, err
    assert "internal error" not in err and "scale of x finer than the fitter's scans" in err, err
    assert "rescale x in the formula" in err, err
    a, b = map(float, INTERVAL.search(err).groups())
    assert a < 1e-5 < b and b - a < 1e-6, (a, b)


def test_a_rise_in_a_constant_tail_that_float32_checks_find_is_a_scale_error():
    """The rise at 0.001 lies in the constant tail g = 1 (y > 4.6e-5), between the scan's points 0 and
    0.006 and the tail's scan points; the bf16/fp16 checks find g = 1e4 there (its y range is
    0.001 +- 1e-4), but g changes by far less than the tolerance between neighbouring float32 values:
    that was an internal CertificationError ('the fitter should have refined')."""
    with pytest.raises(ScaleError) as info:
        build_table(get_spec(WIDE_RISE, "hid", {}), fp32_samples=4096)
    text = str(info.value)
    assert "scan's neighbouring grid points x = 0 and 0.006" in text and "(x = 0.001" in text, text
    assert "rescale x in the formula" in text, text


def test_unresolved_at_names_the_grid_points_around_a_hidden_rise():
    """f' = 1 + 1e4 sech(1e8 (x - 0.001))^2 is 1e4 at 0.001 and 1 at the grid points 0 and 0.006 either
    side (the grid's points, from -60 in steps of 0.006, are 0 and 0.006 to within an ulp of 60);
    1 + x**2 (smooth) departs from its chord over a grid step by ~1e-5 of itself, far below
    MEAN_VALUE_MISMATCH; at a grid point itself there is nothing between."""
    (b,) = analyze(get_spec(WIDE_RISE, "hid", {})).branches
    ref = BranchReference(b)
    found = scan.unresolved_at(ref.fp, 0.001, *b.x_range)   # linspace from -60: within an ulp of 60
    assert found == pytest.approx((0.0, 0.006), abs=np.spacing(scan.SCAN)), found
    smooth = scan.numeric(sp.sympify("1 + x**2"))
    assert scan.unresolved_at(smooth, 0.001, -np.inf, np.inf) is None
    assert scan.unresolved_at(ref.fp, 0.006, *b.x_range) is None


def test_a_rise_between_float32_values_is_still_written():
    """The same rise at 0.001 scaled by 1e-20: y moves by 2e-20 there, between float32 values (1.2e-10
    apart at 0.001), and g = 1 is right at every float32 input: the table is written as before."""
    table = Table.of(build_table(get_spec("x + tanh(1e20*(x - 0.001))/1e20", "hid", {}), fp32_samples=4096))
    assert max(table.certificate["float32_eval_error"], table.certificate["float32_fma_eval_error"]) == 0.0


def test_the_scan_grid_is_built_once_and_callers_get_their_own_copy():
    """scan_grid was rebuilt (60k points sorted) by each of its five callers for the same piece."""
    scan._full_grid.cache_clear()
    first = scan.scan_grid(-np.inf, np.inf)
    first[:] = 0.0
    again = scan.scan_grid(-np.inf, np.inf)
    assert scan._full_grid.cache_info().misses == 1
    assert again.size == first.size and again[0] == -scan.FAR_SCAN and np.all(np.diff(again) > 0)


@pytest.mark.parametrize("sampled, count, kind", [(0.0, 100, "ScaleError"),       # nothing float64 sees
                                                  (3.0, 100, "CertificationError"),  # 3 tolerances: float64 sees it
                                                  (0.0, 0, "CertificationError")])   # no sample in the segment
def test_a_violation_float64_sees_is_the_fitters_own_miss(monkeypatch, sampled, count, kind):
    """A proof's violation is blamed on the formula's scale (ScaleError) only where dense float64 samples
    show the piece within the tolerance (1 here); any error above it that float64 shows, even below
    SCALE_MISS tolerances, or no sample at all, is the fitter's own miss: a CertificationError."""
    from types import SimpleNamespace

    from invact.fitting import segments

    monkeypatch.setattr(segments, "_sampled_error", lambda ctx, seg, a, b: (sampled, 1e-9, count))
    ctx = SimpleNamespace(tolerance=1.0, ref=SimpleNamespace(f=lambda x: np.asarray(x, dtype=float)))
    error = segments._violation_error(ctx, None, "the piece", 0.0, 1.0, 2.0)
    assert type(error).__name__ == kind, error
