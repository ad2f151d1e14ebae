/* LayerNorm / RMSNorm backward from the saved output y (AVX-512), built and loaded by invact.norm_cpu,
 * and the forward's check of which columns can be recovered from y.
 *
 * One pass over each block of 8 rows reads y and dy twice (the second time from cache):
 *   t = y - beta (= gamma x_hat), dxhat = dy gamma,
 *   c1 = mean(dxhat) (LayerNorm; 0 for RMSNorm), c2 = (sum(dy t) + c2_fix) / n,
 *   dx = (dxhat - c1 - t / divisor c2) rstd,
 * and sums dy t and dy over the rows for dgamma = sum(dy t) / divisor and dbeta = sum(dy). divisor is
 * gamma with the kept columns set to 1 (their dx and dgamma are the caller's to replace, from their
 * saved x_hat; c2_fix carries their share of c2). The float32 operations are those of
 * invact.norms._backward_rows / _backward_columns, but the sums are blocked: products rounded to
 * float32, summed in float32 groups of at most 4 vectors (row sums) or 8 rows (column sums), the groups
 * in double; so a sum of N terms is off by at most ~8 u of the sum of their magnitudes, inside
 * invact.norms.error_bound's gamma_N = (8 + 2 log2 N) u.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "invact_bf16.h"                 /* ATen's rounding to bfloat16 */
#include "invact_threads.h"              /* spawn, MAX_THREADS */

#define NORM_ABI 1
#define NORM_MIN_ELEMENTS 32768          /* elements per thread at least */
#define BLOCK_ROWS 8

enum { NF32 = 0, NBF16 = 1, NF16 = 2 };  /* element types of y, dy and dx */

int invact_norm_abi(void) { return NORM_ABI; }

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

static inline __m512 load16(int dtype, const void *base, int64_t at, __mmask16 m) {
    if (dtype == NF32) return _mm512_maskz_loadu_ps(m, (const float *)base + at);
    __m256i half = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + at);
    if (dtype == NF16) return _mm512_cvtph_ps(half);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/* round to nearest even as ATen's conversions: NaN -> 0xFFFF (bfloat16), vcvtps2ph (float16) */
static inline void store16(int dtype, void *base, int64_t at, __mmask16 m, __m512 v) {
    if (dtype == NF32) {
        _mm512_mask_storeu_ps((float *)base + at, m, v);
        return;
    }
    __m256i half;
    if (dtype == NF16) {
        half = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
        half = _mm512_cvtepi32_epi16(invact_bf16_avx512(v));
    }
    _mm256_mask_storeu_epi16((uint16_t *)base + at, m, half);
}

/* acc += v in double, lanes 0-7 and 8-15 into two accumulators */
static inline void add_double(__m512d acc[2], __m512 v) {
    acc[0] = _mm512_add_pd(acc[0], _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    acc[1] = _mm512_add_pd(acc[1], _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

/* column sums: sum[at .. at + 16) += v in double (the sums are padded to a multiple of 16) */
static inline void add_columns(double *sum, int64_t at, __m512 v) {
    __m512d acc[2] = {_mm512_loadu_pd(sum + at), _mm512_loadu_pd(sum + at + 8)};
    add_double(acc, v);
    _mm512_storeu_pd(sum + at, acc[0]);
    _mm512_storeu_pd(sum + at + 8, acc[1]);
}

typedef struct {
    int dtype, dx_dtype, rms;
    int64_t n, lo, hi;                   /* row length; this job's rows [lo, hi) */
    const void *y, *dy;
    const float *rstd, *gamma, *divisor, *beta, *c2_fix;
    void *dx;
    float *c1, *c2;
    double *sum_t, *sum_dy;              /* this job's column sums, n (rounded up to 16) each */
} norm_job;

/* the row sums of one row: s1 = sum(dy gamma) (LayerNorm), s2 = sum(dy t); each group of four vectors
 * summed in float32 (3 roundings), the groups in double */
static void row_sums(const norm_job *jb, int64_t row, double *s1, double *s2) {
    __m512d a1[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()}, a2[2] = {a1[0], a1[0]};
    for (int64_t j = 0; j < jb->n; j += 64) {
        __m512 p1 = _mm512_setzero_ps(), p2 = p1;
        for (int v = 0; v < 4; v++) {
            int64_t at = j + 16 * v;
            __mmask16 m = tail_mask(jb->n - at);
            __m512 y = load16(jb->dtype, jb->y, row + at, m), dy = load16(jb->dtype, jb->dy, row + at, m);
            __m512 t = jb->beta ? _mm512_maskz_sub_ps(m, y, _mm512_maskz_loadu_ps(m, jb->beta + at)) : y;
            p1 = _mm512_add_ps(p1, _mm512_mul_ps(dy, _mm512_maskz_loadu_ps(m, jb->gamma + at)));
            p2 = _mm512_add_ps(p2, _mm512_mul_ps(dy, t));
        }
        add_double(a1, p1);
        add_double(a2, p2);
    }
    *s1 = jb->rms ? 0.0 : _mm512_reduce_add_pd(_mm512_add_pd(a1[0], a1[1]));
    *s2 = _mm512_reduce_add_pd(_mm512_add_pd(a2[0], a2[1]));
}

/* rows [lo, hi) in blocks of BLOCK_ROWS: the row sums of each row of the block, then, column chunk by
 * chunk, dx of every row of the block and the chunk's column sums over the block (float32, at most
 * BLOCK_ROWS - 1 roundings), added to the job's double column sums */
static void *norm_rows(void *arg) {
    const norm_job *jb = arg;
    const int64_t n = jb->n;
    for (int64_t r0 = jb->lo; r0 < jb->hi; r0 += BLOCK_ROWS) {
        int rows = jb->hi - r0 < BLOCK_ROWS ? (int)(jb->hi - r0) : BLOCK_ROWS;
        __m512 c1[BLOCK_ROWS], c2[BLOCK_ROWS], rstd[BLOCK_ROWS];
        for (int k = 0; k < rows; k++) {
            int64_t r = r0 + k;
            double s1, s2;
            row_sums(jb, r * n, &s1, &s2);
            float m1 = (float)(s1 / (double)n), m2 = (float)((s2 + (jb->c2_fix ? jb->c2_fix[r] : 0.0)) / (double)n);
            if (jb->c1) jb->c1[r] = m1;
            if (jb->c2) jb->c2[r] = m2;
            c1[k] = _mm512_set1_ps(m1);
            c2[k] = _mm512_set1_ps(m2);
            rstd[k] = _mm512_set1_ps(jb->rstd[r]);
        }
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 m = tail_mask(n - j);
            __m512 beta = jb->beta ? _mm512_maskz_loadu_ps(m, jb->beta + j) : _mm512_setzero_ps();
            __m512 gamma = _mm512_maskz_loadu_ps(m, jb->gamma + j);
            __m512 divisor = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), m, jb->divisor + j);
            __m512 st = _mm512_setzero_ps(), sd = st, y[BLOCK_ROWS], dy[BLOCK_ROWS];
            /* every load of the chunk before its first store: with rows 4 KiB apart a store would
             * otherwise hold up the next row's loads (4K aliasing: same address bits 0-11) */
            for (int k = 0; k < rows; k++) {
                y[k] = load16(jb->dtype, jb->y, (r0 + k) * n + j, m);
                dy[k] = load16(jb->dtype, jb->dy, (r0 + k) * n + j, m);
            }
            for (int k = 0; k < rows; k++) {
                __m512 t = jb->beta ? _mm512_maskz_sub_ps(m, y[k], beta) : y[k];
                __m512 inner = _mm512_sub_ps(_mm512_sub_ps(_mm512_mul_ps(dy[k], gamma), c1[k]),
                                             _mm512_mul_ps(_mm512_div_ps(t, divisor), c2[k]));
                store16(jb->dx_dtype, jb->dx, (r0 + k) * n + j, m, _mm512_mul_ps(inner, rstd[k]));
                st = _mm512_add_ps(st, _mm512_mul_ps(dy[k], t));
                sd = _mm512_add_ps(sd, dy[k]);
            }
            add_columns(jb->sum_t, j, st);
            add_columns(jb->sum_dy, j, sd);
        }
    }
    return 0;
}

/* dx (rows, n) of dx_dtype, c1 / c2 (rows; may be 0), dgamma (n), dbeta (n; may be 0) in float32 from y
 * and dy (rows, n) of dtype, float32 rstd (rows), gamma, divisor and beta (n; beta may be 0: RMSNorm or
 * no bias), c2_fix (rows; may be 0). Returns 0, -1 for arguments it does not take, -2 without memory. */
int invact_norm_backward(int dtype, int dx_dtype, int rms, int64_t rows, int64_t n, const void *y, const void *dy,
                         const float *rstd, const float *gamma, const float *divisor, const float *beta,
                         const float *c2_fix, void *dx, float *c1, float *c2, float *dgamma, float *dbeta,
                         int threads) {
    if (dtype < NF32 || dtype > NF16 || dx_dtype < NF32 || dx_dtype > NF16 || rows < 0 || n < 1)
        return -1;
    int64_t most = rows * n / NORM_MIN_ELEMENTS;
    int nt = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (most < nt) nt = most < 1 ? 1 : (int)most;
    if (rows < nt) nt = rows < 1 ? 1 : (int)rows;
    /* whole blocks per thread: the float32 block sums do not depend on the number of threads */
    int64_t width = (n + 15) / 16 * 16, step = ((rows + nt - 1) / nt + BLOCK_ROWS - 1) / BLOCK_ROWS * BLOCK_ROWS;
    double *sums = calloc((size_t)(2 * nt * width), sizeof(double));
    if (!sums) return -2;
    norm_job jobs[MAX_THREADS];
    for (int k = 0; k < nt; k++) {
        int64_t lo = k * step < rows ? k * step : rows, hi = lo + step < rows ? lo + step : rows;
        jobs[k] = (norm_job){dtype, dx_dtype, rms, n, lo, hi, y, dy, rstd, gamma, divisor, beta, c2_fix, dx, c1, c2,
                             sums + 2 * k * width, sums + (2 * k + 1) * width};
    }
    spawn(norm_rows, jobs, sizeof(norm_job), nt);
    for (int64_t j = 0; j < n; j++) {
        double st = 0.0, sd = 0.0;
        for (int k = 0; k < nt; k++) {
            st += jobs[k].sum_t[j];
            sd += jobs[k].sum_dy[j];
        }
        dgamma[j] = (float)(st / divisor[j]);
        if (dbeta) dbeta[j] = (float)sd;
    }
    free(sums);
    return 0;
}

/* how many of the n columns cannot be recovered from y: !(|w_j + offset| ratio >= tiny + |beta_j|) (NaN
 * counts), the float32 operations of invact.norms._recoverable on parameters of dtype (converted to
 * float32 exactly, as torch's .to); beta may be 0 */
int64_t invact_norm_unrecoverable(int dtype, int64_t n, const void *weight, const void *beta, float offset,
                                  float ratio, float tiny) {
    int64_t bad = 0;
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 m = tail_mask(n - j);
        __m512 g = _mm512_andnot_ps(sign, _mm512_add_ps(load16(dtype, weight, j, m), _mm512_set1_ps(offset)));
        __m512 limit = _mm512_set1_ps(tiny);
        if (beta) limit = _mm512_add_ps(limit, _mm512_andnot_ps(sign, load16(dtype, beta, j, m)));
        __mmask16 good = _mm512_mask_cmp_ps_mask(m, _mm512_mul_ps(g, _mm512_set1_ps(ratio)), limit, _CMP_GE_OQ);
        bad += __builtin_popcount((unsigned)(m & ~good));
    }
    return bad;
}
