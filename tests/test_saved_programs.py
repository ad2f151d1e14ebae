"""Programs that call invact's custom ops, saved and loaded: torch.export's and torch.jit.trace's.

A loaded program finds its ops only where they are registered, so ``import invact`` registers them,
before or after torch's import (invact.common.after_import); the fitter's command line cancels that.
torch.jit.trace records the ops (an autograd.Function would be a Python call it cannot save);
torch.jit.script is refused with the ways that work.
"""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import invact
from invact.common import after_import

LOAD = """
import sys
{imports}
import torch
program = torch.export.load(sys.argv[1])
x, y = torch.load(sys.argv[2])
print("equal", torch.equal(program.module()(x), y), "ops", "invact.ops" in sys.modules)
"""


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.LayerNorm(32), nn.GELU(approximate="tanh"),
                          nn.Linear(32, 8))
    invact.patch(model)
    return model


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(saved program, saved (x, y)) of a model with activation and norm ops."""
    folder = tmp_path_factory.mktemp("exported")
    model, x = _model(), torch.randn(4, 16)
    program = torch.export.export(model, (x,))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"invact.forward.default", "invact.norm_forward.default"} <= ops, ops
    torch.export.save(program, folder / "program.pt2")
    torch.save((x, model(x)), folder / "io.pt")
    return str(folder / "program.pt2"), str(folder / "io.pt")


@pytest.mark.parametrize("imports", ["import invact", "import torch, invact", "import invact.cpu_kernel",
                                     "from invact import backends", "from invact.table_c import run"])
def test_an_exported_program_loads_after_import_invact(exported, imports):
    """Either import order registers the ops a saved program calls: the load works in a fresh process.
    Also where the first import is one of invact's submodules that import torch (whose own `import torch`
    used to run the registration while that module was half imported: a warning, no ops)."""
    done = _run(LOAD.format(imports=imports), *exported)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "equal True ops True" in done.stdout
    assert "could not be registered" not in done.stderr


def test_torch_free_submodules_do_not_import_torch():
    """invact._TORCH_FREE names the submodules that are imported without torch first (import_first's
    exemptions): each of them, imported in a fresh process, leaves torch unimported."""
    names = sorted(invact._TORCH_FREE)
    done = _run(f"import sys\nimport {', '.join(f'invact.{n}' for n in names)}\nprint('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_without_invact_the_load_fails(exported):
    """The check above can fail: without `import invact` the ops are unknown."""
    done = _run(LOAD.format(imports=""), *exported)
    assert done.returncode != 0


def test_the_command_line_leaves_torch_import_lean():
    """The fitter's command line cancels the registration; a plain `import invact` keeps it."""
    code = ("import sys\nfrom invact.fitting import cli\n{call}\nimport torch\n"
            "print('ops', 'invact.ops' in sys.modules)")
    cancelled = _run(code.format(call="assert cli.main(['list']) == 0"))
    assert cancelled.returncode == 0, cancelled.stderr[-2000:]
    assert cancelled.stdout.strip().endswith("ops False")
    kept = _run(code.format(call=""))
    assert kept.stdout.strip().endswith("ops True"), kept.stderr[-2000:]


def test_a_failed_registration_warns_and_torch_still_imports():
    code = ("import sys, warnings\nimport invact\nsys.modules['invact.norms'] = None\n"
            "with warnings.catch_warnings(record=True) as seen:\n    warnings.simplefilter('always')\n"
            "    import torch\nprint('torch', torch.__version__ is not None, [str(w.message) for w in seen])")
    done = _run(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch True" in done.stdout and "custom ops could not be registered" in done.stdout


def test_after_import_runs_once_after_the_module_and_cancels(tmp_path, monkeypatch):
    (tmp_path / "invact_probe_module.py").write_text("VALUE = 1\n")
    (tmp_path / "invact_probe_broken.py").write_text("raise ValueError('broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    after_import.after_import("invact_probe_module", lambda: calls.append(sys.modules["invact_probe_module"].VALUE))
    after_import.after_import("invact_probe_cancelled", lambda: calls.append("cancelled"))
    after_import.cancel("invact_probe_cancelled")
    try:
        import invact_probe_module
        assert calls == [1]
        importlib.reload(invact_probe_module)      # the loader's own exec_module again: no second call
        assert calls == [1]
        after_import.after_import("invact_probe_module", lambda: calls.append("now"))  # imported: at once
        assert calls == [1, "now"]
        after_import.after_import("invact_probe_broken", lambda: calls.append("broken"))
        with pytest.raises(ValueError, match="broken"):
            import invact_probe_broken  # noqa: F401
        assert calls == [1, "now"]                   # the module's error, and no call
        assert not any(isinstance(f, after_import._Hook) and f.name.startswith("invact_probe")
                       for f in sys.meta_path)
    finally:
        for name in ("invact_probe_module", "invact_probe_broken"):
            sys.modules.pop(name, None)
        after_import.cancel("invact_probe_cancelled")


class _SlotsLoader:
    """A loader that takes no new attributes (as a C-implemented one may)."""

    __slots__ = ()

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.VALUE = 2


class _SlotsFinder:
    def find_spec(self, fullname, path, target=None):
        if fullname != "invact_probe_slots":
            return None
        from importlib.machinery import ModuleSpec
        return ModuleSpec(fullname, _SlotsLoader())


def test_after_import_leaves_an_import_it_cannot_wrap_alone():
    """Where the loader takes no wrapper, the import goes on unchanged (and nothing is called): the hook
    never breaks the import it watches."""
    finder, calls = _SlotsFinder(), []
    sys.meta_path.append(finder)
    try:
        after_import.after_import("invact_probe_slots", lambda: calls.append("called"))
        import invact_probe_slots
        assert invact_probe_slots.VALUE == 2 and calls == []
        assert not any(isinstance(f, after_import._Hook) and f.name == "invact_probe_slots" for f in sys.meta_path)
    finally:
        sys.meta_path.remove(finder)
        sys.modules.pop("invact_probe_slots", None)


MODULES = {
    "silu": lambda: invact.SiLU(), "gelu_tanh": lambda: invact.GELU(approximate="tanh"),
    "elu": lambda: invact.ELU(alpha=0.5), "layer_norm": lambda: invact.LayerNorm(16),
    "rms_norm": lambda: invact.RMSNorm(16),
}


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("which", MODULES)
def test_a_trace_records_the_ops_saves_and_trains(which, grad_mode):
    """Traced with or without grad, the graph calls the forward op (no Python call), saves and loads,
    and gives the eager module's y and gradients bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), MODULES[which](), nn.Linear(16, 4))
    x = torch.randn(5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torch.jit is deprecated in favour of export
        with torch.set_grad_enabled(grad_mode), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, (x,))
        assert not [w for w in seen if "invact" in w.filename or "runtime" in w.filename], \
            [str(w.message) for w in seen]                  # nothing of invact's that nn.Linear lacks
        kinds = {node.kind() for node in traced.inlined_graph.nodes()}
        assert {"invact::forward", "invact::norm_forward"} & kinds and "prim::PythonOp" not in kinds, kinds
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [loaded(xs[0]), model(xs[1])]
    assert torch.equal(ys[0], ys[1])
    for y, xi in zip(ys, xs):
        y.square().sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad)


@pytest.mark.parametrize("which", MODULES)
def test_script_is_refused_naming_what_works(which):
    model = nn.Sequential(nn.Linear(16, 16), MODULES[which]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(NotImplementedError, match=r"torch\.jit\.script cannot compile invact\.\w+: "
                                                      r"torch\.compile, torch\.export and torch\.jit\.trace"):
            torch.jit.script(model)
