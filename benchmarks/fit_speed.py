"""Time to fit + certify every built-in and one new formula at default settings (`make bench`).

Targets (2 cores): all built-ins <= 60 s, a new formula (x*sigmoid(1.702*x)) <= 10 s, in wall-clock
time. CPU seconds (this process and its certification workers) are printed beside it: on a shared,
noisy machine they vary less than the wall clock. Tables are written into a temporary tree, never the
repository's generated/.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from invact.fitting import tables
from invact.fitting.formulas import BUILTINS, get_spec
from invact.fitting.pipeline import build_table

TARGET_ALL_S = 60.0
TARGET_NEW_S = 10.0
NEW_FORMULA = ("x*sigmoid(1.702*x)", "bench_quick_gelu")


def cpu_seconds() -> float:
    """User + system time of this process and of its reaped children (the certification workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def fit_one(spec, root: Path) -> tuple[float, float, dict]:
    start, cpu = time.perf_counter(), cpu_seconds()
    table = build_table(spec)
    tables.write_table(table, tables.table_path(spec.name, root=root))
    return time.perf_counter() - start, cpu_seconds() - cpu, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=sorted(BUILTINS), help="built-ins to time (default: all)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="invact-bench-") as tmp:
        root = Path(tmp)
        total = total_cpu = 0.0
        print(f"{'activation':<18}{'seconds':>9}{'cpu s':>8}{'pieces':>8}{'approx err':>12}{'fp32 err':>11}")
        for name in args.names:
            seconds, cpu, table = fit_one(BUILTINS[name], root)
            total += seconds
            total_cpu += cpu
            _row(name, seconds, cpu, table)
        print(f"{'all built-ins':<18}{total:9.1f}{total_cpu:8.1f}   (target <= {TARGET_ALL_S:.0f} s)")
        seconds, cpu, table = fit_one(get_spec(NEW_FORMULA[0], name=NEW_FORMULA[1]), root)
        _row(NEW_FORMULA[1], seconds, cpu, table)
        print(f"{'new formula':<18}{seconds:9.1f}{cpu:8.1f}   (target <= {TARGET_NEW_S:.0f} s)")
    ok = total <= TARGET_ALL_S and seconds <= TARGET_NEW_S
    print("within targets" if ok else "OVER TARGET", file=sys.stderr)
    return 0 if ok else 1


def _row(name: str, seconds: float, cpu: float, table: dict) -> None:
    """One line; pieces are the fitted pieces, as README and `invact list` count them (constant tails
    and closed forms are not pieces: a table with none is "exact")."""
    cert = table["certificate"]
    pieces = sum(b.get("pieces", 0) for b in table["branches"]) or "exact"
    print(f"{name:<18}{seconds:9.1f}{cpu:8.1f}{pieces:>8}{cert['approx_error']:12.3g}"
          f"{cert['float32_eval_error']:11.3g}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
