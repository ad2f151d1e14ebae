"""Print table expressions (sympy strings in ``x`` or ``y`` and parameter names) as torch or Triton code.

One variable is the tensor (``x`` for formulas, ``y`` for segments); every other symbol is a
parameter, printed as ``param_NAME`` (:func:`mangle`): no name the generated code gives its own
locals, functions or modules starts with ``param_``, so no parameter name can shadow one
(tests/test_trust.py scans the generated modules for that).
Sub-expressions free of the tensor are parameter arithmetic: ``math`` in torch code (parameters are
Python floats there), ``tl`` in Triton code (parameters are float32 kernel scalars). Numbers are
printed as Python float literals. Integer powers become products, other powers of the tensor by a
number float64's pow rounded once to float32 (``fastmath.power``; exp and log in float64 in Triton), and
log(1 + exp(z)) the softplus max(z, 0) + log1p(exp(-|z|)): the forms of :mod:`..scheme`, which
certification evaluates (``closed_form_fn``). Triton has no ``tanh`` that runs in
the interpreter, so it is printed as ``act_triton.tanh`` (invact.act_triton: Cephes' tanhf in ``tl``
operations); Triton square roots and divisions are the correctly rounded ``tl.sqrt_rn`` and ``tl.div_rn``.
"""

from __future__ import annotations

import ast

import sympy as sp
from sympy.printing.precedence import precedence
from sympy.printing.str import StrPrinter

from ..expressions import parse as parse_expression
from ..scheme import emitted_form, fold_numbers, power_form, softplus_terms

__all__ = ["parse", "TorchPrinter", "TorchGPrinter", "TritonPrinter", "to_torch", "to_triton", "to_python",
           "PARAM_PREFIX", "mangle", "mangle_text", "fold_numbers"]

PARAM_PREFIX = "param_"   # of parameters in generated code; no generated local starts with it


def mangle(name: str) -> str:
    """The identifier of parameter ``name`` in generated code (injective: distinct names stay distinct)."""
    return PARAM_PREFIX + name


def mangle_text(text: str, names: list[str] | tuple[str, ...]) -> str:
    """Python expression ``text`` (a built-in's ``torch_forward``) with every variable in ``names``
    renamed by :func:`mangle` (keyword argument names and attributes are left alone)."""
    if not names:
        return text

    class Rename(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.Name:
            return ast.copy_location(ast.Name(mangle(node.id), node.ctx), node) if node.id in names else node

    return ast.unparse(Rename().visit(ast.parse(text, mode="eval")))

_FUNCS = ("exp", "log", "sqrt", "erf", "tanh", "atan", "sinh", "cosh", "asinh", "Abs", "Piecewise", "Min", "Max",
          "sign", "Heaviside")


def parse(text: str, variable: str, params: list[str] | tuple[str, ...]) -> sp.Expr:
    """A table expression string as sympy, with every symbol real; only whitelisted syntax
    (:mod:`invact.fitting.expressions`), else SpecError."""
    return parse_expression(text, (variable,), tuple(params), f"table expression in {variable}")


class _Base(StrPrinter):
    """Shared rules; subclasses name the module functions."""

    tensor_funcs: dict[str, str] = {}
    scalar_funcs: dict[str, str] = {}
    where = ""

    def __init__(self, variable: str) -> None:
        super().__init__({"full_prec": True})
        self.var = sp.Symbol(variable, real=True)

    def _has_var(self, e: sp.Basic) -> bool:
        return e.has(self.var)

    def _print_Symbol(self, e: sp.Symbol) -> str:
        return e.name if e.name == self.var.name else mangle(e.name)

    def _number(self, e: sp.Expr) -> str:
        value = float(e)
        return repr(value)

    def doprint(self, expr):  # noqa: D401 - sympy API
        return super().doprint(self.elementary(sp.sympify(expr)))

    def elementary(self, e: sp.Expr) -> sp.Expr:
        """``e`` as generated code evaluates it (:func:`..scheme.emitted_form`: sign and Heaviside as
        torch.where / tl.where, log(1 + exp(z)) as a softplus that does not overflow), the numbers of
        a product with the tensor folded into one (:func:`..scheme.fold_numbers`)."""
        return fold_numbers(emitted_form(e, self.var), self.var)

    minimum = maximum = clamp = ""
    min_max_args = ""     # after the two operands of ``minimum`` / ``maximum``

    def _print_Min(self, e):
        return self._min_max(e, self.minimum, "max")

    def _print_Max(self, e):
        return self._min_max(e, self.maximum, "min")

    def _min_max(self, e, both: str, bound: str) -> str:
        """Min / Max folded pairwise: tensor with tensor (``both``), or a tensor clamped by a scalar."""
        tensors = [a for a in e.args if self._has_var(a)]
        scalars = [a for a in e.args if not self._has_var(a)]
        out = self._print(tensors[0])
        for a in tensors[1:]:
            out = f"{both}({out}, {self._print(a)}{self.min_max_args})"
        if scalars:
            limit = type(e)(*scalars)
            out = self.clamp.format(v=out, bound=bound, limit=self._print(limit), both=both)
        return out

    def _print(self, expr, **kwargs):
        if isinstance(expr, sp.Expr) and expr.is_number and not isinstance(expr, sp.Integer):
            return self._number(expr)
        return super()._print(expr, **kwargs)

    def _print_Integer(self, e):
        return repr(float(e))

    def _call(self, name: str, *args: sp.Expr) -> str:
        table = self.tensor_funcs if any(self._has_var(a) for a in args) else self.scalar_funcs
        return f"{table[name]}({', '.join(self._print(a) for a in args)})"

    def _print_Function(self, e):
        name = type(e).__name__
        if name not in self.tensor_funcs:
            raise ValueError(f"function {name} is not supported in generated code (allowed: {', '.join(_FUNCS)})")
        return self._call(name, *e.args)

    _print_exp = _print_log = _print_erf = _print_tanh = _print_atan = _print_Function
    _print_sinh = _print_cosh = _print_asinh = _print_log1p = _print_Function

    def _print_Abs(self, e):
        return self._call("Abs", *e.args)

    def _print_StableSoftplus(self, e):
        return f"({self._print(softplus_terms(e.args[0]))})"

    def _print_Pow(self, e, rational=False):
        """By :func:`..scheme.power_form`, which certification evaluates too; real powers take
        positive bases only."""
        base, ex = e.args
        form = power_form(ex)
        if form == "sqrt":
            return self._call("sqrt", base)
        if form == "rsqrt":
            return f"(1.0 / {self._call('sqrt', base)})"
        if form == "product":
            b = self.parenthesize(base, precedence(e), strict=False)
            prod = " * ".join([b] * abs(int(ex)))
            return f"({prod})" if ex > 0 else f"(1.0 / ({prod}))"
        if form == "power" and self._has_var(base):
            return self.power(self._print(base), float(ex))
        return self._call("exp", ex * sp.log(base))

    def power(self, base: str, exponent: float) -> str:
        """A tensor's power by a number: float64's pow rounded once to float32 (:func:`..scheme.power64`)."""
        raise NotImplementedError

    def _print_Piecewise(self, e):
        out = None
        for value, cond in reversed(e.args):
            if out is None:
                out = self._print(value) if cond == sp.true else self.where_call(self._print(cond), self._print(value), "float('nan')")
                continue
            out = self.where_call(self._print(cond), self._print(value), out)
        return out

    def where_call(self, cond: str, a: str, b: str) -> str:
        return f"{self.where}({cond}, {a}, {b})"

    def _print_Relational(self, e):
        return f"({self._print(e.lhs)} {e.rel_op} {self._print(e.rhs)})"

    def _print_And(self, e):
        return "(" + " & ".join(self._print(a) for a in e.args) + ")"

    def _print_Or(self, e):
        return "(" + " | ".join(self._print(a) for a in e.args) + ")"


class TorchPrinter(_Base):
    tensor_funcs = {"exp": "torch.exp", "log": "torch.log", "sqrt": "torch.sqrt", "erf": "torch.erf",
                    "tanh": "torch.tanh", "Abs": "torch.abs", "atan": "torch.atan", "sinh": "torch.sinh",
                    "cosh": "torch.cosh", "asinh": "torch.asinh", "log1p": "torch.log1p"}
    scalar_funcs = {"exp": "math.exp", "log": "math.log", "sqrt": "math.sqrt", "erf": "math.erf",
                    "tanh": "math.tanh", "Abs": "abs", "atan": "math.atan", "sinh": "math.sinh",
                    "cosh": "math.cosh", "asinh": "math.asinh", "log1p": "math.log1p"}
    where = "torch.where"
    minimum, maximum, clamp = "torch.minimum", "torch.maximum", "torch.clamp({v}, {bound}={limit})"

    def power(self, base: str, exponent: float) -> str:
        return f"fastmath.power({base}, {exponent!r})"

    def _print_Add(self, e, order=None):
        """exp(a) - 1 as expm1(a) in a forward: exact near a = 0, where the difference cancels (ELU-type
        formulas; g's closed forms keep it as written, as their C and Triton code)."""
        if len(e.args) == 2 and sp.S.NegativeOne in e.args:
            (other,) = [a for a in e.args if a is not sp.S.NegativeOne]
            if isinstance(other, sp.exp):
                fn = "torch.expm1" if self._has_var(other) else "math.expm1"
                return f"{fn}({self._print(other.args[0])})"
        return super()._print_Add(e, order=order)

    def _print_Piecewise(self, e):
        text = super()._print_Piecewise(e)
        if not self._has_var(e):
            raise ValueError("a Piecewise in parameters only is not supported in generated code")
        if not any(self._has_var(v) for v, _ in e.args):  # torch.where of two numbers: keep the dtype
            text = f"({text}).to({self._print(self.var)}.dtype)"
        return text


class TorchGPrinter(TorchPrinter):
    """g's closed forms: square roots correctly rounded (``fastmath.sqrt``), as the C and Triton code
    compute them, so the C file is the eager code's bits and a closed form's 16-bit backward can be
    computed directly. Forwards keep ``torch.sqrt`` (ATen's, ~3x faster than float64's root in eager
    code): y need not be correctly rounded, only what the backward reads it with."""
    tensor_funcs = {**TorchPrinter.tensor_funcs, "sqrt": "fastmath.sqrt"}
    _print_Add = _Base._print_Add  # exp(a) - 1 as written: the C and Triton code compute it so


class TritonPrinter(_Base):
    """Square roots and divisions correctly rounded, as torch computes them (``tl.sqrt`` and ``/``
    are approximations on GPUs: sqrt.approx.f32, div.full.f32), with both operands of a division
    broadcast to blocks (``tl.div_rn`` does not broadcast); division by a power of two multiplies.
    ``reciprocals``: a division by any other number multiplies by its reciprocal (one rounding more,
    a correctly rounded division costing ~16 SASS instructions; what forwards, whose y need only be
    within a few ulps of PyTorch's, are printed with). ``forward``: log(1 + a) of a tensor a as
    ``act_triton.log1p(a)`` (log(1 + exp(x)) rounded exp(x) away below x = -8, y = 0 below -17; it is
    printed as the stable softplus in every printer), and exp(a) - 1 as ``act_triton.expm1(a)``; g's
    closed forms keep both as written, as their C code."""

    def __init__(self, variable: str, reciprocals: bool = False, forward: bool = False) -> None:
        super().__init__(variable)
        self.reciprocals, self.forward = reciprocals, forward

    tensor_funcs = {"exp": "tl.exp", "log": "tl.log", "sqrt": "tl.sqrt_rn", "erf": "tl.erf",
                    "tanh": "act_triton.tanh", "Abs": "tl.abs", "atan": "act_triton.atan", "log1p": "act_triton.log1p"}
    scalar_funcs = tensor_funcs
    where = "tl.where"
    minimum, maximum = "tl.minimum", "tl.maximum"
    # NaN kept, as torch.minimum / torch.clamp and the C code keep it (tl's default returns the other
    # operand on GPUs: max.f32)
    min_max_args = ", propagate_nan=tl.PropagateNan.ALL"
    clamp = "{both}({v}, {limit}, propagate_nan=tl.PropagateNan.ALL)"

    def elementary(self, e: sp.Expr) -> sp.Expr:
        """Also sinh, cosh and asinh through exp, log and sqrt (no libdevice in the interpreter);
        asinh by its odd form, which does not cancel for x < 0."""
        e = super().elementary(e)
        return e.replace(lambda a: isinstance(a, (sp.sinh, sp.cosh)), lambda a: a.rewrite(sp.exp)).replace(
            lambda a: isinstance(a, sp.asinh),
            lambda a: sp.Piecewise((-sp.log(-a.args[0] + sp.sqrt(a.args[0] ** 2 + 1)), a.args[0] < 0),
                                   (sp.log(a.args[0] + sp.sqrt(a.args[0] ** 2 + 1)), True)))

    def _print_Add(self, e, order=None):
        """In a forward, exp(a) - 1 of a tensor a as ``act_triton.expm1(a)`` (ELU-type formulas cancel there)."""
        if self.forward and len(e.args) == 2 and sp.S.NegativeOne in e.args:
            (other,) = [a for a in e.args if a is not sp.S.NegativeOne]
            if isinstance(other, sp.exp) and self._has_var(other):
                return f"act_triton.expm1({self._print(other.args[0])})"
        return super()._print_Add(e, order=order)

    def _print_log(self, e):
        (arg,) = e.args
        if self.forward and isinstance(arg, sp.Add) and sp.S.One in arg.args and self._has_var(arg):
            return f"act_triton.log1p({self._print(arg - 1)})"
        return self._print_Function(e)

    def _print_Mul(self, e):
        num, den = [], []
        for f in e.args:
            if f.is_Rational and f.q != 1:
                num += [sp.Integer(f.p)] if f.p != 1 else []
                den.append(sp.Integer(f.q))
            elif f.is_Pow and f.exp.is_Rational and f.exp.is_negative:
                den.append(sp.Pow(f.base, -f.exp))
            else:
                num.append(f)
        if not den:
            return super()._print_Mul(e)
        return self._divide(sp.Mul(*num, evaluate=False) if len(num) > 1 else (num[0] if num else sp.Integer(1)),
                            sp.Mul(*den, evaluate=False) if len(den) > 1 else den[0])

    def _print_Pow(self, e, rational=False):
        if e.exp.is_Rational and e.exp.is_negative and power_form(e.exp) != "power":
            return self._divide(sp.Integer(1), sp.Pow(e.base, -e.exp))
        return super()._print_Pow(e, rational)

    def power(self, base: str, exponent: float) -> str:
        """In float64 from exp and log (within a few 2^-53 of the exponent's log(base) before the
        rounding to float32, as float64's pow)."""
        return f"tl.cast(tl.exp(tl.log(tl.cast({base}, tl.float64)) * tl.full((), {exponent!r}, tl.float64)), tl.float32)"

    def _divide(self, num: sp.Expr, den: sp.Expr) -> str:
        if (den.is_Integer and int(den) & (int(den) - 1) == 0) or (self.reciprocals and den.is_number):
            # a power of two's reciprocal is exact; any other number's is rounded once (reciprocals)
            a = self.parenthesize(num, precedence(sp.Mul(2, num, evaluate=False)), strict=False)
            return f"{a} * {1.0 / float(den)!r}"
        a, b = self._print(num), self._print(den)
        if self._has_var(num) != self._has_var(den):  # a scalar and a block
            block = f"tl.zeros_like({self._print(self.var)})"
            a, b = (a, f"{block} + {b}") if self._has_var(num) else (f"{block} + {a}", b)
        return f"tl.div_rn({a}, {b})"


class PythonPrinter(_Base):
    """Parameter arithmetic only (no tensor): break values, constant segment values."""

    tensor_funcs = TorchPrinter.scalar_funcs
    scalar_funcs = TorchPrinter.scalar_funcs


def to_torch(expr: sp.Expr, variable: str) -> str:
    return TorchPrinter(variable).doprint(expr)


def to_triton(expr: sp.Expr, variable: str, reciprocals: bool = False, forward: bool = False) -> str:
    return TritonPrinter(variable, reciprocals, forward).doprint(expr)


def to_python(expr: sp.Expr) -> str:
    return PythonPrinter("_none_").doprint(expr)
