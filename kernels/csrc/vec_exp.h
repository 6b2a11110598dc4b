/*
 * exp for 8 fp32 lanes, shared by the attention's softmax, the sampler and SiLU: one formula,
 * so every kernel rounds an exponential the same way. Header-only (static inline);
 * kernels/_cbuild.py hashes every header of csrc/ into each source's build key.
 */
#ifndef VEC_EXP_H
#define VEC_EXP_H

#include <immintrin.h>

/* exp(x): x = n ln2 + r (|r| <= ln2 / 2, ln2 split in two for an exact n ln2), e^r by its
 * degree-7 Taylor polynomial (relative error < 1e-8 before rounding), times 2^n built in the
 * exponent bits. 0 below -87, x clamped to 88 above (e^88 ~ 1.7e38 stays finite), NaN stays
 * NaN. The same instructions for every lane: a value's result never depends on its lane. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f), nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), given = x;
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723212e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i scale =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
    return _mm256_blendv_ps(e, given, nan);
}

#endif
