"""The activation catalog: one row per built-in activation, read by the fitter and the runtime.

Everything invact says about a built-in is here, once: the formula the fitter reads
(:data:`invact.fitting.formulas.BUILTINS`), PyTorch's forward that generated code pastes in, and the
runtime's faces of it — the torch.nn-style class (:mod:`invact.modules`), the function
(:mod:`invact.functional`), the classes :func:`invact.patch` recognises, the torch.nn.functional calls
:class:`invact.routing.FunctionalRouter` routes, and what :mod:`invact` exports. Adding an activation
is one :class:`Entry` here, then ``invact fit NAME`` for its table.

Rows sharing a ``module`` (or ``functional``) are one class (function) whose arguments ``select``
the table, as ``GELU(approximate='tanh')`` selects gelu_tanh; the first of them gives its ``args``,
``torch`` class and docstrings. transformers and timm classes are named by strings: nothing here (or in
invact) imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Rule", "Entry", "CATALOG", "BY_NAME", "LEFT", "NO_TABLE", "CatalogError", "check_catalog",
           "group"]


class CatalogError(ValueError):
    """A catalog row that contradicts another (or itself): raised at import, naming the row."""


@dataclass(frozen=True)
class Rule:
    """A class recognised by qualified name (``'transformers.activations.FastGELUActivation'``) and a
    remark for the patch report (for :data:`LEFT`: why it is left)."""

    cls: str
    note: str = ""


@dataclass(frozen=True)
class Entry:
    """One built-in activation.

    ``params`` are the defaults (in torch's order) and ``domain`` the relations they must satisfy;
    ``formula`` is text in ``x`` and the params (:mod:`invact.fitting.expressions` syntax).
    ``args`` are the torch.nn constructor's (and torch.nn.functional's) arguments after ``input``,
    ``(name, default)`` in torch's order: those named in ``params`` are passed to the table, those in
    ``select`` choose it, ``inplace`` is accepted. With ``torch`` (the torch.nn class mirrored) set,
    ``functional`` names torch.nn.functional's function too. ``saves_output``: whether PyTorch's own
    class (and function) already saves its output ("always", "inplace" when called with inplace=True,
    or "never"); functions that save their input are routed.
    ``rules``: classes of other libraries computing the same function at these defaults.
    """

    name: str
    formula: str
    torch_forward: str
    doc: str
    params: dict[str, float] = field(default_factory=dict)
    domain: tuple[str, ...] = ()
    module: str = ""
    torch: str | None = None
    args: tuple[tuple[str, Any], ...] = ()
    select: tuple[tuple[str, Any], ...] = ()
    module_doc: str = ""
    functional: str = ""
    functional_doc: str = ""
    saves_output: str = "never"
    rules: tuple[Rule, ...] = ()

    @property
    def table_args(self) -> tuple[str, ...]:
        """The constructor arguments passed to the table as parameters."""
        return tuple(n for n, _ in self.args if n in self.params)


_NN = "torch.nn.modules.activation."
_HF = "transformers.activations."
_TIMM, _TIMM_ME = "timm.layers.activations.", "timm.layers.activations_me."
_INPLACE = (("inplace", False),)
_GELU_ARGS = (("approximate", "none"),)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_FAST_GELU_NOTE = ("FastGELU truncates sqrt(2/pi) to 0.7978845608 (relative 3.6e-12, < 1e-12 apart on "
                   "[-8, 8]): equal to gelu_tanh far below float32 rounding")
#: why a recognised activation class without a table is left
NO_TABLE = "no invact table for this function"


def _no_gain(fn: str) -> str:
    return f"``{fn}``. PyTorch's {fn.split('.')[-1]} already saves its output: invact gains no memory here."


CATALOG: tuple[Entry, ...] = (
    Entry("gelu", "x*(1 + erf(x/sqrt(2)))/2", "F.gelu(x)", "torch.nn.GELU()",
          module="GELU", torch=_NN + "GELU", args=_GELU_ARGS, select=(("approximate", "none"),),
          module_doc="GELU: ``x * Phi(x)``, or its tanh approximation.",
          functional="gelu", functional_doc="``F.gelu``: ``x * Phi(x)``; ``approximate='tanh'`` uses the tanh "
                                            "formula (table gelu_tanh).",
          rules=(Rule(_HF + "GELUActivation"), Rule(_TIMM + "GELU"))),
    Entry("gelu_tanh", "x*(1 + tanh(sqrt(2/pi)*(x + 44715/10**6*x**3)))/2", "F.gelu(x, approximate='tanh')",
          "torch.nn.GELU(approximate='tanh')",
          module="GELU", torch=_NN + "GELU", args=_GELU_ARGS, select=(("approximate", "tanh"),), functional="gelu",
          rules=(Rule(_HF + "GELUTanh"), Rule(_HF + "NewGELUActivation"), Rule(_HF + "AccurateGELUActivation"),
                 Rule(_HF + "FastGELUActivation", _FAST_GELU_NOTE), Rule(_TIMM + "GELUTanh"))),
    Entry("silu", "x*sigmoid(x)", "F.silu(x)", "torch.nn.SiLU()",
          module="SiLU", torch=_NN + "SiLU", args=_INPLACE, module_doc="SiLU / Swish: ``x * sigmoid(x)``.",
          functional="silu", functional_doc="``F.silu``: ``x * sigmoid(x)``.",
          rules=(Rule(_HF + "SiLUActivation"), Rule(_TIMM + "Swish"), Rule(_TIMM_ME + "SwishMe"))),
    Entry("mish", "x*tanh(log(1 + exp(x)))", "F.mish(x)", "torch.nn.Mish()",
          module="Mish", torch=_NN + "Mish", args=_INPLACE, module_doc="Mish: ``x * tanh(softplus(x))``.",
          functional="mish", functional_doc="``F.mish``: ``x * tanh(softplus(x))``.",
          rules=(Rule(_HF + "MishActivation"), Rule(_TIMM + "Mish"), Rule(_TIMM_ME + "MishMe"))),
    Entry("softplus", "Piecewise((x, beta*x > threshold), (log(1 + exp(beta*x))/beta, True))",
          "F.softplus(x, beta, threshold)", "torch.nn.Softplus(beta, threshold)",
          {"beta": 1.0, "threshold": 20.0}, ("beta > 0", "threshold >= 18"),
          module="Softplus", torch=_NN + "Softplus", args=(("beta", 1.0), ("threshold", 20.0)),
          module_doc="Softplus: ``log(1 + exp(beta*x)) / beta``.",
          functional="softplus", functional_doc="``F.softplus``: ``log(1 + exp(beta*x)) / beta``, linear where "
                                                "``beta*x > threshold``."),
    Entry("elu", "Piecewise((alpha*(exp(x) - 1), x <= 0), (x, True))", "F.elu(x, alpha)", "torch.nn.ELU(alpha)",
          {"alpha": 1.0}, ("alpha > 0",),
          module="ELU", torch=_NN + "ELU", args=(("alpha", 1.0),) + _INPLACE, module_doc="ELU.",
          functional="elu", functional_doc="``F.elu``: ``x`` for ``x > 0``, ``alpha*(exp(x) - 1)`` otherwise.",
          saves_output="inplace"),
    Entry("celu", "Piecewise((alpha*(exp(x/alpha) - 1), x <= 0), (x, True))", "F.celu(x, alpha)",
          "torch.nn.CELU(alpha)", {"alpha": 1.0}, ("alpha > 0",),
          module="CELU", torch=_NN + "CELU", args=(("alpha", 1.0),) + _INPLACE, module_doc="CELU.",
          functional="celu", functional_doc="``F.celu``: ``x`` for ``x > 0``, ``alpha*(exp(x/alpha) - 1)`` otherwise.",
          saves_output="inplace"),
    Entry("selu", "Piecewise((scale*alpha*(exp(x) - 1), x <= 0), (scale*x, True))", "F.selu(x)", "torch.nn.SELU()",
          {"alpha": _SELU_ALPHA, "scale": _SELU_SCALE}, ("alpha > 0", "scale > 0"),
          module="SELU", torch=_NN + "SELU", args=_INPLACE, module_doc="SELU with PyTorch's constants.",
          functional="selu", functional_doc="``F.selu``: ``scale * elu(x, alpha)`` with PyTorch's fixed constants.",
          saves_output="inplace"),
    Entry("hardswish", "Piecewise((0, x <= -3), (x*(x + 3)/6, x < 3), (x, True))", "F.hardswish(x)",
          "torch.nn.Hardswish()",
          module="Hardswish", torch=_NN + "Hardswish", args=_INPLACE, module_doc="Hardswish: ``x * relu6(x + 3) / 6``.",
          functional="hardswish", functional_doc="``F.hardswish``: ``x * relu6(x + 3) / 6``.",
          rules=(Rule(_TIMM + "HardSwish"), Rule(_TIMM_ME + "HardSwishMe"))),
    Entry("leaky_relu", "Piecewise((negative_slope*x, x <= 0), (x, True))", "F.leaky_relu(x, negative_slope)",
          "torch.nn.LeakyReLU(negative_slope)", {"negative_slope": 0.01}, ("negative_slope > 0",),
          module="LeakyReLU", torch=_NN + "LeakyReLU", args=(("negative_slope", 0.01),) + _INPLACE,
          module_doc="LeakyReLU.", functional="leaky_relu",
          functional_doc="``F.leaky_relu``: ``x`` for ``x > 0``, ``negative_slope * x`` otherwise.",
          saves_output="inplace"),
    Entry("relu", "Piecewise((0, x <= 0), (x, True))", "F.relu(x)", "torch.nn.ReLU()",
          module="ReLU", torch=_NN + "ReLU", args=_INPLACE,
          module_doc="ReLU. torch.nn.ReLU already saves its output: no memory gain.",
          functional="relu", functional_doc=_no_gain("F.relu"), saves_output="always"),
    Entry("sigmoid", "sigmoid(x)", "torch.sigmoid(x)", "torch.nn.Sigmoid()",
          module="Sigmoid", torch=_NN + "Sigmoid",
          module_doc="Sigmoid. torch.nn.Sigmoid already saves its output: no memory gain.",
          functional="sigmoid", functional_doc=_no_gain("torch.sigmoid"), saves_output="always",
          rules=(Rule(_TIMM + "Sigmoid"),)),
    Entry("tanh", "tanh(x)", "torch.tanh(x)", "torch.nn.Tanh()",
          module="Tanh", torch=_NN + "Tanh", module_doc="Tanh. torch.nn.Tanh already saves its output: no memory gain.",
          functional="tanh", functional_doc=_no_gain("torch.tanh"), saves_output="always",
          rules=(Rule(_TIMM + "Tanh"),)),
    Entry("quick_gelu", "x*sigmoid(1702/1000*x)", "x * torch.sigmoid(1.702 * x)", "x*sigmoid(1.702x) (CLIP)",
          module="QuickGELU", module_doc="QuickGELU (CLIP): ``x * sigmoid(1.702 * x)``.",
          functional="quick_gelu",
          functional_doc="``x * sigmoid(1.702 * x)`` (CLIP; Hugging Face ``QuickGELUActivation``).",
          rules=(Rule(_HF + "QuickGELUActivation"), Rule(_TIMM + "QuickGELU"))),
    Entry("relu2", "Piecewise((0, x <= 0), (x**2, True))", "torch.square(F.relu(x))", "relu(x)**2 (Primer)",
          module="ReLU2", module_doc="Squared ReLU (Primer): ``relu(x) ** 2``.",
          functional="relu2", functional_doc="``relu(x) ** 2`` (Primer; Hugging Face ``ReLUSquaredActivation``).",
          rules=(Rule(_HF + "ReLUSquaredActivation"),)),
)

#: activation classes of other libraries that invact recognises but has no table for, and why
LEFT: tuple[Rule, ...] = (
    Rule(_HF + "ClippedGELUActivation", "clip(gelu(x), min, max): no table (flat outside the clip)"),
    Rule(_HF + "LinearActivation", "identity: saves nothing"),
    Rule(_HF + "LaplaceActivation", NO_TABLE),
    Rule(_HF + "SqrtSoftplusActivation", NO_TABLE),
    Rule(_HF + "XIELUActivation", "has learnable parameters: no fixed table"),
    Rule(_TIMM + "HardSigmoid", NO_TABLE),
    Rule(_TIMM + "HardMish", NO_TABLE),
    Rule(_TIMM + "PReLU", "has learnable parameters: no fixed table"),
    Rule(_TIMM_ME + "HardSigmoidMe", NO_TABLE),
)

BY_NAME: dict[str, Entry] = {e.name: e for e in CATALOG}


def group(key: str, rows: tuple[Entry, ...] | None = None) -> dict[str, tuple[Entry, ...]]:
    """``rows`` (default the catalog) by ``module`` or ``functional`` (``key``), in order; rows without
    one are left out."""
    out: dict[str, list[Entry]] = {}
    for e in CATALOG if rows is None else rows:
        if getattr(e, key):
            out.setdefault(getattr(e, key), []).append(e)
    return {k: tuple(v) for k, v in out.items()}


def check_catalog(rows: tuple[Entry, ...] = CATALOG) -> None:
    """Refuse contradictory rows (:class:`CatalogError` naming the row): duplicate names or classes,
    rows of one class that disagree on its arguments or torch class, ``select`` or table arguments that
    are not arguments, selections that do not tell rows apart, unknown ``saves_output``."""
    seen: dict[str, Entry] = {}
    classes: dict[str, str] = {}
    for e in rows:
        if e.name in seen or not e.name.isidentifier():
            raise CatalogError(f"catalog row {e.name!r}: the name must be a new identifier")
        arg_names = {n for n, _ in e.args}
        if not {n for n, _ in e.select} <= arg_names:
            raise CatalogError(f"catalog row {e.name!r}: select names an argument not in args {sorted(arg_names)}")
        if e.saves_output not in ("always", "inplace", "never"):
            raise CatalogError(f"catalog row {e.name!r}: saves_output must be 'always', 'inplace' or 'never'")
        if e.torch is not None and e.torch.rsplit(".", 1)[-1] != e.module:
            raise CatalogError(f"catalog row {e.name!r}: module {e.module!r} must be named as torch's {e.torch}")
        for rule in e.rules:
            if classes.setdefault(rule.cls, e.name) != e.name:
                raise CatalogError(f"catalog row {e.name!r}: {rule.cls} is already a rule of {classes[rule.cls]!r}")
        seen[e.name] = e
    for key in ("module", "functional"):
        for label, members in group(key, rows).items():
            first = members[0]
            if any((m.args, m.torch, [n for n, _ in m.select]) != (first.args, first.torch, [n for n, _ in first.select])
                   for m in members):
                raise CatalogError(f"catalog rows {[m.name for m in members]} share {key} {label!r} but not its "
                                   "args, torch class and the arguments that select")
            if len({m.select for m in members}) != len(members):
                raise CatalogError(f"catalog rows {[m.name for m in members]} share {key} {label!r}: their select "
                                   "must tell them apart")


check_catalog()
