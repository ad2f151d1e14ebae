"""Shared test set-up. TRITON_INTERPRET must be set before any module defining kernels is imported."""
import os
import shutil
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch._dynamo  # noqa: E402

# One test process compiles each activation's generated code for every dtype, parameter set and
# torch thread count (a Dynamo guard: tests switch to one thread), beyond Dynamo's 8 variants per
# function; past that Dynamo runs the code eagerly, whose float64 rounding differs from Inductor's, and
# bit-for-bit comparisons of two calls then compare two implementations (measured:
# test_vmap_composes[silu-compiled] with INVACT_CPU_KERNEL=0 after the ops and flush-denormal tests).
torch._dynamo.config.recompile_limit = 64


@pytest.fixture
def unoptimised_kernel_build(monkeypatch):
    """invact.cpu_kernel.library() built at -O0 for a test of the kernel cache's mechanics, which builds
    it afresh: ~4x faster to compile than -O3 (8 against 57 s on a loaded 2-core machine), the same
    results (IEEE operations with no contraction either way), slower to run."""
    from invact import cpu_kernel
    monkeypatch.setattr(cpu_kernel, "FLAGS", tuple("-O0" if f == "-O3" else f for f in cpu_kernel.FLAGS))


# ------------------------------------------------------------------------------------------------
# fixtures the test files share (plain helpers: helpers.py)

def _installed_generated() -> Path:
    import invact.generated
    return Path(invact.generated.__file__).parent   # the installed generated/: never written by a test


def _all_tables() -> list[str]:
    from invact import ops
    return ops.names()


@pytest.fixture(params=_all_tables())
def name(request) -> str:
    """Each generated activation in turn: a test taking ``name`` runs over all tables."""
    return request.param


@pytest.fixture
def tree(request, tmp_path) -> Path:
    """A scratch root, ``tmp_path/root``, whose generated/tables/ holds copies of the installed tables that
    the test's module lists in ``TREE_TABLES`` (default gelu and tanh; () for none), code not generated."""
    root = tmp_path / "root"
    dest = root / "generated" / "tables"
    dest.mkdir(parents=True)
    for table in getattr(request.module, "TREE_TABLES", ("gelu", "tanh")):
        shutil.copy(_installed_generated() / "tables" / f"{table}.json", dest)
    return root


@pytest.fixture
def layered():
    """Restore invact.generated's search path (and the runtime caches) after a test that uses a root."""
    import invact
    import invact.generated as pkg
    before = list(pkg.__path__)
    yield
    pkg.__path__[:] = before
    invact.use_root(_installed_generated().parent)
    pkg.__path__[:] = before
