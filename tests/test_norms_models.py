"""benchmarks/models.py's accounting of the bytes a Llama still saves with activations and norms patched:
the parts add up to the total, and invact's own bytes and autocast's weight casts equal the arithmetic.

Worked out from the config, independently of the script: each SiLU call on n elements keeps a packed 1-bit
code of ceil(n / 8) bytes (runtime/bitpack.py); each RMSNorm call keeps its per-row rstd in float32 (4 bytes a
row; 2 norms per layer and the final one); under bf16 autocast every Linear saves a bfloat16 copy of its
weight (2 bytes an element), the same whatever the batch.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")
from test_models_bench import M  # noqa: E402  (benchmarks/models.py, loaded once)

S = M.QUICK


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    return {r["dtype"]: r for r in M.run(quick=True, models=["Llama"])}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_accounting_adds_up(rows, dtype):
    r = rows[dtype]
    parts = r["both_accounting"]
    assert sum(parts.values()) == r["both_bytes"]
    tokens = S.batch * S.seq
    codes = S.layers * math.ceil(tokens * S.gated / 8)
    rstd = (2 * S.layers + 1) * tokens * 4
    assert parts[M.OWN] == codes + rstd
    assert r["both_floor_ratio"] == pytest.approx((r["both_bytes"] - codes - rstd) / r["baseline_bytes"])
    weights = S.layers * (4 * S.hidden**2 + 3 * S.hidden * S.gated) + S.vocab * S.hidden
    casts = 2 * weights if dtype == "bfloat16" else 0
    assert parts.get(M.CASTS, 0) == casts
    assert r["both_ratio_casts_apart"] < r["both_ratio"] if casts else r["both_ratio_casts_apart"] == r["both_ratio"]
    line = M.format_accounting(r)
    assert f"({r['both_ratio']:.3f}x)" in line and f"{r['both_floor_ratio']:.3f}x" in line
