/* exp, log, log1p and tanh of a float for the per-table kernels (invact_table.h): SLEEF's u10 algorithms
 * (within 1 ulp; tanh 1.00000002 ulps at tiny x, SLEEF's own), written for one element in plain arithmetic and integer bit operations, so that gcc
 * vectorises the loops calling them (`omp simd`) for whatever ISA the build targets; no C library call.
 *
 * With INVACT_USE_FMA (invact.table_c's build with FMA: ATen's capability AVX2 or AVX-512) every step is
 * SLEEF's FMA build's, in invact_sleef.h's order, so the results are those of ATen's Vectorized<float>
 * exp, log, log1p and tanh (Sleef_*f8_u10 / Sleef_*f16_u10) bit for bit, NaNs included: torch.log1p's,
 * and torch.exp/log/tanh's where ATen is built without MKL (with MKL those call its VML instead).
 * Without INVACT_USE_FMA they are SLEEF's builds without FMA (its purec and SSE2 ones): each fused step
 * a product and a sum, and the double-float products (SLEEF's df.h) split their operands into 12-bit
 * halves (Dekker) instead of taking an FMA's exact error: the same 1-ulp bound, not the same bits.
 *
 * x is split into m 2^e as SLEEF's AVX2 build does (integer steps; below FLT_MIN scaled by 2^64 first:
 * the AVX-512 build's getexp/getmant give the same m and e), special values as the build's ISA has them. */
#ifndef INVACT_LIBM_H
#define INVACT_LIBM_H

#include <math.h>
#include <stdint.h>

#include "invact_bits.h"

#ifdef INVACT_USE_FMA
#define INVACT_MLA(a, b, c) fmaf((a), (b), (c))  /* -mfma: one vfmadd */
#else
#define INVACT_MLA(a, b, c) ((a) * (b) + (c))
#endif

/* t rounded to the nearest integer, ties to even (vcvtps2dq), for |t| < 2^22; any int elsewhere */
static inline int32_t invact_rint(float t) {
    return (int32_t)(invact_bits(t + 12582912.0f) - 0x4b400000u);
}

/* 2^q as a float, for q + 127 in [1, 254] */
static inline float invact_pow2i(int32_t q) { return invact_float(((uint32_t)q + 0x7fu) << 23); }

/* d 2^q as SLEEF's vldexp2: two products, so that a subnormal result is rounded once */
static inline float invact_ldexp2(float d, int32_t q) {
    return d * invact_pow2i(q >> 1) * invact_pow2i(q - (q >> 1));
}

/* ---- SLEEF's double-float arithmetic (df.h): a value x + y, |y| below half an ulp of x ---- */

typedef struct { float x, y; } invact_df;

static inline float invact_upper(float d) { return invact_float(invact_bits(d) & 0xfffff000u); }

/* dfadd2_vf2_vf_vf: x + y and its rounding error (two-sum) */
static inline invact_df invact_df_add2(float x, float y) {
    float s = x + y, v = s - x;
    return (invact_df){s, (x - (s - v)) + (y - v)};
}

/* dfadd2_vf2_vf2_vf */
static inline invact_df invact_df_add2_df_f(invact_df x, float y) {
    invact_df r = invact_df_add2(x.x, y);
    r.y = r.y + x.y;
    return r;
}

/* dfadd2_vf2_vf2_vf2 */
static inline invact_df invact_df_add2_df_df(invact_df x, invact_df y) {
    invact_df r = invact_df_add2(x.x, y.x);
    r.y = r.y + (x.y + y.y);
    return r;
}

/* dfadd_vf2_vf2_vf2 (|x| >= |y|) */
static inline invact_df invact_df_add_df_df(invact_df x, invact_df y) {
    float s = x.x + y.x;
    return (invact_df){s, (((x.x - s) + y.x) + x.y) + y.y};
}

/* dfmul_vf2_vf2_vf: x y */
static inline invact_df invact_df_mul_df_f(invact_df x, float y) {
    float s = x.x * y;
#ifdef INVACT_USE_FMA
    return (invact_df){s, fmaf(x.y, y, fmaf(x.x, y, -s))};
#else
    float xh = invact_upper(x.x), xl = x.x - xh, yh = invact_upper(y), yl = y - yh;
    float t = xh * yh + -s;
    t = xl * yh + t;
    t = xh * yl + t;
    t = xl * yl + t;
    return (invact_df){s, x.y * y + t};
#endif
}

/* dfmul_vf2_vf2_vf2: x y */
static inline invact_df invact_df_mul_df_df(invact_df x, invact_df y) {
    float s = x.x * y.x;
#ifdef INVACT_USE_FMA
    return (invact_df){s, fmaf(x.x, y.y, fmaf(x.y, y.x, fmaf(x.x, y.x, -s)))};
#else
    float xh = invact_upper(x.x), xl = x.x - xh, yh = invact_upper(y.x), yl = y.x - yh;
    float t = xh * yh + -s;
    t = xl * yh + t;
    t = xh * yl + t;
    t = xl * yl + t;
    t = x.x * y.y + t;
    return (invact_df){s, x.y * y.x + t};
#endif
}

/* dfsqu_vf2_vf2: x^2 */
static inline invact_df invact_df_squ(invact_df x) {
    float s = x.x * x.x;
#ifdef INVACT_USE_FMA
    return (invact_df){s, fmaf(x.x + x.x, x.y, fmaf(x.x, x.x, -s))};
#else
    float xh = invact_upper(x.x), xl = x.x - xh;
    float t = xh * xh + -s;
    t = (xh + xh) * xl + t;
    t = xl * xl + t;
    return (invact_df){s, x.x * (x.y + x.y) + t};
#endif
}

/* dfrec_vf2_vf2: 1 / d */
static inline invact_df invact_df_rec(invact_df d) {
    float t = 1.0f / d.x;
#ifdef INVACT_USE_FMA
    return (invact_df){t, t * fmaf(-d.y, t, fmaf(-d.x, t, 1.0f))};
#else
    float dh = invact_upper(d.x), dl = d.x - dh, th = invact_upper(t), tl = t - th;
    float u = dh * th + -1.0f;
    u = dh * tl + u;
    u = dl * th + u;
    u = dl * tl + u;
    u = d.y * t + u;
    return (invact_df){t, -t * u};
#endif
}

/* dfdiv_vf2_vf2_vf2: n / d */
static inline invact_df invact_df_div(invact_df n, invact_df d) {
    float t = 1.0f / d.x, s = n.x * t;
#ifdef INVACT_USE_FMA
    float u = fmaf(t, n.x, -s);
    float v = fmaf(-d.y, t, fmaf(-d.x, t, 1.0f));
    return (invact_df){s, fmaf(s, v, fmaf(n.y, t, u))};
#else
    float dh = invact_upper(d.x), dl = d.x - dh, th = invact_upper(t), tl = t - th;
    float nh = invact_upper(n.x), nl = n.x - nh;
    float w = dh * th + -1.0f;
    w = dh * tl + w;
    w = dl * th + w;
    w = dl * tl + w;
    w = -w;
    float u = nh * th + -s;
    u = nh * tl + u;
    u = nl * th + u;
    u = nl * tl + u;
    u = s * w + u;
    return (invact_df){s, t * (n.y - s * d.y) + u};
#endif
}

/* ---- the functions ---- */

/* SLEEF's 1 / ln 2, and -ln 2 in two parts (the first exact times any q that occurs) */
#define INVACT_R_LN2 1.44269502162933349609375f
#define INVACT_M_L2U (-0.693145751953125f)
#define INVACT_M_L2L (-1.428606765330187045e-06f)

/* Sleef_expf_u10: 0 below -104, inf past 100 (NaN stays NaN) */
static inline float invact_expf(float d) {
    int32_t q = invact_rint(d * INVACT_R_LN2);
    float qf = (float)q;
    float s = INVACT_MLA(qf, INVACT_M_L2U, d);
    s = INVACT_MLA(qf, INVACT_M_L2L, s);
    float u = 0.000198527617612853646278381f;
    u = INVACT_MLA(u, s, 0.00139304355252534151077271f);
    u = INVACT_MLA(u, s, 0.00833336077630519866943359f);
    u = INVACT_MLA(u, s, 0.0416664853692054748535156f);
    u = INVACT_MLA(u, s, 0.166666671633720397949219f);
    u = INVACT_MLA(u, s, 0.5f);
    u = INVACT_MLA(s * s, u, s) + 1.0f;
    u = invact_ldexp2(u, q);
    u = d < -104.0f ? 0.0f : u;
    return 100.0f < d ? (float)INFINITY : u;
}

/* e ln 2 as a double-float (dfmul of SLEEF's ln 2 pair by e) */
static inline invact_df invact_e_ln2(float e) {
    return invact_df_mul_df_f((invact_df){0.69314718246459960938f, -1.904654323148236017e-09f}, e);
}

/* log = s + 2q + q^3 (c1 + q^2 (c2 + q^2 c3)) for s = e ln 2 and q the reduced quotient, both
 * double-floats: SLEEF's logf_u1 and log1pf from their division on */
static inline float invact_log_sum(invact_df s, invact_df q) {
    float x2 = q.x * q.x;
    float t = INVACT_MLA(0.3027294874e+0f, x2, 0.3996108174e+0f);
    t = INVACT_MLA(t, x2, 0.6666694880e+0f);
    s = invact_df_add_df_df(s, (invact_df){q.x + q.x, q.y + q.y});
    float p = x2 * q.x * t, r = s.x + p;          /* dfadd_vf2_vf2_vf(s, p) */
    return r + (((s.x - r) + p) + s.y);
}

/* x's exponent e (a float) and 2^-e's bits, of d (x, or x scaled by 2^64 where tiny) times 4/3 */
static inline uint32_t invact_log_exponent(float x, float *d, float *e) {
    int tiny = x < 1.17549435e-38f;                        /* FLT_MIN */
    *d = tiny ? x * 18446744073709551616.0f : x;           /* 2^64 */
    uint32_t biased = (invact_bits(*d * 1.33333337306976318359375f) >> 23) & 0xffu;
    *e = (float)((int32_t)biased - (tiny ? 191 : 127));
    return (0x7fu - biased) << 23;
}

/* logf's NaN for x < 0 and NaN x: SLEEF's AVX-512 build's (vfixupimmps) is x quieted, its bits | 0x7fc00000;
 * its other builds' 0x7fc00000 */
static inline float invact_log_nan(float x) {
#if defined(__AVX512F__)
    return invact_float(invact_bits(x) | 0x7fc00000u);
#else
    (void)x;
    return invact_float(0x7fc00000u);
#endif
}

/* Sleef_logf_u10: m = x 2^-e in [0.75, 1.5), q = (m - 1) / (m + 1); +inf for +inf, NaN for x < 0 and
 * NaN, -inf for zeros */
static inline float invact_logf(float x) {
    float d, e;
    float m = invact_float(invact_log_exponent(x, &d, &e) + invact_bits(d));
    invact_df q = invact_df_div(invact_df_add2(-1.0f, m), invact_df_add2(1.0f, m));
    float r = invact_log_sum(invact_e_ln2(e), q);
    r = x == (float)INFINITY ? (float)INFINITY : r;
    r = (x < 0.0f || x != x) ? invact_log_nan(x) : r;
    return x == 0.0f ? -(float)INFINITY : r;
}

/* Sleef_log1pf_u10: e of x + 1, m = x 2^-e + (2^-e - 1), q = m / (m + 2); logf(x) where !(x <= 1e38);
 * then NaN (all ones) for x < -1, -inf for -1, -0 for -0 */
static inline float invact_log1pf(float x) {
    float d, e;
    float t = invact_float(invact_log_exponent(x + 1.0f, &d, &e) + 0x3f800000u);
    float m = INVACT_MLA(t, x, -1.0f + t);
    float den = m + 2.0f;
    invact_df q = invact_df_div((invact_df){m, 0.0f}, (invact_df){den, (2.0f - den) + m});
    float r = invact_log_sum(invact_e_ln2(e), q);
    r = x <= 1e38f ? r : invact_logf(x);
    r = -1.0f > x ? invact_float(0xffffffffu) : r;
    r = x == -1.0f ? -(float)INFINITY : r;
    return invact_bits(x) == 0x80000000u ? -0.0f : r;
}

/* SLEEF's tanhf (u10): T = exp(|x|) as a double-float (its expk2f), then (T - 1/T) / (T + 1/T); 1 past
 * |x| > 8.664339742 (and where that gave NaN), x's sign; all ones for NaN x */
static inline float invact_tanhf(float x) {
    float a = invact_float(invact_bits(x) & 0x7fffffffu);
    int32_t q = invact_rint((a + 0.0f) * INVACT_R_LN2);    /* (d.x + d.y) of the double-float (a, 0) */
    float qf = (float)q;
    invact_df s = invact_df_add2_df_f((invact_df){a, 0.0f}, qf * INVACT_M_L2U);
    s = invact_df_add2_df_f(s, qf * INVACT_M_L2L);
    float u = INVACT_MLA(s.x, 0.1980960224e-3f, 0.1394256484e-2f);
    u = INVACT_MLA(s.x, u, 0.8333456703e-2f);
    u = INVACT_MLA(s.x, u, 0.4166637361e-1f);
    invact_df t = invact_df_add2_df_f(invact_df_mul_df_f(s, u), 0.166666659414234244790680580464e+0f);
    t = invact_df_add2_df_f(invact_df_mul_df_df(s, t), 0.5f);
    t = invact_df_add2_df_df(s, invact_df_mul_df_df(invact_df_squ(s), t));
    float fx = 1.0f + t.x;                                  /* dfadd_vf2_vf_vf2(1, t) */
    invact_df f = {fx, ((1.0f - fx) + t.x) + t.y};
    invact_df T = {invact_ldexp2(f.x, q), invact_ldexp2(f.y, q)};   /* (expk2f's 0 below -104: a >= 0) */
    invact_df e = invact_df_rec(T);
    invact_df ne = {-e.x, -e.y};
    invact_df r = invact_df_div(invact_df_add_df_df(T, ne), invact_df_add_df_df(T, e));
    float y = r.x + r.y;
    y = (a > 8.664339742f || y != y) ? 1.0f : y;
    y = invact_float(invact_bits(y) ^ (invact_bits(x) & 0x80000000u));
    return x != x ? invact_float(0xffffffffu) : y;
}

#endif
