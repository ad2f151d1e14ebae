"""Re-check every committed table's certificate without the fitter's code.

This file has its own float32 evaluator (written from docs/table-format.md) and its own reference:
x = f^-1(y) by bisection on PyTorch's float64 forward, and g = f'(x) from torch.autograd. Every bf16
and fp16 value of y in each branch's range is evaluated (exhaustive, as the certificate claims).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

TABLES = sorted((Path(__file__).resolve().parents[1] / "generated" / "tables").glob("*.json"))
DERIVATIVE = [p for p in TABLES if not p.name.endswith(".inverse.json")]
# Issue bound on the emitted float32 evaluation error.
F32_BOUND = 2.5e-7
# The reference's own uncertainty: next to a branch point, float64 rounding of f (~1.1e-16 * |y|)
# leaves x uncertain by sqrt(2 * 1.1e-16 * |y_min| / f''(x_min)) <= 1e-8 for the built-ins, so g by
# f'' * 1e-8 <= 5e-9; elsewhere bisection to 1e-15 relative gives far less.
REF_SLACK = 1e-8


def _num(v, params):
    if isinstance(v, (int, float)):
        return float(v)
    if v in ("inf", "-inf"):
        return float(v)
    return float(eval(v, {"__builtins__": {}}, dict(params)))  # noqa: S307 - table numbers/params only


def _all_values(kind):
    bits = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(invalid="ignore"):
        v = bits.astype(np.uint16).view(np.float16).astype(np.float32) if kind == "fp16" \
            else (bits << 16).view(np.float32)
    return np.unique(v[np.isfinite(v)])


def centred(seg, v):
    """A poly segment's u = clamp((T(y) - center) * scale, -1, 1) at float32 ``v``, T its transform."""
    f = np.float32
    tf = seg["transform"]
    if tf["kind"] == "identity":
        t = v
    else:
        hi, mid, lo = (f(o) for o in tf["origin"])
        d = f(tf["sign"]) * (((v - hi) - mid) - lo)
        t = np.sqrt(np.maximum(d, f(0))) if tf["kind"] == "sqrt" else \
            np.log(np.maximum(d, np.finfo(np.float32).tiny))
    return np.clip((t - f(seg["center"])) * f(seg["scale"]), f(-1), f(1))


def _within_one_ulp(fn64):
    """A float32 library function within 1 ulp (the certificate's LIBRARY_ULPS): float64's, rounded once."""
    return lambda v: fn64(np.asarray(v, dtype=np.float64)).astype(np.float32)


def evaluate(code_class, y, params):
    """float32 g~(y), straight from the documented scheme."""
    f = np.float32
    seg_of = np.zeros(y.shape, np.int64)
    for br in code_class["y_breaks"]:
        b = f(_num(br["value"], params))
        seg_of += (y > b) if br["side"] == "left" else (y >= b)
    out = np.full(y.shape, np.nan, np.float32)
    for k, seg in enumerate(code_class["segments"]):
        m = seg_of == k
        v = y[m]
        if seg["kind"] == "constant":
            out[m] = f(_num(seg["value"], params))
        elif seg["kind"] == "exact":
            # numpy >= 2 keeps float32 arithmetic with Python-number constants (NEP 50); exp and log as
            # a library within 1 ulp, as certified (float64's rounded: numpy's float32 exp is 2.4 ulps off)
            scope = {"y": v, "sqrt": np.sqrt, "exp": _within_one_ulp(np.exp), "log": _within_one_ulp(np.log),
                     "Abs": np.abs, **params}
            out[m] = np.broadcast_to(np.asarray(eval(seg["expr"], {"__builtins__": {}}, scope),  # noqa: S307
                                                dtype=np.float32), v.shape)
        else:
            u = centred(seg, v)
            acc = np.zeros_like(u)
            for c in seg["coeffs"][:0:-1]:
                acc = (acc + f(c)) * u
            if "den" in seg:  # rational: u N(u) / Q(u), the division before the last multiplication
                acc = np.zeros_like(u)
                for c in seg["coeffs"][:1:-1]:
                    acc = (acc + f(c)) * u
                q = np.zeros_like(u)
                for d in seg["den"][:0:-1]:
                    q = (q + f(d)) * u
                acc = ((acc + f(seg["coeffs"][1])) / (q + f(seg["den"][0]))) * u
            out[m] = (acc + f(seg["c0_lo"])) + f(seg["coeffs"][0])
    return out


def _ordinal(x):
    """float64 -> int64, monotone (bisection over the bit patterns reaches every float64)."""
    i = x.view(torch.int64)
    return torch.where(i >= 0, i, -(i & 0x7FFFFFFFFFFFFFFF))


def _from_ordinal(k):
    return torch.where(k >= 0, k, (-k) | torch.iinfo(torch.int64).min).view(torch.float64)


def torch_reference(table, branch, y):
    """(x, f'(x)) with f(x) = y on ``branch``, via PyTorch's own float64 forward and autograd.

    x is found by bisection over float64 bit patterns inside the branch's open x interval, so it is
    the float64 next to the true root, and never a kink's other side.
    """
    scope = {"F": F, "torch": torch, **table["params"]}
    forward = eval(f"lambda x: {table['torch_forward']}", scope)  # noqa: S307 - committed tables only
    lo, hi = (torch.tensor(_num(v, {}), dtype=torch.float64) for v in branch["x_range"])
    lo = torch.nextafter(lo.clamp(min=-1e300), torch.tensor(math.inf, dtype=torch.float64))
    hi = torch.nextafter(hi.clamp(max=1e300), torch.tensor(-math.inf, dtype=torch.float64))
    a = torch.full(y.shape, int(_ordinal(lo)), dtype=torch.int64)
    b = torch.full(y.shape, int(_ordinal(hi)), dtype=torch.int64)
    target = torch.from_numpy(y.astype(np.float64))
    rising = branch["direction"] == "increasing"
    for _ in range(66):
        mid = (a >> 1) + (b >> 1) + (a & b & 1)   # no int64 overflow
        v = forward(_from_ordinal(mid))
        below = (v < target) if rising else (v > target)
        a, b = torch.where(below, mid, a), torch.where(below, b, mid)
    x = _from_ordinal(b).requires_grad_()
    (grad,) = torch.autograd.grad(forward(x).sum(), x)
    return x.detach().numpy(), grad.numpy()


def recheck(table: dict, kind: str, evaluator, scheme: str = "") -> None:
    """Every ``kind`` (bf16/fp16) value of y in each branch's range, evaluated by ``evaluator(code class,
    y, params)``, within the certificate's ``{kind}{scheme}_eval_error`` of the reference (and the bound)."""
    params = table["params"]
    values = _all_values(kind)
    cert = {b["index"]: b for b in table["certificate"]["branches"]}
    for branch in table["branches"]:
        if branch["direction"] == "constant":
            continue
        lo, hi = (_num(v, {}) for v in branch["y_range"])
        y = values[(values >= lo) & (values <= hi)]
        cc = table["code_classes"][branch["code"]]
        # ties at a shared y break may belong to the neighbouring branch (hardswish's y = 0)
        owner = np.zeros(y.shape, np.int64)
        for br in cc["y_breaks"]:
            b = np.float32(_num(br["value"], params))
            owner += (y > b) if br["side"] == "left" else (y >= b)
        y = y[np.array([s["branch"] for s in cc["segments"]])[owner] == branch["index"]]
        if y.size == 0:
            continue
        _, g = torch_reference(table, branch, y)
        got = evaluator(cc, y, params).astype(np.float64)
        err = np.abs(got - g) / np.maximum(1.0, np.abs(g))   # absolute below 1, relative above
        finite = np.isfinite(g)
        assert np.all(np.isfinite(got[finite])), "table gives non-finite g where f' is finite"
        worst = float(err[finite].max())
        claimed = cert[branch["index"]][f"{kind}{scheme}_eval_error"]
        assert worst <= claimed + REF_SLACK, (branch["index"], worst, claimed)
        assert worst <= F32_BOUND + REF_SLACK


@pytest.mark.skipif(not DERIVATIVE, reason="no tables generated yet")
@pytest.mark.parametrize("path", DERIVATIVE, ids=[p.stem for p in DERIVATIVE])
@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_certificate_recheck(path, kind):
    table = json.loads(path.read_text())
    if table["torch_forward"] is None:
        pytest.skip("user table: no PyTorch reference")
    recheck(table, kind, evaluate)


@pytest.mark.skipif(not DERIVATIVE, reason="no tables generated yet")
@pytest.mark.parametrize("path", DERIVATIVE, ids=[p.stem for p in DERIVATIVE])
def test_certificate_claims_meet_the_bounds(path):
    table = json.loads(path.read_text())
    cert = table["certificate"]
    assert cert["approx_error"] <= table["tolerance"]
    assert cert["float32_eval_error"] <= F32_BOUND
    assert "rigorous" in cert["checks"] and "bf16-exhaustive" in cert["checks"]
    samples = [b["fp32_samples"] for b in cert["branches"] if b["method"] != "constant"]
    assert all(s >= 2**24 for s in samples) or any(b["fp32_exhaustive"] for b in cert["branches"])
    for seg in (s for cc in table["code_classes"] for s in cc["segments"] if s["kind"] == "poly"):
        assert all(np.float32(c) == c for c in seg["coeffs"] + seg.get("den", []) + [seg["c0_lo"], seg["center"], seg["scale"]])
        assert math.isfinite(seg["error"]) and seg["error"] <= table["tolerance"]
