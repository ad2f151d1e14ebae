"""Every notebooks/*.ipynb runs without error on this interpreter and is stored without outputs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


class ThisInterpreter(AsyncKernelManager):
    """Kernels run on the interpreter running the tests (the venv's), whatever kernel specs exist."""

    @property
    def kernel_spec(self) -> KernelSpec:
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          language="python", display_name="invact tests")


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} carry outputs or execution counts; "
                       "clear all outputs before saving the notebook")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executes(path):
    """Runs in a fresh kernel with cwd notebooks/; a cell that raises fails the test (CellExecutionError)."""
    nb = nbformat.read(path, as_version=4)
    # first cell: prove the kernel is this interpreter (so it imports the invact under test)
    check = f"import sys\nassert sys.executable == {sys.executable!r}, sys.executable"
    nb.cells.insert(0, nbformat.v4.new_code_cell(check))
    env = {k: v for k, v in os.environ.items() if k != "INVACT_ROOT"}   # the notebooks read the repo's tables
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_manager_class=ThisInterpreter,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.monotonic()
    client.execute(env=env)
    print(f"{path.name}: {time.monotonic() - start:.1f} s")
