"""Re-check every committed table's FMA figures (certificate: ``*_fma_eval_error``) without the fitter's code.

As tests/test_certificates.py does for the scheme without FMA, and with its reference (x by bisection on
PyTorch's float64 forward, g = f'(x) by autograd): this file evaluates the FMA scheme from
docs/table-format.md with the C library's fmaf (a tiny library built here with the system C compiler,
correctly rounded in hardware or in glibc's software), not with the fitter's emulation, at every bf16
and fp16 value of y in each branch's range (exhaustive, as the certificate claims).
"""

import ctypes
import json
import subprocess

import numpy as np
import pytest

from invact import cpu_kernel
from test_certificates import DERIVATIVE, F32_BOUND, _num, centred, evaluate, recheck

_SOURCE = """#include <math.h>
void invact_test_fmaf(long n, const float *a, const float *b, const float *c, float *out) {
    for (long i = 0; i < n; i++) out[i] = fmaf(a[i], b[i], c[i]);
}
"""


@pytest.fixture(scope="module")
def fmaf(tmp_path_factory):
    """fmaf over float32 arrays (broadcast), by the C library."""
    compiler = cpu_kernel._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    folder = tmp_path_factory.mktemp("fmaf")
    (folder / "fmaf.c").write_text(_SOURCE)
    subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-o", str(folder / "fmaf.so"), str(folder / "fmaf.c"), "-lm"],
                   check=True, capture_output=True)
    lib = ctypes.CDLL(str(folder / "fmaf.so"))
    lib.invact_test_fmaf.argtypes = [ctypes.c_long] + [ctypes.c_void_p] * 4

    def call(a, b, c):
        a, b, c = (np.ascontiguousarray(np.broadcast_to(np.float32(v) if np.isscalar(v) else v, np.shape(b)),
                                        dtype=np.float32) for v in (a, b, c))
        out = np.empty_like(b)
        lib.invact_test_fmaf(out.size, *(v.ctypes.data for v in (a, b, c, out)))
        return out
    return call


def evaluate_fma(code_class, y, params, fmaf):
    """float32 g~(y) by the FMA scheme: poly rows as docs/table-format.md marks them [fma], the other
    segments as tests/test_certificates.py evaluates them (they have no fused step)."""
    f = np.float32
    out = evaluate(code_class, y, params)
    seg_of = np.zeros(y.shape, np.int64)
    for br in code_class["y_breaks"]:
        b = f(_num(br["value"], params))
        seg_of += (y > b) if br["side"] == "left" else (y >= b)
    for k, seg in enumerate(code_class["segments"]):
        m = seg_of == k
        if seg["kind"] != "poly" or len(seg["coeffs"]) < 2 or not m.any():
            continue
        u = centred(seg, y[m])
        c = seg["coeffs"]
        p = np.full_like(u, f(c[-1]))
        for cj in c[-2:0:-1]:
            p = fmaf(p, u, cj)
        if "den" in seg:
            q = np.full_like(u, f(seg["den"][-1]))
            for dj in seg["den"][-2::-1]:
                q = fmaf(q, u, dj)
            p = p / q
        out[m] = fmaf(p, u, seg["c0_lo"]) + f(c[0])
    return out


@pytest.mark.skipif(not DERIVATIVE, reason="no tables generated yet")
@pytest.mark.parametrize("path", DERIVATIVE, ids=[p.stem for p in DERIVATIVE])
@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_fma_certificate_recheck(path, kind, fmaf):
    table = json.loads(path.read_text())
    if table["torch_forward"] is None:
        pytest.skip("user table: no PyTorch reference")
    cert = table["certificate"]["branches"]
    if not any(s["kind"] == "poly" for cc in table["code_classes"] for s in cc["segments"]):
        # no fused step: the FMA scheme is the other one, whose figures test_certificates rechecks
        assert all(b[f"{kind}_fma_eval_error"] == b[f"{kind}_eval_error"] for b in cert)
        return
    recheck(table, kind, lambda cc, y, params: evaluate_fma(cc, y, params, fmaf), "_fma")


@pytest.mark.skipif(not DERIVATIVE, reason="no tables generated yet")
@pytest.mark.parametrize("path", DERIVATIVE, ids=[p.stem for p in DERIVATIVE])
def test_both_figures_meet_the_bound(path):
    """Every certificate carries both schemes' figures, each within the issue's bound; the FMA one is
    the max over its branches' bf16, fp16 and fp32 figures, as the other is over its own."""
    cert = json.loads(path.read_text())["certificate"]
    assert cert["float32_eval_error"] <= F32_BOUND and cert["float32_fma_eval_error"] <= F32_BOUND
    for scheme, top in (("", "float32_eval_error"), ("_fma", "float32_fma_eval_error")):
        assert cert[top] == max(b[f"{k}{scheme}_eval_error"] for b in cert["branches"] for k in ("bf16", "fp16", "fp32"))
