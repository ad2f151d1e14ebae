"""The committed certificates of the closed-form built-ins are what `invact certify` measures today.

Certification evaluates a closed form with the operations generated code runs
(`invact.fitting.scheme.closed_form_fn`); a change to those operations (a folded constant, a power's
form) changes the emitted code's error, and a certificate measured before it would understate it
(hardswish's was 1.38e-7 for code whose error is 1.51e-7, 9 % more). Re-certifying a copy of generated/
must give the committed figures. The samples are deterministic (stratified float32 values, every
bfloat16 and float16 value); so is the float32 evaluation of closed forms made of IEEE operations
(+, -, *, /, sqrt: correctly rounded on every CPU), the ones checked here. A closed form calling exp,
log, ... takes each call's result from numpy's float64 function, rounded and spread by the function's
ulp bound (invact.fitting.scheme.LIBRARY_ULPS); numpy's float64 functions may differ by an ulp between
CPUs, so those are re-certified at one hunted table, softplus (tests/test_library_call_certificates.py).
What is left is the float64 reference's rounding, ~1e-16 of g against figures of ~1e-8 or more:
RELATIVE = 1e-6 of each figure (or 1e-15 absolute, for zero figures).
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from helpers import invact_cli

GENERATED = Path(__file__).resolve().parents[1] / "generated"
RELATIVE, ABSOLUTE = 1e-6, 1e-15
IEEE_ONLY = re.compile(r"\b(?!(?:sqrt|Abs|Max|Min)\()[A-Za-z_]\w*\(")   # a function call other than these
FIELDS = ("bf16_eval_error", "fp16_eval_error", "fp32_eval_error",
          "bf16_fma_eval_error", "fp16_fma_eval_error", "fp32_fma_eval_error")


def _exact_only() -> list[str]:
    names = []
    for path in sorted((GENERATED / "tables").glob("*.json")):
        table = json.loads(path.read_text())
        branches = table["certificate"]["branches"]
        exprs = [seg.get("expr", "") for cls in table["code_classes"] for seg in cls.get("segments", [])]
        if (not path.name.endswith(".inverse.json") and all(b["method"] in ("exact", "constant") for b in branches)
                and not any(IEEE_ONLY.search(str(e)) for e in exprs)):
            names.append(path.stem)
    return names


def _figures(path: Path) -> list[float]:
    """The certificate's evaluation errors: each branch's FIELDS, then the table's two."""
    certificate = json.loads(path.read_text())["certificate"]
    return [b[k] for b in certificate["branches"] for k in FIELDS] + [
        certificate["float32_eval_error"], certificate["float32_fma_eval_error"]]


@pytest.mark.parametrize("name", _exact_only())
def test_closed_form_certificates_are_current(name, tmp_path, capsys):
    shutil.copytree(GENERATED, tmp_path / "generated")
    committed = _figures(GENERATED / "tables" / f"{name}.json")
    status, out, err = invact_cli(capsys, "certify", name, "--root", tmp_path, "--no-generate")
    assert status == 0, err
    again = _figures(tmp_path / "generated" / "tables" / f"{name}.json")
    assert again == pytest.approx(committed, rel=RELATIVE, abs=ABSOLUTE)
