"""The fitter's modules import each other in one direction only (docs/architecture.md): formula ->
branches -> fit -> certify -> table -> codegen, with the table model and float32 arithmetic below
them. Checked on the source (imports inside functions count), so a cycle cannot hide in a body."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_import_rules import REPO, _package, imports

FITTER = "invact.fitting"


def _graph() -> dict[str, set[str]]:
    """Fitter module -> the fitter modules it imports (``from . import x`` resolved to the module x)."""
    paths = {_package(p): p for p in sorted((REPO / "fitting").rglob("*.py"))}
    modules = {name.removesuffix(".__init__") for name in paths}
    graph = {}
    for name, path in paths.items():
        me = name.removesuffix(".__init__")
        deps = set()
        for imported in imports(path):
            while imported and imported not in modules:      # `from .m import f` names m.f: back to m
                imported = imported.rpartition(".")[0]
            if imported.startswith(FITTER) and imported != me and not me.startswith(imported + "."):
                deps.add(imported)                             # a package's own __init__ is no edge back
        graph[me] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_fitter_imports_form_no_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle in the fitter: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    """The check can fail: a graph with a cycle is reported with that cycle."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_layers_point_down():
    """The straight line of the flow: lower layers never import upper ones."""
    graph = _graph()
    order = ["settings", "float32", "scheme", "segments", "model", "tables", "numeric", "pieces", "scan", "limits", "branches",
             "reference", "fit", "certify", "codes", "param_domain", "ends", "pipeline", "codegen", "cli"]
    rank = {f"{FITTER}.{m}": i for i, m in enumerate(order)}
    for name, deps in graph.items():
        top = name if name in rank else ".".join(name.split(".")[:3])
        for dep in deps:
            dep_top = dep if dep in rank else ".".join(dep.split(".")[:3])
            if top in rank and dep_top in rank:
                assert rank[dep_top] <= rank[top], f"{name} imports {dep}, an upper layer"
    assert f"{FITTER}.pipeline" not in set().union(*(graph[m] for m in graph if m.endswith(("certify", "fit"))))
    assert Path(REPO / "fitting" / "float32.py").is_file()


def test_only_the_probe_runs_pytorch():
    """PyTorch's gradients at NaN y are measured in one fitter module (fitting/pytorch_probe.py) when a
    table is fitted; the table holds them (``nan_gradients``) and code generation reads them as data."""
    users = sorted(str(p.relative_to(REPO)) for p in (REPO / "fitting").rglob("*.py")
                   if any(n == "torch" or n.startswith("torch.") for n in imports(p)))
    assert users == ["fitting/pytorch_probe.py"]


def test_probe_measures_what_the_formula_cannot_give():
    """relu at NaN: PyTorch's 1; leaky_relu at NaN: its slope, where the formula's IEEE reading
    (Piecewise((slope*x, x <= 0), (x, True)) takes the last piece at NaN) would give 1; gelu: none."""
    import math

    from invact.fitting.pytorch_probe import nan_gradients
    from invact.fitting.tables import load_table, table_path
    relu, leaky, gelu = (load_table(table_path(n)) for n in ("relu", "leaky_relu", "gelu"))
    [(x, values)] = nan_gradients(relu["torch_forward"], relu["params"])
    assert math.isnan(x) and values == {1.0}
    [(x, values)] = nan_gradients(leaky["torch_forward"], leaky["params"])
    assert math.isnan(x) and values == {leaky["params"]["negative_slope"]} and 1.0 not in values
    assert nan_gradients(gelu["torch_forward"], gelu["params"]) == ()
    assert nan_gradients(None, relu["params"]) == ()


def test_tables_hold_what_the_probe_measures():
    """Every committed table's ``nan_gradients`` is the probe's measurement on its torch_forward (what
    pipeline.build_table stores), read back by the model in the probe's form."""
    from invact.fitting.model import Table, nan_gradients_json
    from invact.fitting.pytorch_probe import nan_gradients
    from invact.fitting.tables import list_tables, load_table
    paths = list_tables(REPO)
    assert paths
    for path in paths:
        table = Table.from_json(load_table(path))
        assert table.nan_gradients == nan_gradients_json(nan_gradients(table.torch_forward, table.params)), path
        assert nan_gradients_json(table.measured_nan_gradients()) == table.nan_gradients, path


def test_code_generation_runs_no_pytorch():
    """`invact generate` with torch unimportable still writes every committed table's code, and the
    plans keep PyTorch's values from the tables (relu at NaN y: 1; with the field emptied: none)."""
    code = f"""
import sys
sys.modules["torch"] = None                     # `import torch` raises ImportError from here on
from pathlib import Path
from invact.fitting.codegen import generate_files, plan_table
from invact.fitting.tables import list_tables, load_table, table_path
root = Path({str(REPO)!r})
files = generate_files(root)
assert len(files) == 3 * len(list_tables(root, target="derivative")) + 1, sorted(files)
relu = load_table(table_path("relu", root=root))
print([float(v) for _, v in plan_table(relu, "relu.json").nan_values],
      plan_table(dict(relu, nan_gradients={{}}), "relu.json").nan_values)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[1.0]", "()"], out.stdout
