/* The 16-bit float conversions of every kernel, in plain C (with AVX2 / AVX-512 forms where they differ).
 * float32 -> bfloat16 as ATen rounds it: to nearest even, NaN to ATen's NaN (its vectorised
 * conversions' 0xFFFF, c10::BFloat16's scalar 0x7FC0); the bits come in a uint16_t, or in the low half
 * of each 32-bit lane. float16 <-> float32 as IEEE conversion (F16C's vcvtph2ps / vcvtps2ph). */
#ifndef INVACT_BF16_H
#define INVACT_BF16_H

#include <stdint.h>

#include "invact_bits.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* as c10::BFloat16 (selects, no branches: loops vectorise) */
static inline uint16_t invact_float_to_bf16(float f) {
    uint32_t b = invact_bits(f);
    uint16_t r = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0u : r;
}

static inline float invact_bf16_to_float(uint16_t h) {
    return invact_float((uint32_t)h << 16);
}

/* exact; a subnormal half becomes a normal float through an int conversion and a product of normal
 * numbers, so flushed denormals (which ATen's conversions ignore) cannot touch it */
static inline float invact_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    uint32_t sb = invact_bits((float)m * 5.9604644775390625e-8f);     /* e == 0: m * 2^-24 */
    uint32_t b = e == 0x1Fu ? (sign | 0x7F800000u | (m << 13))
               : e ? (sign | ((e + 112u) << 23) | (m << 13)) : (sign | sb);
    return invact_float(b);
}

/* round to nearest even, as IEEE conversion (vcvtps2ph): overflow to inf, subnormals, quiet NaN */
static inline uint16_t invact_float_to_half(float f) {
    uint32_t x = invact_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
    uint32_t r = ax - 0x38000000u;                                      /* normal: exponent 127 -> 15 */
    uint32_t normal = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
    uint32_t shift = 126u - (ax >> 23), m = (ax & 0x7FFFFFu) | 0x800000u;  /* subnormal: 2^-25 .. 2^-14 */
    shift = shift > 24u ? 24u : shift;
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = (1u << shift) >> 1;  /* shift 0: 0, no UB */
    uint32_t sub = q + (rem > half || (rem == half && (q & 1u)));
    uint32_t out = ax > 0x7F800000u ? (0x7E00u | ((ax >> 13) & 0x3FFu))   /* NaN */
                 : ax >= 0x477FF000u ? 0x7C00u                          /* >= 65520 (and inf): inf */
                 : ax >= 0x38800000u ? normal
                 : ax >= 0x33000000u ? sub : 0u;                        /* at most 2^-25: zero */
    return (uint16_t)(sign | out);
}

#if defined(__AVX2__)
/* 8 lanes, NaN as ATen's vectorised conversion (its AVX2 cvtfp32_bf16: 0xFFFF, whatever the payload) */
static inline __m256i invact_bf16_avx2(__m256 v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0xFFFF)),
                                                _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
#endif

#if defined(__AVX512F__)
/* 16 lanes, NaN as ATen's vectorised conversion */
static inline __m512i invact_bf16_avx512(__m512 v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
}
#endif

#endif
