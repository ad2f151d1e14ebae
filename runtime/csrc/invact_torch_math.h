/* PyTorch's vector math on AVX-512, reproduced bit for bit for the one-pass forward (cpu_kernels.c):
 * invact_sleef.h on 16 lanes (SLEEF's expf, tanhf, logf and log1pf, ATen's erf, tanh-form GELU and
 * mish) with AVX-512's own steps of logf and log1pf, and oneDNN's gelu_erf. Each follows the
 * instructions libtorch runs, in their order; invact.impl_cpu takes a forward built on them only
 * after a probe gives PyTorch's y bit for bit. */
#ifndef INVACT_TORCH_MATH_H
#define INVACT_TORCH_MATH_H

#include <immintrin.h>
#include <stdint.h>

static inline __m512 negate(__m512 v) { return _mm512_xor_ps(_mm512_set1_ps(-0.0f), v); }

/* the vector layer on 16 lanes: invact_sleef.h's operations, and invact_poly_transform.h's */
#define VF __m512
#define VI __m512i
#define VM __mmask16
#define V_LANES 16
#define V_REG "v"  /* the asm constraint of a zmm register */
#define V_ZERO _mm512_setzero_ps()
#define V_SET(c) _mm512_set1_ps(c)
#define V_BITS(u) _mm512_castsi512_ps(_mm512_set1_epi32(u))
#define V_ADD _mm512_add_ps
#define V_SUB _mm512_sub_ps
#define V_MUL _mm512_mul_ps
#define V_DIV _mm512_div_ps
#define V_FMA _mm512_fmadd_ps    /* a b + c */
#define V_FMS _mm512_fmsub_ps    /* a b - c */
#define V_FNMA _mm512_fnmadd_ps  /* c - a b */
#define V_AND(a, b) _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)))
#define V_ANDNOT(a, b) _mm512_castsi512_ps(_mm512_andnot_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)))
#define V_XOR(a, b) _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)))
#define V_RINT _mm512_cvtps_epi32
#define V_I2F _mm512_cvtepi32_ps
#define V_ASF _mm512_castsi512_ps
#define V_ASI _mm512_castps_si512
#define V_ISET _mm512_set1_epi32
#define V_IADD _mm512_add_epi32
#define V_ISUB _mm512_sub_epi32
#define V_SRAI _mm512_srai_epi32
#define V_SLLI _mm512_slli_epi32
#define V_IEQ _mm512_cmpeq_epi32_mask
#define V_CMP _mm512_cmp_ps_mask
#define V_MOR(a, b) ((VM)((a) | (b)))
#define V_SELECT(m, a, b) _mm512_mask_blend_ps(m, b, a)  /* m ? a : b */
#define V_ISELECT(m, a, b) _mm512_mask_blend_epi32(m, b, a)
#define V_IAND _mm512_and_si512
#define V_IOR _mm512_or_si512
#define V_SQRT _mm512_sqrt_ps
#define V_ALL(m) ((m) == 0xFFFF)
#define V_ANY(m) ((m) != 0)

#define BC(u) _mm512_castsi512_ps(_mm512_set1_epi32((int)(u)))
/* logf's split of x into m 2^e, m in [0.75, 1.5): getmant and getexp (e = 128 where x * 4/3 is inf) */
static inline void sleef_log_reduce16(__m512 x, __m512 *e, __m512 *m) {
    *m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_nan);
    __m512 ex = _mm512_getexp_ps(_mm512_mul_ps(x, BC(0x3faaaaab)));
    *e = _mm512_mask_mov_ps(ex, _mm512_cmp_ps_mask(ex, BC(0x7f800000), _CMP_EQ_OQ), BC(0x43000000));
}

/* logf's special values by one vfixupimmps: +inf, NaN, negative x and zeros */
static inline __m512 sleef_log_special16(__m512 x, __m512 r) {
    return _mm512_fixupimm_ps(r, x, _mm512_set1_epi32(0x2530400), 0);
}

/* log1pf's split: e = getexp((x + 1) * 4/3) (128 where that is inf), m = fma(2^-e, x, 2^-e - 1) */
static inline void sleef_log1p_reduce16(__m512 x, __m512 *e, __m512 *m) {
    __m512 ex = _mm512_getexp_ps(_mm512_mul_ps(_mm512_add_ps(x, BC(0x3f800000)), BC(0x3faaaaab)));
    *e = ex = _mm512_mask_mov_ps(ex, _mm512_cmp_ps_mask(ex, BC(0x7f800000), _CMP_EQ_OQ), BC(0x43000000));
    __m512 t = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(
                   _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_cvtps_epi32(ex)), 23), _mm512_set1_epi32(0x3f800000)));
    *m = _mm512_fmadd_ps(t, x, _mm512_add_ps(BC(0xbf800000), t));
}
#undef BC

#include "invact_sleef.h"

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
