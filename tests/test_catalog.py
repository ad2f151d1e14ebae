"""One activation catalog (invact.common.catalog): every face of a built-in is built from its row.

The fitter's BUILTINS, the torch.nn-style classes, the functional API, the patch rules and invact's
exports each hold exactly the catalog's activations (nothing more, nothing less), and a row added in a
fresh interpreter appears in all of them with nothing else edited. One parameter check
(invact.common.params) serves the fitter and the runtime, with the same messages.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import invact
import invact.functional as IF
from invact import modules, ops, patch_rules, routing
from invact.common.catalog import CATALOG, LEFT, CatalogError, check_catalog, group
from invact.common.params import ParamError, check_params, holds
from invact.fitting.expressions import parse
from invact.fitting.formulas import BUILTINS, SpecError, get_spec

NOT_ACTIVATIONS = {"apply", "layer_norm", "rms_norm"}   # invact.functional's other functions


def test_builtins_are_the_catalog():
    assert list(BUILTINS) == [row.name for row in CATALOG]
    for row in CATALOG:
        spec = BUILTINS[row.name]
        assert spec.expr == parse(row.formula, ("x",), tuple(row.params), "formula")
        assert (spec.params, spec.domain, spec.doc, spec.torch_forward) == \
            (row.params, row.domain, row.doc, row.torch_forward)


@pytest.mark.parametrize("row", CATALOG, ids=lambda r: r.name)
def test_every_row_has_a_module_a_function_and_patch_rules(row):
    cls = getattr(invact, row.module)
    assert cls is getattr(modules, row.module) and row.module in invact.__all__
    assert cls._table_of(**{**dict(row.args), **dict(row.select)}) == row.name
    assert [(p.name, p.default) for p in inspect.signature(cls).parameters.values()][:-1] == list(row.args)
    fn = getattr(IF, row.functional)
    assert row.functional in IF.__all__ and fn.__doc__ == group("functional")[row.functional][0].functional_doc
    assert [(p.name, p.default) for p in inspect.signature(fn).parameters.values()][1:-1] == list(row.args)
    keys = [tuple(r.cls.rsplit(".", 1)) for r in row.rules] + ([tuple(row.torch.rsplit(".", 1))] if row.torch else [])
    assert keys, f"{row.name}: patch recognises no class"
    for key in keys:
        rule = patch_rules.RULES[key]
        assert rule.table == row.name or callable(rule.table)


def test_faces_expose_nothing_outside_the_catalog():
    assert {c.__name__ for c in modules.TORCH_STYLE_CLASSES} == {row.module for row in CATALOG}
    assert set(modules.__all__) == {"Activation", "activation", "module_for"} | {row.module for row in CATALOG}
    assert set(IF.__all__) - NOT_ACTIVATIONS == {row.functional for row in CATALOG}
    exported = {n for n in invact.__all__ if invact._LAZY.get(n) == "modules"}
    assert exported == {"Activation", "activation"} | {row.module for row in CATALOG}
    names = {row.name for row in CATALOG}
    recognised = {tuple(r.cls.rsplit(".", 1)) for row in CATALOG for r in row.rules} \
        | {tuple(row.torch.rsplit(".", 1)) for row in CATALOG if row.torch} | {tuple(r.cls.rsplit(".", 1)) for r in LEFT}
    assert set(patch_rules.RULES) == recognised
    # functional routing: torch.nn.functional's function of each row that mirrors a torch.nn class and
    # whose PyTorch form saves its input (relu, sigmoid, tanh save their output: nothing to gain)
    assert {label for label, _ in routing.ROUTED.values()} == \
        {row.functional for row in CATALOG if row.torch is not None and row.saves_output != "always"}
    for rule in patch_rules.RULES.values():
        assert rule.table is None or callable(rule.table) or rule.table in names


def test_torch_nn_rules_read_the_selecting_fields_and_parameters():
    """nn.GELU(approximate='tanh') -> gelu_tanh and nn.Softplus(beta=2) -> its beta: from attributes."""
    gelu = patch_rules.RULES[("torch.nn.modules.activation", "GELU")]
    assert gelu.table(torch.nn.GELU(approximate="tanh")) == "gelu_tanh" and gelu.table(torch.nn.GELU()) == "gelu"
    softplus = patch_rules.RULES[("torch.nn.modules.activation", "Softplus")]
    assert softplus.params(torch.nn.Softplus(beta=2.0, threshold=5.0)) == {"beta": 2.0, "threshold": 5.0}
    elu = patch_rules.RULES[("torch.nn.modules.activation", "ELU")]
    assert elu.saves_output(torch.nn.ELU(inplace=True)) and not elu.saves_output(torch.nn.ELU())


def test_a_new_row_is_all_it_takes():
    """In a fresh interpreter, one row added to the catalog (before the runtime loads) gives the fitter's
    spec, the class, the function, the export, the patch rules and the functional route — no other file
    edited. (Its table
    would come from `invact fit softsign`; without it patch leaves nn.Softsign and says why.)"""
    code = textwrap.dedent("""
        import inspect
        import torch
        import invact.common.catalog as c
        row = c.Entry("softsign", "x/(1 + abs(x))", "F.softsign(x)", "torch.nn.Softsign()",
                      module="Softsign", torch="torch.nn.modules.activation.Softsign", module_doc="Softsign.",
                      functional="softsign", functional_doc="``F.softsign``: ``x / (1 + |x|)``.",
                      rules=(c.Rule("timm.layers.activations.SoftSign"),))
        c.CATALOG += (row,)
        import importlib, invact
        importlib.reload(invact)       # its __init__ ran to import the catalog: read the row into __all__
        import invact.functional as IF
        from invact import patch_rules
        from invact.fitting.formulas import BUILTINS, X
        import sympy as sp
        assert BUILTINS["softsign"].expr == X / (1 + sp.Abs(X)), BUILTINS["softsign"].expr
        assert "Softsign" in invact.__all__ and invact.Softsign._table_of() == "softsign"
        assert list(inspect.signature(invact.Softsign).parameters) == ["backend"] and "softsign" in IF.__all__
        assert IF.softsign.__doc__ == row.functional_doc
        assert list(inspect.signature(IF.softsign).parameters) == ["input", "backend"]
        assert patch_rules.RULES[("torch.nn.modules.activation", "Softsign")].table == "softsign"
        assert patch_rules.RULES[("timm.layers.activations", "SoftSign")].table == "softsign"
        from invact import routing
        assert routing.ROUTED[torch.nn.functional.softsign][0] == "softsign"
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Softsign())
        report = invact.patch(model)
        assert report.left[0].reason == "no table 'softsign' in invact.generated", report
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


@pytest.mark.parametrize("change, message", [
    (lambda rows: rows + (rows[0],), "must be a new identifier"),
    (lambda rows: rows + (dataclasses.replace(rows[2], name="silu2", args=(), rules=()),), "share module 'SiLU'"),
    (lambda rows: rows + (dataclasses.replace(rows[0], name="gelu2", rules=()),), "select must tell them apart"),
    (lambda rows: (dataclasses.replace(rows[0], select=(("approx", "none"),)),) + rows[1:], "not in args"),
    (lambda rows: rows + (dataclasses.replace(rows[2], name="silu2", module="", torch=None, functional=""),),
     "already a rule of 'silu'"),
    (lambda rows: (dataclasses.replace(rows[0], module="Gelu"),) + rows[1:], "must be named as torch's"),
    (lambda rows: (dataclasses.replace(rows[0], saves_output="yes"),) + rows[1:], "saves_output"),
])
def test_contradictory_rows_are_refused(change, message):
    check_catalog(CATALOG)
    with pytest.raises(CatalogError, match=message):
        check_catalog(change(CATALOG))


# -- the one parameter check ---------------------------------------------------------------------------

@pytest.mark.parametrize("params, message, argument", [
    ({"beta": 1.0}, "params: 'beta' is not a parameter of 'elu' (known: alpha)", "params"),
    ({"alpha": "big"}, "params: 'alpha' must be a real number, got 'big'", "params['alpha']"),
    ({"alpha": float("inf")}, "params: 'alpha' must be finite, got inf", "params['alpha']"),
])
def test_fitter_and_runtime_share_the_check(params, message, argument):
    with pytest.raises(ParamError) as common:
        check_params("elu", {"alpha": 1.0}, params, ("alpha > 0",))
    assert str(common.value) == message and common.value.argument == argument
    with pytest.raises(SpecError) as fitter:
        get_spec("elu", params=params)
    assert str(fitter.value) == message
    if "elu" in ops.names():
        with pytest.raises(ValueError) as runtime:
            modules.named_params("elu", params)
        assert str(runtime.value) == message


def test_check_order_defaults_and_domain():
    defaults = {"beta": 1.0, "threshold": 20.0}
    assert list(check_params("softplus", defaults, {"threshold": 3})) == ["beta", "threshold"]
    assert check_params("softplus", defaults, {"threshold": 3}) == {"beta": 1.0, "threshold": 3.0}
    with pytest.raises(ParamError, match=r"'softplus' needs beta > 0 \(got"):
        check_params("softplus", defaults, {"beta": -1.0}, ("beta > 0",))
    # a table fitted for its defaults only refuses other values before the domain is looked at
    with pytest.raises(ParamError, match="fitted for defaults"):
        check_params("softplus", defaults, {"beta": -1.0}, ("beta > 0",), lambda v: "fitted for defaults")
    assert check_params("softplus", defaults, None, ("beta > 0",), lambda v: "unused") == defaults
    assert holds("-alpha + 2*beta/4 <= 1", {"alpha": 1.0, "beta": 2.0}) and not holds("alpha > 0", {"alpha": -1.0})
    with pytest.raises(ParamError, match="param_domain"):
        holds("alpha >", {"alpha": 1.0})


@pytest.mark.slow
def test_generated_functions_trace_without_graph_breaks():
    """The functions built from the catalog (binding, table lookup by a selecting argument, parameters)
    trace under torch.compile(fullgraph=True) and compute what they compute eagerly."""
    if not {"gelu_tanh", "elu", "softplus"} <= set(ops.names()):
        pytest.skip("tables not generated")
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)

    def f(x):
        return IF.gelu(x, "tanh", backend="eager") + IF.elu(x, alpha=1.0, backend="eager") \
            + IF.softplus(x, backend="eager")

    y = torch.compile(f, fullgraph=True)(x)
    # the same custom ops, then the same two float64 additions in the same order: bit for bit
    torch.testing.assert_close(y, f(x), rtol=0, atol=0)


def test_prose_lists_name_every_catalog_class():
    """The catalog builds the code, but four places list its rows in prose for readers: invact's
    docstring, README's quick start, patch's and routing's docstrings. A row added without them fails
    here, by name (docs/architecture.md, "Adding a built-in activation")."""
    from invact import patching, routing

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quick = readme[readme.index("* Modules with torch.nn's names"):][:600]
    missing = []
    for e in CATALOG:
        if e.module and f":class:`{e.module}`" not in invact.__doc__:
            missing.append(f"invact/__init__ docstring: :class:`{e.module}`")
        if e.module and not re.search(rf"\b{e.module}\b", quick):
            missing.append(f"README quick start: {e.module}")
        for cls in [r.cls for r in e.rules] + ([e.torch] if e.torch else []):
            if cls.rsplit(".", 1)[-1] not in patching.__doc__:
                missing.append(f"invact.patching docstring: {cls}")
    for fn in routing.ROUTED:
        if f"``F.{fn.__name__}``" not in routing.__doc__:
            missing.append(f"invact.routing docstring: ``F.{fn.__name__}``")
    assert not missing, sorted(set(missing))
