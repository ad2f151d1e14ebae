"""Generate ``generated/c_NAME.c``: the float32 backward ``out = g(y, code) * grad`` of one table in C.

The runtime (:mod:`invact.table_c`) builds it once into the kernel cache and calls it on CPU, so no
table needs a torch.compile on its first call. Its statements are those of the generated torch
``g_kernel``'s eager branch (:func:`.evaluation.emit_g` with the torch dialect), translated one by
one with the float32 semantics torch gives them (:class:`_Translator`): a Python float meeting a
float32 tensor is rounded to float32 first; arithmetic on Python floats alone (parameters) is double;
``scalar / tensor`` is ``reciprocal(tensor) * scalar`` (``Tensor.__rtruediv__``); clamps and wheres
treat NaN and signed zeros as ATen's kernels do. Built with ``-ffp-contract=off`` (no FMA), so plain
arithmetic gives the eager backend's bits; the FMA scheme's fused steps (Horner's, docs/table-format.md)
are written ``INVACT_FMA(a, b, c)``: ``fmaf`` in the build with FMA (invact.table_c), else the eager
code's two roundings. Where the torch code calls torch.exp/log/log1p/tanh, the C code calls
``csrc/invact_libm.h``'s ``invact_expf`` etc.: SLEEF's u10 algorithms (within 1 ulp) in scalar C that
vectorises, no C library call; in the build with FMA they give the bits of ATen's Vectorized<float>
functions (torch.log1p's; torch.exp/log/tanh's where ATen has no MKL, else those call MKL's VML, also
within an ulp). For torch.erf/atan/sinh/cosh/asinh it calls the C library's scalar float function.
Those results may differ from ATen's by an ulp or so, which the tests bound (tests/test_c_tables.py).
"""

from __future__ import annotations

import ast
import re
import struct

from ...common import float32_scheme as scheme
from .analysis import Plan
from .evaluation import TorchDialect, emit_g
from .writer import Writer, header

__all__ = ["generate_c"]

# torch.NAME on a float32 tensor -> the C float function; math.NAME on Python floats -> the double one
_FUNCS = {"exp": "exp", "log": "log", "sqrt": "sqrt", "erf": "erf", "tanh": "tanh", "atan": "atan",
          "sinh": "sinh", "cosh": "cosh", "asinh": "asinh", "abs": "fabs", "log1p": "log1p"}
_HELPERS = {"clamp_min": "invact_clamp_min", "minimum": "invact_minimum", "maximum": "invact_maximum"}
# torch.NAME -> csrc/invact_libm.h's scalar version of the SLEEF u10 function ATen's Vectorized<float> calls
_SLEEF = {"exp": "invact_expf", "log": "invact_logf", "log1p": "invact_log1pf", "tanh": "invact_tanhf"}
_TENSORS, _SCALARS = ("f", "i", "b"), ("d", "n")   # float32, int32, bool tensors; Python float, int
_CTYPE = {"f": "float", "i": "int32_t", "b": "int32_t"}
_COUNTED = 64    # torch.bucketize over at most this many thresholds: counted by compares (vectorised)


def _float(text: str, kind: str) -> str:
    """``text`` as a float32 value: Python numbers and integer tensors are converted (rounded)."""
    return text if kind == "f" else f"(float)({text})"


def _number(value: float | int) -> tuple[str, str]:
    if isinstance(value, bool) or isinstance(value, int):
        return str(int(value)), "n"
    if value != value:
        return "NAN", "d"
    if value in (float("inf"), float("-inf")):
        return ("INFINITY" if value > 0 else "(-INFINITY)"), "d"
    return repr(float(value)), "d"


def _f32(value: float) -> tuple[str, int]:
    """(exact C literal, bits) of ``value`` rounded to float32, as ``torch.tensor(POLY, float32)``."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    v = struct.unpack("<f", struct.pack("<I", bits))[0]
    if v != v or v in (float("inf"), float("-inf")):
        return _number(v)[0].join("()"), bits
    return f"({v.hex()}f)", bits


class _Translator:
    """Statements of generated torch code (a small, fixed subset of Python) -> C statements."""

    def __init__(self, params: tuple[str, ...], poly: tuple[tuple[float, ...], ...] = ()) -> None:
        self.kinds: dict[str, str] = {"y": "f", "code": "i", **{p: "d" for p in params}}
        self.row = ""          # the segment index that `q = poly.index_select(1, s)` gathered
        self.poly = poly       # POLY (one row per segment): table constants, never parameters
        self.columns: list[int] = []   # POLY columns that vary with the segment: qb[k * INVACT_BLOCK]
        self.head: list[str] = []      # the statements before q: the segment index s
        self.emitted: list[str] = []   # every statement so far

    def statements(self, body: list[ast.stmt]) -> list[str]:
        out: list[str] = []
        for node in body:
            if isinstance(node, ast.If):
                if ast.unparse(node.test) != "torch.compiler.is_compiling()":
                    raise ValueError(f"unsupported condition in generated code: {ast.unparse(node.test)}")
                out += self.statements(node.orelse)   # the eager branch
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                out += self._assign(node.targets[0].id, node.value)
            else:
                raise ValueError(f"unsupported statement in generated code: {ast.unparse(node)}")
        return out

    def _assign(self, name: str, value: ast.expr) -> list[str]:
        text = ast.unparse(value)
        if name == "q":        # the per-element POLY row: its columns are read in _Subscript
            self.row = {"poly.index_select(1, s)": "s", "poly[:, 0]": "0"}.get(text, "")
            if not self.row:
                raise ValueError(f"unsupported row selection in generated code: {text}")
            self.head = list(self.emitted)
            return []
        c, kind = self._fused(name, value) or self.expr(value)
        if kind == "n":                        # a Python int (a segment index): an int32 tensor in where()
            kind = "i"
        elif kind == "d":                      # a Python float: a tensor of the default dtype
            c, kind = _float(c, kind), "f"
        if name in self.kinds:
            if self.kinds[name] != kind:
                raise ValueError(f"{name} changes type in generated code: {text}")
            self.emitted.append(f"{name} = {c};")
        else:
            self.kinds[name] = kind
            self.emitted.append(f"{_CTYPE[kind]} {name} = {c};")
        return self.emitted[-1:]

    def _fused(self, name: str, value: ast.expr) -> tuple[str, str] | None:
        """The FMA scheme's fused steps (docs/table-format.md) as ``INVACT_FMA(a, b, c)``: Horner's
        ``p = p * u + c`` and ``den = den * u + d``, and ``g = (p * u + c0_lo) + c0_hi``; None for
        any other statement (every other operation is rounded as written)."""
        if not self.row or name not in ("p", "den", "g"):
            return None
        add, outer = (value.left, value.right) if name == "g" and isinstance(value, ast.BinOp) \
            and isinstance(value.op, ast.Add) else (value, None)
        if name == "g" and outer is None:
            return None
        if not (isinstance(add, ast.BinOp) and isinstance(add.op, ast.Add) and isinstance(add.left, ast.BinOp)
                and isinstance(add.left.op, ast.Mult) and ast.unparse(add.left.right) == "u"
                and ast.unparse(add.left.left) == ("p" if name == "g" else name)):
            return None
        (a, ka), (b, kb), (c, kc) = (self.expr(n) for n in (add.left.left, add.left.right, add.right))
        if ka != "f" or kb != "f":
            return None
        text = f"INVACT_FMA({a}, {b}, {_float(c, kc)})"
        if outer is not None:
            o, ko = self.expr(outer)
            text = f"({text} + {_float(o, ko)})"
        return text, "f"

    def expr(self, node: ast.expr) -> tuple[str, str]:
        """(C text, kind) of a Python expression of the generated code."""
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise ValueError(f"unsupported expression in generated code: {ast.unparse(node)}")
        return method(node)

    def _Constant(self, node: ast.Constant) -> tuple[str, str]:
        return _number(node.value)

    def _Name(self, node: ast.Name) -> tuple[str, str]:
        if node.id not in self.kinds:
            raise ValueError(f"unknown name in generated code: {node.id}")
        return node.id, self.kinds[node.id]

    def _Subscript(self, node: ast.Subscript) -> tuple[str, str]:
        base, index = ast.unparse(node.value), node.slice
        if isinstance(index, ast.Constant) and isinstance(index.value, int):
            if base == "thr":
                return f"thr[{index.value}]", "f"
            if base == "q" and self.row and self.poly:   # poly[:, 0]: the one segment's constant
                values = [_f32(r[index.value]) for r in (self.poly[:1] if self.row == "0" else self.poly)]
                if len({bits for _, bits in values}) == 1:   # the same in every segment: a constant
                    return values[0][0], "f"
                if index.value not in self.columns:
                    self.columns.append(index.value)
                return f"qb[{self.columns.index(index.value)} * INVACT_BLOCK]", "f"
            if base == "q" and self.row:
                return f"invact_col(poly, {index.value}, {self.row})", "f"
        raise ValueError(f"unsupported subscript in generated code: {ast.unparse(node)}")

    def _UnaryOp(self, node: ast.UnaryOp) -> tuple[str, str]:
        a, kind = self.expr(node.operand)
        if isinstance(node.op, ast.USub):
            return f"(-{a})", kind
        if isinstance(node.op, ast.UAdd):
            return a, kind
        if isinstance(node.op, (ast.Not, ast.Invert)) and kind == "b":
            return f"(!{a})", "b"
        raise ValueError(f"unsupported operator in generated code: {ast.unparse(node)}")

    def _IfExp(self, node: ast.IfExp) -> tuple[str, str]:
        """A clamp's end by y's dtype (evaluation.TorchDialect.end): the float32 one, the only y here."""
        if ast.unparse(node.test) != "y.dtype == torch.float64":
            raise ValueError(f"unsupported condition in generated code: {ast.unparse(node.test)}")
        return self.expr(node.orelse)

    def _BinOp(self, node: ast.BinOp) -> tuple[str, str]:
        (a, ka), (b, kb) = self.expr(node.left), self.expr(node.right)
        if isinstance(node.op, (ast.BitAnd, ast.BitOr)) and ka == kb == "b":
            return f"({a} {'&' if isinstance(node.op, ast.BitAnd) else '|'} {b})", "b"
        op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}.get(type(node.op))
        if op is None:
            raise ValueError(f"unsupported operator in generated code: {ast.unparse(node)}")
        if ka in _SCALARS and kb in _SCALARS:       # Python arithmetic: double
            if op == "/":
                return f"((double)({a}) / (double)({b}))", "d"
            return f"({a} {op} {b})", "d" if "d" in (ka, kb) else "n"
        if ka == "i" and kb in ("i", "n") and op in "+-":
            return f"({a} {op} {b})", "i"
        if "f" not in (ka, kb) and not (ka in _SCALARS or kb in _SCALARS):
            raise ValueError(f"unsupported operand types in generated code: {ast.unparse(node)}")
        if op == "/" and ka in _SCALARS:             # Tensor.__rtruediv__: reciprocal, then a product
            return f"((1.0f / {b}) * {_float(a, ka)})", "f"
        return f"({_float(a, ka)} {op} {_float(b, kb)})", "f"

    def _Compare(self, node: ast.Compare) -> tuple[str, str]:
        if len(node.ops) != 1:
            raise ValueError(f"chained comparison in generated code: {ast.unparse(node)}")
        op = {ast.Gt: ">", ast.GtE: ">=", ast.Lt: "<", ast.LtE: "<=", ast.Eq: "==", ast.NotEq: "!="}[type(node.ops[0])]
        (a, ka), (b, kb) = self.expr(node.left), self.expr(node.comparators[0])
        if "f" in (ka, kb) or (ka == "d" and kb == "d"):   # a tensor's float32 compare (scalars rounded)
            a, b = (_float(a, ka), _float(b, kb)) if "f" in (ka, kb) else (a, b)
        return f"({a} {op} {b})", "b"

    def _Call(self, node: ast.Call) -> tuple[str, str]:
        func = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(node.func, ast.Attribute) and node.func.attr == "to" and len(node.args) == 1:
            a, kind = self.expr(node.func.value)
            target = ast.unparse(node.args[0])
            if target == "torch.int32":
                return f"((int32_t)({a}))", "i"
            if target in ("y.dtype", "torch.float32"):
                return _float(a, kind), "f"
        if func in ("torch.bucketize", "selection.passed"):  # (its count): NaN passes every threshold
            sl = node.args[1]
            if not (isinstance(sl, ast.Subscript) and isinstance(sl.slice, ast.Slice)):
                raise ValueError(f"unsupported bucketize in generated code: {ast.unparse(node)}")
            lo, hi = ast.literal_eval(sl.slice.lower), ast.literal_eval(sl.slice.upper)
            right = int(bool(ast.literal_eval(keywords["right"])))
            v = self.expr(node.args[0])[0]
            if hi - lo > _COUNTED:
                return f"invact_bucketize({v}, thr + {lo}, {hi - lo}, {right})", "i"
            # sorted thresholds: the count of those the value passes (NaN passes all), as the search
            # finds it, in compares that vectorise (the search is a scalar loop: 36 ns an element)
            op = ">" if right else ">="
            return "(" + " + ".join(f"((int32_t)(!(thr[{j}] {op} {v})))" for j in range(lo, hi)) + ")", "i"
        if func == "scheme.row" and self.row and ast.unparse(node.args[0]) == "q":   # invact.scheme.row
            degree, den = (ast.literal_eval(a) for a in node.args[2:4])
            return f"invact_row(poly, {self.row}, {self.expr(node.args[1])[0]}, {degree}, {den})", "f"
        if func == "torch.zeros_like":
            return "0.0f", "f"
        if func == "float" and len(node.args) == 1:
            return _number(float(ast.literal_eval(node.args[0])))
        args = [self.expr(a) for a in node.args]
        module, _, name = func.rpartition(".")
        if func in ("torch.where", "fastmath.where") and len(args) == 3:
            (c, _), (a, ka), (b, kb) = args
            if ka in ("i", "n") and kb in ("i", "n"):
                return f"({c} ? {a} : {b})", "i"
            return f"({c} ? {_float(a, ka)} : {_float(b, kb)})", "f"
        if func == "torch.clamp":
            v = args[0][0]
            lo = _float(*args[1]) if len(args) > 1 else keywords.get("min") and _float(*self.expr(keywords["min"]))
            hi = _float(*args[2]) if len(args) > 2 else keywords.get("max") and _float(*self.expr(keywords["max"]))
            if lo:
                v = f"invact_clamp_min({v}, {lo})"
            return (f"invact_clamp_max({v}, {hi})" if hi else v), "f"
        if module == "torch" and name in _HELPERS:
            return f"{_HELPERS[name]}({', '.join(_float(*a) for a in args)})", "f"
        if func == "fastmath.log":                     # invact.fastmath.log, operation for operation
            return f"invact_log32({args[0][0]})", "f"
        if func == "fastmath.sqrt":                    # correctly rounded in eager code, as sqrtf
            return f"invact_sqrt_rn({args[0][0]})", "f"
        if func == "fastmath.root_power":               # power_tail's a^(k/n): invact_root_power below
            n, k = (ast.literal_eval(a) for a in node.args[1:3])
            return f"invact_root_power({args[0][0]}, {int(n)}, {scheme.root_seed(int(n))}, {int(k)})", "f"
        if func == "fastmath.power":                    # a closed form's power: float64's pow, rounded once
            return f"((float)pow((double)({args[0][0]}), {args[1][0]}))", "f"
        if module == "torch" and name in _SLEEF and args[0][1] == "f":
            return f"{_SLEEF[name]}({args[0][0]})", "f"
        if module == "torch" and name in _FUNCS and args[0][1] == "f":
            return f"{_FUNCS[name]}f({args[0][0]})", "f"
        if (module == "math" and name in _FUNCS) or func == "abs":
            return f"{_FUNCS[name or func]}({args[0][0]})", "d"
        raise ValueError(f"unsupported call in generated code: {ast.unparse(node)}")


def _translator(plan: Plan) -> tuple[_Translator, list[str]]:
    """The translator (its POLY columns, the statements giving s) and the statements of g."""
    w = Writer()
    emit_g(w, plan, TorchDialect())
    t = _Translator(tuple(f"param_{n}" for n in plan.param_names), plan.poly)
    return t, t.statements(ast.parse(w.text()).body)


def _columns(plan: Plan, t: _Translator) -> list[str]:
    """COLUMNS: the POLY columns the statements read from qb, one row each, as float32 constants
    padded with zeros to the permute width (8 segments, 16, or all)."""
    width = next((n for n in (8, 16) if plan.n_segments <= n), plan.n_segments)
    if not t.columns:                   # (a single segment's columns are constants)
        return ["#define N_COLUMNS 0"]
    rows = [[_f32(r[j])[0] for r in plan.poly] + ["0.0f"] * (width - plan.n_segments) for j in t.columns]
    return [f"#define N_COLUMNS {len(rows)}", f"#define COLUMN_WIDTH {width}",
            f"/* POLY columns {', '.join(map(str, t.columns))} (float32), by segment */",
            f"static const float COLUMNS[N_COLUMNS][COLUMN_WIDTH] __attribute__((aligned(64))) = {{",
            *(f"    {{{', '.join(r)}}}," for r in rows), "};"]


_ROOT_POWER = ("/* invact.fastmath.root_power op for op (power_tail, docs/table-format.md): a^(k/n), k = -1 or",
               " * n - 1, of a in [1, FLT_MAX]: a seed from a's bits, float64 Newton steps, r^k rounded once */",
               "static inline float invact_root_power(float a, int n, int32_t seed, int k) {",
               "    union { float f; int32_t i; } v = {a};",
               "    v.i = v.i / n + seed;",
               "    double r = (double)v.f, a64 = (double)a, inv = 1.0 / (double)n, out;",
               f"    for (int step = 0; step < {scheme.ROOT_STEPS}; step++) {{",
               "        double p = r;",
               "        for (int j = 0; j < n - 2; j++) p = p * r;",
               "        r = r + (a64 / p - r) * inv;",
               "    }",
               "    if (k == -1) return (float)(1.0 / r);",
               "    out = r;",
               "    for (int j = 0; j < k - 1; j++) out = out * r;",
               "    return (float)out;",
               "}", "")


def _calls(lines: list[str]) -> tuple[list[str], list[str]]:
    """The C library functions the statements call where the torch code calls ATen's, and the
    functions of csrc/invact_libm.h (SLEEF's) they call."""
    text = "\n".join(lines)
    library = sorted(f"{c}f" for c in set(_FUNCS.values()) - {"fabs"} if re.search(rf"\b{c}f\(", text))
    return library, sorted(f for f in _SLEEF.values() if f"{f}(" in text)


def _fma_lines(body: list[str], calls: list[str]) -> list[str]:
    """EAGER_BITS, and INVACT_FMA where the statements have fused steps (the build with FMA)."""
    fused = any("INVACT_FMA(" in line for line in body)
    lines = [] if not fused else [
        "/* INVACT_FMA: the FMA scheme's fused steps, fmaf where invact.table_c builds with INVACT_USE_FMA,",
        " * else a * b + c rounded twice as in the eager g_kernel (docs/table-format.md) */",
        "#ifdef INVACT_USE_FMA", "#define INVACT_FMA(a, b, c) fmaf((a), (b), (c))",
        "#else", "#define INVACT_FMA(a, b, c) ((a) * (b) + (c))", "#endif"]
    if calls:
        return [*lines, "/* 0: g calls math functions (above), which may differ from the eager g_kernel's"
                        " (invact.table_c.g_kernel) */", "#define EAGER_BITS 0"]
    eager = "/* 1: no C library call, so g is the eager g_kernel's bit for bit (invact.table_c.g_kernel) */"
    if not fused:
        return [eager, "#define EAGER_BITS 1"]
    return [*lines, eager[:-4] + ", not with FMA) */", "#ifdef INVACT_USE_FMA", "#define EAGER_BITS 0", "#else",
            "#define EAGER_BITS 1", "#endif"]


def generate_c(plan: Plan) -> str:
    """Source text of ``generated/c_NAME.c`` for ``plan``. Generated code this translator does not
    take gives a file that says why (``#error``): the runtime then runs Inductor's code for the table
    (one warning), and the fit that wrote the table still succeeds."""
    w = Writer()
    w(header(plan.source, "/*").rstrip("\n"),
      f"/* {plan.name}: float32 backward out = g(y, code) * grad, the statements of the eager g_kernel of",
      f" * generated/torch_{plan.name}.py in the same order (invact.fitting.codegen.c_gen); built and called",
      " * by invact.table_c. */")
    try:
        t, body = _translator(plan)
    except (ValueError, KeyError) as error:
        reason = " ".join(str(error).split()).replace("*/", "* /")
        w("", f'#define TABLE_SHA256 "{plan.meta["sha256"]}"', f"#error no C kernel: {reason}")
        return w.text()
    library, sleef = _calls(body)
    if library:
        w(f"/* Calls the C library's {', '.join(library)} where ATen calls its own vectorised functions:",
          " * those results may differ by about an ulp (everything else: the eager backend's bits). */")
    if sleef:
        w(f"/* Calls {', '.join(sleef)} (csrc/invact_libm.h): SLEEF's u10 algorithms, within 1 ulp, as ATen's",
          " * vectorised functions (their bits in the build with FMA); torch.exp/log/tanh of an ATen built",
          " * with MKL call its VML instead, about an ulp apart (everything else: the eager backend's bits). */")
    w("", f'#define TABLE_SHA256 "{plan.meta["sha256"]}"',
      *_fma_lines(body, library + sleef), f"#define CODE_BITS {plan.code_bits}",
      f"#define N_SEGMENTS {plan.n_segments}", f"#define N_THRESHOLDS {plan.n_y_breaks}",
      f"#define ROW_LENGTH {plan.row_len}", f"#define N_PARAMS {len(plan.params)}",
      "/* invact.common.float32_scheme: invact.fastmath.log's constants */",
      f"#define LOG_SQRT2 {scheme.SQRT2_F32!r}", f"#define LOG_LN2_HI {scheme.LN2_HI!r}",
      f"#define LOG_LN2_LO {scheme.LN2_LO!r}",
      f"#define LOG_POLY {{{', '.join(repr(c) for c in scheme.LOG_POLY)}}}",
      "/* invact.common.float32_scheme: columns of a POLY row */",
      *(f"#define {k} {getattr(scheme, k)}" for k in ("ROW_TID", "ROW_CENTER", "ROW_SCALE", "ROW_C0", "ROW_C0_LO",
                                                      "ROW_C1")),
      *_columns(plan, t), "", '#include "invact_table.h"', "")
    if any("invact_root_power(" in line for line in body):
        w(*_ROOT_POWER)
    if t.columns:
        with w.block("static inline int32_t invact_seg(float y, int32_t code, const float *restrict thr,"
                     " const double *restrict param) {"):
            w(*(f"const double param_{n} = param[{k}];" for k, n in enumerate(plan.param_names)))
            w("(void)code, (void)thr, (void)param;", *t.head, "return s;")
        w("}", "")
    with w.block("static inline float invact_g(float y, int32_t code, const float *restrict thr,"
                 " const float *restrict poly, const double *restrict param, const float *restrict qb) {"):
        w(*(f"const double param_{n} = param[{k}];" for k, n in enumerate(plan.param_names)))
        w("(void)code, (void)thr, (void)poly, (void)param, (void)qb;")
        w(*body, "return g;")
    w("}")
    return w.text()
