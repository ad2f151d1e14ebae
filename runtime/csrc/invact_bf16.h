/* float32 -> bfloat16 as ATen rounds it, for every kernel that stores bfloat16: to nearest even, NaN
 * to ATen's NaN (its vectorised conversions' 0xFFFF, c10::BFloat16's scalar 0x7FC0). The bits come
 * in a uint16_t, or in the low half of each 32-bit lane. */
#ifndef INVACT_BF16_H
#define INVACT_BF16_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* as c10::BFloat16 (selects, no branches: loops vectorise) */
static inline uint16_t invact_float_to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    uint16_t r = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0u : r;
}

#if defined(__AVX2__)
/* 8 lanes, NaN as the scalar conversion */
static inline __m256i invact_bf16_avx2(__m256 v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)),
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
