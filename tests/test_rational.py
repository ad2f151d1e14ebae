"""Rational pieces g = c0 + u N(u) / Q(u): fit, proved pole-free denominator, rigorous bound, table
format, layout choice, and generated torch / Triton code against the numpy emulation and autograd.

Two tables are fitted into a temporary root: "x + tanh(x)/2" (g = 1 + sech(x)^2 / 2 has poles at
x = +-i pi/2, so rationals are cheaper than polynomials and the default layout choice takes them),
and GELU with its left branch rational (``rationals="prefer"``) next to the right branch's
polynomials, so one POLY table holds both kinds of rows.
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
import torch

import invact
from invact import ops, selection
from invact.fitting.arb_bound import den_lower_bound, piece_bound
from invact.fitting.branches import analyze
from invact.fitting.certify import certify_table
from invact.fitting.codegen import generate_all
from invact.fitting.errors import TableError
from invact.fitting.evaluate import eval_code_class, eval_segment, number
from invact.fitting.fit import Transform, f32_below, fit_branch, fit_piece, layout_cost, table_cost
from invact.fitting.formulas import BUILTINS, X, get_spec
from invact.fitting.pipeline import build_table
from invact.fitting.rational import MIN_DEN_MARGIN, den_margin
from invact.fitting.reference import BranchReference
from invact.fitting.tables import load_table, table_path, write_table
from triton_tolerances import needs_interpreter

TOL = 5e-8
SAMPLES = 2**12          # fp32 samples per branch in certification here (committed tables: 2**24)
XTH = "x + tanh(x)/2"


# ------------------------------------------------------------------------------------------------
# one piece: fit, certificate, broken coefficient, poles

@pytest.fixture(scope="module")
def gelu_right():
    """(branch, reference, rational (6, 6) pieces) on GELU's right branch, y in [y_min, 1.92]."""
    b = analyze(BUILTINS["gelu"]).branches[1]
    ref = BranchReference(b)
    y_min = sp.N(b.expr.subs(X, sp.Float(b.x_range[0], 30)), 40)
    pieces = fit_branch(ref, f32_below(float(y_min)), 1.9193730354309082, {"sqrt": (y_min, 1)}, TOL,
                        degrees=(), rationals=((6, 6),))
    return b, ref, pieces


def _x_range(ref, seg):
    xa, xb = sorted(float(v) for v in ref.inverse(np.array(seg["y_range"])))
    return xa - 1e-15 * max(1.0, abs(xa)), xb + 1e-15 * max(1.0, abs(xb))   # as certify does


def test_rational_fit_certifies(gelu_right):
    b, ref, pieces = gelu_right
    for p in pieces:
        seg = p.to_json()
        assert len(seg["den"]) == 7 and seg["den"][0] == 1.0 and len(seg["coeffs"]) == 7
        assert all(np.float32(v) == v for v in seg["coeffs"] + seg["den"] + [seg["c0_lo"], seg["scale"]])
        assert den_lower_bound(seg["den"]) > 0
        bound, _, proved = piece_bound(b.expr, seg, "derivative", *_x_range(ref, seg), TOL)
        assert proved and p.error <= bound <= TOL
        y = np.linspace(*seg["y_range"], 20001)
        assert np.max(np.abs(eval_segment(seg, y) - ref(y))) <= bound     # the bound bounds
        y32 = y.astype(np.float32)
        assert np.max(np.abs(eval_segment(seg, y32) - ref(y32.astype(np.float64)))) <= TOL + 1.5e-7


def test_arb_bound_catches_a_broken_coefficient(gelu_right):
    b, ref, pieces = gelu_right
    seg = pieces[0].to_json()
    xs = _x_range(ref, seg)
    for key, j in (("coeffs", 2), ("den", 3)):
        broken = dict(seg, **{key: list(seg[key])})
        broken[key][j] += 1e-6                   # moves g by ~1e-6 somewhere: far outside 5e-8
        assert not piece_bound(b.expr, broken, "derivative", *xs, TOL)[2], key


def test_denominator_with_a_root_is_rejected(gelu_right):
    b, ref, pieces = gelu_right
    seg = pieces[0].to_json()
    # Q = 1 - 1.25 u vanishes at u = 0.8: no proof, no bound (whatever the numerator)
    assert den_lower_bound([1.0, -1.25]) == -math.inf
    assert piece_bound(b.expr, dict(seg, den=[1.0, -1.25]), "derivative", *_x_range(ref, seg), TOL) == \
        (math.inf, 0, False)
    # the fitter is stricter than the proof: a root just outside [-1, 1] (u = 1.11) is refused too
    assert den_lower_bound([1.0, -0.9]) > 0
    assert den_margin([1.0, -0.9]) == -math.inf and den_margin([1.0, 0.5]) >= MIN_DEN_MARGIN
    # a float32 Horner rounding of Q that could reach 0 is not accepted either
    assert den_lower_bound([1.0, -1.0 + 2.0**-22]) == -math.inf


class _Stub:
    """A reference g(y) on y in [-1, 1] (identity transform: u = y)."""
    target = "derivative"

    def __init__(self, g):
        self.g = g

    def __call__(self, y):
        return self.g(np.asarray(y, dtype=np.float64))


@pytest.mark.parametrize("pole, fits", [(0.3, False), (1.05, False), (1.6, True)])
def test_fit_refuses_poles_on_or_near_the_piece(pole, fits):
    """g = 1 / (pole - y): a pole inside [-1, 1] or within the margin outside gives no piece; one
    further out is fitted by a (3, 2) rational to float32 rounding, far below a degree-5 polynomial
    (same number of coefficients)."""
    ref = _Stub(lambda y: 0.25 / (pole - y))
    rational = fit_piece(ref, -1.0, 1.0, Transform("identity"), 3, 2)
    if not fits:
        assert rational.error == math.inf and rational.den is None
        return
    poly = fit_piece(ref, -1.0, 1.0, Transform("identity"), 5)
    assert rational.error < 1e-8 and poly.error > 1e-5
    assert den_lower_bound(rational.den) > 0


# ------------------------------------------------------------------------------------------------
# layout choice

def test_table_cost_charges_every_element_for_the_division():
    """A rational branch that is cheaper on its own (GELU's left branch: 3 pieces (4, 4) vs 3 of
    degree 12) can make the table dearer: every element then runs the denominator and the division,
    and the row grows by its columns (so GELU's committed table stays polynomial)."""
    assert layout_cost(4, 3, 4) < layout_cost(12, 3)
    assert table_cost([(4, 4, 3), (14, 0, 2)], 2) > table_cost([(12, 0, 3), (14, 0, 2)], 2)
    # a branch is priced as if the table had another like it (segments share the column permutes)
    assert table_cost([(4, 4, 6)] * 2, 2) == layout_cost(4, 6, 4)


# ------------------------------------------------------------------------------------------------
# tables with rational pieces, fitted into a temporary root

def _rational(seg) -> bool:
    return seg["kind"] == "poly" and "den" in seg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A project root with the x + tanh(x)/2 table (default layout choice) and GELU with a rational
    left branch next to the committed polynomial right branch; generated code for both."""
    root = tmp_path_factory.mktemp("rational")
    xth = build_table(get_spec(XTH, name="xth"), fp32_samples=SAMPLES)
    write_table(xth, table_path("xth", root=root))
    mixed = build_table(BUILTINS["gelu"], fp32_samples=SAMPLES, rationals="prefer")
    committed = load_table(table_path("gelu"))                     # right branch: polynomials
    assert not any(map(_rational, committed["code_classes"][0]["segments"]))
    mixed["name"] = "gelu_mixed"
    mixed["code_classes"][0] = committed["code_classes"][0]
    mixed["branches"][1] = committed["branches"][1]
    mixed["certificate"] = certify_table(mixed, fp32_samples=SAMPLES)
    write_table(mixed, table_path("gelu_mixed", root=root))
    generate_all(root)
    return root


@pytest.fixture(scope="module")
def tables(root):
    return {name: load_table(table_path(name, root=root)) for name in ("xth", "gelu_mixed")}


def test_tables_with_rational_pieces_certify(tables):
    xth, mixed = tables["xth"], tables["gelu_mixed"]
    assert all(map(_rational, [s for s in xth["code_classes"][0]["segments"] if s["kind"] == "poly"]))
    assert xth["branches"][0]["den_degrees"] and any(map(_rational, mixed["code_classes"][1]["segments"]))
    for t in tables.values():
        cert = t["certificate"]
        assert cert["approx_error"] <= TOL and cert["float32_eval_error"] <= 2.5e-7
        assert "arb-taylor2" in {b["method"].split("+")[0] for b in cert["branches"]}


def test_polynomials_only_when_asked():
    t = build_table(get_spec(XTH, name="xth_poly"), fp32_samples=SAMPLES, rationals="never")
    assert not any(map(_rational, t["code_classes"][0]["segments"]))


def test_den_is_validated(root, tables, tmp_path):
    for bad in ([2.0, 0.5], [1.0], [1.0, "x"]):
        t = dict(tables["xth"], code_classes=[dict(tables["xth"]["code_classes"][0])])
        segs = t["code_classes"][0]["segments"] = [dict(s) for s in t["code_classes"][0]["segments"]]
        next(s for s in segs if _rational(s))["den"] = bad
        with pytest.raises(TableError, match="den"):
            load_table(write_table(t, tmp_path / "generated" / "tables" / "xth.json"))


# ------------------------------------------------------------------------------------------------
# generated code == the emulated float32 scheme

def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"_rational_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _samples(cc, n=3000):
    rng = np.random.default_rng(0)
    out = [np.float32([0.0, -0.0, np.inf, -np.inf, np.nan])]
    for seg in cc["segments"]:
        lo, hi = (max(min(number(v), 1e6), -1e6) for v in seg["y_range"])
        out += [rng.uniform(lo, hi, n).astype(np.float32), np.float32([lo, hi])]
    return np.concatenate(out)


@pytest.mark.parametrize("name", ["xth", "gelu_mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generated_torch_matches_the_scheme(root, tables, name, dtype):
    """g_kernel (eager gathers) and the compiled path's column selection against evaluate.py. Same
    operations in the same order; torch's float32 sqrt is not correctly rounded, hence a few ulps
    (as tests/test_codegen.py)."""
    table = tables[name]
    mod = _import(root / "generated" / f"torch_{name}.py")
    assert any(r[-1] != 0.0 for r in mod.POLY)            # the den columns are there
    npdt = np.float32 if dtype == torch.float32 else np.float64
    k = ops.module_constants(mod, dtype, torch.device("cpu"), ())
    for cc in table["code_classes"]:
        y = _samples(cc).astype(npdt)
        code = torch.full(y.shape, cc["code"], dtype=torch.uint8)
        yt = torch.from_numpy(y)
        got = mod.g_kernel(yt, code, k.y_thresholds, k.poly).numpy()
        want = eval_code_class(cc, y, table["params"])
        assert np.array_equal(np.isnan(got), np.isnan(want))
        ok = np.isfinite(want)
        ulp = np.spacing(np.abs(want[ok]).astype(npdt))
        tol = 8 * ulp + (4 * np.finfo(npdt).eps if npdt == np.float32 else 1e-14 * np.maximum(1, np.abs(want[ok])))
        np.testing.assert_array_less(np.abs(got[ok] - want[ok]), tol, err_msg=f"{name} code {cc['code']}")
        # compiled path: the columns selected by blend chains are the eager path's gathered rows
        y_ok = yt[~torch.isnan(yt)]
        codes = None if not mod.CODE_BITS else torch.full(y_ok.shape, cc["code"], dtype=torch.int32)
        cols = selection.columns(mod.POLY, mod.CLASSES, y_ok, k.y_thresholds.tolist(), codes, k.y_strict)
        _, first, count, first_thr = next(c for c in mod.CLASSES if c[0] == cc["code"])
        passed = [y_ok > t if strict else y_ok >= t for t, strict in
                  zip(k.y_thresholds[first_thr:first_thr + count - 1], k.y_strict[first_thr:first_thr + count - 1])]
        seg = sum((p.to(torch.int64) for p in passed), torch.zeros_like(y_ok, dtype=torch.int64)) + first
        rows = k.poly.index_select(1, seg)
        for j, col in enumerate(cols):
            assert torch.equal(torch.as_tensor(col, dtype=dtype).expand_as(y_ok), rows[j]), (name, j)


@pytest.fixture
def in_root(root, monkeypatch):
    """The runtime loads activations from ``root`` inside the test, the installed tree after."""
    import invact.generated as pkg
    src = Path(pkg.__file__).parent
    monkeypatch.setattr(pkg, "__path__", list(pkg.__path__))
    invact.use_root(root)
    yield root
    monkeypatch.undo()
    invact.use_root(src.parent)


def _reference(name, x):
    if name == "xth":
        return x + torch.tanh(x) / 2
    return torch.nn.functional.gelu(x)


@pytest.mark.parametrize("name", ["xth", "gelu_mixed"])
def test_gradients_match_autograd(in_root, tables, name):
    """invact's backward (eager, float32) against autograd of the formula in float64 at the same x:
    within the information floor |f'(x) - g(y)| at the stored y (g from the independent float64
    reference on x's branch; docs/floors.md: 4.3e-5 for GELU next to its branch point, where y barely
    moves with x), plus the certified approximation and float32 evaluation errors and 4 ulps."""
    from invact.fitting.certify import branch_reference
    table = tables[name]
    x = torch.cat([torch.linspace(-8, 8, 40_001), torch.tensor([-0.7517915, -0.75, 0.0, 1e-3])])
    xi = x.clone().requires_grad_()
    y = invact.activation(name, backend="eager")(xi)
    y.sum().backward()
    xr = x.double().requires_grad_()
    _reference(name, xr).sum().backward()
    fp = xr.grad.numpy()
    floor = np.zeros_like(fp)
    for i, branch in enumerate(table["branches"]):
        lo, hi = (number(v) for v in branch["x_range"])
        on = (x.numpy() >= lo) & (x.numpy() <= hi)
        floor[on] = np.abs(fp[on] - branch_reference(table, i)(y.detach().double().numpy()[on]))
    cert = table["certificate"]
    bound = floor + (cert["approx_error"] + cert["float32_eval_error"]) * np.maximum(1, np.abs(fp)) \
        + 4 * 2.0**-24 * (np.abs(fp) + 1)
    err = np.abs(xi.grad.double().numpy() - fp)
    assert (err <= bound).all(), (err - bound).max()
    if name != "gelu_mixed":
        assert err.max() <= 3e-7
        return
    # as good as the committed GELU table on this machine: both read the same stored y (PyTorch's GELU,
    # whose rounding next to the minimum differs by CPU kernel), so their worst errors differ by at most
    # both tables' certified approximation and float32 evaluation errors
    xg = x.clone().requires_grad_()
    invact.activation("gelu", backend="eager")(xg).sum().backward()
    builtin = invact.ops.info("gelu")["certificate"]
    slack = sum(c["approx_error"] + c["float32_eval_error"] for c in (cert, builtin)) * max(1.0, np.abs(fp).max())
    assert err.max() <= np.abs(xg.grad.double().numpy() - fp).max() + slack


@needs_interpreter
@pytest.mark.parametrize("name", ["xth", "gelu_mixed"])
def test_triton_matches_eager(in_root, name):
    """The Triton backward (tl.div_rn: IEEE division, as torch's) against the eager torch one on
    the same (y, code): 8 float32 ulps of |g go| plus |go| 2^-21 (tests/test_triton.py)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=g) * 4
    params = []
    y, code = torch.ops.invact.forward(x, name, params, "eager")
    go = torch.randn(x.shape, generator=g)
    a = torch.ops.invact.backward(go, y, code, name, params, "triton")
    b = torch.ops.invact.backward(go, y, code, name, params, "eager")
    tol = 8 * 2.0**-23 * torch.maximum(a.abs(), b.abs()) + go.abs() * 2.0**-21
    assert ((a - b).abs() <= tol).all(), (a - b).abs().max()


@pytest.mark.slow
def test_compiled_backward_matches_eager(in_root):
    """The compiled CPU backward (POLY columns by blend chains, invact.selection) on rational rows:
    the same float32 scheme as the eager gathers (inductor may contract to FMA: a few ulps)."""
    x = torch.randn(2000, generator=torch.Generator().manual_seed(2)) * 4
    y, code = torch.ops.invact.forward(x, "xth", [], "eager")
    go = torch.randn_like(y)
    a = torch.ops.invact.backward(go, y, code, "xth", [], "eager")
    b = torch.ops.invact.backward(go, y, code, "xth", [], "compiled")
    torch.testing.assert_close(a, b, rtol=4 * 2.0**-23, atol=4 * 2.0**-24)
