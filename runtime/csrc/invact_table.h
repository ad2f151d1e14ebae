/* The per-table float32 backward kernels' common part: included by every generated/c_NAME.c (written
 * by `invact generate`, invact.fitting.codegen.c_gen), which defines TABLE_SHA256, EAGER_BITS (1 where
 * g is the eager code's bit for bit), CODE_BITS, N_SEGMENTS, N_THRESHOLDS, ROW_LENGTH, N_PARAMS,
 * invact.fastmath.log's constants (LOG_*), the POLY row's columns (ROW_*) and N_COLUMNS (where > 0 also
 * COLUMN_WIDTH and COLUMNS) before including it, and the element function invact_g (with invact_seg
 * where N_COLUMNS > 0) after it. Built and called by invact.table_c (-ffp-contract=off: no
 * FMA, so every operation rounds as the generated torch code's does). torch.exp/log/log1p/tanh are
 * invact_libm.h's (SLEEF's, as ATen's); torch.erf/atan/sinh/cosh/asinh the C library's scalar ones.
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

#include "invact_bf16.h"
#include "invact_libm.h"
#include "invact_pack.h"
#include "invact_threads.h"

#define INVACT_TABLE_ABI 4

static inline float invact_g(float y, int32_t code, const float *restrict thr, const float *restrict poly,
                             const double *restrict param, const float *restrict qb);

/* Elements go through g_loop in blocks of INVACT_BLOCK. Where the file defines N_COLUMNS > 0, the
 * POLY columns that vary with the segment (COLUMNS, N_COLUMNS x COLUMN_WIDTH float32 constants) are
 * selected per block first: invact_seg gives each element's segment, invact_columns the column
 * values (one permute per column and 8 or 16 elements where the ISA has it), and invact_g reads
 * column k of element i at qb[k * INVACT_BLOCK] (qb = the block's columns + i). */
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if N_COLUMNS
#define INVACT_BLOCK 128   /* 256 measured slower: its 1 KiB column stride aliases in the L1 cache */
static inline int32_t invact_seg(float y, int32_t code, const float *restrict thr, const double *restrict param);

/* qb[k * INVACT_BLOCK + i] = COLUMNS[k][s[i]] for i < m (s: INVACT_BLOCK segment indices) */
static void invact_columns(float *restrict qb, const int32_t *restrict s, int m) {
    for (int k = 0; k < N_COLUMNS; k++) {
        float *restrict q = qb + k * INVACT_BLOCK;
        int i = 0;
#if defined(__AVX512F__) && COLUMN_WIDTH == 16
        __m512 tab = _mm512_loadu_ps(COLUMNS[k]);
        for (; i + 16 <= m; i += 16)
            _mm512_storeu_ps(q + i, _mm512_permutexvar_ps(_mm512_loadu_si512((const void *)(s + i)), tab));
#endif
#if defined(__AVX2__) && COLUMN_WIDTH == 8
        __m256 tab8 = _mm256_loadu_ps(COLUMNS[k]);
        for (; i + 8 <= m; i += 8)
            _mm256_storeu_ps(q + i, _mm256_permutevar8x32_ps(tab8, _mm256_loadu_si256((const __m256i *)(s + i))));
#endif
#if defined(__AVX2__) && COLUMN_WIDTH == 16    /* two permutes and a blend on s > 7 */
        __m256 lo8 = _mm256_loadu_ps(COLUMNS[k]), hi8 = _mm256_loadu_ps(COLUMNS[k] + 8);
        for (; i + 8 <= m; i += 8) {
            __m256i si = _mm256_loadu_si256((const __m256i *)(s + i));
            __m256 high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(si, _mm256_set1_epi32(7)));
            _mm256_storeu_ps(q + i, _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo8, si),
                                                     _mm256_permutevar8x32_ps(hi8, si), high));
        }
#endif
        for (; i < m; i++) q[i] = COLUMNS[k][s[i]];
    }
}
#else
#define INVACT_BLOCK 256
#endif

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
    uint32_t bits = invact_bits(a);
    float m = invact_float((bits & 0x7FFFFFu) | 0x3F800000u);
    int32_t big = m >= (float)LOG_SQRT2;
    float e = (float)(((int32_t)bits >> 23) - 127 + big);
    float f = (big ? m * (float)0.5 : m) - (float)1.0;
    float z = f * f;
    float p = (float)poly[0];
#pragma GCC unroll 16
    for (int k = 1; k < (int)(sizeof poly / sizeof poly[0]); k++) p = p * f + (float)poly[k];
    float r = f * z * p;
    r = r + e * (float)LOG_LN2_LO;
    r = r - (float)0.5 * z;
    return (f + r) + e * (float)LOG_LN2_HI;
}

/* column j of segment s's POLY row (poly: POLY transposed), selected by a chain of blends over the
 * segments (vectorises without gathers, which some CPUs run one lane at a time: as Inductor's code,
 * invact.selection); the same value as the eager code's gather */
static inline float invact_col(const float *restrict poly, int j, int32_t s) {
    float v = poly[j * N_SEGMENTS];
#pragma GCC unroll 64
    for (int k = 1; k < N_SEGMENTS; k++) v = s == k ? poly[j * N_SEGMENTS + k] : v;
    return v;
}

/* invact.scheme.row: g of the POLY row of segment s at t */
static inline float invact_row(const float *restrict poly, int32_t s, float t, int degree, int den_degree) {
#define Q(j) invact_col(poly, (j), s)
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
int invact_table_eager_bits(void) { return EAGER_BITS; }

/* 1 where invact_table_grad computes 16-bit y itself: g is the eager code's bit for bit (so the lookup
 * table's entry), and no POLY column varies with the segment, so g costs a few vector operations an
 * element where a gather of the lookup costs ~1.7 cycles (AVX-512, Zen 4) */
int invact_table_direct16(void) { return EAGER_BITS && !N_COLUMNS; }

/* ---- the loops: g(y, code) * grad of float32 y, a lookup for 16-bit y, the forward code ---- */

enum { T_F32 = 0, T_BF16 = 1, T_F16 = 2, T_F64 = 3 };  /* element types (invact.table_c.DTYPES) */

typedef struct {
    int64_t n, lo, hi;                     /* all elements, and this job's range */
    int dtype;
    const void *y, *grad;
    void *out;
    const float *thr, *poly, *lut;         /* lut: invact_table_lut's table, else 0 */
    const uint8_t *code;
    const double *param;
} table_job;

/* c[j] = the code of element j of a block, (cd[j] >> shift) & mask (0 without a code): int32 before the
 * main loop, where a byte read would make it 32 or 64 lanes wide */
static inline void invact_block_codes(int32_t *restrict c, const uint8_t *restrict cd, int m, int shift) {
    for (int j = 0; j < m; j++) c[j] = CODE_BITS ? (cd[j] >> shift) & ((1 << CODE_BITS) - 1) : 0;
}

/* `poly` read from a local copy of POLY's rows from here on: a selected column's load cannot fault, so the
 * selections become blends of loop-invariant values */
#define INVACT_LOCAL_ROWS(poly)                              \
    float invact_rows_[ROW_LENGTH * N_SEGMENTS];             \
    memcpy(invact_rows_, (poly), sizeof invact_rows_);       \
    (poly) = invact_rows_

/* out[i] = g(y[i], code) * grad[i] for i in [lo, hi) of one bit plane, codes (cd[i - lo] >> shift) & mask;
 * restrict parameters: nothing the loop stores can change what it reads, so it vectorises (`omp simd`
 * with -fopenmp-simd: also through the segment selections' multi-way blends; no threads, no reordering
 * of any arithmetic) */
__attribute__((noinline)) static void g_loop(int64_t lo, int64_t hi, const float *restrict y, const float *restrict grad, float *restrict out,
                   const uint8_t *restrict cd, int shift, const float *restrict thr, const float *restrict poly,
                   const double *restrict param) {
    INVACT_LOCAL_ROWS(poly);
    int32_t c[INVACT_BLOCK];  /* the codes as int32 first: a byte read in the main loop would make it 32 */
#if N_COLUMNS                 /* or 64 lanes wide, four vectors a value: spills */
    float qb[N_COLUMNS * INVACT_BLOCK];
    int32_t sb[INVACT_BLOCK];
#else
    float qb[1] = {0.0f};                     /* unread: no POLY column varies with the segment */
#endif
    for (int64_t i = lo; i < hi; i += INVACT_BLOCK) {
        int m = (int)clamp_to(hi - i, INVACT_BLOCK);
        invact_block_codes(c, cd + (i - lo), m, shift);
#if N_COLUMNS
#pragma omp simd
        for (int j = 0; j < m; j++) sb[j] = invact_seg(y[i + j], c[j], thr, param);
        invact_columns(qb, sb, m);
#endif
#pragma omp simd
        for (int j = 0; j < m; j++) out[i + j] = invact_g(y[i + j], c[j], thr, poly, param, qb + j) * grad[i + j];
    }
}

/* bfloat16 NaN products as torch.mul(float32 g, bfloat16 grad, out=bfloat16) stores them (the eager
 * backward's): with ATen's AVX2 or AVX-512 kernels (this build's ISA is ATen's, invact.table_c) its
 * vectorised conversion's 0xFFFF on every element, tails included (measured, either capability); with
 * its baseline kernels c10::BFloat16's 0x7FC0 */
#if defined(__AVX2__)
#define INVACT_BF16_NAN 0xFFFFu
#else
#define INVACT_BF16_NAN 0x7FC0u
#endif

static inline uint16_t invact_bf16_round(float f) {  /* invact_float_to_bf16 with INVACT_BF16_NAN */
    uint16_t r = invact_float_to_bf16(f);
    return f != f ? (uint16_t)INVACT_BF16_NAN : r;
}

#if defined(__AVX2__)
/* the 16-bit lookup 8 elements at a time from lo (where the ISA has the conversions: float16 needs
 * F16C), the same values as the scalar loop below: a gather of g, the product in float, rounded to
 * nearest even as invact_bf16_round (NaN: INVACT_BF16_NAN) or vcvtps2ph. Returns where it stopped. */
static int64_t lut_vector(const table_job *jb, int64_t lo, int64_t hi, const uint8_t *code, int shift) {
    const uint16_t *y = jb->y, *grad = jb->grad;
    uint16_t *out = jb->out;
#if !defined(__F16C__)
    if (jb->dtype != T_BF16) return lo;
#endif
    const __m256i sh = _mm256_set1_epi32(shift), mask = _mm256_set1_epi32((1 << CODE_BITS) - 1);
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        __m256i idx = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(y + i)));
        if (CODE_BITS) {
            __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(code + (i - lo))));
            idx = _mm256_or_si256(idx, _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(c, sh), mask), 16));
        }
        __m256 g = _mm256_i32gather_ps(jb->lut, idx, 4);
        __m128i gh = _mm_loadu_si128((const __m128i *)(grad + i)), h;
        if (jb->dtype == T_BF16) {
            __m256 p = _mm256_mul_ps(g, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(gh), 16)));
            __m256i r = invact_bf16_avx2(p);
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
            h = _mm256_castsi256_si128(packed);
        } else {
#if defined(__F16C__)
            h = _mm256_cvtps_ph(_mm256_mul_ps(g, _mm256_cvtph_ps(gh)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
        }
        _mm_storeu_si128((__m128i *)(out + i), h);
    }
    return i;
}
#endif

#if !N_COLUMNS
/* ---- 16-bit y computed directly (invact_table_direct16): g of y as float32, the product rounded as
 * torch.mul, so the lookup table's values; bfloat16 NaN products as INVACT_BF16_NAN (float16 by
 * vcvtps2ph where F16C) ---- */
#define INVACT_BLOCK16 1024
/* float16's blocks: its passes (convert y, g, g * grad converted back) in blocks of 128 measured
 * 1.37-1.66x a plain product's time at 2^22 elements, one thread (Xeon, AVX-512; hardswish), against
 * 1.65-1.80 in blocks of 512 and 1.92-2.12 with g_loop's three passes in blocks of 1024; no faster for
 * bfloat16's one pass */
#define INVACT_BLOCK_F16 128

/* bfloat16: elements i0 .. i0 + m in one vectorised loop (its conversions are bit operations) */
__attribute__((noinline)) static void bf16_block(int64_t i0, int m, const uint16_t *restrict y,
                                                 const uint16_t *restrict grad, uint16_t *restrict out,
                                                 const uint8_t *restrict cd, int shift, const float *restrict thr,
                                                 const float *restrict poly, const double *restrict param) {
    INVACT_LOCAL_ROWS(poly);
    float qb[1] = {0.0f};  /* unread: no POLY column varies with the segment (as g_loop's) */
    int32_t c[INVACT_BLOCK16];
    invact_block_codes(c, cd, m, shift);
#pragma omp simd
    for (int j = 0; j < m; j++)
        out[i0 + j] = invact_bf16_round(invact_g(invact_bf16_to_float(y[i0 + j]), c[j], thr, poly, param, qb)
                                        * invact_bf16_to_float(grad[i0 + j]));
}

/* float16: y converted to a float32 block (16 at a time with AVX-512, 8 by F16C: the scalar conversions do
 * not vectorise), g of it in one vectorised loop (as bf16_block's), then g * grad converted back as grad is
 * read: the product as g_loop's (g first), so the lookup's values */
__attribute__((noinline)) static void f16_block(int64_t i0, int m, const uint16_t *restrict y,
                                                const uint16_t *restrict grad, uint16_t *restrict out,
                                                const uint8_t *restrict cd, int shift, const float *restrict thr,
                                                const float *restrict poly, const double *restrict param) {
    INVACT_LOCAL_ROWS(poly);
    float qb[1] = {0.0f};  /* unread: no POLY column varies with the segment (as g_loop's) */
    float yb[INVACT_BLOCK_F16], gb[INVACT_BLOCK_F16];
    int32_t c[INVACT_BLOCK_F16];
    int j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= m; j += 16)
        _mm512_storeu_ps(yb + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(y + i0 + j))));
#endif
#if defined(__F16C__)
    for (; j + 8 <= m; j += 8)
        _mm256_storeu_ps(yb + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(y + i0 + j))));
#endif
    for (; j < m; j++) yb[j] = invact_half_to_float(y[i0 + j]);
    invact_block_codes(c, cd, m, shift);
#pragma omp simd
    for (j = 0; j < m; j++) gb[j] = invact_g(yb[j], c[j], thr, poly, param, qb);
    j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= m; j += 16) {
        __m512 p = _mm512_mul_ps(_mm512_loadu_ps(gb + j),
                                 _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(grad + i0 + j))));
        _mm256_storeu_si256((__m256i *)(out + i0 + j), _mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
#if defined(__F16C__)
    for (; j + 8 <= m; j += 8) {
        __m256 p = _mm256_mul_ps(_mm256_loadu_ps(gb + j), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(grad + i0 + j))));
        _mm_storeu_si128((__m128i *)(out + i0 + j), _mm256_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
    for (; j < m; j++) out[i0 + j] = invact_float_to_half(gb[j] * invact_half_to_float(grad[i0 + j]));
}

static void g_loop16(const table_job *jb, int64_t lo, int64_t hi, const uint8_t *code, int shift) {
    const int block = jb->dtype == T_BF16 ? INVACT_BLOCK16 : INVACT_BLOCK_F16;
    for (int64_t i = lo; i < hi; i += block) {
        int m = (int)clamp_to(hi - i, block);
        (jb->dtype == T_BF16 ? bf16_block : f16_block)(i, m, jb->y, jb->grad, jb->out, code + (i - lo), shift,
                                                        jb->thr, jb->poly, jb->param);
    }
}
#endif

/* elements [lo, hi) of one bit plane: codes (code[k] >> shift) & mask from byte k of `code` */
static void table_plane(const table_job *jb, int64_t lo, int64_t hi, const uint8_t *code, int shift) {
    const int32_t mask = (1 << CODE_BITS) - 1;
    if (jb->lut) {                          /* 16-bit y: g = lut[code << 16 | bits of y], product in float */
        const uint16_t *y = jb->y, *grad = jb->grad;
        uint16_t *out = jb->out;
        int64_t first = lo;
#if defined(__AVX2__)
        first = lut_vector(jb, lo, hi, code, shift);
#endif
        for (int64_t i = first; i < hi; i++) {
            int32_t c = CODE_BITS ? (code[i - lo] >> shift) & mask : 0;
            float g = jb->lut[(int64_t)c << 16 | y[i]];
            out[i] = jb->dtype == T_BF16 ? invact_bf16_round(g * invact_bf16_to_float(grad[i]))
                                         : invact_float_to_half(g * invact_half_to_float(grad[i]));
        }
        return;
    }
#if !N_COLUMNS
    if (jb->dtype != T_F32) {  /* invact_table_grad takes 16-bit y only where invact_table_direct16 */
        g_loop16(jb, lo, hi, code, shift);
        return;
    }
#endif
    g_loop(lo, hi, jb->y, jb->grad, jb->out, code, shift, jb->thr, jb->poly, jb->param);
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

static int table_jobs(table_job base, int threads) {
    if (base.n < 0) return -1;
    int64_t step;
    int nt = split(base.n, MIN_PER_THREAD, threads, &step);
    table_job jobs[MAX_THREADS];
    for (int k = 0; k < nt; k++) {
        jobs[k] = base;
        jobs[k].lo = clamp_to(k * step, base.n);
        jobs[k].hi = clamp_to(jobs[k].lo + step, base.n);
    }
    spawn(table_run, jobs, sizeof(table_job), nt);
    return 0;
}

/* out = g(y, code) * grad for n contiguous elements of dtype (T_F32; T_BF16 or T_F16 where
 * invact_table_direct16: g of y as float32, the product rounded as torch.mul); code: invact.bitpack
 * planes of `bits` bits (CODE_BITS; none when 0); thr: the N_THRESHOLDS float32 y thresholds; poly:
 * POLY transposed (ROW_LENGTH x N_SEGMENTS floats); param: the N_PARAMS parameters. Returns 0, or -1
 * for arguments it does not take. */
int invact_table_grad(int dtype, int64_t n, const void *y, const void *grad, void *out, const uint8_t *code,
                      int bits, const float *thr, const float *poly, const double *param, int threads) {
    if (bits != CODE_BITS || (dtype != T_F32 && !((dtype == T_BF16 || dtype == T_F16) && invact_table_direct16())))
        return -1;
    return table_jobs((table_job){n, 0, 0, dtype, y, grad, out, thr, poly, 0, code, param}, threads);
}

/* the same for bfloat16 / float16 (dtype) y, grad and out, with g = lut[code << 16 | bits of y]
 * (2^CODE_BITS * 65536 floats: what the eager g_kernel gives), rounded as torch.mul(g, grad, out=out) */
int invact_table_lut(int dtype, int64_t n, const uint16_t *y, const uint16_t *grad, uint16_t *out,
                     const uint8_t *code, int bits, const float *lut, int threads) {
    if (bits != CODE_BITS || (dtype != T_BF16 && dtype != T_F16) || !lut) return -1;
    return table_jobs((table_job){n, 0, 0, dtype, y, grad, out, 0, 0, lut, code, 0}, threads);
}

/* ---- the forward code: the interval of x between the x thresholds, packed in invact.bitpack's planes ---- */

#define PACK_BLOCK 512

/* one block of the codes of m elements of x (contiguous, of dtype) into c: count the thresholds each
 * passes, one vectorised pass per threshold, then the count's code (NaN: nan_code) */
static void pack_block(const code_job *jb, int64_t e0, int m, uint8_t *restrict c) {
    float v[PACK_BLOCK];
    int32_t count[PACK_BLOCK], code[PACK_BLOCK];
    if (jb->dtype == T_F32) memcpy(v, (const float *)jb->x + e0, sizeof(float) * (size_t)m);
    else if (jb->dtype == T_BF16)
        for (int k = 0; k < m; k++) v[k] = invact_bf16_to_float(((const uint16_t *)jb->x)[e0 + k]);
    else
        for (int k = 0; k < m; k++) v[k] = invact_half_to_float(((const uint16_t *)jb->x)[e0 + k]);
    for (int k = 0; k < m; k++) count[k] = 0;
    for (int j = 0; j < jb->n_thr; j++) {    /* thresholds and x alike exact in float: x's own compares */
        float t = jb->thr[j];
        if ((jb->strict >> j) & 1) for (int k = 0; k < m; k++) count[k] += v[k] > t;
        else for (int k = 0; k < m; k++) count[k] += v[k] >= t;
    }
    for (int k = 0; k < m; k++) code[k] = jb->codes[0];
    for (int q = 1; q <= jb->n_thr; q++) {
        int32_t cq = jb->codes[q];
        for (int k = 0; k < m; k++) code[k] = count[k] == q ? cq : code[k];
    }
    for (int k = 0; k < m; k++) c[k] = (uint8_t)(v[k] != v[k] ? jb->nan_code : code[k]);
}

#if defined(__AVX2__)
/* acc[k] |= the code of element e0 + k shifted by `shift`, for a one-threshold code, 32 elements at a time
 * (float32 and bfloat16 x; the count done is returned, the rest left to the scalar loop): the scalar
 * loop's compares (`x > t` or `x >= t`, NaN apart: the same under flushed denormals), its codes
 * selected by blends and packed to bytes */
static int pack1_avx2(const code_job *jb, int64_t e0, int mm, int shift, uint8_t *restrict acc) {
    if (jb->dtype != T_F32 && jb->dtype != T_BF16) return 0;
    __m256 t = _mm256_set1_ps(jb->thr[0]);
    int strict = jb->strict & 1;
    __m256i c0 = _mm256_set1_epi32((uint8_t)(jb->codes[0] << shift)), c1 = _mm256_set1_epi32((uint8_t)(jb->codes[1] << shift)),
            cn = _mm256_set1_epi32((uint8_t)(jb->nan_code << shift)), zero = _mm256_setzero_si256();
    int k = 0;
    for (; k + 32 <= mm; k += 32) {
        __m256 v[4];
        if (jb->dtype == T_F32) {  /* elements 8i .. 8i + 7 */
            for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps((const float *)jb->x + e0 + k + 8 * i);
        } else {  /* bfloat16 as float32 bits: per 16, elements 0-3 and 8-11, then 4-7 and 12-15 */
            for (int i = 0; i < 2; i++) {
                __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)jb->x + e0 + k + 16 * i));
                v[2 * i] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, h));
                v[2 * i + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, h));
            }
        }
        __m256i code[4];
        for (int i = 0; i < 4; i++) {
            __m256 passed = strict ? _mm256_cmp_ps(v[i], t, _CMP_GT_OQ) : _mm256_cmp_ps(v[i], t, _CMP_GE_OQ);
            code[i] = _mm256_blendv_epi8(_mm256_blendv_epi8(c0, c1, _mm256_castps_si256(passed)), cn,
                                         _mm256_castps_si256(_mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q)));
        }
        /* to bytes: the packs interleave 128-bit lanes, a permute restores the order */
        __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(code[0], code[1]), _mm256_packs_epi32(code[2], code[3]));
        b = jb->dtype == T_F32 ? _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
                               : _mm256_permute4x64_epi64(b, 0xD8);
        __m256i *at = (__m256i *)(acc + k);
        _mm256_storeu_si256(at, _mm256_or_si256(_mm256_loadu_si256(at), b));
    }
    return k;
}
#endif

static void *pack_run(void *arg) {
    const code_job *jb = arg;
    int per = 8 / jb->bits;
    uint8_t c[PACK_BLOCK], acc[PACK_BLOCK];
    for (int64_t b = jb->lo; b < jb->hi; b += PACK_BLOCK) {
        int m = (int)clamp_to(jb->hi - b, PACK_BLOCK);
        memset(acc, 0, (size_t)m);
        for (int plane = 0; plane < per; plane++) {  /* element plane * nbytes + b lives in byte b */
            int64_t e0 = plane * jb->nbytes + b;
            int mm = (int)clamp_to(jb->n - e0, m);
            if (mm <= 0) break;
            int shift = plane * jb->bits;
            if (jb->n_thr == 1) {                         /* the common case in one pass: one threshold */
                float t = jb->thr[0];
                int strict = jb->strict & 1;
                uint8_t c0 = (uint8_t)jb->codes[0], c1 = (uint8_t)jb->codes[1], cn = (uint8_t)jb->nan_code;
                int k0 = 0;
#if defined(__AVX2__)
                k0 = pack1_avx2(jb, e0, mm, shift, acc);
#endif
#define PACK1(LOAD)                                                                                    \
    for (int k = k0; k < mm; k++) {                                                                    \
        float v = LOAD;                                                                                \
        acc[k] |= (uint8_t)((v != v ? cn : (strict ? v > t : v >= t) ? c1 : c0) << shift);            \
    }
                const uint16_t *restrict h = (const uint16_t *)jb->x + e0;
                if (jb->dtype == T_F32) PACK1(((const float *)jb->x)[e0 + k])
                else if (jb->dtype == T_BF16) PACK1(invact_bf16_to_float(h[k]))
                else PACK1(invact_half_to_float(h[k]))
#undef PACK1
                continue;
            }
            pack_block(jb, e0, mm, c);
            for (int k = 0; k < mm; k++) acc[k] |= (uint8_t)(c[k] << shift);
        }
        memcpy(jb->packed + b, acc, (size_t)m);
    }
    return 0;
}

/* the forward code of n contiguous x of dtype (T_F32, T_BF16, T_F16), as invact.cpu_kernel's
 * invact_pack_code but portable (invact_pack.h's pack_jobs) */
int invact_table_pack(int dtype, int64_t n, const void *x, int n_thr, const float *thr, int strict,
                      const int32_t *codes, int nan_code, int bits, uint8_t *packed, int threads) {
    return pack_jobs(pack_run, dtype, n, x, n_thr, thr, strict, codes, nan_code, bits, packed, threads);
}

#endif
