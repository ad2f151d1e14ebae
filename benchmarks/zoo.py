"""The activation zoo (issue 14): every row of benchmarks/zoo.toml through `invact fit` and the runtime.

For each formula: the outcome (exact / fitted / refused with the reason, or an internal error, which
is always a bug), branches and code bits, pieces and degrees, fit + certify wall time, the certified
errors, and the float32 gradient error of the generated code (eager backend: y from the printed
formula in float32, g from the table) against float64 autograd of the same formula, over x ~ N(0, 3)
and x ~ U(-12, 12). That error is |g - f'(x)| / max(1, |f'(x)|) and includes the information floor
of storing y in float32 (~5e-5 next to a branch point, docs/floors.md), which no table beats.

    .venv/bin/python benchmarks/zoo.py                 # every row (minutes)
    .venv/bin/python benchmarks/zoo.py --fast          # one row per branch-end kind
    .venv/bin/python benchmarks/zoo.py --only gelu,erf --markdown

Tables are written into a temporary tree (or --root), never the repository's generated/. Exit 1
when a row's outcome differs from its `expect` or any row ends in an internal error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ZOO = Path(__file__).with_name("zoo.toml")
GRAD_SAMPLES = 1 << 18
FP32_SAMPLES = 1 << 20       # per branch, for certification's stratified float32 check


@dataclass
class Result:
    name: str
    formula: str
    source: str
    expect: str
    outcome: str = ""            # exact | fitted | refused | internal
    message: str = ""            # the refusal or error
    branches: int = 0
    code_bits: int = 0
    pieces: int = 0
    degrees: list[int] = field(default_factory=list)
    seconds: float = 0.0
    approx: float = math.nan
    fp32_eval: float = math.nan
    grad_normal: float = math.nan
    grad_uniform: float = math.nan
    ends: list[str] = field(default_factory=list)
    ok: bool = False


def load_rows(path: Path = ZOO) -> list[dict]:
    with open(path, "rb") as fh:
        return tomllib.load(fh)["activation"]


def table_name(row: dict) -> str:
    """The row's table name: prefixed, so that rows named like built-ins (gelu) do not clash."""
    return f"zoo_{row['name']}"


def run_row(row: dict, root: Path, fp32_samples: int = FP32_SAMPLES, grad_samples: int = GRAD_SAMPLES) -> Result:
    """Fit one row with `invact fit --root root` (exit status decides the outcome), then measure."""
    from invact.fitting import cli
    from invact.fitting.tables import load_table, table_path

    res = Result(row["name"], row["formula"], row.get("source", ""), row["expect"])
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["--root", str(root), "fit", row["formula"], "--name", table_name(row),
                       "--fp32-samples", str(fp32_samples)])
    res.seconds = time.perf_counter() - start
    if rc != 0:
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("invact: ") and "[" not in ln[:12]]
        res.outcome = "refused" if rc == 2 else "internal"
        res.message = lines[-1].removeprefix("invact: ").removeprefix("error: ") if lines else f"exit {rc}"
    else:
        table = load_table(table_path(table_name(row), root=root))
        res.outcome = "fitted" if any(b["route"] == "fit" for b in table["branches"]) else "exact"
        res.branches, res.code_bits = table["n_branches"], table["code_bits"]
        res.pieces = sum(b["pieces"] for b in table["branches"])
        res.degrees = sorted({d for b in table["branches"] for d in b["degrees"]})
        res.approx = table["certificate"]["approx_error"]
        res.fp32_eval = table["certificate"]["float32_eval_error"]
        res.ends = sorted({b[k] for b in table["branches"] for k in ("lower_end", "upper_end")})
        res.grad_normal, res.grad_uniform = gradient_errors(table_name(row), table, root, grad_samples)
    reason = row.get("reason", "")
    res.ok = res.outcome == row["expect"] and (res.outcome != "refused" or reason.lower() in res.message.lower())
    return res


def torch_formula(table: dict):
    """f(x) of the table's formula as torch operations (the generated code's printer), any dtype."""
    import torch

    from invact.fitting.codegen.printer import mangle, parse, to_torch
    names = list(table["params"])
    code = compile(to_torch(parse(table["formula"], "x", names), "x"), "<formula>", "eval")
    params = {mangle(k): v for k, v in table["params"].items()}   # the printer's names for them
    return lambda x: eval(code, {"torch": torch, "math": math, "x": x, **params})  # noqa: S307


def gradient_errors(name: str, table: dict, root: Path, n: int) -> tuple[float, float]:
    """max |g - f'(x)| / max(1, |f'(x)|) of the eager float32 backward, x ~ N(0, 3) and U(-12, 12)."""
    import torch

    import invact
    from invact import ops
    invact.use_root(root)
    f = torch_formula(table)
    gen = torch.Generator().manual_seed(14)
    errors = []
    for x64 in (torch.randn(n, generator=gen, dtype=torch.float64) * 3,
                torch.rand(n, generator=gen, dtype=torch.float64) * 24 - 12):
        x32 = x64.to(torch.float32)
        ref_x = x32.to(torch.float64).requires_grad_()       # the same x, in float64
        f(ref_x).backward(torch.ones_like(ref_x))
        want = ref_x.grad
        x = x32.clone().requires_grad_()
        ops.apply(x, name, None, "eager").backward(torch.ones_like(x))
        got = x.grad.to(torch.float64)
        ok = torch.isfinite(want)
        err = (got[ok] - want[ok]).abs() / want[ok].abs().clamp(min=1.0)
        errors.append(float(err.max()) if err.numel() else 0.0)
    return errors[0], errors[1]


def _fmt(v: float) -> str:
    return "-" if not math.isfinite(v) else ("0" if v == 0 else f"{v:.2g}")


def markdown(results: list[Result]) -> str:
    head = ("| activation | source | outcome | branches / bits | pieces (degrees) | fit + certify | approx | "
            "float32 eval | grad err N(0,3) | grad err U(-12,12) |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        source = r.source.replace("|", "\\|")
        if r.outcome in ("exact", "fitted"):
            pieces = "exact" if r.outcome == "exact" else f"{r.pieces} ({', '.join(map(str, r.degrees))})"
            rows.append(f"| {r.name} | {source} | {r.outcome} | {r.branches} / {r.code_bits} | {pieces} | "
                        f"{r.seconds:.1f} s | {_fmt(r.approx)} | {_fmt(r.fp32_eval)} | {_fmt(r.grad_normal)} | "
                        f"{_fmt(r.grad_uniform)} |")
        else:
            msg = r.message.replace("|", "\\|")
            rows.append(f"| {r.name} | {source} | {r.outcome}: {msg} | | | {r.seconds:.1f} s | | | | |")
    return head + "\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated row names")
    p.add_argument("--fast", action="store_true", help="only rows marked fast (one per branch-end kind)")
    p.add_argument("--fp32-samples", type=int, default=FP32_SAMPLES)
    p.add_argument("--grad-samples", type=int, default=GRAD_SAMPLES)
    p.add_argument("--root", type=Path, help="tree to write tables into (default: a temporary one)")
    p.add_argument("--markdown", action="store_true", help="print the README table at the end")
    args = p.parse_args(argv)
    rows = load_rows()
    if args.only:
        wanted = set(args.only.split(","))
        rows = [r for r in rows if r["name"] in wanted]
    if args.fast:
        rows = [r for r in rows if r.get("fast")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        for row in rows:
            r = run_row(row, root, args.fp32_samples, args.grad_samples)
            results.append(r)
            detail = (f"{r.branches} branches, {r.code_bits} bits, {r.pieces} pieces {r.degrees}, ends "
                      f"{'/'.join(r.ends)}, approx {_fmt(r.approx)}, fp32 {_fmt(r.fp32_eval)}, grad "
                      f"{_fmt(r.grad_normal)} / {_fmt(r.grad_uniform)}" if r.outcome in ("exact", "fitted")
                      else r.message)
            print(f"{'ok ' if r.ok else 'BAD'} {r.name:18s} {r.outcome:8s} {r.seconds:6.1f} s  {detail}", flush=True)
    bad = [r.name for r in results if not r.ok]
    print(f"{len(results) - len(bad)}/{len(results)} rows as expected" + (f"; not: {', '.join(bad)}" if bad else ""))
    if args.markdown:
        print(markdown(results))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
