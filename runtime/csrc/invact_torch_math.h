/* PyTorch's vector math on AVX-512, reproduced bit for bit for the one-pass forward (cpu_kernels.c):
 * SLEEF's expf, tanhf, logf and log1pf (u10, the FMA builds that ATen's Vectorized<float> calls),
 * ATen's erf, tanh-form GELU and mish, and oneDNN's gelu_erf. Each follows the instructions libtorch runs, in their order;
 * invact.impl_cpu takes a forward built on them only after a probe gives PyTorch's y bit for bit. */
#ifndef INVACT_TORCH_MATH_H
#define INVACT_TORCH_MATH_H

#include <immintrin.h>
#include <stdint.h>

static inline __m512 negate(__m512 v) { return _mm512_xor_ps(_mm512_set1_ps(-0.0f), v); }

/* Sleef_expf16_u10 (SLEEF's AVX-512 expf, which ATen's Vectorized<float>::exp calls), step for step */
static inline __m512 sleef_exp16(__m512 d) {
    __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(d, _mm512_set1_ps(1.44269502162933349609375f)));
    __m512 qf = _mm512_cvtepi32_ps(q);
    __m512 s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-0.693145751953125f), d);
    s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-1.428606765330187e-06f), s);
    __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00139304355252534151077271f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00833336077630519866943359f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.0416664853692054748535156f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.166666671633720397949219f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
    u = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s), _mm512_set1_ps(1.0f));
    __m512i half = _mm512_srai_epi32(q, 1), bias = _mm512_set1_epi32(0x7f);
    u = _mm512_mul_ps(u, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(half, bias), 23)));
    u = _mm512_mul_ps(u, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(q, half), bias), 23)));
    u = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.0f), _CMP_NLT_UQ), u);
    return _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(_mm512_set1_ps(100.0f), d, _CMP_LT_OQ), _mm512_set1_ps(INFINITY));
}

/* ATen's Vectorized<float>::erf (AVX-512), FMAs where it has them */
static inline __m512 aten_erf(__m512 v) {
    __m512 one = _mm512_set1_ps(1.0f), sign = _mm512_and_ps(_mm512_set1_ps(-0.0f), v);
    __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), _mm512_abs_ps(v), one));
    __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
    __m512 e = negate(sleef_exp16(negate(_mm512_mul_ps(v, v))));
    return _mm512_xor_ps(sign, _mm512_fmadd_ps(_mm512_mul_ps(e, t), r, one));
}

/* SLEEF's tanhf u10 (Sleef_tanhf16_u10, AVX-512 with FMA, which ATen's Vectorized<float>::tanh calls),
 * step for step from libtorch's code: exp(|x|) as a double-float (range reduction by ln 2 in two
 * parts, a polynomial, scaling by 2^q in two halves), then (T - 1/T) / (T + 1/T) in double-float
 * arithmetic; 1 past |x| > 8.66434 (and where that gave NaN), x's sign, NaN for NaN x */
#define BC(u) _mm512_castsi512_ps(_mm512_set1_epi32((int)(u)))
/* SLEEF's dfadd2 of two floats: a + b rounded, and in *lo its rounding error (two-sum) */
static inline __m512 two_sum(__m512 a, __m512 b, __m512 *lo) {
    __m512 s = _mm512_add_ps(a, b), v = _mm512_sub_ps(s, a);
    *lo = _mm512_add_ps(_mm512_sub_ps(a, _mm512_sub_ps(s, v)), _mm512_sub_ps(b, v));
    return s;
}

static inline __m512 sleef_tanh16(__m512 x) {
    const __m512 zero = _mm512_setzero_ps();
    const __m512 one  = BC(0x3f800000);          /* 1.0f */
    const __m512 half = BC(0x3f000000);          /* 0.5f */
    const __m512 negz = BC(0x80000000);          /* -0.0f (sign mask) */

    /* a = |x|; expk2f(d = (a, 0)) */
    __m512 a = _mm512_castsi512_ps(_mm512_andnot_si512(_mm512_set1_epi32((int)0x80000000),
                                                        _mm512_castps_si512(x)));
    __m512 u = _mm512_add_ps(zero, a);                        /* d.x + d.y        */
    u = _mm512_mul_ps(u, BC(0x3fb8aa3b));                     /* * R_LN2f          */
    __m512i q = _mm512_cvtps_epi32(u);                        /* vrint (RNE)      */
    __m512 qf = _mm512_cvtepi32_ps(q);
    __m512 p1 = _mm512_mul_ps(qf, BC(0xbf317200));            /* q * -L2Uf         */
    __m512 p2 = _mm512_mul_ps(qf, BC(0xb5bfbe8e));            /* q * -L2Lf         */

    /* s = dfadd2(dfadd2(d, p1), p2) */
    __m512 s1y, sy;
    __m512 s1x = two_sum(a, p1, &s1y);
    s1y = _mm512_add_ps(s1y, zero);                           /* + d.y (=0)       */
    __m512 sx = two_sum(s1x, p2, &sy);
    sy = _mm512_add_ps(s1y, sy);

    /* polynomial */
    __m512 pu = _mm512_fmadd_ps(sx, BC(0x394fb7ff), BC(0x3ab6bf7c));
    pu = _mm512_fmadd_ps(sx, pu, BC(0x3c08890d));
    pu = _mm512_fmadd_ps(sx, pu, BC(0x3d2aaa5c));

    /* t = dfadd2(dfmul(s, pu), 1/6) */
    __m512 mx = _mm512_mul_ps(sx, pu);
    __m512 my = _mm512_fmsub_ps(sx, pu, mx);
    my = _mm512_fmadd_ps(sy, pu, my);
    __m512 ty, tx = two_sum(mx, BC(0x3e2aaaaa), &ty);
    ty = _mm512_add_ps(ty, my);

    /* t2 = dfadd2(dfmul(s, t), 0.5) */
    __m512 nx = _mm512_mul_ps(sx, tx);
    __m512 ny = _mm512_fmsub_ps(sx, tx, nx);
    ny = _mm512_fmadd_ps(sy, tx, ny);
    ny = _mm512_fmadd_ps(ty, sx, ny);
    __m512 t2y, t2x = two_sum(nx, half, &t2y);
    t2y = _mm512_add_ps(t2y, ny);

    /* sq = dfsqu(s) */
    __m512 sqx = _mm512_mul_ps(sx, sx);
    __m512 sqy = _mm512_fmsub_ps(sx, sx, sqx);
    sqy = _mm512_fmadd_ps(_mm512_add_ps(sx, sx), sy, sqy);

    /* w = dfmul(sq, t2) */
    __m512 wx = _mm512_mul_ps(t2x, sqx);
    __m512 wy = _mm512_fmsub_ps(sqx, t2x, wx);
    wy = _mm512_fmadd_ps(sqy, t2x, wy);
    wy = _mm512_fmadd_ps(sqx, t2y, wy);

    /* r = dfadd2(s, w) */
    __m512 ry, rx = two_sum(sx, wx, &ry);
    ry = _mm512_add_ps(ry, _mm512_add_ps(sy, wy));

    /* f = dfadd(1, r) */
    __m512 fx = _mm512_add_ps(rx, one);
    __m512 fy = _mm512_add_ps(_mm512_sub_ps(one, fx), rx);
    fy = _mm512_add_ps(ry, fy);

    /* ldexp2 by q */
    __m512i h  = _mm512_srai_epi32(q, 1);
    __m512i eA = _mm512_slli_epi32(_mm512_add_epi32(h, _mm512_set1_epi32(0x7f)), 23);
    __m512i eB = _mm512_slli_epi32(_mm512_sub_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(0x7f)), h), 23);
    __m512 A = _mm512_castsi512_ps(eA), B = _mm512_castsi512_ps(eB);
    __mmask16 kun = _mm512_cmp_ps_mask(a, BC(0xc2d00000), _CMP_LT_OQ);   /* a < -104 */
    __m512 Tx = _mm512_mul_ps(_mm512_mul_ps(fx, A), B);
    __m512 Ty = _mm512_mul_ps(_mm512_mul_ps(fy, A), B);
    Tx = _mm512_mask_mov_ps(Tx, kun, zero);
    Ty = _mm512_mask_mov_ps(Ty, kun, zero);

    /* e = dfrec(T) */
    __m512 ex = _mm512_div_ps(one, Tx);
    __m512 ev = _mm512_fnmadd_ps(Tx, ex, one);
    ev = _mm512_fnmadd_ps(Ty, ex, ev);
    __m512 ey = _mm512_mul_ps(ex, ev);
    __m512 nex = _mm512_xor_ps(ex, negz);
    __m512 ney = _mm512_xor_ps(ey, negz);

    /* den = dfadd(T, e), num = dfadd(T, -e) */
    __m512 dx = _mm512_add_ps(ex, Tx);
    __m512 dy = _mm512_add_ps(_mm512_sub_ps(Tx, dx), ex);
    dy = _mm512_add_ps(dy, Ty);
    dy = _mm512_add_ps(dy, ey);
    __m512 nmx = _mm512_add_ps(nex, Tx);
    __m512 nmy = _mm512_add_ps(_mm512_sub_ps(Tx, nmx), nex);
    nmy = _mm512_add_ps(nmy, Ty);
    nmy = _mm512_add_ps(nmy, ney);

    /* dfdiv(num, den) */
    __m512 rc = _mm512_div_ps(one, dx);
    __m512 S  = _mm512_mul_ps(rc, nmx);
    __m512 Ulo = _mm512_fmsub_ps(rc, nmx, S);
    __m512 V  = _mm512_fnmadd_ps(dx, rc, one);
    V = _mm512_fnmadd_ps(dy, rc, V);
    __m512 W = _mm512_fmadd_ps(nmy, rc, Ulo);
    __m512 Qy = _mm512_fmadd_ps(V, S, W);
    __m512 y = _mm512_add_ps(S, Qy);

    __mmask16 k = _mm512_cmp_ps_mask(a, BC(0x410aa123), _CMP_GT_OQ)   /* a > 8.66434 */
                | _mm512_cmp_ps_mask(y, y, _CMP_NEQ_UQ);                /* isnan(y) */
    y = _mm512_mask_mov_ps(y, k, one);
    __m512 r = _mm512_xor_ps(_mm512_and_ps(x, negz), y);                /* mulsign */
    __mmask16 kn = _mm512_cmp_ps_mask(x, x, _CMP_NEQ_UQ);
    r = _mm512_mask_mov_ps(r, kn, _mm512_castsi512_ps(_mm512_set1_epi32(-1)));
    return r;
}


/* src1 * src2 by one vmulps with the operands in this order: with two NaNs it returns src1's (quieted),
 * and the compiler may swap _mm512_mul_ps's */
static inline __m512 mul_src1(__m512 src1, __m512 src2) {
    __m512 r;
    __asm__("vmulps %2, %1, %0" : "=v"(r) : "v"(src1), "v"(src2));
    return r;
}


/* ATen's vectorized_gelu_approximated_with_tanh: x^3 = (x x) x, inner = fma(x^3, 0.044715, x) * sqrt(2/pi),
 * y = (x / 2) * (tanh(inner) + 1); its bfloat16/float16 instantiations multiply the other way round
 * (NaN payloads differ) */
static inline __m512 aten_gelu_tanh16(__m512 x, int low_precision) {
    __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(x, x), x), BC(0x3d372713), x);
    __m512 t1 = _mm512_add_ps(sleef_tanh16(_mm512_mul_ps(inner, BC(0x3f4c422a))), _mm512_set1_ps(1.0f));
    __m512 hx = mul_src1(x, _mm512_set1_ps(0.5f));
    return low_precision ? mul_src1(t1, hx) : mul_src1(hx, t1);
}
/* the tail SLEEF's logf and log1pf share: log = s + 2q + q^3 (c1 + q^2 (c2 + q^2 c3)), with s = (sx, sy)
 * the exponent times ln 2 and q = (qx, q2lo / 2) the reduced quotient as double-floats, summed in
 * their order: (((sx - S) + 2qx) + sy + q2lo) + ((S - R) + p) + R, S = 2qx + sx, R = S + p */
static inline __m512 sleef_log_sum(__m512 sx, __m512 sy, __m512 qx, __m512 q2lo) {
    __m512 x2 = _mm512_mul_ps(qx, qx), qx2 = _mm512_add_ps(qx, qx);
    __m512 p = _mm512_fmadd_ps(x2, BC(0x3e9aff5c), BC(0x3ecc99ca));
    p = _mm512_mul_ps(_mm512_mul_ps(x2, qx), _mm512_fmadd_ps(x2, p, BC(0x3f2aaada)));
    __m512 S = _mm512_add_ps(qx2, sx), R = _mm512_add_ps(S, p);
    __m512 r = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(_mm512_sub_ps(sx, S), qx2), sy), q2lo);
    return _mm512_add_ps(_mm512_add_ps(r, _mm512_add_ps(_mm512_sub_ps(S, R), p)), R);
}

/* Sleef_logf16_u10avx512f, instruction for instruction (the disassembly's register names in the comments) */
static inline __m512 sleef_log16(__m512 x) {
    const __m512 one = BC(0x3f800000), mone = BC(0xbf800000);
    __m512 m   = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_nan);   /* zmm5 */
    __m512 e   = _mm512_getexp_ps(_mm512_mul_ps(x, BC(0x3faaaaab)));                /* zmm0 */
    __m512 mm1 = _mm512_add_ps(m, mone);                                             /* zmm8 = m - 1 */
    e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(e, BC(0x7f800000), _CMP_EQ_OQ), BC(0x43000000));
    __m512 sx  = _mm512_mul_ps(e, BC(0x3f317218));                                   /* zmm1 */
    __m512 sy  = _mm512_fmsub_ps(BC(0x3f317218), e, sx);                             /* zmm2 */
    __m512 mp1b = _mm512_add_ps(mm1, one);                                           /* zmm11 */
    sy = _mm512_fmadd_ps(e, BC(0xb102e308), sy);                                     /* zmm4 */
    __m512 mp1 = _mm512_add_ps(m, one);                                              /* zmm2 */
    __m512 rcp = _mm512_div_ps(one, mp1);                                            /* zmm9 */
    __m512 qx  = _mm512_mul_ps(rcp, mm1);                                            /* zmm6 */
    __m512 v   = _mm512_add_ps(mp1, mone);                                           /* zmm10 */
    __m512 u   = _mm512_fnmadd_ps(mp1, rcp, one);                                    /* zmm13 */
    __m512 t2  = _mm512_sub_ps(mp1, v);                                              /* zmm2 */
    __m512 t10 = _mm512_sub_ps(m, v);                                                /* zmm10 */
    __m512 t5  = _mm512_sub_ps(m, mp1b);                                             /* zmm5 */
    __m512 w   = _mm512_fmsub_ps(rcp, mm1, qx);                                      /* zmm12 */
    __m512 t8  = _mm512_sub_ps(mm1, mp1b);                                           /* zmm8 */
    t2 = _mm512_sub_ps(one, t2);
    __m512 t3  = _mm512_sub_ps(mone, t8);                                            /* zmm3 */
    t2 = _mm512_add_ps(t2, t10);                   /* den.y */
    t3 = _mm512_add_ps(t3, t5);                    /* num.y */
    t2 = _mm512_fnmadd_ps(t2, rcp, u);
    t3 = _mm512_fmadd_ps(t3, rcp, w);
    t2 = _mm512_fmadd_ps(t2, qx, t3);              /* q.y */
    __m512 r = sleef_log_sum(sx, sy, qx, _mm512_add_ps(t2, t2));
    return _mm512_fixupimm_ps(r, x, _mm512_set1_epi32(0x2530400), 0);
}

/* Sleef_log1pf16_u10avx512f, instruction for instruction: m = fma(2^-e, x, 2^-e - 1) with
 * e = getexp((x + 1) * 4/3) (128 where that is inf); e ln2 as a double-float; m / (m + 2) by dfdiv;
 * s + 2q + q^3 (0.666669488 + q^2 (0.399610817 + q^2 0.302729487)) summed as SLEEF; lanes with
 * !(x <= 1e38) (incl. NaN, +inf) take logf(x); then x < -1: NaN (0xFFFFFFFF), x == -1: -inf, -0: -0 */
static inline __m512 sleef_log1p16(__m512 x) {
    const __m512 one = BC(0x3f800000), mone = BC(0xbf800000);
    __m512 e = _mm512_getexp_ps(_mm512_mul_ps(_mm512_add_ps(x, one), BC(0x3faaaaab)));   /* zmm1 */
    e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(e, BC(0x7f800000), _CMP_EQ_OQ), BC(0x43000000));
    __m512i ei = _mm512_cvtps_epi32(e);
    __m512 t = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(
                   _mm512_sub_epi32(_mm512_setzero_si512(), ei), 23), _mm512_set1_epi32(0x3f800000)));
    __m512 tm1 = _mm512_add_ps(mone, t);                                             /* zmm0 */
    __m512 m = _mm512_fmadd_ps(t, x, tm1);                                           /* zmm4 */
    __m512 sx = _mm512_mul_ps(e, BC(0x3f317218));                                    /* zmm0 */
    __m512 sy = _mm512_fmsub_ps(BC(0x3f317218), e, sx);                              /* zmm3 */
    sy = _mm512_fmadd_ps(e, BC(0xb102e308), sy);
    __m512 two = BC(0x40000000);
    __m512 den = _mm512_add_ps(m, two);                                              /* zmm10 */
    __m512 rcp = _mm512_div_ps(one, den);                                            /* zmm6 */
    __m512 u = _mm512_fnmadd_ps(den, rcp, one);                                      /* zmm2 -> zmm8 */
    __m512 qx = _mm512_mul_ps(rcp, m);                                               /* zmm7 */
    __m512 dy = _mm512_sub_ps(two, den);                                             /* zmm2 */
    __m512 w = _mm512_fmsub_ps(rcp, m, qx);                                          /* zmm11 */
    dy = _mm512_add_ps(dy, m);
    dy = _mm512_fnmadd_ps(dy, rcp, u);
    w = _mm512_fmadd_ps(_mm512_setzero_ps(), rcp, w);                                /* zmm1 */
    __m512 qy = _mm512_fmadd_ps(dy, qx, w);                                          /* zmm2 */
    __m512 r = sleef_log_sum(sx, sy, qx, _mm512_add_ps(qy, qy));
    __mmask16 small = _mm512_cmp_ps_mask(x, BC(0x7e967699), _CMP_LE_OQ);            /* x <= 1e38 */
    if (small != 0xffff)
        r = _mm512_mask_blend_ps(small, sleef_log16(x), r);
    r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(mone, x, _CMP_GT_OQ), BC(0xffffffff));
    r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, mone, _CMP_EQ_OQ), BC(0xff800000));
    r = _mm512_mask_mov_ps(r, _mm512_cmpeq_epi32_mask(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000)),
                           BC(0x80000000));
    return r;
}

/* ATen's mish, x * tanh(log1p(exp(x))), as one vmulps: with two NaNs its float32 loop returns x's in
 * the first 16 lanes of each 32-element step and tanh's in the second, its float16 loop the other way
 * round, its bfloat16 loop tanh's (both round to the same bfloat16 NaN); tanh_first: the lanes taking
 * tanh's */
static inline __m512 aten_mish16(__m512 x, __mmask16 tanh_first) {
    __m512 t = sleef_tanh16(sleef_log1p16(sleef_exp16(x)));
    __m512 y = mul_src1(x, t);
    return tanh_first ? _mm512_mask_mov_ps(y, tanh_first, mul_src1(t, x)) : y;
}
#undef BC

/* oneDNN's gelu_erf (jit_uni_eltwise_injector, avx512_core: gelu_erf_minimax_approx_compute_vector_fwd):
 * erf(x / sqrt 2) as a degree-5 polynomial in |x| picked by |x|'s quarter binade (24 intervals; past
 * 5.5426 the constant 1), its sign restored, then x * (1 + erf) * 0.5. The coefficients are oneDNN's
 * table (gelu_erf_minimax_polynomial, Apache-2.0), as float32 bit patterns, by degree. Every element,
 * tails included, runs this vector code in oneDNN, so no element is left to a scalar loop. */
static const uint32_t ONEDNN_GELU_POLY[6][32] __attribute__((aligned(64))) = {
    /* degree 0 */
    {0xa6f2cb94, 0x32827792, 0x3381cc0c, 0x34523d4a, 0x351ac44d, 0x35f36d88,
     0x36ee8229, 0x37b8a3bb, 0x3867a213, 0x3940033b, 0x3a2a5a1d, 0x3ae35863,
     0x3b7828f2, 0x3c08b14b, 0x3c515ed3, 0xbb503236, 0xbd8d8e5e, 0xbe8abcd9,
     0xbf0c19a2, 0xbeccb328, 0x3e176ced, 0x3f470d99, 0x3f7abb28, 0x3f800000,
     0x00000000, 0, 0, 0, 0, 0, 0, 0},
    /* degree 1 */
    {0x3f4c422a, 0x3f4c421f, 0x3f4c4207, 0x3f4c41cb, 0x3f4c413b, 0x3f4c3fad,
     0x3f4c3a2f, 0x3f4c2d40, 0x3f4c146a, 0x3f4bc341, 0x3f4ad08c, 0x3f48f8cf,
     0x3f45fac7, 0x3f404e07, 0x3f3b980f, 0x3f48dff3, 0x3f78b21b, 0x3fbb0704,
     0x40019c32, 0x3fe536d6, 0x3f81331e, 0x3e6c8684, 0x3c98f936, 0x00000000,
     0x3f800000, 0, 0, 0, 0, 0, 0, 0},
    /* degree 2 */
    {0xb62173f4, 0x3735e4cf, 0x37f2ff89, 0x388c23be, 0x3917535c, 0x39ab2ab0,
     0x3a60fadb, 0x3af9b960, 0x3b6e5491, 0x3c0a4ec5, 0x3ca5aa8c, 0x3d2138d9,
     0x3d8737d4, 0x3ddfb660, 0x3e0f27ab, 0x3d94004b, 0xbe0efdeb, 0xbf1d96c3,
     0xbf89db58, 0xbf6d9897, 0xbef69fb8, 0xbdc4f8a8, 0xbbde6422, 0x00000000,
     0x00000000, 0, 0, 0, 0, 0, 0, 0},
    /* degree 3 */
    {0xbe081a19, 0xbe084570, 0xbe08639b, 0xbe089837, 0xbe08f409, 0xbe09ab95,
     0xbe0b66d0, 0xbe0e400a, 0xbe124df8, 0xbe1bde02, 0xbe2f19c9, 0xbe4931bf,
     0xbe685fbc, 0xbe89c95f, 0xbe96cbca, 0xbe8044aa, 0xbe0550f2, 0x3dcfd6a1,
     0x3e94c826, 0x3e79345f, 0x3decec91, 0x3ca46568, 0x3aa1e00a, 0x00000000,
     0x00000000, 0, 0, 0, 0, 0, 0, 0},
    /* degree 4 */
    {0xba3d61db, 0x39f097a3, 0x3a5845dc, 0x3ab1fa35, 0x3b0cefb8, 0x3b653ab6,
     0x3bcae527, 0x3c221712, 0x3c6c5840, 0x3cc0a703, 0x3d1dcc19, 0x3d63656d,
     0x3d955907, 0x3dbf9910, 0x3dd53f69, 0x3db7dcef, 0x3d639ebe, 0xba6ede48,
     0xbd22be69, 0xbd041cf1, 0xbc64f5ab, 0xbb097a32, 0xb8ebf380, 0x00000000,
     0x00000000, 0, 0, 0, 0, 0, 0, 0},
    /* degree 5 */
    {0x3cb7d80c, 0x3c9b6050, 0x3c978d11, 0x3c92e850, 0x3c8d058b, 0x3c848454,
     0x3c6cd623, 0x3c4c824b, 0x3c2a7935, 0x3be0b390, 0x3b0651ac, 0xbb232f53,
     0xbbd42fa0, 0xbc2c5366, 0xbc492c9e, 0xbc2a7aa6, 0xbbd55d04, 0xba823a76,
     0x3b102aa8, 0x3ae25a7e, 0x3a31f792, 0x38b84375, 0x3689bb5a, 0x00000000,
     0x00000000, 0, 0, 0, 0, 0, 0, 0},
};

/* coefficient d of each lane's interval `at` */
static inline __m512 onednn_gelu_coefficient(int d, __m512i at) {
    return _mm512_permutex2var_ps(_mm512_load_ps((const float *)ONEDNN_GELU_POLY[d]), at,
                                  _mm512_load_ps((const float *)ONEDNN_GELU_POLY[d] + 16));
}

static inline __m512 onednn_gelu16(__m512 x) {
    __m512 ax = _mm512_abs_ps(x);
    __m512i at = _mm512_srai_epi32(_mm512_add_epi32(_mm512_castps_si512(ax), _mm512_set1_epi32((int)0xc21fffff)), 21);
    at = _mm512_min_epi32(_mm512_max_epi32(at, _mm512_set1_epi32(1)), _mm512_set1_epi32(24));
    __mmask16 past = _mm512_cmp_ps_mask(_mm512_castsi512_ps(_mm512_set1_epi32(0x40b15cee)), ax, _CMP_LT_OS);
    at = _mm512_mask_mov_epi32(at, past, _mm512_set1_epi32(23));
    __m512 p = onednn_gelu_coefficient(5, at);
    for (int d = 4; d >= 0; d--) p = _mm512_fmadd_ps(p, ax, onednn_gelu_coefficient(d, at));
    __m512 erf = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(p),
                                                      _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u))));
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_add_ps(erf, _mm512_set1_ps(1.0f))), _mm512_set1_ps(0.5f));
}

#endif
