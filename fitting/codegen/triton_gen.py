"""Generate ``generated/triton_NAME.py``: fused Triton forward (y and packed code) and backward kernels."""

from __future__ import annotations

from ...common.float32_scheme import LN2_HI, LN2_LO, LOG_POLY, SQRT2_F32
from .analysis import Plan
from .evaluation import TritonDialect, emit_code, emit_g
from .printer import mangle, to_triton
from .writer import Writer, header

__all__ = ["generate_triton"]


def _program_elements(w: Writer, plan: Plan) -> None:
    """The elements of program pid: BLOCK contiguous ones without a code; with one, the BLOCK code
    bytes b = pid * BLOCK + arange and, in plane j, elements nbytes * j + b (see invact.bitpack), so
    every load and store is contiguous and no offset needs a division."""
    w("pid = tl.program_id(0).to(tl.int64)  # int64 offsets: more than 2**31 elements work")
    if not plan.code_bits:
        w("offs = pid * BLOCK + tl.arange(0, BLOCK)", "mask = offs < n")
        return
    w("b = pid * BLOCK + tl.arange(0, BLOCK)",
      "plane = tl.zeros_like(b) + nbytes  # int64: plane * j cannot overflow")


def _plane_offsets(w: Writer) -> None:
    w("offs = plane * j + b", "mask = (b < nbytes) & (offs < n)")


def _kernel_params(plan: Plan) -> str:
    """The parameters' kernel arguments (float32 scalars, in PARAMS order: the launchers pass a list)."""
    return "".join(f"{mangle(n)}, " for n in plan.param_names)


def _forward_kernel(w: Writer, plan: Plan) -> None:
    params = _kernel_params(plan)
    code_args = "CODE, XT, " if plan.code_bits else ""
    w("@triton.jit")
    with w.block(f"def forward_kernel(X, Y, {code_args}n, nbytes, {params}BLOCK: tl.constexpr):"):
        w('"""y = f(x) in float32, stored in Y\'s dtype; with a code: program pid packs BLOCK code bytes',
          "from the matching element of every bit plane. x > XT[j] (x >= XT[j] for a right-side break)",
          "<=> x is right of forward-code break j.\"\"\"")
        _program_elements(w, plan)
        if not plan.code_bits:
            _forward_body(w, plan)
            return
        w("acc = tl.zeros([BLOCK], dtype=tl.int32)")
        with w.block("for j in tl.static_range(PER):"):
            _plane_offsets(w)
            _forward_body(w, plan)
            emit_code(w, plan, TritonDialect())
            w("acc = acc | (tl.where(mask, c, 0) << (j * BITS))")
        w("tl.store(CODE + b, acc.to(tl.uint8), mask=b < nbytes)")


def _forward_body(w: Writer, plan: Plan) -> None:
    w("x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)",
      f"y = {to_triton(plan.formula, 'x')}",
      "tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)")


TANH_POLY = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1)


def _tanh_function(w: Writer) -> None:
    """Cephes tanhf in tl operations (libdevice tanh does not run in the interpreter, and
    2 sigmoid(2z) - 1 loses the relative accuracy of small z)."""
    w("@triton.jit")
    with w.block("def _tanh(z):"):
        w('"""tanh as Cephes tanhf (~2 float32 ulps): z + z^3 P(z^2) below |z| = 0.625, else',
          '1 - 2 / (exp(2|z|) + 1) with z\'s sign; the same operations in the interpreter and on GPUs."""',
          "a = tl.abs(z)",
          "s = z * z",
          f"p = tl.zeros(z.shape, dtype=tl.float32) + {TANH_POLY[0]!r}")
        for c in TANH_POLY[1:]:
            w(f"p = p * s + {c!r}")
        w("big = 1.0 - tl.div_rn(tl.zeros_like(a) + 2.0, tl.exp(2.0 * a) + 1.0)",
          "t = tl.where(a < 0.625, p * s * z + z, tl.where(z < 0.0, -big, big))",
          "return tl.where(z == 0.0, z, t)  # tanh(-0.0) = -0.0")
    w("", "")


ATAN_POLY = (8.05374449538e-2, -1.38776856032e-1, 1.99777106478e-1, -3.33329491539e-1)


def _atan_function(w: Writer) -> None:
    """Cephes atanf in tl operations (libdevice atan does not run in the interpreter): argument
    reduction by tan(3 pi / 8) and tan(pi / 8), then z + z^3 P(z^2)."""
    w("@triton.jit")
    with w.block("def _atan(z):"):
        w('"""atan as Cephes atanf (~2 float32 ulps), with z\'s sign."""',
          "a = tl.abs(z)",
          "big = a > 2.414213562373095",
          "mid = (a > 0.4142135623730950) & (a <= 2.414213562373095)",
          "one = tl.zeros_like(a) + 1.0",
          "r = tl.where(big, -tl.div_rn(one, tl.where(big, a, one)), tl.where(mid, tl.div_rn(a - 1.0, a + 1.0), a))",
          "base = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))",
          "s = r * r",
          f"p = tl.zeros(z.shape, dtype=tl.float32) + {ATAN_POLY[0]!r}")
        for c in ATAN_POLY[1:]:
            w(f"p = p * s + {c!r}")
        w("t = base + (p * s * r + r)",
          "return tl.where(z < 0.0, -t, tl.where(z == 0.0, z, t))")
    w("", "")


def _log_function(w: Writer) -> None:
    """The float32 log of invact.fastmath (Cephes logf from the float's bits), op for op."""
    w("@triton.jit")
    with w.block("def _log(a):"):
        w('"""log of positive normal float32 a, as invact.fastmath.log (what certification emulates)."""',
          "bits = a.to(tl.int32, bitcast=True)",
          "m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)",
          f"big = m >= {SQRT2_F32!r}",
          "e = ((bits >> 23) - 127 + big.to(tl.int32)).to(tl.float32)",
          "f = tl.where(big, m * 0.5, m) - 1.0",
          "z = f * f",
          f"p = tl.zeros(f.shape, dtype=tl.float32) + {LOG_POLY[0]!r}")
        for c in LOG_POLY[1:]:
            w(f"p = p * f + {c!r}")
        w("r = f * z * p", f"r = r + e * {LN2_LO!r}", "r = r - 0.5 * z", f"return (f + r) + e * {LN2_HI!r}")
    w("", "")


def _backward_kernel(w: Writer, plan: Plan) -> None:
    params = _kernel_params(plan)
    code_args = "CODE, " if plan.code_bits else ""
    w("@triton.jit")
    with w.block(f"def backward_kernel(GO, Y, {code_args}GX, YT, P, n, nbytes, {params}BLOCK: tl.constexpr):"):
        w('"""grad_in = g(y, code) * grad_out; YT: y thresholds, P: POLY transposed (float32). With a code:',
          'program pid reads BLOCK code bytes once and the matching element of every bit plane."""')
        _program_elements(w, plan)
        if not plan.code_bits:
            _backward_body(w, plan)
            return
        w("byte = tl.load(CODE + b, mask=b < nbytes, other=0).to(tl.int32)")
        with w.block("for j in range(PER):  # a loop, not unrolled: g is long"):
            _plane_offsets(w)
            w("code = (byte >> (j * BITS)) & CODE_MASK")
            _backward_body(w, plan)


def _backward_body(w: Writer, plan: Plan) -> None:
    w("y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)")
    emit_g(w, plan, TritonDialect())
    w("go = tl.load(GO + offs, mask=mask, other=0.0).to(tl.float32)",
      "tl.store(GX + offs, (g * go).to(GX.dtype.element_ty), mask=mask)")


def _launchers(w: Writer, plan: Plan) -> None:
    code_fwd = "code, xthr, " if plan.code_bits else ""
    code_bwd = "code, " if plan.code_bits else ""
    programs = "triton.cdiv(nbytes, block)" if plan.code_bits else "triton.cdiv(n, block)"
    with w.block("def forward(x, y, code, xthr, params, block=DEFAULT_BLOCK):"):
        w('"""Launch forward_kernel on flat contiguous x, y (and code, xthr when CODE_BITS > 0)."""',
          "n = x.numel()", "nbytes = code.numel() if code is not None else 0")
        with w.block("if n:"):
            call = f"forward_kernel[({programs},)]("
            w(f"{call}x, y, {code_fwd}n, nbytes, *params,", f"{' ' * len(call)}BLOCK=block, enable_fp_fusion=False)")
    w("", "")
    with w.block("def backward(grad, y, code, grad_in, ythr, poly, params, block=DEFAULT_BLOCK):"):
        w('"""Launch backward_kernel on flat contiguous tensors; ythr and poly in float32."""',
          "n = y.numel()", "nbytes = code.numel() if code is not None else 0")
        with w.block("if n:"):
            call = f"backward_kernel[({programs},)]("
            w(f"{call}grad, y, {code_bwd}grad_in, ythr, poly, n, nbytes, *params,",
              f"{' ' * len(call)}BLOCK=block, enable_fp_fusion=False)")


def generate_triton(plan: Plan) -> str:
    """Source text of the Triton module of ``plan`` (imported only where triton is importable)."""
    w = Writer()
    per = 8 // plan.code_bits if plan.code_bits else 8
    w(header(plan.source).rstrip("\n"))
    w(f'"""{plan.name}: fused Triton kernels; invact.ops launches them through forward() and backward()."""',
      "", "import triton", "import triton.language as tl", "")
    w("# Launched with enable_fp_fusion=False: every a * b + c is rounded twice, as the certified float32",
      "# scheme and the torch code evaluate it (Triton contracts them into FMAs on GPUs by default).",
      "DEFAULT_BLOCK = 1024  # per program: elements, or with a code, code bytes (elements of each plane)",
      f"NSEG = tl.constexpr({plan.n_segments})",
      f"BITS = tl.constexpr({max(plan.code_bits, 1)})", f"PER = tl.constexpr({per})",
      f"CODE_MASK = tl.constexpr({(1 << plan.code_bits) - 1})",
      "# sha256 of the table's content this code was generated from (checked by invact.ops at import)",
      f"TABLE_SHA256 = {plan.meta['sha256']!r}", "", "")
    kernels = Writer()
    _forward_kernel(kernels, plan)
    kernels("", "")
    _backward_kernel(kernels, plan)
    kernels("", "")
    _launchers(kernels, plan)
    body = kernels.text()
    if "_tanh(" in body:
        _tanh_function(w)
    if "_log(" in body:
        _log_function(w)
    if "_atan(" in body:
        _atan_function(w)
    return w.text() + "\n\n" + body
