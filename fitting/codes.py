"""A table's codes: the forward code (x breaks -> codes), the code classes (y breaks -> segments) and
the branches' JSON; breaks are written in parameter names where the table is parameter-generic."""

from __future__ import annotations

import sympy as sp

from .branches import Analysis, Branch
from .formulas import X, ActivationSpec
from .model import Break, CodeClass, ExactSegment, ForwardCode, Segment, TableBranch

__all__ = ["forward_code", "code_classes", "branch_json", "symbolic_boundary", "meeting_y"]


def _values(spec: ActivationSpec) -> dict:
    """The parameters' values by their (real) sympy symbols."""
    return {sp.Symbol(n, real=True): v for n, v in spec.params.items()}


def branch_json(b: Branch, segs: list[Segment]) -> TableBranch:
    """The table's entry for branch ``b`` with its chosen segments ``segs``: its route, tails and pieces."""
    fitted = [s for s in segs if s.fitted]
    d = b.to_json()
    d["route"] = "constant" if b.flat else ("exact" if all(isinstance(s, ExactSegment) for s in segs) else "fit")
    d["tails"] = [{"y_range": s.y_range, "value": s.text()} for s in segs if not s.fitted] \
        if d["route"] == "fit" else []
    d["pieces"] = len(fitted)
    d["degrees"] = sorted({s.degree for s in fitted})
    if any(s.den_degree for s in fitted):  # rational pieces (absent otherwise: older tables stay as they were)
        d["den_degrees"] = sorted({s.den_degree for s in fitted if s.den_degree})
    return TableBranch.from_json(d)


def forward_code(analysis: Analysis, spec: ActivationSpec, generic: bool) -> ForwardCode:
    """The x breaks and the code of each interval between them (in parameter names where ``generic``)."""
    return ForwardCode([Break(_sym_number(v, spec, generic), side) for v, side in analysis.x_breaks],
                       list(analysis.codes))


def _sym_number(value: float, spec: ActivationSpec, generic: bool) -> str:
    """repr(value), or an expression in parameter names equal to it when the table is generic."""
    if generic:
        sym = symbolic_boundary(value, spec)
        if sym is not None:
            return sp.sstr(sym)
    return repr(float(value))


def symbolic_boundary(value: float, spec: ActivationSpec) -> sp.Expr | None:
    """A piece boundary of the symbolic formula (Max, Min and Abs as their Piecewise: Max(x, b)'s b) whose
    value at the defaults is ``value``."""
    vals = _values(spec)
    rewritten = sp.piecewise_fold(spec.expr.rewrite(sp.Piecewise)).atoms(sp.Rel) - spec.expr.atoms(sp.Rel)
    for cond in [*spec.expr.atoms(sp.Rel), *sorted(rewritten, key=sp.default_sort_key)]:
        try:
            sols = sp.solve(sp.Eq(cond.lhs, cond.rhs), X)
        except NotImplementedError:
            continue
        for s in sols:
            try:
                at = float(s.subs(vals))
            except (TypeError, ValueError):    # not a number at the defaults (x**2 < b's roots for b < 0)
                continue
            if abs(at - value) <= 1e-12 * (1 + abs(value)):
                return s
    if value == 0:
        return sp.Integer(0)
    return None


def code_classes(analysis: Analysis, per_branch: dict, spec: ActivationSpec, generic: bool) -> list[CodeClass]:
    """Per code, its branches' segments (``per_branch``) in y order and the y breaks between them."""
    out = []
    for code in range(analysis.n_codes):
        members = sorted((b for b in analysis.branches if b.code == code), key=lambda b: (b.y_range[0], b.y_range[1]))
        segs, breaks = [], []
        for i, b in enumerate(members):
            bsegs = per_branch[b.index]
            if segs:
                breaks.append(_branch_break(members[i - 1], b, spec, generic))
            for j, s in enumerate(bsegs):
                if j > 0:
                    breaks.append(Break(repr(float(s.y_range[0])), "left"))
                segs.append(s)
        out.append(CodeClass(code, breaks, segs))
    return out


def _branch_break(left: Branch, right: Branch, spec: ActivationSpec, generic: bool) -> Break:
    """The y boundary between two branches of one code class, owned as PyTorch's kinks are."""
    value = right.y_range[0]
    left_has = left.y_closed[1] or left.flat
    right_has = right.y_closed[0] or right.flat
    if right.flat and right_has:
        side = "right"
    elif left_has and (left.flat or not right_has):
        side = "left"
    else:
        side = "right" if right_has else "left"
    text = repr(float(value))
    if generic and (y0 := meeting_y(right, spec)) is not None:
        text = sp.sstr(y0)
    return Break(text, side)


def meeting_y(hi: Branch, spec: ActivationSpec) -> sp.Expr | None:
    """The y where branch ``hi`` meets the branch before it in its code class (the y of its lower end),
    as an expression in the parameters; None where that x is not a piece boundary of the formula."""
    x_b = hi.x_range[0] if hi.direction != "decreasing" else hi.x_range[1]
    xs = symbolic_boundary(x_b, spec)
    return None if xs is None else sp.simplify(hi.sym_expr.subs(X, xs))
