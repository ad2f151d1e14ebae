/* The CPU kernels for CPUs with AVX2 and FMA but not AVX-512 (as ATen sees them): invact_poly_grad, and
 * invact_forward_code for hardswish, silu, quick_gelu, gelu (both forms) and mish (ATen's AVX2 kernels and oneDNN's avx2 gelu
 * reproduced; at the end).
 *
 * invact_poly_grad: the float32 backward of tables of polynomial pieces, cpu_kernels.c's scheme on 8-lane vectors (see there: the same operations in the
 * same order, so the same bits, with FMA or without). Only how the row is found differs: AVX2's
 * permute reads 8 entries, so an index past 7 takes two permutes and a blend on its bit 3 (past 15:
 * four and three blends); a one-bit code's first search level is a blend of two thresholds, the
 * sqrt-or-identity choice a shift of a 32-bit mask, the count of thresholds passed a sum of compares
 * (cpu_kernels.c's subtractions reproduce those compares), and the slot of a code of several bits a
 * gather. Zero-padded copies take the last elements of a plane. float32 y only.
 *
 * Built and loaded by invact.cpu_kernel (poly_library, forward_library), which fills invact_table.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "invact_pack.h"
#include "invact_poly.h"
#include "invact_threads.h"

int invact_abi_version(void) { return ABI_VERSION; }

typedef __m256 vf;
typedef __m256i vi;

static inline vf set(float v) { return _mm256_set1_ps(v); }
static inline vf as_f(vi v) { return _mm256_castsi256_ps(v); }
static inline vi as_i(vf v) { return _mm256_castps_si256(v); }

/* U independent vectors of 8 elements a step: 2 measured as fast as 3 or 4 (16 vector registers) */
#ifndef U
#define U 2
#endif
#define EACH(v) for (int v = 0; v < U; v++)
#define LANES 8

/* the vector layer on 8 lanes: invact_sleef.h's operations, and invact_poly_transform.h's */
#define VF vf
#define VI vi
#define VM vf                      /* a compare's lanes: all ones or zero */
#define V_LANES 8
#define V_REG "x"                  /* the asm constraint of a ymm register */
#define V_ZERO _mm256_setzero_ps()
#define V_SET set
#define V_BITS(u) as_f(_mm256_set1_epi32(u))
#define V_ADD _mm256_add_ps
#define V_SUB _mm256_sub_ps
#define V_MUL _mm256_mul_ps
#define V_DIV _mm256_div_ps
#define V_FMA _mm256_fmadd_ps    /* a b + c */
#define V_FMS _mm256_fmsub_ps    /* a b - c */
#define V_FNMA _mm256_fnmadd_ps  /* c - a b */
#define V_AND _mm256_and_ps
#define V_ANDNOT _mm256_andnot_ps
#define V_XOR _mm256_xor_ps
#define V_RINT _mm256_cvtps_epi32
#define V_I2F _mm256_cvtepi32_ps
#define V_ASF as_f
#define V_ASI as_i
#define V_ISET _mm256_set1_epi32
#define V_IADD _mm256_add_epi32
#define V_ISUB _mm256_sub_epi32
#define V_SRAI _mm256_srai_epi32
#define V_SLLI _mm256_slli_epi32
#define V_IEQ(a, b) as_f(_mm256_cmpeq_epi32(a, b))
#define V_CMP _mm256_cmp_ps
#define V_MOR _mm256_or_ps
#define V_SELECT(m, a, b) _mm256_blendv_ps(b, a, m)  /* m ? a : b */
#define V_ISELECT(m, a, b) _mm256_blendv_epi8(b, a, as_i(m))
#define V_IAND _mm256_and_si256
#define V_IOR _mm256_or_si256
#define V_SQRT _mm256_sqrt_ps
#define V_ALL(m) (_mm256_movemask_ps(m) == 0xFF)
#define V_ANY(m) (_mm256_movemask_ps(m) != 0)

/* clamps as ATen's (cpu_kernels.c): vmaxps/vminps return their second operand where either is NaN */
static inline vf at_least(vf v, float lo) { return _mm256_max_ps(set(lo), v); }
static inline vf clamp1(vf v) { return _mm256_min_ps(set(1.0f), _mm256_max_ps(set(-1.0f), v)); }

/* the blend selectors of index s: bit 3 and bit 4 moved to the sign (vblendvps reads the sign) */
typedef struct { vi s; vf b3, b4; } index8;

static inline index8 index_of(vi s) {
    return (index8){s, as_f(_mm256_slli_epi32(s, 28)), as_f(_mm256_slli_epi32(s, 27))};
}

/* row[s] for s below `width` (8, 16 or 32; a constant where inlined) */
static inline __attribute__((always_inline)) vf lookup(int width, const float *row, index8 k) {
    vf a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(row), k.s);
    if (width == 8) return a;
    a = _mm256_blendv_ps(a, _mm256_permutevar8x32_ps(_mm256_loadu_ps(row + 8), k.s), k.b3);
    if (width == 16) return a;
    vf b = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(row + 16), k.s),
                            _mm256_permutevar8x32_ps(_mm256_loadu_ps(row + 24), k.s), k.b3);
    return _mm256_blendv_ps(a, b, k.b4);
}

#include "invact_poly_transform.h"

/* each lane's entry of a by-code table: a blend for one-bit codes (odd: all ones in the lanes of code
 * 1), else a gather at min(code, 16) */
static inline vi by_code(int one_bit, const int32_t *table, vi code, vi odd) {
    if (one_bit) return _mm256_blendv_epi8(_mm256_set1_epi32(table[0]), _mm256_set1_epi32(table[1]), odd);
    return _mm256_i32gather_epi32(table, _mm256_min_epu32(code, _mm256_set1_epi32(16)), 4);
}

/* the segment index as cpu_kernels.c's: by binary search over the class's slots (a compare, y >= the
 * level's threshold, is the test whose result the subtraction there reproduces), or by counting
 * the class's thresholds passed (`y > t` where strict, else `y >= t`); NaN y passes none */
static inline __attribute__((always_inline)) void segment(const invact_table *t, int one_bit, int width,
                                                          const vf y[U], const vi code[U], const vi odd[U], vi s[U]) {
    if (t->search_levels) {
        EACH(v) s[v] = by_code(one_bit, t->slot_of_code, code[v], odd[v]);
        for (int l = 0; l < t->search_levels; l++) {
            vi step = _mm256_set1_epi32(1 << (t->search_levels - 1 - l));
            EACH(v) {  /* one-bit codes start at one of two slots: the first level's threshold by a blend */
                vf level = l == 0 && one_bit ? _mm256_blendv_ps(set(t->level_thr[0][t->slot_of_code[0]]),
                                                                set(t->level_thr[0][t->slot_of_code[1]]), as_f(odd[v]))
                                             : lookup(width, t->level_thr[l], index_of(s[v]));
                vf passed = _mm256_cmp_ps(y[v], level, _CMP_GE_OQ);
                s[v] = _mm256_add_epi32(s[v], _mm256_and_si256(as_i(passed), step));
            }
        }
        return;
    }
    EACH(v) s[v] = _mm256_setzero_si256();  /* class 0's count replaces it */
    for (int c = 0; c < t->n_classes; c++) {
        const float *thr = t->thresholds + t->class_threshold[c];
        const int32_t *is_strict = t->strict + t->class_threshold[c];
        vi sc[U];
        EACH(v) sc[v] = _mm256_set1_epi32(t->class_first[c]);
        for (int j = 0; j < t->class_count[c] - 1; j++) {
            vf tj = set(thr[j]);
            EACH(v) sc[v] = _mm256_sub_epi32(sc[v], as_i(is_strict[j] ? _mm256_cmp_ps(y[v], tj, _CMP_GT_OQ)
                                                                  : _mm256_cmp_ps(y[v], tj, _CMP_GE_OQ)));
        }
        if (c == 0) {
            EACH(v) s[v] = sc[v];
            continue;
        }
        EACH(v) {
            vi mine = _mm256_cmpeq_epi32(code[v], _mm256_set1_epi32(t->class_code[c]));  /* one-bit: code is 0 or 1 */
            s[v] = _mm256_blendv_epi8(s[v], sc[v], mine);
        }
    }
}

/* where a table has one identity and one sqrt transform: bit 31 - s set where slot (or row) s's is the
 * sqrt, what `columns[COL_TID][s] == its index` gives, moved to the sign by a left shift of s */
static uint32_t rooted_slots(const invact_table *t) {
    uint32_t bits = 0;
    float i = t->transform_kind[0] == SQRT ? 0.0f : 1.0f;
    for (int s = 0; s < MAX_SEGMENTS; s++)
        if (t->columns[COL_TID][s] == i) bits |= 1u << (31 - s);
    return bits;
}

static inline __m256 mul_add(int fused, vf p, vf u, vf c) {
    return fused ? _mm256_fmadd_ps(p, u, c) : _mm256_add_ps(_mm256_mul_ps(p, u), c);
}

/* g of U vectors of y (cpu_kernels.c's g_block); the flags constants where inlined */
static inline __attribute__((always_inline)) void g_block(const invact_table *t, int fused, int one_bit, int width,
                                                          int blend, int clamp, uint32_t rooted, const vf y[U],
                                                          const vi code[U], const vi odd[U], vf g[U]) {
    vi s[U];
    index8 k[U];
    vf tv[U], q[U], q2[U], u[U], p[U];
    segment(t, one_bit, width, y, code, odd, s);
    EACH(v) k[v] = index_of(s[v]);
    if (t->n_transforms == 1) {
        transform(t, 0, y, tv);
    } else if (t->n_transforms == 2 && t->transform_kind[0] + t->transform_kind[1] == IDENTITY + SQRT) {
        int i = t->transform_kind[0] == SQRT ? 0 : 1;
        vf ti[U];
        root(t, i, y, ti);
        vi bits = _mm256_set1_epi32((int)rooted);  /* which slots: by a shift, not two permutes */
        EACH(v) tv[v] = _mm256_blendv_ps(y[v], ti[v], as_f(_mm256_sllv_epi32(bits, s[v])));
    } else {  /* a log is skipped where no element of the step has it */
        EACH(v) {
            tv[v] = y[v];
            q[v] = lookup(width, t->columns[COL_TID], k[v]);
        }
        for (int i = 0; i < t->n_transforms; i++) {
            if (t->transform_kind[i] == IDENTITY) continue;
            vf has[U];
            int any = 0;
            EACH(v) {
                has[v] = _mm256_cmp_ps(q[v], set((float)i), _CMP_EQ_OQ);
                any |= _mm256_movemask_ps(has[v]);
            }
            if (t->transform_kind[i] == LOG && !any) continue;
            vf ti[U];
            transform(t, i, y, ti);
            EACH(v) tv[v] = _mm256_blendv_ps(tv[v], ti[v], has[v]);
        }
    }
    EACH(v) {
        u[v] = _mm256_mul_ps(_mm256_sub_ps(tv[v], lookup(width, t->columns[COL_CENTER], k[v])),
                             lookup(width, t->columns[COL_SCALE], k[v]));
        if (clamp) u[v] = clamp1(u[v]);
        p[v] = lookup(width, t->columns[COL_C0_LO + t->degree], k[v]);
    }
    for (int j = t->degree - 1; j >= 1; j--)
        EACH(v) p[v] = mul_add(fused, p[v], u[v], lookup(width, t->columns[COL_C0_LO + j], k[v]));
    EACH(v) {
        q[v] = lookup(width, t->columns[COL_C0_LO], k[v]);
        q2[v] = lookup(width, t->columns[COL_C0_HI], k[v]);
        g[v] = _mm256_add_ps(mul_add(fused, p[v], u[v], q[v]), q2[v]);
        if (blend) g[v] = _mm256_blendv_ps(g[v], y[v], _mm256_cmp_ps(y[v], y[v], _CMP_UNORD_Q));
    }
}

typedef struct {
    const invact_table *table;
    int bits, fused, width, blend, clamp;  /* blend: nan_blend(table); clamp: table->clamp_sides != 0 */
    uint32_t rooted;                       /* rooted_slots(table) */
    int64_t n, lo, hi;                     /* all elements, and this job's range */
    const float *y, *grad;
    float *out;
    const uint8_t *code;
} job;

/* out[0 .. 8U) = g(y, code) * grad, the codes of those elements from the bytes at code ((byte >>
 * shift) & mask; one-bit codes as lane masks); the flags constants where inlined */
static inline __attribute__((always_inline)) void step(const job *jb, int fused, int one_bit, int width,
                                                       const float *y, const float *grad, float *out,
                                                       const uint8_t *code, int shift) {
    vf yv[U], g[U];
    vi c[U], odd[U];
    EACH(v) {
        yv[v] = _mm256_loadu_ps(y + LANES * v);
        vi bytes = jb->bits ? _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(code + LANES * v)))
                            : _mm256_setzero_si256();
        if (one_bit) {
            vi bit = _mm256_set1_epi32(1 << shift);
            odd[v] = _mm256_cmpeq_epi32(_mm256_and_si256(bytes, bit), bit);
            c[v] = _mm256_and_si256(odd[v], _mm256_set1_epi32(1));
        } else {
            c[v] = _mm256_and_si256(_mm256_srli_epi32(bytes, shift), _mm256_set1_epi32((1 << jb->bits) - 1));
            odd[v] = _mm256_setzero_si256();
        }
    }
    g_block(jb->table, fused, one_bit, width, jb->blend, jb->clamp, jb->rooted, yv, c, odd, g);
    EACH(v) _mm256_storeu_ps(out + LANES * v, _mm256_mul_ps(g[v], _mm256_loadu_ps(grad + LANES * v)));
}

/* elements [lo, hi) of one bit plane, code[k] the byte of element lo + k; the last few through
 * zero-padded copies */
static inline __attribute__((always_inline)) void plane_as(const job *jb, int fused, int one_bit, int width,
                                                           int64_t lo, int64_t hi, const uint8_t *code, int shift) {
    int64_t i = lo;
    for (; i + LANES * U <= hi; i += LANES * U)
        step(jb, fused, one_bit, width, jb->y + i, jb->grad + i, jb->out + i, code + (i - lo), shift);
    if (i == hi) return;
    float y[LANES * U] = {0}, grad[LANES * U] = {0}, out[LANES * U];
    uint8_t bytes[LANES * U] = {0};
    size_t m = (size_t)(hi - i);
    memcpy(y, jb->y + i, m * sizeof(float));
    memcpy(grad, jb->grad + i, m * sizeof(float));
    if (jb->bits) memcpy(bytes, code + (i - lo), m);
    step(jb, fused, one_bit, width, y, grad, out, bytes, shift);
    memcpy(jb->out + i, out, m * sizeof(float));
}

/* each combination of the flags, inlined with its constants */
#define PLANE(f, o, w) plane_as(jb, f, o, w, lo, hi, code, shift)

static void plane(const job *jb, int64_t lo, int64_t hi, const uint8_t *code, int shift) {
    int one_bit = jb->bits == 1;
    switch (jb->width) {
    case 8: jb->fused ? (one_bit ? PLANE(1, 1, 8) : PLANE(1, 0, 8)) : (one_bit ? PLANE(0, 1, 8) : PLANE(0, 0, 8)); break;
    case 16: jb->fused ? (one_bit ? PLANE(1, 1, 16) : PLANE(1, 0, 16)) : (one_bit ? PLANE(0, 1, 16) : PLANE(0, 0, 16)); break;
    default: jb->fused ? (one_bit ? PLANE(1, 1, 32) : PLANE(1, 0, 32)) : (one_bit ? PLANE(0, 1, 32) : PLANE(0, 0, 32));
    }
}

static void *run_job(void *arg) {
    const job *jb = arg;
    if (!jb->bits) {
        plane(jb, jb->lo, jb->hi, jb->code, 0);
        return 0;
    }
    int64_t per = 8 / jb->bits, nbytes = (jb->n + per - 1) / per;  /* invact.bitpack's planar layout */
    for (int64_t i = jb->lo; i < jb->hi;) {
        int64_t p = i / nbytes, end = clamp_to((p + 1) * nbytes, jb->hi);
        plane(jb, i, end, jb->code + (i - p * nbytes), (int)(p * jb->bits));
        i = end;
    }
    return 0;
}

/* out = g(y, code) * grad for n contiguous float32 elements, as cpu_kernels.c's invact_poly_grad
 * (which also takes 16-bit y: here -1, as for any argument the kernel does not take) */
int invact_poly_grad(const invact_table *table, int dtype, int64_t n, const float *y, const float *grad,
                     float *out, const uint8_t *code, int bits, int threads, int fused) {
    if (!poly_table_taken(table) || dtype != F32 || n < 0 || (bits != 0 && bits != 1 && bits != 2 && bits != 4 && bits != 8))
        return -1;
    int bound = index_bound(table);
    job base = {table, bits, fused != 0, bound <= 8 ? 8 : bound <= 16 ? 16 : 32, nan_blend(table),
                table->clamp_sides != 0, rooted_slots(table), n, 0, 0, y, grad, out, code};
    int64_t step_size;
    int nt = split(n, MIN_PER_THREAD, threads, &step_size);
    job jobs[MAX_THREADS];
    for (int k = 0; k < nt; k++) {
        jobs[k] = base;
        jobs[k].lo = clamp_to(k * step_size, n);
        jobs[k].hi = clamp_to(jobs[k].lo + step_size, n);
    }
    spawn(run_job, jobs, sizeof(job), nt);
    return 0;
}

/* ---- forward: y and the one-bit code in one pass over x (cpu_kernels.c's invact_forward_code, for
 * ATen's AVX2 kernels of hardswish, silu, gelu (both forms), mish and quick_gelu's three ops, float32
 * and bfloat16 x, and oneDNN's avx2 gelu, float32; SLEEF's and ATen's vector math by invact_sleef.h) ---- */
enum { FWD_HARDSWISH = 1, FWD_SILU = 2, FWD_GELU = 3, FWD_QUICK_GELU = 4,  /* cpu_kernels.c's kinds: ATen's AVX2 code, */
       FWD_GELU_ONEDNN = 5,                                                  /* oneDNN's avx2 JIT (float32), */
       FWD_GELU_TANH = 6, FWD_MISH = 7 };                                    /* ATen's AVX2 code */

#define BC8(u) as_f(_mm256_set1_epi32((int)(u)))

/* SLEEF's AVX2 split of x (logf) or x + 1 (log1pf) into m 2^e, m in [0.75, 1.5), by integer steps where
 * AVX-512 has getexp: below FLT_MIN scaled by 2^64 first; E the biased exponent of that times 4/3 */
static inline vi sleef_exponent8(vf d, vf *scaled, vf *e) {
    vf tiny = _mm256_cmp_ps(d, BC8(0x00800000), _CMP_LT_OQ);
    *scaled = _mm256_blendv_ps(d, _mm256_mul_ps(d, BC8(0x5f800000)), tiny);
    vi biased = _mm256_and_si256(_mm256_srli_epi32(as_i(_mm256_mul_ps(*scaled, BC8(0x3faaaaab))), 23),
                                 _mm256_set1_epi32(0xff));
    *e = _mm256_cvtepi32_ps(_mm256_blendv_epi8(_mm256_sub_epi32(biased, _mm256_set1_epi32(127)),
                                               _mm256_sub_epi32(biased, _mm256_set1_epi32(191)), as_i(tiny)));
    return _mm256_slli_epi32(_mm256_sub_epi32(_mm256_set1_epi32(0x7f), biased), 23);  /* 2^-E's exponent, as bits */
}

/* logf's split: m = d 2^-E, e = E - 127 (- 64 where scaled) */
static inline void sleef_log_reduce8(vf x, vf *e, vf *m) {
    vf d;
    vi shift = sleef_exponent8(x, &d, e);
    *m = as_f(_mm256_add_epi32(shift, as_i(d)));
}

/* logf's special values by blends (on x: its scaling keeps sign, zero, inf and NaN): +inf, NaN for
 * negative or NaN x (0x7fc00000), -inf for zeros */
static inline vf sleef_log_special8(vf x, vf r) {
    r = _mm256_blendv_ps(r, BC8(0x7f800000), _mm256_cmp_ps(x, BC8(0x7f800000), _CMP_EQ_OQ));
    vf invalid = _mm256_or_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ), _mm256_cmp_ps(x, x, _CMP_NEQ_UQ));
    r = _mm256_blendv_ps(r, BC8(0x7fc00000), invalid);
    return _mm256_blendv_ps(r, BC8(0xff800000), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ));
}

/* log1pf's split: t = 2^-E of x + 1's E, m = fma(t, x, t - 1) */
static inline void sleef_log1p_reduce8(vf x, vf *e, vf *m) {
    vf d;
    vf t = as_f(_mm256_add_epi32(sleef_exponent8(_mm256_add_ps(x, BC8(0x3f800000)), &d, e),
                                 _mm256_set1_epi32(0x3f800000)));
    *m = _mm256_fmadd_ps(t, x, _mm256_add_ps(BC8(0xbf800000), t));
}

#include "invact_sleef.h"

/* oneDNN's exp on avx2 (its JIT eltwise injector): x clamped to [ln FLT_MIN, ln FLT_MAX], 2^(n-1) of
 * n = floor(x log2 e + 1/2), a degree-5 polynomial in the remainder, times 2^(n-1) and 2; zero below
 * ln FLT_MIN */
static inline vf onednn_exp8(vf v) {
    vf below = _mm256_cmp_ps(v, BC8(0xc2aeac50), _CMP_LT_OS);
    v = _mm256_max_ps(_mm256_min_ps(v, BC8(0x42b17218)), BC8(0xc2aeac50));
    vf n = _mm256_round_ps(_mm256_add_ps(_mm256_mul_ps(v, BC8(0x3fb8aa3b)), BC8(0x3f000000)),
                           _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    vf r = _mm256_fnmadd_ps(n, BC8(0x3f317218), v);
    vi scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(_mm256_sub_ps(n, set(1.0f))),
                                                  _mm256_set1_epi32(0x7f)), 23);
    vf two_n = _mm256_blendv_ps(as_f(scale), _mm256_setzero_ps(), below);
    static const float poly[] = {0x1.0f9f9cp-7f, 0x1.573a1ap-5f, 0x1.555a80p-3f, 0x1.fffdc6p-2f, 0x1.fffff6p-1f, 1.0f};
    vf p = horner8(r, poly, 6);
    return _mm256_mul_ps(_mm256_mul_ps(p, two_n), set(2.0f));
}

/* oneDNN's gelu_erf on avx2: erf by Abramowitz and Stegun's formula with its exp, y = S + S erf, S = x / 2 */
static inline vf onednn_gelu8(vf s) {
    vf x = _mm256_mul_ps(s, BC8(0x3f3504f3));
    vf t = _mm256_div_ps(set(1.0f), _mm256_fmadd_ps(BC8(0x3ea7ba05), _mm256_and_ps(x, BC8(0x7fffffff)), set(1.0f)));
    vf e = _mm256_xor_ps(onednn_exp8(_mm256_xor_ps(_mm256_mul_ps(x, x), BC8(0x80000000))), BC8(0x80000000));
    e = _mm256_mul_ps(e, t);
    vf r = horner8(t, AS_ERF_POLY, 5);
    vf erf = _mm256_xor_ps(_mm256_fmadd_ps(e, r, set(1.0f)), _mm256_and_ps(s, BC8(0x80000000)));
    vf half_s = _mm256_mul_ps(s, set(0.5f));
    return _mm256_fmadd_ps(erf, half_s, half_s);
}

/* the lanes of elements e .. e + 7 in the second vector of ATen's 16-element steps, counted from the
 * start of its range (of length chunk): where its loop's operand order, and so a product's NaN, differs */
static inline vf second_halves(const code_job *jb, int64_t e) {
    int32_t lanes[LANES];
    for (int l = 0; l < LANES; l++) lanes[l] = (((e + l) % jb->chunk) & 15) >= 8 ? -1 : 0;
    return as_f(_mm256_loadu_si256((const __m256i *)lanes));
}

/* bfloat16 bits of 8 floats in the low halves of the lanes, as ATen's AVX2 conversion (to nearest
 * even, NaN 0xFFFF) */
static inline vi bf16_bits8(vf v) {
    vi b = as_i(v);
    vi r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 16),
                                                                                   _mm256_set1_epi32(1)),
                                                                  _mm256_set1_epi32(0x7FFF))), 16);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), as_i(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

/* v rounded to dtype and back: what an ATen op stores between ops */
static inline vf round8(int dtype, vf v) { return dtype == F32 ? v : as_f(_mm256_slli_epi32(bf16_bits8(v), 16)); }

/* y of 8 x (elements e .. e + 7) by `kind` (a constant where inlined), as ATen's AVX2 code */
static inline __attribute__((always_inline)) vf forward8(const code_job *jb, int kind, int dtype, vf x, int64_t e) {
    if (kind == FWD_SILU)  /* x / (1 + exp(-x)) */
        return _mm256_div_ps(x, _mm256_add_ps(set(1.0f), sleef_exp8(_mm256_xor_ps(set(-0.0f), x))));
    if (kind == FWD_GELU_ONEDNN) return onednn_gelu8(x);
    if (kind == FWD_GELU_TANH) return aten_gelu_tanh8(x, dtype != F32);
    if (kind == FWD_MISH) {  /* of two NaNs x's, tanh's in the second vector of each 16-element step (float32; */
        vf nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);  /* bfloat16 stores every NaN as 0xFFFF) */
        return aten_mish8(x, dtype == F32 && _mm256_movemask_ps(nan) ? _mm256_and_ps(nan, second_halves(jb, e))
                                                                       : _mm256_setzero_ps());
    }
    if (kind == FWD_GELU) {  /* x * 0.5 * (1 + erf(x * M_SQRT1_2)); NaN x: x's, as ATen's */
        vf erf = aten_erf8(_mm256_mul_ps(x, set(0.70710678118654752440f)));
        return mul_src1(_mm256_mul_ps(x, set(0.5f)), _mm256_add_ps(set(1.0f), erf));
    }
    if (kind == FWD_QUICK_GELU) {  /* x * sigmoid(1.702 * x): three ATen ops, each result in x's dtype */
        vf t = round8(dtype, _mm256_mul_ps(x, set(1.702f)));
        vf sig = _mm256_div_ps(set(1.0f), _mm256_add_ps(set(1.0f), sleef_exp8(_mm256_xor_ps(set(-0.0f), t))));
        vf y = mul_src1(round8(dtype, sig), x);  /* of two NaNs sigmoid's in float32; 16-bit: x's, quieted */
        vf nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
        if (dtype == F32 || !_mm256_movemask_ps(nan)) return y;
        return _mm256_blendv_ps(y, _mm256_or_ps(x, as_f(_mm256_set1_epi32(0x400000))), nan);
    }
    /* x * minimum(maximum(x + 3, 0), 6) / 6; vec::maximum and minimum give NaN x all ones (c), and x * c
     * of two NaNs is one operand's, by the place in ATen's float32 loop (its 16-bit loops: x's quieted) */
    vf six = set(6.0f), nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    vf p = _mm256_mul_ps(x, _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(x, set(3.0f)), _mm256_setzero_ps()), six));
    if (_mm256_movemask_ps(nan)) {
        vf ones = as_f(_mm256_set1_epi32(-1)), quiet = _mm256_or_ps(x, as_f(_mm256_set1_epi32(0x400000)));
        vf first = dtype == F32 ? _mm256_andnot_ps(second_halves(jb, e), ones) : _mm256_setzero_ps();
        p = _mm256_blendv_ps(p, _mm256_blendv_ps(quiet, ones, first), nan);
    }
    return _mm256_div_ps(p, six);
}

/* 8 elements of x as float32 (bfloat16: its bits moved up) */
static inline vf load8(int dtype, const void *p, int64_t i) {
    if (dtype == F32) return _mm256_loadu_ps((const float *)p + i);
    return as_f(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
}

/* 8 elements stored in dtype: bfloat16 as ATen's AVX2 conversion (to nearest even, NaN 0xFFFF) */
static inline void store8(int dtype, void *p, int64_t i, vf v) {
    if (dtype == F32) {
        _mm256_storeu_ps((float *)p + i, v);
        return;
    }
    vi r = bf16_bits8(v);
    r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_castsi256_si128(r));
}

/* the one-bit code of one threshold by one compare: x > t as x >= the float after t (t finite and
 * not near 0); `x >= t` gives NaN 0, `!(x < t)` 1: the one that, inverted where passing's code is 0,
 * gives NaN's code (cpu_kernels.c's bit_code) */
typedef struct { vf thr; int unordered; uint32_t invert; } bit_code;

static int bit_code_of(int bits, int n_thr, const float *thr, int strict, const int32_t *codes, int nan_code,
                       bit_code *k) {
    if (bits != 1 || n_thr != 1) return 0;
    float t = thr[0];
    int passed = codes[1], failed = codes[0];
    if (passed == failed || (passed != 0 && passed != 1) || (failed != 0 && failed != 1) || (nan_code != 0 && nan_code != 1))
        return 0;
    if (strict & 1) {
        if (!isfinite(t) || fabsf(t) < 2 * FLT_MIN) return 0;
        t = nextafterf(t, INFINITY);
    }
    *k = (bit_code){set(t), (nan_code != 0) != (passed == 0), passed ? 0u : ~0u};
    return 1;
}

/* 8 elements from e of a plane: y stored, the code bits returned (before inverting) */
static inline __attribute__((always_inline)) uint32_t step8(const code_job *jb, int kind, int dtype, const bit_code *k,
                                                            const void *x, void *y, int64_t i, int64_t e) {
    vf v = load8(dtype, x, i);
    vf bits = k->unordered ? _mm256_cmp_ps(v, k->thr, _CMP_NLT_UQ) : _mm256_cmp_ps(v, k->thr, _CMP_GE_OQ);
    store8(dtype, y, i, forward8(jb, kind, dtype, v, e));
    return (uint32_t)_mm256_movemask_ps(bits);
}

#define STEP_BYTES 524288       /* bytes of code a step: each plane's x in runs of as many (cpu_kernels.c) */
#define STEP_BYTES_STACK 16384  /* where malloc fails: words on the stack */

/* the job's code bytes and their elements' y: per step, each plane's bits of 32 elements as a word,
 * then 32 bytes of code from the 8 planes' words; kind and dtype constants where inlined */
static inline __attribute__((always_inline)) void forward_job(const code_job *jb, int kind, int dtype, const bit_code *k,
                                                              uint32_t *words, int64_t step_bytes) {
    const int64_t per_plane = step_bytes / 32;
    for (int64_t b0 = jb->lo; b0 < jb->hi; b0 += step_bytes) {
        int64_t len = clamp_to(step_bytes, jb->hi - b0), groups = (len + 31) / 32;
        for (int plane = 0; plane < 8; plane++) {  /* element plane * nbytes + b lives in byte b */
            uint32_t *w = words + plane * per_plane;
            int64_t e = plane * jb->nbytes + b0, e1 = clamp_to(e + len, jb->n), g = 0;
            for (; e + 32 <= e1; e += 32, g++) {
                uint32_t bits = 0;
                for (int v = 0; v < 4; v++) bits |= step8(jb, kind, dtype, k, jb->x, jb->y, e + 8 * v, e + 8 * v) << (8 * v);
                w[g] = bits ^ k->invert;
            }
            if (e < e1) {  /* the plane's last elements, through zero-padded copies */
                int m = (int)(e1 - e), size = dtype == F32 ? 4 : 2;
                uint8_t xs[32 * 4] = {0}, ys[32 * 4];
                memcpy(xs, (const char *)jb->x + e * size, (size_t)(m * size));
                uint32_t bits = 0;
                for (int v = 0; v < 4; v++) bits |= step8(jb, kind, dtype, k, xs, ys, 8 * v, e + 8 * v) << (8 * v);
                memcpy((char *)jb->y + e * size, ys, (size_t)(m * size));
                w[g++] = (bits ^ k->invert) & (m == 32 ? ~0u : (1u << m) - 1);
            }
            for (; g < groups; g++) w[g] = 0;
        }
        const vi select = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
        const vi bit = _mm256_set1_epi64x(0x8040201008040201);  /* byte j of each 8: bit j */
        for (int64_t g = 0; g < groups; g++) {
            vi out = _mm256_setzero_si256();
            for (int plane = 0; plane < 8; plane++) {  /* byte b of the group: bit b of the plane's word */
                vi spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)words[plane * per_plane + g]), select);
                vi set_ = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
                out = _mm256_or_si256(out, _mm256_and_si256(set_, _mm256_set1_epi8((char)(1 << plane))));
            }
            int64_t left = len - 32 * g;
            if (left >= 32) _mm256_storeu_si256((__m256i *)(jb->packed + b0 + 32 * g), out);
            else {
                uint8_t last[32];
                _mm256_storeu_si256((__m256i *)last, out);
                memcpy(jb->packed + b0 + 32 * g, last, (size_t)left);
            }
        }
    }
}

#define KIND_DTYPE(kind, dtype) forward_job(jb, kind, dtype, k, words, step_bytes)
static void forward_kinds(const code_job *jb, const bit_code *k, uint32_t *words, int64_t step_bytes) {
    if (jb->kind == FWD_SILU) jb->dtype == F32 ? KIND_DTYPE(FWD_SILU, F32) : KIND_DTYPE(FWD_SILU, BF16);
    else if (jb->kind == FWD_GELU) jb->dtype == F32 ? KIND_DTYPE(FWD_GELU, F32) : KIND_DTYPE(FWD_GELU, BF16);
    else if (jb->kind == FWD_GELU_ONEDNN) KIND_DTYPE(FWD_GELU_ONEDNN, F32);
    else if (jb->kind == FWD_QUICK_GELU)
        jb->dtype == F32 ? KIND_DTYPE(FWD_QUICK_GELU, F32) : KIND_DTYPE(FWD_QUICK_GELU, BF16);
    else if (jb->kind == FWD_GELU_TANH)
        jb->dtype == F32 ? KIND_DTYPE(FWD_GELU_TANH, F32) : KIND_DTYPE(FWD_GELU_TANH, BF16);
    else if (jb->kind == FWD_MISH) jb->dtype == F32 ? KIND_DTYPE(FWD_MISH, F32) : KIND_DTYPE(FWD_MISH, BF16);
    else jb->dtype == F32 ? KIND_DTYPE(FWD_HARDSWISH, F32) : KIND_DTYPE(FWD_HARDSWISH, BF16);
}
#undef KIND_DTYPE

static void *run_forward_job(void *arg) {
    const code_job *jb = arg;
    bit_code k;
    bit_code_of(jb->bits, jb->n_thr, jb->thr, jb->strict, jb->codes, jb->nan_code, &k);  /* invact_forward_code checked it */
    uint32_t *forward_words = thread_buffer(8 * STEP_BYTES / 32 * sizeof(uint32_t));  /* kept (cpu_kernels.c's) */
    if (forward_words) {
        forward_kinds(jb, &k, forward_words, STEP_BYTES);
        return 0;
    }
    uint32_t small[8 * STEP_BYTES_STACK / 32];
    forward_kinds(jb, &k, small, STEP_BYTES_STACK);
    return 0;
}

/* y[0 .. n) = the forward `kind` (hardswish, silu, gelu, quick_gelu, oneDNN's gelu, gelu_tanh, mish) of n contiguous float32 or bfloat16 x and packed =
 * their one-bit codes of one threshold, as cpu_kernels.c's invact_forward_code; chunk: the length of
 * the ranges ATen splits n into. Returns 0, or -1 for arguments it does not take. */
int invact_forward_code(int kind, int64_t chunk, int dtype, int64_t n, const void *x, void *y, int n_thr,
                        const float *thr, int strict, const int32_t *codes, int nan_code, int bits, uint8_t *packed,
                        int threads) {
    bit_code k;
    if (kind < FWD_HARDSWISH || kind > FWD_MISH || (kind == FWD_GELU_ONEDNN && dtype != F32) ||
        (dtype != F32 && dtype != BF16) || !y || chunk < 1 || !bit_code_of(bits, n_thr, thr, strict, codes, nan_code, &k))
        return -1;
    return forward_jobs(run_forward_job, dtype, n, x, n_thr, thr, strict, codes, nan_code, bits, packed, threads,
                        y, kind, chunk);
}

/* STEP_BYTES, for tests that cross it */
int64_t invact_forward_chunk(void) { return STEP_BYTES; }
