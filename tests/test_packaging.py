"""The wheel: builds offline, installs, imports outside the repository, and carries the tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import invact.generated

REPO = Path(invact.generated.__file__).resolve().parent.parent
CHECK = """
import json, sys
import invact, invact.fitting, invact.generated
from invact.fitting import tables
from invact.fitting.cli import main
paths = tables.list_tables()
print(json.dumps({"invact": invact.__file__, "generated": invact.generated.__file__,
                  "tables": [p.name for p in paths],
                  "loaded": [tables.load_table(p)["name"] for p in paths]}))
"""


@pytest.mark.slow
def test_wheel_installs_and_imports_outside_the_repo(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--quiet", "-w", str(wheels), str(REPO)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("invact-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                              str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if k != "INVACT_ROOT"}
    env["PYTHONPATH"] = str(target)
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["invact"].startswith(str(target)) and found["generated"].startswith(str(target))
    expected = sorted(p.name for p in (REPO / "generated" / "tables").glob("*.json"))
    assert expected and found["tables"] == expected
    assert found["loaded"] == [n.removesuffix(".json").removesuffix(".inverse") for n in expected]
    generated_py = sorted(p.name for p in (REPO / "generated").glob("*.py"))
    assert sorted(p.name for p in (target / "invact" / "generated").glob("*.py")) == generated_py
    assert (target / "bin" / "invact").is_file()                            # the console script
    for source in ("cpu_kernels.c", "cpu_avx2.c", "invact_poly.h",            # the fused CPU kernels' sources
                   "invact_poly_transform.h", "invact_sleef.h"):                # (headers both ISAs' builds include)
        assert (target / "invact" / "csrc" / source).is_file(), source
