/* LayerNorm / RMSNorm backward from the saved output y, built and loaded by invact.norm_cpu, and the
 * forward's check of which columns can be recovered from y.
 *
 * One pass over each block of 8 rows reads y and dy twice (the second time from cache):
 *   t = y - beta (= gamma x_hat), dxhat = dy gamma,
 *   c1 = mean(dxhat) (LayerNorm; 0 for RMSNorm), c2 = (sum(dy t) + c2_fix) / n,
 *   dx = (dxhat - c1 - t / divisor c2) rstd,
 * and sums dy t and dy over the rows for dgamma = sum(dy t) / divisor and dbeta = sum(dy). divisor is
 * gamma with the kept columns set to 1 (their dx and dgamma are the caller's to replace, from their
 * saved x_hat; c2_fix carries their share of c2). The float32 operations are those of
 * invact.norm_math._backward_rows / _backward_columns, but the sums are blocked: products rounded to
 * float32, summed in float32 groups of at most 4 vectors (row sums) or 8 rows (column sums), the groups
 * in double; so a sum of N terms is off by at most ~8 u of the sum of their magnitudes, inside
 * invact.norm_bounds.error_bound's gamma_N = (8 + 2 log2 N) u.
 *
 * Portable C: a vector is one register of the build's target in GCC's / Clang's vector extension (16
 * float lanes with AVX-512, 8 with AVX, else 4: SSE2, NEON), the 16-bit conversions by F16C / AVX-512
 * where the build has them (exactly the plain C ones), nothing contracted (-ffp-contract=off). The
 * lanes set how a sum is grouped, so builds for different widths differ in the last bits of c1, c2 and
 * the column sums, each within the bound above.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "invact_bf16.h"                 /* 16-bit conversions as ATen's */
#include "invact_threads.h"              /* spawn, MAX_THREADS */

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  /* vectors passed between static functions only */
#endif

#define NORM_ABI 2
#define NORM_MIN_ELEMENTS 32768          /* elements per thread at least */
#define BLOCK_ROWS 8
#if defined(__AVX512F__)
#define LANES 16                         /* a vector: one register of the build's target */
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif

enum { NF32 = 0, NBF16 = 1, NF16 = 2 };  /* element types of y, dy and dx */

#define INLINE inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));
typedef float vfh __attribute__((vector_size(2 * LANES)));    /* half a vector */
#if defined(__FLT16_MAX__)
typedef _Float16 vhf __attribute__((vector_size(2 * LANES)));
#endif
/* the same, read and written at any element's address */
typedef float vf_at __attribute__((vector_size(4 * LANES), aligned(4), may_alias));
typedef uint16_t vh_at __attribute__((vector_size(2 * LANES), aligned(2), may_alias));
typedef double vd __attribute__((vector_size(4 * LANES)));    /* LANES / 2 doubles */
typedef double vd_at __attribute__((vector_size(4 * LANES), aligned(8), may_alias));

int invact_norm_abi(void) { return NORM_ABI; }

static INLINE vf splat(float f) { return (vf){0} + f; }

static INLINE vf half_to_float(vh h) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtph_ps((__m256i)h);
#elif defined(__F16C__)
    return (vf)_mm256_cvtph_ps((__m128i)h);
#elif defined(__FLT16_MAX__)                    /* the compiler's _Float16: the target's own conversion */
    return __builtin_convertvector((vhf)h, vf);
#else
    vf v;
    for (int l = 0; l < LANES; l++) v[l] = invact_half_to_float(h[l]);
    return v;
#endif
}

static INLINE vh float_to_half(vf v) {
#if defined(__AVX512F__)
    return (vh)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(__F16C__)
    return (vh)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(__FLT16_MAX__)
    return (vh)__builtin_convertvector(v, vhf);
#else
    vh h;
    for (int l = 0; l < LANES; l++) h[l] = invact_float_to_half(v[l]);
    return h;
#endif
}

/* round to nearest even as ATen's vectorised conversion, NaN to 0xFFFF */
static INLINE vh float_to_bf16(vf v) {
    vu b = (vu)v;
    vu r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    vu nan = (vu)(v != v);
    return __builtin_convertvector((r & ~nan) | (nan & 0xFFFFu), vh);
}

/* LANES elements of y's type from base[at ..] as float32 */
static INLINE vf load_full(int dtype, const void *base, int64_t at) {
    if (dtype == NF32) return *(const vf_at *)((const float *)base + at);
    vh h = *(const vh_at *)((const uint16_t *)base + at);
    return dtype == NF16 ? half_to_float(h) : (vf)(__builtin_convertvector(h, vu) << 16);
}

/* lanes [0, count) of base[at ..] as float32, the others `fill` (count < LANES: the rows' last columns) */
__attribute__((noinline)) static vf load_tail(int dtype, const void *base, int64_t at, int64_t count, float fill) {
    vf v;
    for (int64_t l = 0; l < LANES; l++) {
        uint16_t h = dtype == NF32 || l >= count ? 0 : ((const uint16_t *)base)[at + l];
        v[l] = l >= count ? fill : dtype == NF32 ? ((const float *)base)[at + l]
             : dtype == NF16 ? invact_half_to_float(h) : invact_bf16_to_float(h);
    }
    return v;
}

/* the first `count` lanes (all where count >= LANES) loaded, the others `fill` */
static INLINE vf loadv(int dtype, const void *base, int64_t at, int64_t count, float fill) {
    return count >= LANES ? load_full(dtype, base, at) : load_tail(dtype, base, at, count, fill);
}

static INLINE vf loadf(const float *base, int64_t at, int64_t count, float fill) {
    return loadv(NF32, base, at, count, fill);
}

/* the first min(count, LANES) lanes stored, rounded to nearest even as ATen's conversions */
static INLINE void storev(int dtype, void *base, int64_t at, int64_t count, vf v) {
    if (dtype == NF32) {
        if (count >= LANES) *(vf_at *)((float *)base + at) = v;
        else memcpy((float *)base + at, &v, (size_t)count * sizeof(float));
        return;
    }
    vh h = dtype == NF16 ? float_to_half(v) : float_to_bf16(v);
    if (count >= LANES) *(vh_at *)((uint16_t *)base + at) = h;
    else memcpy((uint16_t *)base + at, &h, (size_t)count * sizeof(uint16_t));
}

/* acc += v in double, the lower and the upper half of the lanes into two accumulators */
static INLINE void add_double(vd acc[2], vf v) {
    vfh lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    acc[0] += __builtin_convertvector(lo, vd);
    acc[1] += __builtin_convertvector(hi, vd);
}

/* the lanes' sum, halving: lane i + lane i + w/2 (_mm512_reduce_add_pd's order for 8 lanes) */
static INLINE double reduce(vd a) {
    for (int w = LANES / 2; w > 1; w /= 2)
        for (int i = 0; i < w / 2; i++) a[i] = a[i] + a[i + w / 2];
    return a[0];
}

/* column sums: sum[at .. at + LANES) += v in double (the sums are padded to a multiple of LANES) */
static INLINE void add_columns(double *sum, int64_t at, vf v) {
    vd acc[2] = {*(vd_at *)(sum + at), *(vd_at *)(sum + at + LANES / 2)};
    add_double(acc, v);
    *(vd_at *)(sum + at) = acc[0];
    *(vd_at *)(sum + at + LANES / 2) = acc[1];
}

typedef struct {
    int dtype, dx_dtype, rms;
    int64_t n, lo, hi;                   /* row length; this job's rows [lo, hi) */
    const void *y, *dy;
    const float *rstd, *gamma, *divisor, *beta, *c2_fix;
    void *dx;
    float *c1, *c2;
    double *sum_t, *sum_dy;              /* this job's column sums, n (rounded up to LANES) each */
} norm_job;

/* one group of four vectors of a row's sums from column j (`left` = n - j), each summed in float32 */
static INLINE void row_group(const norm_job *jb, int64_t row, int64_t j, int64_t left, vd a1[2], vd a2[2]) {
    vf p1 = splat(0.0f), p2 = p1;
    for (int v = 0; v < 4; v++) {
        int64_t at = j + LANES * v, rest = left - LANES * v;
        vf y = loadv(jb->dtype, jb->y, row + at, rest, 0.0f), dy = loadv(jb->dtype, jb->dy, row + at, rest, 0.0f);
        vf t = jb->beta ? y - loadf(jb->beta, at, rest, 0.0f) : y;
        p1 = p1 + dy * loadf(jb->gamma, at, rest, 0.0f);
        p2 = p2 + dy * t;
    }
    add_double(a1, p1);
    add_double(a2, p2);
}

/* the row sums of one row: s1 = sum(dy gamma) (LayerNorm), s2 = sum(dy t); each group of four vectors
 * summed in float32 (3 roundings), the groups in double */
static void row_sums(const norm_job *jb, int64_t row, double *s1, double *s2) {
    vd a1[2] = {{0}, {0}}, a2[2] = {{0}, {0}};
    int64_t j = 0;
    for (; j + 4 * LANES <= jb->n; j += 4 * LANES) row_group(jb, row, j, 4 * LANES, a1, a2);  /* no tail here */
    if (j < jb->n) row_group(jb, row, j, jb->n - j, a1, a2);
    *s1 = jb->rms ? 0.0 : reduce(a1[0] + a1[1]);
    *s2 = reduce(a2[0] + a2[1]);
}

/* the columns [j, j + LANES) of a block's rows (`left` = n - j): dx, and the column sums over the block
 * (float32, at most BLOCK_ROWS - 1 roundings) added to the job's double sums */
static INLINE void block_chunk(const norm_job *jb, int64_t r0, int rows, int64_t j, int64_t left, const float *c1,
                               const float *c2, const float *rstd) {
    const int64_t n = jb->n;
    vf beta = jb->beta ? loadf(jb->beta, j, left, 0.0f) : splat(0.0f);
    vf gamma = loadf(jb->gamma, j, left, 0.0f), divisor = loadf(jb->divisor, j, left, 1.0f);
    vf st = splat(0.0f), sd = st, y[BLOCK_ROWS], dy[BLOCK_ROWS];
    /* every load of the chunk before its first store: with rows 4 KiB apart a store would otherwise
     * hold up the next row's loads (4K aliasing: same address bits 0-11) */
#pragma GCC unroll 8
    for (int k = 0; k < rows; k++) {
        y[k] = loadv(jb->dtype, jb->y, (r0 + k) * n + j, left, 0.0f);
        dy[k] = loadv(jb->dtype, jb->dy, (r0 + k) * n + j, left, 0.0f);
    }
#pragma GCC unroll 8
    for (int k = 0; k < rows; k++) {
        vf t = jb->beta ? y[k] - beta : y[k];
        vf inner = ((dy[k] * gamma) - c1[k]) - (t / divisor) * c2[k];
        storev(jb->dx_dtype, jb->dx, (r0 + k) * n + j, left, inner * rstd[k]);
        st = st + dy[k] * t;
        sd = sd + dy[k];
    }
    add_columns(jb->sum_t, j, st);
    add_columns(jb->sum_dy, j, sd);
}

/* rows [lo, hi) in blocks of BLOCK_ROWS: the row sums of each row of the block, then, column chunk by
 * chunk, dx of every row of the block and the chunk's column sums */
static void *norm_rows(void *arg) {
    const norm_job *jb = arg;
    const int64_t n = jb->n;
    for (int64_t r0 = jb->lo; r0 < jb->hi; r0 += BLOCK_ROWS) {
        int rows = jb->hi - r0 < BLOCK_ROWS ? (int)(jb->hi - r0) : BLOCK_ROWS;
        float c1[BLOCK_ROWS], c2[BLOCK_ROWS], rstd[BLOCK_ROWS];
        for (int k = 0; k < rows; k++) {
            int64_t r = r0 + k;
            double s1, s2;
            row_sums(jb, r * n, &s1, &s2);
            c1[k] = (float)(s1 / (double)n);
            c2[k] = (float)((s2 + (jb->c2_fix ? jb->c2_fix[r] : 0.0)) / (double)n);
            rstd[k] = jb->rstd[r];
            if (jb->c1) jb->c1[r] = c1[k];
            if (jb->c2) jb->c2[r] = c2[k];
        }
        int64_t j = 0;
        if (rows == BLOCK_ROWS)                     /* constants: the loops over rows unrolled, no tail */
            for (; j + LANES <= n; j += LANES) block_chunk(jb, r0, BLOCK_ROWS, j, LANES, c1, c2, rstd);
        for (; j < n; j += LANES) block_chunk(jb, r0, rows, j, n - j, c1, c2, rstd);
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
    int64_t width = (n + LANES - 1) / LANES * LANES;
    int64_t step = ((rows + nt - 1) / nt + BLOCK_ROWS - 1) / BLOCK_ROWS * BLOCK_ROWS;
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
 * counts), the float32 operations of invact.norm_recovery.recoverable on parameters of dtype (converted to
 * float32 exactly, as torch's .to); beta may be 0 */
int64_t invact_norm_unrecoverable(int dtype, int64_t n, const void *weight, const void *beta, float offset,
                                  float ratio, float tiny) {
    int64_t bad = 0;
    for (int64_t j = 0; j < n; j += LANES) {
        vf g = loadv(dtype, weight, j, n - j, 0.0f) + offset;
        vf limit = splat(tiny);
        if (beta) limit = limit + (vf)((vu)loadv(dtype, beta, j, n - j, 0.0f) & 0x7FFFFFFFu);
        vi good = (vf)((vu)g & 0x7FFFFFFFu) * ratio >= limit;
        for (int64_t l = 0; l < LANES && l < n - j; l++) bad += !good[l];
    }
    return bad;
}
