"""Emit the evaluation of g(y, code) and of the forward code, once for both torch and Triton.

The emitted statements follow docs/table-format.md's float32 scheme step by step; a ``Dialect``
names the few operations that differ between torch and Triton (where, sqrt, clamps, gathers, the
segment index). Both dialects read the same ``POLY`` rows (see :mod:`.analysis`).
"""

from __future__ import annotations

import sympy as sp

from ...common import slots
from ...common.float32_scheme import TINY32, root_seed
from ..fit import search_pays
from ..float32 import F32_MAX, f32_below
from .analysis import Y, Plan
from .printer import TorchGPrinter, TritonPrinter
from .writer import Writer

__all__ = ["TorchDialect", "TritonDialect", "TritonSearchDialect", "search_levels", "emit_g", "emit_code"]

EAGER_COMPARES = 1  # a class of this many thresholds compares in eager code too (the same statements as compiled)


def passes(side: str) -> str:
    """The comparison of a value with a break's threshold that holds right of the break: `>` where
    the break belongs to the left side, else `>=` (invact.bitpack.threshold: never a subnormal t)."""
    return ">" if side == "left" else ">="


class TorchDialect:
    printer = TorchGPrinter  # g's closed forms with fastmath.sqrt (correctly rounded)
    where = "fastmath.where"  # torch.where, bit for bit; eager CPU code: no branch per element
    where_rare = "torch.where"  # for conditions that hardly ever hold (NaN y): ATen's branches predict well

    def sqrt(self, v): return f"fastmath.sqrt({v})"  # correctly rounded, as the scheme's sqrt
    def log(self, v): return f"fastmath.log({v})"
    def root_power(self, v, n, k): return f"fastmath.root_power({v}, {n}, {k})"  # power_tail: a^(k/n)
    def clamp_range(self, v, lo, hi): return f"torch.clamp({v}, {lo!r}, {hi!r})"
    def at_least(self, v, lo): return f"torch.clamp_min({v}, {lo!r})"
    def clamp1(self, v): return f"torch.clamp({v}, -1.0, 1.0)"

    def clamp_ends(self, v, lo, hi):
        """v clamped to [lo, hi] (texts; None: no bound), NaN kept (torch.clamp; c_gen's clamps too)."""
        if lo is not None and hi is not None:
            return f"torch.clamp({v}, {lo}, {hi})"
        return f"torch.clamp({v}, min={lo})" if lo is not None else f"torch.clamp({v}, max={hi})"

    def end(self, value: float, lower: bool) -> str:
        """A clamp's numeric end: the stored float64 end for float64 y; for float32 y the nearest float32
        inside the range (every float32 y of the range passes it unmoved), where the two differ."""
        inside = -f32_below(-value) if lower else f32_below(value)
        return repr(value) if inside == value else f"({value!r} if y.dtype == torch.float64 else {inside!r})"
    def isnan(self, v): return f"{v} != {v}"  # torch.isnan compiles to a scalar loop on CPU
    def zeros(self, v): return f"torch.zeros_like({v})"
    def gather(self, col: int) -> str: return f"q[{col}]"
    def divide(self, a, b): return f"{a} / {b}"
    def constant_index(self, offset: int) -> str: return repr(offset)

    def class_index(self, plan: Plan, c, compare: bool) -> str:
        """Global segment index within code class ``c``: count of thresholds <= y, plus its offset.
        Compiled code compares (each compare fuses into Inductor's loop); eager code counts by
        :func:`invact.selection.passed` (vectorised compares into float32, as aten.bucketize counts:
        its binary search is a scalar loop) where the class has more than :data:`EAGER_COMPARES`
        breaks, all of one side."""
        if not c.y_breaks:
            return [repr(c.offset)]
        a, b = c.break_offset, c.break_offset + len(c.y_breaks)
        sides = {side for _, side in c.y_breaks}
        if compare or len(c.y_breaks) <= EAGER_COMPARES or len(sides) > 1:
            terms = [f"(y {passes(side)} thr[{a + j}]).to(torch.int32)" for j, (_, side) in enumerate(c.y_breaks)]
        else:  # right=True counts thresholds <= y, right=False those < y
            terms = [f"selection.passed(y, thr[{a}:{b}], right={sides == {'right'}})"]
        return terms + ([str(c.offset)] if c.offset else [])

    def interval_code(self, plan: Plan) -> str:
        """The forward code of x (int32) from the thresholds thr (x > thr[j], or x >= thr[j] for a
        right-side break, passes break j)."""
        k, codes, op = len(plan.x_breaks), list(plan.codes), [passes(side) for _, side in plan.x_breaks]
        if codes == list(range(k + 1)):
            return " + ".join(f"(x {op[j]} thr[{j}]).to(torch.int32)" for j in range(k))
        if k == 1 and codes == [1, 0]:
            return f"(x {'<=' if op[0] == '>' else '<'} thr[0]).to(torch.int32)"
        text = f"torch.full_like(x, {codes[0]}, dtype=torch.int32)"
        for j in range(k):
            text = f"{self.where}(x {op[j]} thr[{j}], {codes[j + 1]}, {text})"
        return text


class TritonDialect(TorchDialect):
    printer = TritonPrinter
    where = where_rare = "tl.where"
    columns = "NSEG"  # P's columns: one per segment

    def sqrt(self, v): return f"tl.sqrt_rn({v})"  # correctly rounded, as the scheme's sqrt
    def log(self, v): return f"act_triton.log({v})"
    def root_power(self, v, n, k): return f"act_triton.root_power({v}, {n}, {root_seed(n)}, {k})"
    def clamp_range(self, v, lo, hi): return f"tl.minimum(tl.maximum({v}, {lo!r}), {hi!r})"
    def at_least(self, v, lo): return f"tl.maximum({v}, {lo!r})"
    def isnan(self, v): return f"{v} != {v}"
    def zeros(self, v): return f"tl.zeros({v}.shape, dtype=tl.float32)"

    def clamp_ends(self, v, lo, hi):   # NaN kept, as torch.clamp (tl's default drops it on GPUs)
        for op, bound in (("tl.maximum", lo), ("tl.minimum", hi)):
            if bound is not None:
                v = f"{op}({v}, {bound}, propagate_nan=tl.PropagateNan.ALL)"
        return v

    def end(self, value: float, lower: bool) -> str:   # float32 y only
        return repr(-f32_below(-value) if lower else f32_below(value))
    def gather(self, col: int) -> str: return f"tl.load(P + {col} * {self.columns} + s)"

    def class_index(self, plan: Plan, c, compare: bool = True) -> str:
        strict = sum(1 << j for j, (_, side) in enumerate(c.y_breaks) if passes(side) == ">")
        return [f"act_triton.segment(y, YT, {c.break_offset}, {len(c.y_breaks)}, {strict}, {c.offset})"]

    def interval_code(self, plan: Plan) -> str:
        op = [passes(side) for _, side in plan.x_breaks]
        if len(plan.x_breaks) == 1 and list(plan.codes) == [1, 0]:  # as torch: NaN gets code 0
            return f"(x {'<=' if op[0] == '>' else '<'} tl.load(XT + 0)).to(tl.int32)"
        text = f"tl.zeros(x.shape, dtype=tl.int32) + {plan.codes[0]}"
        for j in range(len(plan.x_breaks)):
            text = f"tl.where(x {op[j]} tl.load(XT + {j}), {plan.codes[j + 1]}, {text})"
        return text


class TritonSearchDialect(TritonDialect):
    """Triton code whose segment index is act_triton.search's over slots (invact.common.slots): P holds
    POLY by slot, one column per slot."""
    columns = "NSLOT"

    def __init__(self, levels: int):
        self.levels = levels

    def search_index(self, w: Writer, plan: Plan) -> None:
        """s = each element's slot: its class's first (the last class whose code matches, the first
        where none does, as the count's selection), then the search."""
        w("s = tl.zeros(y.shape, dtype=tl.int32)")
        for k, c in enumerate(plan.classes[1:], 1):
            w(f"s = tl.where(code == {c.code}, {k << self.levels}, s)")
        w(f"s = act_triton.search(y, s, YT, {self.levels}, NSLOT)")


def search_levels(plan: Plan) -> int:
    """Levels of act_triton.search for the table's Triton g (0: its segments are counted): where every
    segment is a POLY row, the slots fit (invact.common.slots.levels), every class code is below 16
    and the search costs fewer instructions than counting (invact.fitting.fit.search_pays)."""
    n = slots.levels([c.n_segments for c in plan.classes])
    if not plan.has_poly or plan.exact or plan.constant or not n or any(not 0 <= c.code < 16 for c in plan.classes):
        return 0
    return n if search_pays(n, plan.n_y_breaks) else 0


def _sum(w: Writer, name: str, terms: list[str]) -> None:
    """name = t0 + t1 + ..., one term a line when there are more than two."""
    if len(terms) <= 2:
        w(f"{name} = {' + '.join(terms)}")
        return
    with w.block(f"{name} = ("):
        w(terms[0], *(f"+ {t}" for t in terms[1:]))
    w(")")


def _segment_index(w: Writer, plan: Plan, d: TorchDialect) -> None:
    """s = global segment index of each element (code class picked by ``code``), and the
    per-element POLY row q (gathered, or selected on the compiled CPU path)."""
    def body(compare: bool, w: Writer = w) -> Writer:
        if plan.n_segments == 1 and isinstance(d, TritonDialect):
            w("s = 0")
        if plan.n_segments > 1:
            for c in plan.classes[1:]:
                _sum(w, f"s{c.code}", d.class_index(plan, c, compare))
            _sum(w, "s", d.class_index(plan, plan.classes[0], compare))
            for c in plan.classes[1:]:
                w(f"s = {d.where}(code == {c.code}, s{c.code}, s)")
        return w

    if isinstance(d, TritonSearchDialect):
        d.search_index(w, plan)
        return
    if isinstance(d, TritonDialect):
        body(True)
        return
    compiled = body(True, Writer()).lines()
    if not plan.has_poly and compiled == body(False, Writer()).lines():
        w(*compiled)   # no bucketize, no gather: the same statements compiled and eager
        return
    # compiled: comparisons and selections fuse into the one generated loop (aten.bucketize and
    # gathers would not: see invact.selection); eager: one count per class and one gather.
    with w.block("if torch.compiler.is_compiling():"):
        if plan.exact or plan.constant or not plan.has_poly:  # else every segment is a POLY row
            body(True)
        if plan.has_poly:
            w("q = selection.columns(POLY, CLASSES, y, thr, code, Y_STRICT)")
    with w.block("else:"):
        body(False)
        if plan.has_poly:
            w("q = poly.index_select(1, s)" if plan.n_segments > 1 else "q = poly[:, 0]")  # 6x faster than poly[:, s]


def _power_base(d: TorchDialect, tf) -> str:
    """a = sign*y clamped to [1, float32 max]: a power transform's argument."""
    return d.clamp_range("y" if tf.sign == 1 else "-y", 1.0, F32_MAX)


def _transform(d: TorchDialect, tf) -> str:
    """t = T(y) of one transform, with its constants inlined (docs/table-format.md)."""
    if tf.kind == "identity":
        return "y"
    if tf.kind == "power":     # root 0 (exponential growth of f): t = log a
        return d.root_power(_power_base(d, tf), tf.root, -1) if tf.root else d.log(_power_base(d, tf))
    dd = "y"
    for o in tf.origin:  # y - 0 == y and y - (-o) == y + o exactly: print the simpler form
        if o != 0:
            dd = f"({dd} {'-' if o > 0 else '+'} {abs(o)!r})"
    dd = dd if tf.sign == 1 else f"-{dd}"
    if tf.kind == "sqrt":
        return d.sqrt(d.at_least(dd, 0.0))
    return d.log(d.at_least(dd, TINY32))


def _poly(w: Writer, plan: Plan, d: TorchDialect) -> None:
    """g from the gathered row: transform, centred variable u, Horner, c0 split in two (in Triton
    code, after the transform, the runtime's invact.act_triton.row: the same operations)."""
    q = d.gather
    *rest, last = plan.transforms
    w(f"t = {_transform(d, last)}")
    for i, tf in reversed(list(enumerate(rest))):
        w(f"t = {d.where}({q(Plan.ROW_TID)} == {float(i)!r}, {_transform(d, tf)}, t)")
    if isinstance(d, TritonDialect):
        w(f"g = act_triton.row(t, P, s, {d.columns}, {plan.degree}, {plan.den_degree}, CLAMP)")
        return
    c0 = Plan.ROW_C0
    w(f"u = {d.clamp1(f'(t - {q(Plan.ROW_CENTER)}) * {q(Plan.ROW_SCALE)}')}")
    if plan.degree == 0:
        w(f"g = (u * 0.0 + {q(c0 + 1)}) + {q(c0)}")
        return
    w(f"p = {q(c0 + 1 + plan.degree)}")
    for j in range(plan.degree - 1, 0, -1):
        w(f"p = p * u + {q(c0 + 1 + j)}")
    if plan.den_degree:  # rational rows: p = N(u) / Q(u), Q = 1 + d1 u + ... (1 on polynomial rows)
        w(f"den = {q(plan.row_den + plan.den_degree - 1)}")
        for j in range(plan.den_degree - 1, 0, -1):
            w(f"den = den * u + {q(plan.row_den + j - 1)}")
        w("den = den * u + 1.0", f"p = {d.divide('p', 'den')}")
    w(f"g = (p * u + {q(c0 + 1)}) + {q(c0)}")   # the FMA scheme fuses p * u + c0_lo (c_gen, act_triton.row)


def _power_weights(w: Writer, plan: Plan, d: TorchDialect) -> None:
    """power_tail rows: g = h * a^((n-1)/n), or h * a for root 0 (a = sign*y clamped; other rows keep
    g, times 1.0). Beyond float32's largest y (y = +-inf, where the forward overflowed, or a float64
    y past it) a polynomial tail's weight is NaN: there g ~ |y|^((n-1)/n) is far below float32's
    largest value, and the clamped a would give one finite g, wrong, however large x is. An exponential
    tail (root 0, g ~ c|y|) keeps a = float32's largest value: g is then about c times it, float32's
    own overflow of g."""
    for i, tf in enumerate(plan.transforms):
        if tf.kind == "power":
            base = _power_base(d, tf)
            weight = d.root_power(base, tf.root, tf.root - 1) if tf.root else base
            if tf.root:
                beyond = f"{'y' if tf.sign == 1 else '-y'} > {F32_MAX!r}"
                weight = f"{d.where_rare}({beyond}, float('nan'), {weight})"
            w(f"g = g * {d.where}({d.gather(Plan.ROW_TID)} == {float(i)!r}, {weight}, 1.0)")


def _closed_form(w: Writer, plan: Plan, d: TorchDialect, i: int, e: sp.Expr, made: dict[str, str]) -> str:
    """The text of segment ``i``'s closed form or constant ``e``; where the plan clamps it
    (:func:`.analysis.range_clamp`), in y{i} = y clamped to its range (a statement emitted here, or
    an earlier segment's of the same clamp: ``made`` maps each clamp's text to its name)."""
    clamp = next((ends for k, *ends in plan.clamps if k == i), None)
    if clamp is None:
        return d.printer("y").doprint(e)
    lo, hi = (None if v is None else d.end(v, lower) if isinstance(v, float) else d.printer("y").doprint(v)
              for v, lower in zip(clamp, (True, False)))
    text = d.clamp_ends("y", lo, hi)
    if text not in made:   # the identity on the segment's range: g there keeps its bits (and certificate)
        made[text] = f"y{i}"
        w(f"y{i} = {text}")
    name = made[text]
    return d.printer(name).doprint(e.subs(Y, sp.Symbol(name, real=True)))


def emit_g(w: Writer, plan: Plan, d: TorchDialect) -> None:
    """Statements turning ``y`` (float32/float64) and ``code`` into ``g``."""
    segments = sorted(plan.exact + plan.constant, key=lambda item: item[0])
    made: dict[str, str] = {}
    constant_valued = any(not e.has(Y) for _, e in segments)
    if plan.n_segments > 1 or plan.has_poly:
        _segment_index(w, plan, d)
    if plan.has_poly:
        _poly(w, plan, d)
        _power_weights(w, plan, d)
    else:
        i, e = segments.pop(0)
        value = _closed_form(w, plan, d, i, e, made)
        w(f"g = {value}" if e.has(Y) else f"g = {d.zeros('y')} + {value}")
    for i, e in segments:
        w(f"g = {d.where}(s == {i}, {_closed_form(w, plan, d, i, e, made)}, g)")
    if constant_valued or plan.has_poly or plan.nan_values or isinstance(d, TritonDialect):
        # constants and the float32 log drop NaN; PyTorch's own value where it has one (Plan.nan_values)
        printer = d.printer("y")
        fill = "y"
        for code, value in plan.nan_values:
            v = printer.doprint(value)
            fill = v if plan.code_bits == 0 else f"{d.where}(code == {code}, {v}, {fill})"
        w(f"g = {d.where_rare}({d.isnan('y')}, {fill}, g)")


def emit_code(w: Writer, plan: Plan, d: TorchDialect) -> None:
    """``c = ...``: the forward code of ``x`` (only for code_bits > 0)."""
    w(f"c = {d.interval_code(plan)}")
