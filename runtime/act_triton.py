"""The fitted activations' Triton kernels, less what is per table (docs/table-format.md, float32 scheme).

A generated ``invact.generated.triton_NAME`` module holds what one table decides, as three
``@triton.jit`` functions: ``f_x(x, params)`` (y = f(x) in float32), ``code_x(x, XT)`` (the int32
forward code of x from the thresholds XT) and ``g_y(y, code, YT, P, params, CLAMP)`` (g(y, code) in float32
from the y thresholds YT and POLY transposed, P; CLAMP: :func:`row`'s); ``params`` is the tuple of float32 parameter
values (a kernel argument may not be called ``params``: Triton's argument binder has a local of
that name). It gets its launchers from :func:`launchers`. The kernels here load, store, pack and unpack
the codes, and call those functions, passed as ``tl.constexpr`` arguments: Triton compiles one kernel
per function and keys its caches by the function's source, as for any constexpr. Where a binary
search over slots costs less than counting thresholds, the module also has ``g_search(y, code, LT, P,
params, CLAMP)``: g_y with the segment found by :func:`search` (LT: the search's level thresholds, P: POLY by
slot; invact.common.slots, impl_triton.search_tables).

Also here: the float32 helpers generated code calls (:func:`log`, :func:`log1p`, :func:`expm1`,
:func:`tanh`, :func:`atan`; libdevice does not run in the interpreter), :func:`segment` (a segment index from
thresholds), :func:`search` (one by binary search over slots) and :func:`row`
(a POLY row's value at t). Every launch passes ``enable_fp_fusion=False``: each a * b + c is rounded
twice, as the torch code evaluates it (Triton contracts them into FMAs on GPUs by default), except the
FMA scheme's fused steps in :func:`row`, written ``tl.fma`` (docs/table-format.md: certified too). On
GPUs tl.fma is one rounding; Triton's interpreter computes it as x * y + z in numpy, rounded twice, so
interpreted kernels give the scheme without FMA (tests/test_fma_c.py).
"""

from collections.abc import Callable

import triton
import triton.language as tl

from .common import float32_scheme as scheme

__all__ = ["DEFAULT_BLOCK", "forward_kernel", "backward_kernel", "lut_backward_kernel", "launchers", "lut_backward",
           "log", "log1p", "expm1", "tanh", "atan", "segment", "search", "row", "root_power"]

DEFAULT_BLOCK = 1024  # per program: elements, or with a code, code bytes (elements of each plane)
LOG_POLY, LOG_TERMS = tl.constexpr(scheme.LOG_POLY), tl.constexpr(len(scheme.LOG_POLY))
SQRT2_F32 = tl.constexpr(scheme.SQRT2_F32)
ROOT_STEPS = tl.constexpr(scheme.ROOT_STEPS)
LN2_HI, LN2_LO = tl.constexpr(scheme.LN2_HI), tl.constexpr(scheme.LN2_LO)
TANH_POLY = tl.constexpr((-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1,
                          -3.33332819422e-1))  # Cephes tanhf
ATAN_POLY = tl.constexpr((8.05374449538e-2, -1.38776856032e-1, 1.99777106478e-1, -3.33329491539e-1))  # Cephes atanf
LOG1P_SERIES = tl.constexpr((-1 / 6, 1 / 5, -1 / 4, 1 / 3, -1 / 2, 1.0))  # log1p(z) / z, z^5 first
LOG1P_TERMS = tl.constexpr(len(LOG1P_SERIES.value))
EXPM1_SERIES = tl.constexpr((1 / 40320, 1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0))  # expm1(z) / z
EXPM1_TERMS = tl.constexpr(len(EXPM1_SERIES.value))
TANH_TERMS, ATAN_TERMS = tl.constexpr(len(TANH_POLY.value)), tl.constexpr(len(ATAN_POLY.value))
ROW_CENTER, ROW_SCALE = tl.constexpr(scheme.ROW_CENTER), tl.constexpr(scheme.ROW_SCALE)
ROW_C0, ROW_C0_LO, ROW_C1 = tl.constexpr(scheme.ROW_C0), tl.constexpr(scheme.ROW_C0_LO), tl.constexpr(scheme.ROW_C1)


@triton.jit
def _forward_plane(X, Y, offs, mask, params, F: tl.constexpr):
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = F(x, params)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    return x


@triton.jit
def forward_kernel(X, Y, CODE, XT, n, nbytes, PARAMS, F: tl.constexpr, CODE_OF: tl.constexpr,
                   BITS: tl.constexpr, BLOCK: tl.constexpr):
    """y = F(x) in float32, stored in Y's dtype. With a code (BITS > 0), program pid packs BLOCK code
    bytes b = pid * BLOCK + arange from the matching element nbytes * j + b of every bit plane j (see
    invact.bitpack), so every load and store is contiguous and no offset needs a division."""
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: more than 2**31 elements work
    if BITS == 0:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        _forward_plane(X, Y, offs, offs < n, PARAMS, F)
    else:
        b = pid * BLOCK + tl.arange(0, BLOCK)
        plane = tl.zeros_like(b) + nbytes  # int64: plane * j cannot overflow
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for j in tl.static_range(8 // BITS):
            offs = plane * j + b
            mask = (b < nbytes) & (offs < n)
            c = CODE_OF(_forward_plane(X, Y, offs, mask, PARAMS, F), XT)
            acc = acc | (tl.where(mask, c, 0) << (j * BITS))
        tl.store(CODE + b, acc.to(tl.uint8), mask=b < nbytes)


@triton.jit
def _backward_plane(GO, Y, GX, YT, P, offs, mask, code, params, G: tl.constexpr, CLAMP: tl.constexpr):
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    g = G(y, code, YT, P, params, CLAMP)
    go = tl.load(GO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(GX + offs, (g * go).to(GX.dtype.element_ty), mask=mask)


@triton.jit
def backward_kernel(GO, Y, CODE, GX, YT, P, n, nbytes, PARAMS, G: tl.constexpr, CLAMP: tl.constexpr,
                    BITS: tl.constexpr, BLOCK: tl.constexpr):
    """grad_in = G(y, code) * grad_out, u clamped on the sides CLAMP (:func:`row`). With a code, program pid
    reads BLOCK code bytes once and the matching element of every bit plane (the layout of
    :func:`forward_kernel`)."""
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: more than 2**31 elements work
    if BITS == 0:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        _backward_plane(GO, Y, GX, YT, P, offs, offs < n, 0, PARAMS, G, CLAMP)
    else:
        b = pid * BLOCK + tl.arange(0, BLOCK)
        plane = tl.zeros_like(b) + nbytes  # int64: plane * j cannot overflow
        byte = tl.load(CODE + b, mask=b < nbytes, other=0).to(tl.int32)
        for j in range(8 // BITS):  # a loop: unrolled, sm_90 code was hardly shorter (gelu 106 -> 101
            # SASS instructions an element, silu 105 -> 105) for more registers (72 -> 80, 107)
            offs = plane * j + b
            code = (byte >> (j * BITS)) & ((1 << BITS) - 1)
            _backward_plane(GO, Y, GX, YT, P, offs, (b < nbytes) & (offs < n), code, PARAMS, G, CLAMP)


@triton.jit
def _lut_plane(GO, Y16, GX, LUT, offs, mask, code):
    bits = tl.load(Y16 + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
    g = tl.load(LUT + ((code << 16) | bits), mask=mask, other=0.0)
    go = tl.load(GO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(GX + offs, (g * go).to(GX.dtype.element_ty), mask=mask)


@triton.jit
def lut_backward_kernel(GO, Y16, CODE, GX, LUT, n, nbytes, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """grad_in = LUT[code << 16 | bits of y] * grad_out for 16-bit y (Y16: y's bits as int16; LUT: float32
    g of every 16-bit y and code): one gather an element in place of the table's float32 scheme, for
    any table. Programs and bit planes as :func:`backward_kernel`'s."""
    pid = tl.program_id(0).to(tl.int64)
    if BITS == 0:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        _lut_plane(GO, Y16, GX, LUT, offs, offs < n, 0)
    else:
        b = pid * BLOCK + tl.arange(0, BLOCK)
        plane = tl.zeros_like(b) + nbytes
        byte = tl.load(CODE + b, mask=b < nbytes, other=0).to(tl.int32)
        for j in range(8 // BITS):
            offs = plane * j + b
            code = (byte >> (j * BITS)) & ((1 << BITS) - 1)
            _lut_plane(GO, Y16, GX, LUT, offs, (b < nbytes) & (offs < n), code)


def lut_backward(grad, y16, code, grad_in, lut, code_bits: int, block: int = DEFAULT_BLOCK) -> None:
    """Launch :func:`lut_backward_kernel` on flat contiguous tensors: y16 is y viewed as int16, lut holds
    2^(16 + code_bits) float32 g (code << 16 | bits of y), code is used only when ``code_bits`` > 0."""
    n = y16.numel()
    if n:
        nbytes = code.numel() if code_bits else 0
        grid = (triton.cdiv(nbytes if code_bits else n, block),)
        lut_backward_kernel[grid](grad, y16, code if code_bits else None, grad_in, lut, n, nbytes, code_bits, block,
                                  enable_fp_fusion=False)


def launchers(f_x, code_x, g_y, code_bits: int, g_search=None) -> tuple[Callable, Callable]:
    """``forward(x, y, code, xthr, params, block)`` and ``backward(grad, y, code, grad_in, ythr, poly,
    params, block, by_search, clamp)`` of one table: launch the kernels on flat contiguous tensors (code and
    xthr are used only when ``code_bits`` > 0; ythr and poly in float32; params: the parameter values).
    ``by_search``: g by ``g_search`` (the segment by :func:`search`; ythr then the search's level
    thresholds and poly POLY by slot, invact.common.slots), else by ``g_y``. ``clamp``: the sides of
    u's clamp evaluated (:func:`row`; fewer than both only where invact.u_clamp proves the others
    change nothing)."""
    def sizes(n: int, code, block: int) -> tuple[tuple[int], int]:
        """(the grid, the code bytes): a program covers ``block`` elements, or with a code, ``block``
        code bytes and the matching element of every bit plane."""
        nbytes = code.numel() if code_bits else 0
        return (triton.cdiv(nbytes if code_bits else n, block),), nbytes

    def forward(x, y, code, xthr, params, block: int = DEFAULT_BLOCK) -> None:
        n = x.numel()
        if n:
            grid, nbytes = sizes(n, code, block)
            code, xthr, code_of = (code, xthr, code_x) if code_bits else (None, None, None)
            forward_kernel[grid](x, y, code, xthr, n, nbytes, tuple(params), f_x, code_of, code_bits, block,
                                 enable_fp_fusion=False)

    def backward(grad, y, code, grad_in, ythr, poly, params, block: int = DEFAULT_BLOCK, by_search: bool = False,
                 clamp: int = 3) -> None:
        if by_search and g_search is None:
            raise ValueError("by_search: this table's Triton module has no g_search (its segments are counted)")
        n = y.numel()
        if n:
            grid, nbytes = sizes(n, code, block)
            backward_kernel[grid](grad, y, code if code_bits else None, grad_in, ythr, poly, n, nbytes,
                                  tuple(params), g_search if by_search else g_y, clamp, code_bits, block,
                                  enable_fp_fusion=False)

    return forward, backward


@triton.jit
def log(a):
    """log of positive normal float32 a, as invact.fastmath.log op for op (what certification
    emulates): Cephes logf from the float's bits."""
    bits = a.to(tl.int32, bitcast=True)
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m >= SQRT2_F32
    e = ((bits >> 23) - 127 + big.to(tl.int32)).to(tl.float32)
    f = tl.where(big, m * 0.5, m) - 1.0
    z = f * f
    p = tl.zeros(f.shape, dtype=tl.float32) + LOG_POLY[0]
    for k in tl.static_range(1, LOG_TERMS):
        p = p * f + LOG_POLY[k]
    r = f * z * p
    r = r + e * LN2_LO
    r = r - 0.5 * z
    return (f + r) + e * LN2_HI


@triton.jit
def log1p(z):
    """log(1 + z) for z > -1, where log(1 + z) loses z's digits below 1's ulp (softplus and mish below
    x = -8, 0 below -17): the series z - z^2/2 + ... - z^6/6 for |z| < 1/16 (its relative error below
    2^-24 / 7), else log(u) + e / u with u = 1 + z rounded and e = z - (u - 1) its rounding error
    (exact for |z| <= 1; e / u as e (1 - (u - 1)), no division; none from u = 2 on). With a correctly
    rounded log (the interpreter) within ~2 ulps; a GPU's tl.log (lg2.approx) adds an absolute ~2^-23
    to log(u) >= log(17/16)."""
    p = z * LOG1P_SERIES[0] + LOG1P_SERIES[1]
    for k in tl.static_range(2, LOG1P_TERMS):
        p = p * z + LOG1P_SERIES[k]
    u = 1.0 + z
    d = u - 1.0
    correction = tl.where(d < 1.0, (z - d) * (1.0 - d), 0.0)
    return tl.where(tl.abs(z) < 0.0625, z * p, tl.log(u) + correction)


@triton.jit
def expm1(z):
    """exp(z) - 1, where the difference cancels (ELU, CELU, SELU: exp(x) - 1 gave y = 0 for x in (-6e-8, 0)
    and lost digits up to |x| ~ 1/2): the series z (1 + z/2 + ... + z^7/8!) for |z| < 1/2 (truncation below
    z^8/9! relative, 2^-24 / 5.5 at |z| = 1/2; -0.0 stays -0.0), else exp(z) - 1 (from z = -1/2 down, 1 - exp
    is exact by Sterbenz and the relative error is exp's times e^z / (1 - e^z) <= 1.55)."""
    p = z * EXPM1_SERIES[0] + EXPM1_SERIES[1]
    for k in tl.static_range(2, EXPM1_TERMS):
        p = p * z + EXPM1_SERIES[k]
    return tl.where(tl.abs(z) < 0.5, z * p, tl.exp(z) - 1.0)


@triton.jit
def tanh(z):
    """tanh as Cephes tanhf (~2 float32 ulps): z + z^3 P(z^2) below |z| = 0.625, else
    1 - 2 / (exp(2|z|) + 1) with z's sign; the same operations in the interpreter and on GPUs
    (2 sigmoid(2z) - 1 would lose the relative accuracy of small z)."""
    a = tl.abs(z)
    s = z * z
    p = tl.zeros(z.shape, dtype=tl.float32) + TANH_POLY[0]
    for k in tl.static_range(1, TANH_TERMS):
        p = p * s + TANH_POLY[k]
    big = 1.0 - tl.div_rn(tl.zeros_like(a) + 2.0, tl.exp(2.0 * a) + 1.0)
    t = tl.where(a < 0.625, p * s * z + z, tl.where(z < 0.0, -big, big))
    return tl.where(z == 0.0, z, t)  # tanh(-0.0) = -0.0


@triton.jit
def atan(z):
    """atan as Cephes atanf (~2 float32 ulps), with z's sign: argument reduction by tan(3 pi / 8)
    and tan(pi / 8), then z + z^3 P(z^2)."""
    a = tl.abs(z)
    big = a > 2.414213562373095
    mid = (a > 0.4142135623730950) & (a <= 2.414213562373095)
    one = tl.zeros_like(a) + 1.0
    r = tl.where(big, -tl.div_rn(one, tl.where(big, a, one)), tl.where(mid, tl.div_rn(a - 1.0, a + 1.0), a))
    base = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
    s = r * r
    p = tl.zeros(z.shape, dtype=tl.float32) + ATAN_POLY[0]
    for k in tl.static_range(1, ATAN_TERMS):
        p = p * s + ATAN_POLY[k]
    t = base + (p * s * r + r)
    return tl.where(z < 0.0, -t, tl.where(z == 0.0, z, t))


@triton.jit
def root_power(a, N: tl.constexpr, SEED: tl.constexpr, K: tl.constexpr):
    """a^(K/N) (K = -1 or N - 1) of float32 a in [1, float32 max], as invact.fastmath.root_power op
    for op (the power_tail scheme, docs/table-format.md): a seed from a's bits (SEED =
    invact.common.float32_scheme.root_seed(N)), float64 Newton steps, r^K rounded once to float32."""
    r = (a.to(tl.int32, bitcast=True) // N + SEED).to(tl.float32, bitcast=True).to(tl.float64)
    a64 = a.to(tl.float64)
    inv = (a64 * 0.0 + 1.0) / N  # 1/N in float64 (a float literal would be a float32 constant)
    for _ in tl.static_range(ROOT_STEPS):
        p = r
        for _ in tl.static_range(N - 2):
            p = p * r
        r = r + (a64 / p - r) * inv
    if K == -1:
        out = 1.0 / r
    else:
        out = r
        for _ in tl.static_range(K - 1):
            out = out * r
    return out.to(tl.float32)


@triton.jit
def segment(y, YT, FIRST: tl.constexpr, COUNT: tl.constexpr, STRICT: tl.constexpr, OFFSET: tl.constexpr):
    """OFFSET + the number of thresholds YT[FIRST + j] (j < COUNT) that y passes: the global segment
    index of y in a code class. y passes t where y > t if bit j of STRICT is set (its break belongs
    to the left side), else where y >= t."""
    s = tl.zeros(y.shape, dtype=tl.int32)
    if OFFSET != 0:
        s = s + OFFSET
    for j in tl.static_range(COUNT):
        if (STRICT >> j) & 1:
            s = s + (y > tl.load(YT + (FIRST + j))).to(tl.int32)
        else:
            s = s + (y >= tl.load(YT + (FIRST + j))).to(tl.int32)
    return s


@triton.jit
def search(y, s, LT, LEVELS: tl.constexpr, WIDTH: tl.constexpr):
    """The slot of y from s, its class's first slot, by binary search (invact.common.slots): level l
    adds 2^(LEVELS - 1 - l) where y >= LT[l * WIDTH + s], the float32 y passing that threshold (NaN
    padding is never passed, nor by NaN y). LEVELS gathers from a table of LEVELS x WIDTH floats
    in place of a compare, a select and an add per threshold of every class (float32 y on sm_90:
    silu 106 -> 80 SASS instructions an element, benchmarks/ptx_estimate.py)."""
    for l in tl.static_range(LEVELS):
        s = s + tl.where(y >= tl.load(LT + (l * WIDTH) + s), 1 << (LEVELS - 1 - l), 0)
    return s


@triton.jit
def row(t, P, s, NSEG: tl.constexpr, DEGREE: tl.constexpr, DEN: tl.constexpr, CLAMP: tl.constexpr):
    """g from segment s's POLY row at t (P: POLY transposed, NSEG segments): u = (t - center) * scale
    clamped to [-1, 1], N(u) by Horner, divided by Q(u) = 1 + d1 u + ... on tables with rational
    rows (DEN > 0), then g = (u N'(u) + c0_lo) + c0_hi (docs/table-format.md); the FMA scheme: each
    Horner step and u N'(u) + c0_lo one tl.fma. CLAMP: the clamp's sides (invact.u_clamp's bits:
    1 max(u, -1), 2 min(u, 1)), the others left out where invact.u_clamp proves that no float32 y
    reaches past them (the same bits). The clamp keeps a NaN u (a constant row's (inf - center) * 0
    at y = +-inf), as torch.clamp and the C kernels do: GPUs' max.f32 / min.f32 would return the
    bound, so the clamp is max.NaN.f32 / min.NaN.f32 (PropagateNan.ALL; the interpreter's numpy
    propagates either way)."""
    u = (t - tl.load(P + ROW_CENTER * NSEG + s)) * tl.load(P + ROW_SCALE * NSEG + s)
    if CLAMP & 1:
        u = tl.maximum(u, -1.0, propagate_nan=tl.PropagateNan.ALL)
    if CLAMP & 2:
        u = tl.minimum(u, 1.0, propagate_nan=tl.PropagateNan.ALL)
    c0_lo, c0_hi = tl.load(P + ROW_C0_LO * NSEG + s), tl.load(P + ROW_C0 * NSEG + s)
    if DEGREE == 0:
        g = (u * 0.0 + c0_lo) + c0_hi
    else:
        p = tl.load(P + (ROW_C0_LO + DEGREE) * NSEG + s)
        for k in tl.static_range(1, DEGREE):
            p = tl.fma(p, u, tl.load(P + (ROW_C0_LO + DEGREE - k) * NSEG + s))
        if DEN > 0:  # d1 .. dDEN follow c1 .. cDEGREE
            den = tl.load(P + (ROW_C1 + DEGREE + DEN - 1) * NSEG + s)
            for k in tl.static_range(1, DEN):
                den = tl.fma(den, u, tl.load(P + (ROW_C1 + DEGREE + DEN - 1 - k) * NSEG + s))
            den = tl.fma(den, u, 1.0)
            p = tl.div_rn(p, den)
        g = tl.fma(p, u, c0_lo) + c0_hi
    return g
