"""benchmarks/models.py: measured savings on real architectures equal the byte arithmetic, and where they
differ from the estimate (input bytes - code bytes) the script names the cause.

Expected bytes are worked out here from the configs, independently of the script: a replaced activation
called on n elements of itemsize b frees its saved input (n*b bytes) and adds a packed 1-bit code of
ceil(n/8) bytes (runtime/bitpack.py: 8 codes per byte); its output y is the tensor the next op saves
anyway, so y costs nothing. Under bf16 autocast the activation's input is the output of a Linear, which
autocast runs in bfloat16: b = 2.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
_spec = importlib.util.spec_from_file_location("invact_bench_models",
                                               Path(__file__).parents[1] / "benchmarks" / "models.py")
M = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))   # dataclasses need it there
_spec.loader.exec_module(M)

S = M.QUICK
ITEMSIZE = {"float32": 4, "bfloat16": 2}


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], dict]:
    return {(r["model"], r["dtype"]): r for r in M.run(quick=True, models=["Llama", "Phi-3"])}


def _per_call(n: int, dtype: str) -> tuple[int, int]:
    """(input bytes, code bytes) of one activation call on n elements."""
    return n * ITEMSIZE[dtype], math.ceil(n / 8)


@pytest.mark.parametrize("dtype", list(ITEMSIZE))
def test_swiglu_saves_exactly_the_input_less_the_code(rows, dtype):
    # Llama's MLP: down(silu(gate(x)) * up(x)); the multiply saves silu's output, so invact's y is free
    r = rows[("Llama", dtype)]
    x, code = _per_call(S.batch * S.seq * S.gated, dtype)
    assert r["calls"] == S.layers and r["replaced"] == S.layers
    assert r["theory_bytes"] == S.layers * (x - code)
    assert r["measured_bytes"] == r["theory_bytes"] and r["agree"] and r["reasons"] == []
    assert r["baseline_bytes"] - r["patched_bytes"] == r["measured_bytes"]
    assert r["measured_pct"] == pytest.approx(100 * r["measured_bytes"] / r["baseline_bytes"])


@pytest.mark.parametrize("dtype", list(ITEMSIZE))
def test_fused_gate_up_is_freed_by_copied_chunks(rows, dtype):
    # Phi-3: gate, up = gate_up_proj(x).chunk(2); silu's input is half of a storage the multiply keeps for
    # `up`. patch(example=) copies the chunks inside the MLP (the multiply saves its own copy of up, n
    # elements, and the 2n fused output is saved by nobody): x's bytes are freed after all, less the code
    r = rows[("Phi-3", dtype)]
    x, code = _per_call(S.batch * S.seq * S.gated, dtype)
    assert r["theory_bytes"] == S.layers * (x - code)
    assert r["measured_bytes"] == r["theory_bytes"] and r["agree"] and r["reasons"] == []


def test_formula_activation_saves_more(tmp_path):
    # GPT-2's NewGELUActivation, 0.5*x*(1 + tanh(c*(x + 0.044715*x**3))), saves x (pow), tanh's output,
    # 0.5*x and 1 + tanh: 4 tensors of x's size, all freed; c_proj saves invact's y anyway
    out = tmp_path / "rows.json"
    assert M.main(["--quick", "--models", "GPT-2", "--dtypes", "float32", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    x, code = _per_call(S.batch * S.seq * S.ffn, "float32")
    assert r["theory_bytes"] == S.layers * (x - code)
    assert r["measured_bytes"] == S.layers * (4 * x - code)
    assert len(r["reasons"]) == 1 and "saves 4 tensors per call" in r["reasons"][0]
    assert f"+{S.layers * 3 * x / M.MiB:.2f} MiB" in r["reasons"][0]


def test_unimportable_model_is_skipped_with_the_reason(monkeypatch):
    def build(size):
        raise ImportError("no module named 'missing'")
    monkeypatch.setattr(M, "SPECS", [M.Spec("broken", build, M._tokens)])
    (r,) = M.run(quick=True, models=["broken"], dtypes=["float32"])
    assert r["skipped"] == "ImportError: no module named 'missing'"
    assert "skipped: ImportError" in M.format_row(r)
    with pytest.raises(ValueError, match="unknown model"):
        M.run(quick=True, models=["nope"])


NEW_FAMILIES = ["Mamba", "Bloom", "Mixtral", "Wav2Vec2", "ModernBERT", "Whisper"]


@pytest.mark.slow
def test_measured_patch_is_never_worse_and_every_byte_is_explained():
    # patch(example=, functional=True) keeps a swap only where it frees bytes, so no row is above baseline;
    # the causes named (routed calls, copied chunks, views, lone y) account for every byte
    for r in M.run(quick=True, models=NEW_FAMILIES, dtypes=["float32"]):
        assert r["patched_bytes"] <= r["baseline_bytes"] and r["unexplained_bytes"] == 0, r
        assert r["measured_bytes"] > 0, r      # each of these families gains something once measured
