/* The compiled CPU backend's kernels (AVX-512): out = g(y, code) * grad by two routes, and the
 * forward's packed branch code.
 *
 * invact_poly_grad: tables of polynomial pieces, float32/bfloat16/float16 y. Evaluates
 * docs/table-format.md's float32 scheme: without FMA, with the operations of the generated torch code
 * (g_kernel) in the same order and with the same roundings, so its results are those of the eager
 * backend bit for bit; or the FMA scheme (its steps one vfmadd each), the per-table C kernels' fmaf
 * build bit for bit. Only the selection of each element's table row differs: a binary search over
 * the class's slots (or a count of thresholds passed), then one permute per column (vpermps up to 16
 * segments, vpermt2ps up to 32) where Inductor's code blends every coefficient over every segment.
 *
 * invact_lut_grad: any table, bfloat16/float16 y: g of every 16-bit y and code, computed once by
 * the eager g_kernel (invact.ops), gathered per element.
 *
 * invact_pack_code: the code of each x (the interval between the forward thresholds), packed in
 * invact.bitpack's planes, as the generated code_packed. invact_forward_code: the same and, in the
 * same pass over x, y by PyTorch's own forward where its kernels are reproduced here (ATen's hardswish,
 * silu, gelu in both forms, mish, and quick_gelu's x * sigmoid(1.702 x) as its three ops; oneDNN's gelu).
 *
 * Built and loaded by invact.cpu_kernel, which fills invact_table and the lookup tables.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "invact_bf16.h"
#include "invact_pack.h"
#include "invact_threads.h"
#include "invact_torch_math.h"

#include "invact_poly.h"

int invact_abi_version(void) { return ABI_VERSION; }

static inline __m512 set(float v) { return _mm512_set1_ps(v); }

/* Every step works on U independent vectors of 16 elements: the scheme is a chain of dependent
 * multiply-adds (two Horner loops), and interleaving U chains hides their latency. */
#define U 4
#define EACH(v) for (int v = 0; v < U; v++)

/* torch.clamp_min / clamp, as ATen computes them: vmaxps/vminps return their second operand where
 * either is NaN or both are zeros, so NaN stays NaN and -0.0 stays -0.0 */
static inline __m512 at_least(__m512 v, float lo) { return _mm512_max_ps(set(lo), v); }

static inline __m512 clamp1(__m512 v) { return _mm512_min_ps(set(1.0f), _mm512_max_ps(set(-1.0f), v)); }

#include "invact_poly_transform.h"

/* global segment index: count of the class's thresholds that y passes plus its first segment; the
 * class is the last whose code matches (the first class where none does), as the generated code's
 * wheres. y >= t exactly when (y + 0) - t is +0 or positive (a difference of floats is 0 only when
 * they are equal, and y + 0 turns -0 into +0, since -0 - +0 is -0); y > t exactly when t - y is
 * negative or -0 (t + 0 is never -0): each threshold costs a subtraction and a shift instead of a
 * mask compare (which competes with the permutes for one port). With denormals flushed a subnormal y
 * reads as 0 and a flushed difference keeps its sign, as a compare would. NaN y gets any index and
 * is replaced by NaN at the end */
static inline void segment_by_count(const invact_table *t, const __m512 y[U], const __m512i code[U], __m512i s[U]) {
    __m512 yz[U];
    EACH(v) yz[v] = _mm512_add_ps(y[v], _mm512_setzero_ps());
    EACH(v) s[v] = _mm512_setzero_si512();
    for (int c = 0; c < t->n_classes; c++) {
        int count = t->class_count[c] - 1, strict = 0;
        const float *thr = t->thresholds + t->class_threshold[c];
        const int32_t *is_strict = t->strict + t->class_threshold[c];
        for (int j = 0; j < count; j++) strict += is_strict[j] != 0;
        __m512i sc[U];
        EACH(v) sc[v] = _mm512_set1_epi32(t->class_first[c] + count - strict);
        for (int j = 0; j < count; j++) {
            __m512 tj = set(thr[j] + 0.0f);
            if (is_strict[j]) {
                EACH(v) sc[v] = _mm512_add_epi32(
                    sc[v], _mm512_srli_epi32(_mm512_castps_si512(_mm512_sub_ps(tj, y[v])), 31));
                continue;
            }
            EACH(v) {
                __m512i negative = _mm512_srli_epi32(_mm512_castps_si512(_mm512_sub_ps(yz[v], tj)), 31);
                sc[v] = _mm512_sub_epi32(sc[v], negative);
            }
        }
        __m512i cc = _mm512_set1_epi32(t->class_code[c]);
        EACH(v) s[v] = c == 0 ? sc[v] : _mm512_mask_mov_epi32(s[v], _mm512_cmpeq_epi32_mask(code[v], cc), sc[v]);
    }
}

/* each lane's entry of a by-code table: a blend where codes are one bit (odd: the lanes of code 1),
 * else a permute by min(code, 16); one_bit a constant where inlined */
static inline __m512i by_code(int one_bit, const int32_t *table, __m512i code, __mmask16 odd) {
    if (one_bit) return _mm512_mask_blend_epi32(odd, _mm512_set1_epi32(table[0]), _mm512_set1_epi32(table[1]));
    return _mm512_permutex2var_epi32(_mm512_loadu_si512(table), _mm512_min_epu32(code, _mm512_set1_epi32(16)),
                                     _mm512_loadu_si512(table + 16));
}

/* the same by binary search (search_levels > 0): the class's first slot from its code, then one
 * permute, compare and masked add per level. A strict threshold t (`y > t`) is there as the float after
 * t, `y >= t'` being the same for every y (search_layout declines t = 0, where a compare with denormals
 * flushed would read t' as 0, and a subnormal t); padding is NaN, never passed. With denormals flushed
 * the compare reads a subnormal y as 0, as torch's does. NaN y passes none. Slots index the columns. */
static inline __attribute__((always_inline)) void segment_by_search(const invact_table *t, int one_bit, int narrow,
                                                                    const __m512 y[U], const __m512i code[U],
                                                                    const __mmask16 odd[U], __m512i s[U]) {
    EACH(v) s[v] = by_code(one_bit, t->slot_of_code, code[v], odd[v]);
    for (int l = 0; l < t->search_levels; l++) {
        __m512 lo = _mm512_loadu_ps(t->level_thr[l]), hi = _mm512_loadu_ps(t->level_thr[l] + 16);
        __m512i step = _mm512_set1_epi32(1 << (t->search_levels - 1 - l));
        EACH(v) {
            __m512 level = narrow ? _mm512_permutexvar_ps(s[v], lo) : _mm512_permutex2var_ps(lo, s[v], hi);
            __mmask16 passed = _mm512_cmp_ps_mask(y[v], level, _CMP_GE_OQ);
            s[v] = _mm512_mask_add_epi32(s[v], passed, s[v], step);
        }
    }
}

static inline __attribute__((always_inline)) void segment(const invact_table *t, int one_bit, int narrow,
                                                          const __m512 y[U], const __m512i code[U],
                                                          const __mmask16 odd[U], __m512i s[U]) {
    if (t->search_levels) {
        segment_by_search(t, one_bit, narrow, y, code, odd, s);
        return;
    }
    __m512i c[U];  /* one-bit codes come as masks: their values for the count */
    EACH(v) c[v] = one_bit ? _mm512_maskz_mov_epi32(odd[v], _mm512_set1_epi32(1)) : code[v];
    segment_by_count(t, y, c, s);
}

/* column j of each element's row: one permute over up to 32 segments (narrow: up to 16, by the
 * one-register permute, which leaves its operands alone: the two-register one overwrites its table,
 * and keeping that for the next vector cost a register copy each, ~8 % of the kernel in cache) */
static inline __attribute__((always_inline)) void column(const invact_table *t, int narrow, int j, const __m512i s[U],
                                                         __m512 out[U]) {
    __m512 lo = _mm512_loadu_ps(t->columns[j]), hi = _mm512_loadu_ps(t->columns[j] + 16);
    EACH(v) out[v] = narrow ? _mm512_permutexvar_ps(s[v], lo) : _mm512_permutex2var_ps(lo, s[v], hi);
}

/* p * u + c, one rounding where fused (the FMA scheme's steps: docs/table-format.md), else two */
static inline __m512 mul_add(int fused, __m512 p, __m512 u, __m512 c) {
    return fused ? _mm512_fmadd_ps(p, u, c) : _mm512_add_ps(_mm512_mul_ps(p, u), c);
}

/* g of U vectors of y (lanes live), codes as vectors or, one_bit, as masks (odd); u clamped where
 * `clamp` (t->clamp_sides != 0); the flags constants where inlined */
static inline __attribute__((always_inline)) void g_block(const invact_table *t, int fused, int one_bit, int nan_blend,
                                                          int clamp, int narrow,
                                                          const __m512 y[U], const __m512i code[U], const __mmask16 odd[U],
                                                          const __mmask16 live[U], __m512 g[U]) {
    __m512i s[U];
    __m512 tv[U], q[U], q2[U], u[U], p[U];
    segment(t, one_bit, narrow, y, code, odd, s);
    if (t->n_transforms == 1) {
        transform(t, 0, y, tv);
    } else if (t->n_transforms == 2 && t->transform_kind[0] + t->transform_kind[1] == IDENTITY + SQRT) {
        /* one identity and one sqrt (kinds are 0 .. 2), every fitted built-in's: straight-line (the
         * loop below kept tv in memory across its iterations, ~7 % of silu's kernel) */
        int i = t->transform_kind[0] == SQRT ? 0 : 1;
        __m512 ti[U];
        column(t, narrow, COL_TID, s, q);
        root(t, i, y, ti);
        EACH(v) tv[v] = _mm512_mask_blend_ps(_mm512_mask_cmp_ps_mask(live[v], q[v], set((float)i), _CMP_EQ_OQ),
                                             y[v], ti[v]);
    } else {  /* the transform of each element's row (the identity: tv is y until another transform's
               * lanes are blended in); a log (~25 operations a vector) is skipped where no live element
               * has it, a sqrt is not (the test measured dearer than the sqrt) */
        EACH(v) tv[v] = y[v];
        column(t, narrow, COL_TID, s, q);
        for (int i = 0; i < t->n_transforms; i++) {
            if (t->transform_kind[i] == IDENTITY) continue;
            __mmask16 has[U], any = 0;
            EACH(v) has[v] = _mm512_mask_cmp_ps_mask(live[v], q[v], set((float)i), _CMP_EQ_OQ);
            if (t->transform_kind[i] == LOG) {
                EACH(v) any |= has[v];
                if (!any) continue;
            }
            __m512 ti[U];
            transform(t, i, y, ti);
            EACH(v) tv[v] = _mm512_mask_blend_ps(has[v], tv[v], ti[v]);
        }
    }
    column(t, narrow, COL_CENTER, s, q);
    column(t, narrow, COL_SCALE, s, q2);
    EACH(v) {
        u[v] = _mm512_mul_ps(_mm512_sub_ps(tv[v], q[v]), q2[v]);
        if (clamp) u[v] = clamp1(u[v]);
    }
    column(t, narrow, COL_C0_LO + t->degree, s, p);
    for (int j = t->degree - 1; j >= 1; j--) {
        column(t, narrow, COL_C0_LO + j, s, q);
        EACH(v) p[v] = mul_add(fused, p[v], u[v], q[v]);
    }
    column(t, narrow, COL_C0_LO, s, q);
    column(t, narrow, COL_C0_HI, s, q2);
    EACH(v) {
        g[v] = _mm512_add_ps(mul_add(fused, p[v], u[v], q[v]), q2[v]);
        if (nan_blend)  /* NaN y: g = y (else the steps carried y's NaN there: see nan_blend) */
            g[v] = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y[v], y[v], _CMP_UNORD_Q), g[v], y[v]);
    }
}

/* whether every segment index the kernel forms is below 16 (column's one-register permute) */
static int narrow(const invact_table *t) { return index_bound(t) <= 16; }

/* 16 two-byte and 16 one-byte elements from p (lanes m, 0 elsewhere): unmasked where every lane is
 * (Zen 4 takes an unmasked load faster), as in load and store */
static inline __m256i load16x2(const void *p, __mmask16 m) {
    return m == 0xFFFF ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(m, p);
}

static inline __m128i load16x1(const uint8_t *p, __mmask16 m) {
    return m == 0xFFFF ? _mm_loadu_si128((const __m128i *)p) : _mm_maskz_loadu_epi8(m, p);
}

static inline __m512 load(int dtype, const void *p, int64_t i, __mmask16 m) {
    if (dtype == F32)
        return m == 0xFFFF ? _mm512_loadu_ps((const float *)p + i) : _mm512_maskz_loadu_ps(m, (const float *)p + i);
    __m256i h = load16x2((const uint16_t *)p + i, m);
    if (dtype == F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* v rounded to dtype as ATen's vectorised conversions (round to nearest even; NaN -> 0xFFFF in
 * bfloat16, vcvtps2ph in float16) and back to float32: what an op stores between ops */
static inline __m512 round_as(int dtype, __m512 v) {
    if (dtype == F32) return v;
    if (dtype == F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return _mm512_castsi512_ps(_mm512_slli_epi32(invact_bf16_avx512(v), 16));
}

/* v stored in dtype, rounded as round_as */
static inline void store(int dtype, void *p, int64_t i, __mmask16 m, __m512 v) {
    if (dtype == F32) {  /* masked where every lane is too: unmasked (a test of m) measured 25 % slower */
        _mm512_mask_storeu_ps((float *)p + i, m, v);
        return;
    }
    __m256i h = dtype == F16 ? _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                             : _mm512_cvtepi32_epi16(invact_bf16_avx512(v));
    if (m == 0xFFFF) _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), h);
    else _mm256_mask_storeu_epi16((uint16_t *)p + i, m, h);
}

typedef struct {
    const invact_table *table;
    int dtype, bits, fused, nan_blend;     /* fused: the FMA scheme; nan_blend: nan_blend(table) */
    int narrow;                            /* narrow(table) */
    int64_t n, lo, hi;                     /* all elements, and this job's range */
    const void *y, *grad;
    void *out;
    const uint8_t *code;
    const float *lut;                      /* invact_lut_grad's table, else 0 */
} job;

static inline __mmask16 lanes(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

/* the codes of the m lanes whose bytes start at p: (byte >> shift) & mask; 0 without a code */
static inline __m512i codes16(int bits, const uint8_t *p, __mmask16 m, __m512i shift, __m512i mask) {
    if (!bits) return _mm512_setzero_si512();
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(load16x1(p, m)), shift), mask);
}

/* the same for one-bit codes, as the mask of the m lanes whose byte has `bit` set */
static inline __mmask16 odd16(const uint8_t *p, __mmask16 m, __m128i bit) {
    return _mm_mask_test_epi8_mask(m, load16x1(p, m), bit);
}

/* elements [lo, hi) of one bit plane: codes (code[b] >> shift) & mask from byte b = first + k, one-bit
 * codes as the mask of their lanes; the flags (g_block's) constants where inlined */
static inline __attribute__((always_inline)) void run_plane_scheme(const job *jb, int fused, int one_bit, int blend,
                                                                   int clamp, int64_t lo, int64_t hi,
                                                                   const uint8_t *code, int shift) {
    __m512i mask = _mm512_set1_epi32((1 << jb->bits) - 1), sh = _mm512_set1_epi32(shift);
    __m128i bit = _mm_set1_epi8((char)(1 << shift));
    for (int64_t i = lo; i < hi; i += 16 * U) {
        __mmask16 m[U], odd[U];
        __m512 y[U], g[U];
        __m512i c[U];
        EACH(v) {
            int64_t at = i + 16 * v;
            m[v] = lanes(hi - at);
            y[v] = load(jb->dtype, jb->y, at, m[v]);
            if (one_bit) odd[v] = odd16(code + (at - lo), m[v], bit);
            else c[v] = codes16(jb->bits, code + (at - lo), m[v], sh, mask);
        }
        g_block(jb->table, fused, one_bit, blend, clamp, jb->narrow, y, c, odd, m, g);
        EACH(v) {
            __m512 grad = load(jb->dtype, jb->grad, i + 16 * v, m[v]);
            store(jb->dtype, jb->out, i + 16 * v, m[v], _mm512_mul_ps(g[v], grad));
        }
    }
}

/* each combination of the flags, inlined with its constants */
#define PLANE(k) case k: run_plane_scheme(jb, k >> 3 & 1, k >> 2 & 1, k >> 1 & 1, k & 1, lo, hi, code, shift); break

static void run_plane(const job *jb, int64_t lo, int64_t hi, const uint8_t *code, int shift) {
    switch (jb->fused << 3 | (jb->bits == 1) << 2 | jb->nan_blend << 1 | (jb->table->clamp_sides != 0)) {
        PLANE(0); PLANE(1); PLANE(2); PLANE(3); PLANE(4); PLANE(5); PLANE(6); PLANE(7);
        PLANE(8); PLANE(9); PLANE(10); PLANE(11); PLANE(12); PLANE(13); PLANE(14); PLANE(15);
    }
}

/* the same for invact_lut_grad: g = lut[code << 16 | bits of y]; one-bit codes by a masked or.
 * `count` vectors from element i (lanes m[v]), every index first and then every gather, which
 * overlap; one_bit and count constants where inlined */
#define LUT_U 4
static inline __attribute__((always_inline)) void lut_vectors(const job *jb, int one_bit, int count, int64_t i,
                                                              const __mmask16 *m, const uint8_t *code, int shift) {
    __m512i idx[LUT_U], sh = _mm512_set1_epi32(shift), mask = _mm512_set1_epi32((1 << jb->bits) - 1);
    __m512 g[LUT_U];
    for (int v = 0; v < count; v++) {
        idx[v] = _mm512_cvtepu16_epi32(load16x2((const uint16_t *)jb->y + i + 16 * v, m[v]));
        if (one_bit)
            idx[v] = _mm512_mask_or_epi32(idx[v], odd16(code + 16 * v, m[v], _mm_set1_epi8((char)(1 << shift))),
                                          idx[v], _mm512_set1_epi32(1 << 16));
        else
            idx[v] = _mm512_or_si512(idx[v], _mm512_slli_epi32(codes16(jb->bits, code + 16 * v, m[v], sh, mask), 16));
    }
    for (int v = 0; v < count; v++) g[v] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m[v], idx[v], jb->lut, 4);
    for (int v = 0; v < count; v++)
        store(jb->dtype, jb->out, i + 16 * v, m[v], _mm512_mul_ps(g[v], load(jb->dtype, jb->grad, i + 16 * v, m[v])));
}

static inline __attribute__((always_inline)) void run_plane_lut_as(const job *jb, int one_bit, int64_t lo, int64_t hi,
                                                                   const uint8_t *code, int shift) {
    __mmask16 full[LUT_U];
    for (int v = 0; v < LUT_U; v++) full[v] = 0xFFFF;
    int64_t i = lo;
    for (; i + 16 * LUT_U <= hi; i += 16 * LUT_U) lut_vectors(jb, one_bit, LUT_U, i, full, code + (i - lo), shift);
    for (; i < hi; i += 16) {
        __mmask16 m = lanes(hi - i);
        lut_vectors(jb, one_bit, 1, i, &m, code + (i - lo), shift);
    }
}

static void run_plane_lut(const job *jb, int64_t lo, int64_t hi, const uint8_t *code, int shift) {
    if (jb->bits == 1) run_plane_lut_as(jb, 1, lo, hi, code, shift);
    else run_plane_lut_as(jb, 0, lo, hi, code, shift);
}

static void *run_job(void *arg) {
    const job *jb = arg;
    void (*plane_fn)(const job *, int64_t, int64_t, const uint8_t *, int) = jb->lut ? run_plane_lut : run_plane;
    if (!jb->bits) {
        plane_fn(jb, jb->lo, jb->hi, jb->code, 0);
        return 0;
    }
    int64_t per = 8 / jb->bits, nbytes = (jb->n + per - 1) / per;  /* invact.bitpack's planar layout */
    for (int64_t i = jb->lo; i < jb->hi;) {
        int64_t plane = i / nbytes, end = clamp_to((plane + 1) * nbytes, jb->hi);
        plane_fn(jb, i, end, jb->code + (i - plane * nbytes), (int)(plane * jb->bits));
        i = end;
    }
    return 0;
}

/* the gradient kernels over [0, n), split into whole vectors over up to `threads` threads */
static int run_jobs(job base, int threads) {
    if (base.dtype < F32 || base.dtype > F16 || base.n < 0 ||
        (base.bits != 0 && base.bits != 1 && base.bits != 2 && base.bits != 4 && base.bits != 8))
        return -1;
    int64_t step;
    int nt = split(base.n, MIN_PER_THREAD, threads, &step);
    job jobs[MAX_THREADS];
    for (int k = 0; k < nt; k++) {
        jobs[k] = base;
        jobs[k].lo = clamp_to(k * step, base.n);
        jobs[k].hi = clamp_to(jobs[k].lo + step, base.n);
    }
    spawn(run_job, jobs, sizeof(job), nt);
    return 0;
}

/* out = g(y, code) * grad for n contiguous elements of dtype; code: invact.bitpack planes of bits
 * bits (bits 0: no code); fused: the FMA scheme, else the scheme without FMA (the eager code's bits).
 * Returns 0, or -1 for arguments it does not take. */
int invact_poly_grad(const invact_table *table, int dtype, int64_t n, const void *y, const void *grad,
                     void *out, const uint8_t *code, int bits, int threads, int fused) {
    if (!poly_table_taken(table)) return -1;
    return run_jobs((job){table, dtype, bits, fused != 0, nan_blend(table), narrow(table), n, 0, 0, y, grad, out, code, 0},
                    threads);
}

/* the same with g from lut[code << 16 | bits of y] (2^bits * 65536 floats) for 16-bit dtypes */
int invact_lut_grad(const float *lut, int dtype, int64_t n, const void *y, const void *grad, void *out,
                    const uint8_t *code, int bits, int threads) {
    if (dtype == F32) return -1;
    return run_jobs((job){0, dtype, bits, 0, 0, 0, n, 0, 0, y, grad, out, code, lut}, threads);
}

/* ---- forward: the code, and y with it ---- */

/* the code of 16 x: the interval between the thresholds that x lies in, NaN's own code for NaN */
static inline __m512i code16(const code_job *jb, __m512 x, __m512i codes, __m512i nan_code) {
    __m512i count = _mm512_setzero_si512(), one = _mm512_set1_epi32(1);
    for (int j = 0; j < jb->n_thr; j++) {
        __mmask16 passed = (jb->strict >> j) & 1 ? _mm512_cmp_ps_mask(x, set(jb->thr[j]), _CMP_GT_OQ)
                                                 : _mm512_cmp_ps_mask(x, set(jb->thr[j]), _CMP_GE_OQ);
        count = _mm512_mask_add_epi32(count, passed, count, one);
    }
    __m512i c = _mm512_permutexvar_epi32(count, codes);
    return _mm512_mask_mov_epi32(c, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), nan_code);
}

/* PyTorch's forwards whose vectorised ATen kernels (AVX-512) this reproduces operation for operation,
 * so y is theirs bit for bit wherever ATen runs its vector code (all but the last n % 32 (float32) or
 * n % 64 (16-bit) elements of each of its threads' ranges, which invact.cpu_kernel recomputes with
 * PyTorch itself): 16-bit x computed in float32 and rounded as ATen's conversions (store) */
enum { FWD_NONE = 0, FWD_HARDSWISH = 1, FWD_SILU = 2, FWD_GELU = 3, FWD_QUICK_GELU = 4,  /* NONE: the code alone */
       FWD_GELU_ONEDNN = 5,        /* GELU as oneDNN's JIT eltwise (avx512_core), which ATen calls where it may */
       FWD_GELU_TANH = 6,          /* GELU's tanh form */
       FWD_MISH = 7,
       FWD_GELU_ONEDNN_INSN = 8 }; /* oneDNN's, bfloat16 stored by vcvtneps2bf16 (chosen here, not by callers) */

/* v stored as bfloat16 as oneDNN stores it. On avx512_core_bf16 by vcvtneps2bf16 (round to nearest even
 * whatever MXCSR says, subnormals to a signed zero, NaN quieted and truncated), where the compiler knows
 * the instruction; on avx512_core without it by oneDNN's emulation (bf16_emulation_t: round to nearest
 * even by integer adds, subnormals rounded as any value, NaN quieted and truncated), store_bf16_onednn.
 * A CPU with the instruction and a compiler without it: invact_forward_code declines bfloat16 for
 * FWD_GELU_ONEDNN (what oneDNN stores there is not reproduced). */
#include <cpuid.h>
static int cpu_has_bf16_insn(void) {  /* CPUID.(EAX=7, ECX=1):EAX bit 5, AVX512_BF16; asked once (a VM */
    static int known = -1;               /* may trap CPUID), threads racing to ask get the same answer */
    if (known < 0) {
        unsigned a, b, c, d;
        known = __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1);
    }
    return known;
}

#if defined(__clang__) ? __clang_major__ >= 9 : (defined(__GNUC__) && __GNUC__ >= 10)
#define BF16_INSN 1
__attribute__((target("avx512bf16"))) static inline void store_bf16_by_insn(void *p, int64_t i, __mmask16 m, __m512 v) {
    _mm256_mask_storeu_epi16((uint16_t *)p + i, m, (__m256i)_mm512_cvtneps_pbh(v));
}
#define HAVE_BF16_INSN 1
#else
#define HAVE_BF16_INSN 0
#endif

static inline void store_bf16_onednn(void *p, int64_t i, __mmask16 m, __m512 v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), b, _mm512_set1_epi32(0x400000));
    __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
    if (m == 0xFFFF) _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), h);
    else _mm256_mask_storeu_epi16((uint16_t *)p + i, m, h);
}

/* the lanes of elements e .. e + 15 in the second half of ATen's 32-element steps, counted from the start
 * of its range (of length chunk): where its loops' operand order, and so a product's NaN, differs */
static inline __mmask16 second_halves(const code_job *jb, int64_t e) {
    __mmask16 second = 0;
    for (int l = 0; l < 16; l++)
        second |= (__mmask16)((((e + l) % jb->chunk) & 31) >= 16) << l;
    return second;
}

/* y of 16 x (elements e .. e + 15, NaN in lanes nan) by the formula `kind` (a constant where inlined) */
static inline __attribute__((always_inline)) __m512 forward16(const code_job *jb, int kind, int dtype, __m512 x,
                                                              __mmask16 nan, int64_t e) {
    if (kind == FWD_HARDSWISH) {  /* x * minimum(maximum(x + 3, 0), 6) / 6: vec::maximum and minimum */
        __m512 six = set(6.0f);  /* differ from the instructions only where x is NaN (all ones, c below) */
        __m512 p = _mm512_mul_ps(x, _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(x, set(3.0f)), set(0.0f)), six));
        if (nan) {  /* x * c of two NaNs: whichever operand the compiler put first. ATen's float32 loop */
            /* answers c's in the first vector of each pair (from its range's start) */
            __mmask16 first = dtype == F32 ? (__mmask16)~second_halves(jb, e) : 0;
            __m512 ones = _mm512_castsi512_ps(_mm512_set1_epi32(-1));
            __m512 quiet = _mm512_or_ps(x, _mm512_castsi512_ps(_mm512_set1_epi32(0x400000)));
            p = _mm512_mask_blend_ps(nan, p, _mm512_mask_blend_ps(first, quiet, ones));  /* else x's, quieted */
        }
        return _mm512_div_ps(p, six);
    }
    if (kind == FWD_SILU)  /* x / (1 + exp(-x)) */
        return _mm512_div_ps(x, _mm512_add_ps(set(1.0f), sleef_exp16(negate(x))));
    if (kind == FWD_QUICK_GELU) {  /* x * sigmoid(1.702 * x): three ATen ops, each result in x's dtype; */
        __m512 t = round_as(dtype, _mm512_mul_ps(x, set(1.702f)));  /* the scalar as a float, sigmoid */
        __m512 s = _mm512_div_ps(set(1.0f), _mm512_add_ps(set(1.0f), sleef_exp16(negate(t))));  /* (1 + exp(-t))^-1 */
        __m512 y = mul_src1(round_as(dtype, s), x);  /* of two NaNs s's, as ATen's float32 loop */
        if (dtype == F32 || !nan) return y;                 /* here; its 16-bit loops give x's, quieted */
        return _mm512_mask_blend_ps(nan, y, _mm512_or_ps(x, _mm512_castsi512_ps(_mm512_set1_epi32(0x400000))));
    }
    if (kind == FWD_GELU_ONEDNN || kind == FWD_GELU_ONEDNN_INSN) return onednn_gelu16(x);
    if (kind == FWD_GELU_TANH) return aten_gelu_tanh16(x, dtype != F32);
    if (kind == FWD_MISH) {  /* NaN lanes: which operand's NaN, by the lane's place in ATen's 32-steps */
        __mmask16 second = nan && dtype != BF16 ? second_halves(jb, e) : 0;
        return aten_mish16(x, (__mmask16)(nan & (dtype == BF16 ? 0xFFFF : dtype == F32 ? second : ~second)));
    }
    /* GELU: x * 0.5 * (1 + erf(x * M_SQRT1_2)) */
    __m512 erf = aten_erf16(_mm512_mul_ps(x, set(0.70710678118654752440f)));
    return mul_src1(_mm512_mul_ps(x, set(0.5f)), _mm512_add_ps(set(1.0f), erf));  /* NaN x: x's, as ATen's */
}

/* bytes of code a step: each plane's x and y in runs of as many elements, the step's code in a buffer
 * of as many bytes (forward_buffer; a small one on the stack where malloc fails). Runs of 64 K elements measured
 * 1.22-1.33x ATen's hardswish at 2^22 float32, one thread (each switch of plane restarts the
 * prefetchers), 128 K 1.11-1.13, 512 K 1.01-1.10; whole planes with the code or-ed into the output
 * plane after plane 1.38-1.45 (the code re-read from beyond L2) */
#define FORWARD_CHUNK 524288
#define FORWARD_CHUNK_STACK 16384

/* the bits of a one-bit code from one threshold, by one compare: x > t is x >= the float after t
 * (for t finite and not near 0, where flushed denormals would read the neighbour as 0); `x >= t`
 * answers NaN 0, `!(x < t)` 1: the one that, inverted where the code of passing is 0, gives NaN's code */
typedef struct { __m512 thr; int unordered; uint64_t invert; } bit_code;

static inline int bit_code_of(const code_job *jb, bit_code *k) {
    float t = jb->thr[0];
    int passed = jb->codes[1], failed = jb->codes[0];
    if (jb->bits != 1 || jb->n_thr != 1 || passed == failed) return 0;
    if (jb->strict & 1) {
        if (!isfinite(t) || fabsf(t) < 2 * FLT_MIN) return 0;
        t = nextafterf(t, INFINITY);
    }
    *k = (bit_code){set(t), (jb->nan_code != 0) != (passed == 0), passed ? 0 : ~0ull};
    return 1;
}

/* the compare's lanes (the code bits before inverting), `unordered` a constant where inlined */
static inline __mmask16 bits16(const bit_code *k, int unordered, __m512 x) {
    return unordered ? _mm512_cmp_ps_mask(x, k->thr, _CMP_NLT_UQ) : _mm512_cmp_ps_mask(x, k->thr, _CMP_GE_OQ);
}

/* y of elements e .. e + 15 (lanes m), x loaded; nothing for the code alone */
static inline __attribute__((always_inline)) void y_step(const code_job *jb, int kind, int dtype, int64_t e,
                                                         __mmask16 m, __m512 x) {
    if (kind == FWD_NONE) return;
    __m512 y = forward16(jb, kind, dtype, x, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), e);
#ifdef BF16_INSN
    if (kind == FWD_GELU_ONEDNN_INSN) {
        store_bf16_by_insn(jb->y, e, m, y);
        return;
    }
#endif
    if (kind == FWD_GELU_ONEDNN && dtype == BF16) {  /* a CPU without vcvtneps2bf16 (run_forward_job) */
        store_bf16_onednn(jb->y, e, m, y);
        return;
    }
    store(dtype, jb->y, e, m, y);
}

/* elements e .. e + 15 (lanes m) of a plane: y, and x for their code (as forward_job keeps it) */
static inline __attribute__((always_inline)) __m512 forward_step(const code_job *jb, int kind, int dtype, int64_t e,
                                                                 __mmask16 m) {
    __m512 x = load(dtype, jb->x, e, m);
    y_step(jb, kind, dtype, e, m, x);
    return x;
}

static inline uint64_t lanes64(int64_t left) { return left >= 64 ? ~0ull : left <= 0 ? 0 : (1ull << left) - 1; }

/* 16 elements of a one-bit code: the compare's lanes (before y, so that x need not stay live through y's steps) */
static inline __attribute__((always_inline)) __mmask16 bits_step(const code_job *jb, int kind, int dtype, int64_t e,
                                                                 __mmask16 m, const bit_code *k, int unordered) {
    __m512 x = load(dtype, jb->x, e, m);
    __mmask16 bits = bits16(k, unordered, x);
    y_step(jb, kind, dtype, e, m, x);
    return bits;
}

/* one-bit codes of one threshold (every built-in table's): each plane's bits of 64 elements as one
 * word (a store per 4 vectors: stores per vector would take the store queue from y's cache misses),
 * then 64 bytes of code a time from the 8 planes' words */
static inline __attribute__((always_inline)) void forward_bits(const code_job *jb, int kind, int dtype,
                                                               const bit_code *k, int unordered, uint8_t *buf,
                                                               int64_t chunk) {
    uint64_t (*words)[chunk / 64] = (uint64_t (*)[chunk / 64])buf;  /* chunk / 64 words a plane */
    for (int64_t b0 = jb->lo; b0 < jb->hi; b0 += chunk) {
        int64_t len = clamp_to(chunk, jb->hi - b0), groups = (len + 63) / 64;
        for (int plane = 0; plane < 8; plane++) {  /* element plane * nbytes + b lives in byte b */
            int64_t e = plane * jb->nbytes + b0, e1 = clamp_to(e + len, jb->n), g = 0;
            for (; e + 64 <= e1; e += 64, g++) {
                uint64_t w = 0;
                for (int v = 0; v < 4; v++)
                    w |= (uint64_t)bits_step(jb, kind, dtype, e + 16 * v, 0xFFFF, k, unordered) << (16 * v);
                words[plane][g] = w ^ k->invert;
            }
            if (e < e1) {  /* the plane's last elements; shorter planes leave their bytes' bits 0 */
                uint64_t w = 0;
                for (int v = 0; v < 4 && e + 16 * v < e1; v++)
                    w |= (uint64_t)bits_step(jb, kind, dtype, e + 16 * v, lanes(e1 - e - 16 * v), k, unordered)
                         << (16 * v);
                words[plane][g++] = (w ^ k->invert) & lanes64(e1 - e);
            }
            for (; g < groups; g++) words[plane][g] = 0;
        }
        for (int64_t g = 0; g < groups; g++) {
            __m512i out = _mm512_setzero_si512();
            for (int plane = 0; plane < 8; plane++)
                out = _mm512_or_si512(out, _mm512_maskz_set1_epi8(words[plane][g], (char)(1 << plane)));
            _mm512_mask_storeu_epi8(jb->packed + b0 + 64 * g, lanes64(len - 64 * g), out);
        }
    }
}

/* the job's bytes of code, and y of their elements, plane after plane in steps of FORWARD_CHUNK
 * bytes (each plane's elements of a step are contiguous); kind and dtype constants where inlined */
static inline __attribute__((always_inline)) void forward_chunks(const code_job *jb, int kind, int dtype,
                                                                 uint8_t *acc, int64_t chunk) {
    bit_code k;
    if (bit_code_of(jb, &k)) {
        if (k.unordered) forward_bits(jb, kind, dtype, &k, 1, acc, chunk);
        else forward_bits(jb, kind, dtype, &k, 0, acc, chunk);
        return;
    }
    int per = 8 / jb->bits;
    __m512i codes = _mm512_loadu_si512(jb->codes), nan_code = _mm512_set1_epi32(jb->nan_code);
    for (int64_t b0 = jb->lo; b0 < jb->hi; b0 += chunk) {
        int64_t b1 = clamp_to(b0 + chunk, jb->hi);
        for (int plane = 0; plane < per; plane++) {  /* plane 0 covers every byte: later planes OR into it */
            int64_t e0 = plane * jb->nbytes + b0, e1 = clamp_to(plane * jb->nbytes + b1, jb->n);
            for (int64_t e = e0; e < e1; e += 16) {
                __mmask16 m = lanes(e1 - e);
                __m512i c = _mm512_slli_epi32(code16(jb, forward_step(jb, kind, dtype, e, m), codes, nan_code),
                                              plane * jb->bits);
                __m128i bytes = _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(m, c)), *at = (__m128i *)(acc + (e - e0));
                _mm_storeu_si128(at, plane ? _mm_or_si128(_mm_loadu_si128(at), bytes) : bytes);
            }
        }
        memcpy(jb->packed + b0, acc, (size_t)(b1 - b0));
    }
}

/* the thread's step buffer: kept from its first forward until the thread exits (invact_threads.h) */
static inline __attribute__((always_inline)) void forward_job(const code_job *jb, int kind, int dtype) {
    uint8_t *forward_buffer = thread_buffer(FORWARD_CHUNK);
    if (forward_buffer) {
        forward_chunks(jb, kind, dtype, forward_buffer, FORWARD_CHUNK);
        return;
    }
    uint8_t small[FORWARD_CHUNK_STACK] __attribute__((aligned(64)));
    forward_chunks(jb, kind, dtype, small, FORWARD_CHUNK_STACK);
}

#define FORWARD_DTYPES(kind) \
    (jb->dtype == F32 ? forward_job(jb, kind, F32) : jb->dtype == BF16 ? forward_job(jb, kind, BF16) \
                                                                       : forward_job(jb, kind, F16))

#ifdef BF16_INSN
__attribute__((target("avx512bf16"))) static void forward_gelu_onednn_bf16_insn(const code_job *jb) {
    forward_job(jb, FWD_GELU_ONEDNN_INSN, BF16);
}
#endif

static void *run_forward_job(void *arg) {
    const code_job *jb = arg;
#ifdef BF16_INSN
    if (jb->kind == FWD_GELU_ONEDNN && jb->dtype == BF16 && cpu_has_bf16_insn()) {
        forward_gelu_onednn_bf16_insn(jb);
        return 0;
    }
#endif
    if (jb->kind == FWD_NONE) FORWARD_DTYPES(FWD_NONE);
    else if (jb->kind == FWD_HARDSWISH) FORWARD_DTYPES(FWD_HARDSWISH);
    else if (jb->kind == FWD_SILU) FORWARD_DTYPES(FWD_SILU);
    else if (jb->kind == FWD_QUICK_GELU) FORWARD_DTYPES(FWD_QUICK_GELU);
    else if (jb->kind == FWD_GELU_ONEDNN) FORWARD_DTYPES(FWD_GELU_ONEDNN);
    else if (jb->kind == FWD_GELU_TANH) FORWARD_DTYPES(FWD_GELU_TANH);
    else if (jb->kind == FWD_MISH) FORWARD_DTYPES(FWD_MISH);
    else FORWARD_DTYPES(FWD_GELU);
    return 0;
}

/* y[0 .. n) = the forward `kind` of n contiguous x of dtype and packed = their codes (as
 * invact_pack_code); chunk: the length of the ranges ATen splits n into (n where it runs one). Returns
 * 0, or -1 for arguments it does not take. */
int invact_forward_code(int kind, int64_t chunk, int dtype, int64_t n, const void *x, void *y, int n_thr,
                        const float *thr, int strict, const int32_t *codes, int nan_code, int bits, uint8_t *packed,
                        int threads) {
    if (kind < FWD_HARDSWISH || kind > FWD_MISH || !y || chunk < 1 ||
        (kind == FWD_GELU_ONEDNN && dtype == BF16 && !HAVE_BF16_INSN && cpu_has_bf16_insn()))
        return -1;
    return forward_jobs(run_forward_job, dtype, n, x, n_thr, thr, strict, codes, nan_code, bits, packed, threads,
                        y, kind, chunk);
}

/* FORWARD_CHUNK, for tests that cross it */
int64_t invact_forward_chunk(void) { return FORWARD_CHUNK; }

/* whether oneDNN's bfloat16 gelu store is reproduced here: by vcvtneps2bf16 (the compiler knew it, the
 * CPU has it) or by oneDNN's emulation (a CPU without it) */
int invact_bf16_store(void) { return HAVE_BF16_INSN || !cpu_has_bf16_insn(); }

/* packed[0 .. nbytes) = the codes of n contiguous x of dtype (invact_pack.h's pack_jobs) */
int invact_pack_code(int dtype, int64_t n, const void *x, int n_thr, const float *thr, int strict,
                     const int32_t *codes, int nan_code, int bits, uint8_t *packed, int threads) {
    return pack_jobs(run_forward_job, dtype, n, x, n_thr, thr, strict, codes, nan_code, bits, packed, threads);
}
