"""A training-only install: the runtime works with the fitter's dependencies unimportable.

``pip install invact`` brings torch and numpy only; scipy, matplotlib and python-flint come with the
``fit`` extra. Each check runs in a fresh interpreter whose import system refuses those packages (and
``invact.fitting`` itself), so an import of them anywhere in the runtime or generated code fails it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

BLOCK = """
import importlib.abc, sys
BLOCKED = BLOCKED_NAMES
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"blocked for this test: {name}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""

TRAIN = """
import io, torch, invact
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16),
                            torch.nn.SiLU(), torch.nn.Linear(16, 1))
report = invact.patch(model)
assert isinstance(model[1], invact.GELU) and isinstance(model[3], invact.SiLU), report
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.randn(8, 16)
loss = model(x).square().mean()
loss.backward()
opt.step()
buffer = io.BytesIO()
torch.save(model.state_dict(), buffer)
buffer.seek(0)
model.load_state_dict(torch.load(buffer))
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("scipy", "matplotlib", "flint")
                or m.startswith("invact.fitting"))
assert not leaked, leaked
print("trained", float(loss))
"""


RUNTIME_ONLY = ("scipy", "matplotlib", "flint", "invact.fitting")


def _run(code: str, blocked: tuple[str, ...] = RUNTIME_ONLY) -> subprocess.CompletedProcess:
    prelude = BLOCK.replace("BLOCKED_NAMES", repr(blocked))
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_patch_train_and_save_without_the_fit_extra():
    run = _run(TRAIN)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("trained")


def test_the_blocker_really_blocks():
    """The check above could pass vacuously if the blocker did nothing."""
    run = _run("import scipy\n")
    assert run.returncode != 0 and "blocked for this test: scipy" in run.stderr


def test_cli_without_the_fit_extra_names_the_extra():
    """The console script's module imports without scipy and flint, and says which extra to install."""
    run = _run("import sys\nfrom invact.fitting.entry import main\nsys.exit(main(['list']))\n",
               blocked=("scipy", "flint"))
    assert run.returncode == 2, run.stderr
    assert "pip install 'invact[fit]'" in run.stderr and "scipy" in run.stderr and "python-flint" in run.stderr


def test_entry_runs_the_cli_with_the_extra(capsys):
    from invact.fitting import entry
    assert entry.missing_fit_modules() == []
    assert entry.main(["list"]) == 0
    assert "gelu" in capsys.readouterr().out
