/* The per-table float32 backward kernels' common part: included by every generated/c_NAME.c (written
 * by `invact generate`, invact.fitting.codegen.c_gen), which defines TABLE_SHA256, CODE_BITS,
 * N_SEGMENTS, N_THRESHOLDS, ROW_LENGTH, N_PARAMS, invact.fastmath.log's constants (LOG_*) and the POLY
 * row's columns (ROW_*) before
 * including it, and the element function invact_g after it. Built and called by invact.table_c
 * (-ffp-contract=off: no FMA, so every operation rounds as the generated torch code's does).
 *
 * The helpers give ATen's results: clamps as its vectorised clamp kernels (vmaxps(lo, v), vminps(hi, v):
 * NaN stays NaN and -0.0 stays -0.0), invact_log32 as invact.fastmath.log operation for operation,
 * invact_bucketize as ATen's binary search (NaN passes every threshold).
 */
#ifndef INVACT_TABLE_H
#define INVACT_TABLE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "invact_threads.h"

#define INVACT_TABLE_ABI 1

static inline float invact_g(float y, int32_t code, const float *restrict thr, const float *restrict poly,
                             const double *restrict param);

static inline float invact_clamp_min(float v, float lo) { return lo > v ? lo : v; }
static inline float invact_clamp_max(float v, float hi) { return hi < v ? hi : v; }
static inline float invact_sqrt_rn(float v) { return sqrtf(v); }  /* invact.fastmath.sqrt: correctly rounded */

/* torch.minimum / torch.maximum: NaN where either is NaN */
static inline float invact_minimum(float a, float b) { return (a != a || b != b) ? NAN : (b < a ? b : a); }
static inline float invact_maximum(float a, float b) { return (a != a || b != b) ? NAN : (b > a ? b : a); }

/* torch.bucketize(v, bd[0 .. n), right=right): ATen's upper (right) or lower bound */
static inline int32_t invact_bucketize(float v, const float *bd, int32_t n, int right) {
    int32_t lo = 0, hi = n;
    while (lo < hi) {
        int32_t mid = lo + ((hi - lo) >> 1);
        if (right ? !(bd[mid] > v) : !(bd[mid] >= v)) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* invact.fastmath.log of positive normal a: exponent plus a polynomial in the mantissa. Every
 * Python float constant meets a float32 tensor there, so it is rounded to float32 first. */
static inline float invact_log32(float a) {
    static const double poly[] = LOG_POLY;
    uint32_t bits, mbits;
    memcpy(&bits, &a, sizeof bits);
    mbits = (bits & 0x7FFFFFu) | 0x3F800000u;
    float m;
    memcpy(&m, &mbits, sizeof m);
    int32_t big = m >= (float)LOG_SQRT2;
    float e = (float)(((int32_t)bits >> 23) - 127 + big);
    float f = (big ? m * (float)0.5 : m) - (float)1.0;
    float z = f * f;
    float p = (float)poly[0];
    for (int k = 1; k < (int)(sizeof poly / sizeof poly[0]); k++) p = p * f + (float)poly[k];
    float r = f * z * p;
    r = r + e * (float)LOG_LN2_LO;
    r = r - (float)0.5 * z;
    return (f + r) + e * (float)LOG_LN2_HI;
}

/* invact.scheme.row: g of the POLY row of segment s (column j at poly[j * N_SEGMENTS + s]) at t */
static inline float invact_row(const float *restrict poly, int32_t s, float t, int degree, int den_degree) {
#define Q(j) poly[(j) * N_SEGMENTS + s]
    float u = invact_clamp_max(invact_clamp_min((t - Q(ROW_CENTER)) * Q(ROW_SCALE), -1.0f), 1.0f);
    if (degree == 0) return (u * 0.0f + Q(ROW_C0_LO)) + Q(ROW_C0);
    float p = Q(ROW_C0_LO + degree);
    for (int j = degree - 1; j > 0; j--) p = p * u + Q(ROW_C0_LO + j);
    if (den_degree) {  /* d1 .. d_den follow c1 .. c_degree */
        float den = Q(ROW_C1 + degree + den_degree - 1);
        for (int j = den_degree - 1; j > 0; j--) den = den * u + Q(ROW_C1 + degree + j - 1);
        den = den * u + 1.0f;
        p = p / den;
    }
    p = p * u;
    return (p + Q(ROW_C0_LO)) + Q(ROW_C0);
#undef Q
}

int invact_table_abi(void) { return INVACT_TABLE_ABI; }
const char *invact_table_sha256(void) { return TABLE_SHA256; }

typedef struct {
    int64_t n, lo, hi;                     /* all elements, and this job's range */
    const float *y, *grad, *thr, *poly;
    float *out;
    const uint8_t *code;
    const double *param;
} table_job;

/* elements [lo, hi) of one bit plane: codes (code[k] >> shift) & mask from byte k of `code` */
static void table_plane(const table_job *jb, int64_t lo, int64_t hi, const uint8_t *code, int shift) {
    const float *restrict y = jb->y, *restrict grad = jb->grad;
    float *restrict out = jb->out;
    if (CODE_BITS == 0) {
        for (int64_t i = lo; i < hi; i++) out[i] = invact_g(y[i], 0, jb->thr, jb->poly, jb->param) * grad[i];
        return;
    }
    for (int64_t i = lo; i < hi; i++) {
        int32_t c = (code[i - lo] >> shift) & ((1 << CODE_BITS) - 1);
        out[i] = invact_g(y[i], c, jb->thr, jb->poly, jb->param) * grad[i];
    }
}

static void *table_run(void *arg) {
    const table_job *jb = arg;
    if (CODE_BITS == 0) {
        table_plane(jb, jb->lo, jb->hi, jb->code, 0);
        return 0;
    }
    int64_t per = 8 / (CODE_BITS ? CODE_BITS : 8), nbytes = (jb->n + per - 1) / per;  /* invact.bitpack */
    for (int64_t i = jb->lo; i < jb->hi;) {
        int64_t plane = i / nbytes, end = clamp_to((plane + 1) * nbytes, jb->hi);
        table_plane(jb, i, end, jb->code + (i - plane * nbytes), (int)(plane * CODE_BITS));
        i = end;
    }
    return 0;
}

/* out = g(y, code) * grad for n contiguous float32 elements; code: invact.bitpack planes of
 * `bits` bits (CODE_BITS; none when 0); thr: the N_THRESHOLDS float32 y thresholds; poly: POLY
 * transposed (ROW_LENGTH x N_SEGMENTS floats); param: the N_PARAMS parameters. Returns 0, or -1
 * for arguments it does not take. */
int invact_table_grad(int64_t n, const float *y, const float *grad, float *out, const uint8_t *code, int bits,
                      const float *thr, const float *poly, const double *param, int threads) {
    if (n < 0 || bits != CODE_BITS) return -1;
    int64_t step;
    int nt = split(n, MIN_PER_THREAD, threads, &step);
    table_job jobs[MAX_THREADS];
    for (int k = 0; k < nt; k++) {
        jobs[k] = (table_job){n, 0, 0, y, grad, thr, poly, out, code, param};
        jobs[k].lo = clamp_to(k * step, n);
        jobs[k].hi = clamp_to(jobs[k].lo + step, n);
    }
    spawn(table_run, jobs, sizeof(table_job), nt);
    return 0;
}

#endif
