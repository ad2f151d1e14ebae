"""Before/after: run benchmarks/activations.py from another git revision and from the working tree,
alternately, and print each row's invact/native ratio side by side.

    python benchmarks/revisions.py REV [--rounds 2] [activations.py options ...]

Each run measures invact against native PyTorch in one process (so the ratio cancels the machine's
speed at that moment); runs alternate REV, tree, REV, tree, ... and each row keeps the median ratio per
side. REV's package is materialised with ``git archive`` into a temporary folder laid out as the
installed ``invact`` package (runtime/ as ``invact``, fitting/, generated/ and common/ under it) and
put first on PYTHONPATH, so REV runs its own code with this environment's torch.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("fitting", "generated", "common")
ROW = re.compile(r"^(\S+)\s+(float32|bfloat16|float16)\s+(.*)$")


def materialise(rev: str, into: Path) -> Path:
    """Lay REV's package out under ``into/site/invact``; returns the folder to put on PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    src = into / "src"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(src, filter="data")
    package = into / "site" / "invact"
    package.mkdir(parents=True)
    for entry in (src / "runtime").iterdir():
        (package / entry.name).symlink_to(entry)
    for name in SUBPACKAGES:
        if (src / name).is_dir():
            (package / name).symlink_to(src / name)
    site = package.parent
    found = subprocess.run([sys.executable, "-c", "import invact.ops; print(invact.ops.__file__)"], check=True,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)}).stdout
    if not found.startswith(str(site)):
        raise RuntimeError(f"PYTHONPATH={site} did not take precedence over the installed invact: {found}")
    return site


def run(script: Path, args: list[str], pythonpath: str | None) -> dict[tuple[str, str], list[str]]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, str(script), *args], env=env, check=True, capture_output=True,
                         text=True).stdout
    rows = {}
    for line in out.splitlines():
        match = ROW.match(line)
        if match:
            rows[match[1], match[2]] = match[3].replace("*", "").split()
    header = next((re.split(r"\s{2,}", line.strip())[2:] for line in out.splitlines()
                   if line.startswith("activation")), [])
    rows[("", "")] = header
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side (alternating)")
    known, passthrough = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        site = materialise(known.rev, Path(tmp))
        sides = {known.rev: (Path(tmp) / "src" / "benchmarks" / "activations.py", str(site)),
                 "tree": (REPO / "benchmarks" / "activations.py", None)}
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for _ in range(known.rounds):
            for side, (script, path) in sides.items():
                runs[side].append(run(script, passthrough, path))
    header = runs["tree"][0][("", "")]
    print(f"invact / native ratios, median of {known.rounds} runs each: {known.rev} -> working tree")
    print(f"{'activation':12s} {'dtype':9s} " + " ".join(f"{h:>22s}" for h in header))
    for key in runs["tree"][0]:
        if key == ("", ""):
            continue
        cells = []
        for col in range(len(header)):
            def median(side: str) -> float:
                return statistics.median(float(r[key][col]) for r in runs[side] if key in r)
            cells.append(f"{median(known.rev):9.2f} -> {median('tree'):<9.2f}")
        print(f"{key[0]:12s} {key[1]:9s} " + " ".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    main()
