"""The activation zoo's data file, and its fast subset (one formula per branch-end kind) through the
whole chain: `invact fit` into a scratch tree, generated torch and Triton code, the runtime."""

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

import invact
from invact import backends, ops
from triton_tolerances import formula_error, is_fitted, within

ZOO = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"
_spec = importlib.util.spec_from_file_location("zoo", ZOO)
zoo = importlib.util.module_from_spec(_spec)
sys.modules["zoo"] = zoo
_spec.loader.exec_module(zoo)

ROWS = zoo.load_rows()
FAST = [r for r in ROWS if r.get("fast")]
SAMPLES = 2**14          # fp32 sample per branch in certification (the zoo script uses 2**20)
APPROX, FLOAT32 = 5e-8, 2.5e-7     # the default tolerance, and its float32 evaluation target (issue 14)


def test_zoo_file():
    names = [r["name"] for r in ROWS]
    assert len(ROWS) >= 50 and len(set(names)) == len(names)
    for r in ROWS:
        assert r["formula"] and r["source"] and r["expect"] in ("exact", "fitted", "refused"), r
        assert (r["expect"] == "refused") == bool(r.get("reason")), r
    kinds = {r.get("ends", "") for r in FAST}
    assert len(FAST) >= 6 and len(kinds) == len(FAST)   # one row per end kind


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    import invact.generated as pkg
    before = list(pkg.__path__)
    path = tmp_path_factory.mktemp("zoo")
    yield path
    pkg.__path__[:] = before
    invact.use_root(Path(before[0]).parent)


@pytest.fixture(scope="module")
def results(root):
    return {r["name"]: zoo.run_row(r, root, SAMPLES, 1 << 14) for r in FAST}


@pytest.mark.parametrize("row", FAST, ids=[r["name"] for r in FAST])
def test_fast_row(row, results):
    r = results[row["name"]]
    assert r.ok, (r.outcome, r.message)
    if r.outcome in ("exact", "fitted"):
        assert r.approx <= APPROX and r.fp32_eval <= FLOAT32
        assert math.isfinite(r.grad_normal) and math.isfinite(r.grad_uniform)


@pytest.mark.skipif(not backends.triton_importable() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton with TRITON_INTERPRET=1 (set in conftest.py)")
@pytest.mark.parametrize("row", FAST, ids=[r["name"] for r in FAST])
def test_fast_row_triton_matches_eager(row, results, root):
    """The generated Triton forward (its own erf/exp/atan in tl operations) is within the formula's
    float32 error of the torch one (tests/test_triton.py's bound), the packed codes agree, and where
    both stored the same y the Triton backward of a fitted table equals the eager one bit for bit
    (same float32 scheme); a closed form's within test_triton's 8 ulps of g plus 2**-21."""
    if results[row["name"]].outcome not in ("exact", "fitted"):
        pytest.skip("refused")
    invact.use_root(root)
    x = torch.cat([torch.linspace(-12, 12, 4099), torch.randn(4096) * 3])
    outs = {}
    for backend in ("eager", "triton"):
        xb = x.clone().requires_grad_()
        y = ops.apply(xb, zoo.table_name(row), None, backend)
        y.backward(torch.ones_like(y))
        outs[backend] = (y.detach(), xb.grad)
    (ye, ge), (yt, gt) = outs["eager"], outs["triton"]
    assert within(yt, ye, 8, formula_error(x))
    same = ye == yt
    assert same.float().mean() > 0.5
    if is_fitted(zoo.table_name(row)):
        assert torch.equal(ge[same], gt[same])
    else:   # closed forms: ATen's CPU sqrt/exp are not correctly rounded (sqrt(0.74368536f) is 1 ulp off
        #     where tl.sqrt_rn is exact), so test_triton's closed-form bound: 8 ulps of g plus 2**-21
        assert within(gt[same], ge[same], 8, 2.0**-21)


@pytest.mark.slow
def test_new_forward_functions_build_for_sm90(results, root):
    """The forwards printed for atan (Cephes atanf in tl operations) and Min/Max (tl.minimum and
    tl.maximum), and a power tail's backward (act_triton.root_power, float64 Newton steps; the exponential
    tail's act_triton.log), build for sm_90 without a GPU like the built-ins' (tests/test_triton_offline.py):
    launched without FP fusion, no FMA in the forward (the backward's are the FMA scheme's explicit
    tl.fma steps, counted for the built-ins by tests/test_triton_offline.py), no approximate division
    or square root."""
    import subprocess
    import triton.backends
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend")
    names = [zoo.table_name(r) for r in FAST if r["name"] in ("arctan", "relu6", "cubic", "exp_plus_x")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"INVACT_ROOT": str(root)}
    script = Path(__file__).with_name("triton_offline.py")
    done = subprocess.run([sys.executable, str(script), "--names", ",".join(names)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    import json
    report = json.loads(done.stdout)
    assert sorted(report) == sorted(names)
    for name, kernels in report.items():
        for kernel, cases in kernels.items():
            for case, found in cases.items():
                assert found["options"] == {"enable_fp_fusion": False}, (name, kernel, case)
                banned = ("div.full.f32", "sqrt.approx.f32") + (("fma.rn.f32",) if kernel == "forward" else ())
                assert not any(found["ptx"][i] for i in banned), (name, kernel, case)
