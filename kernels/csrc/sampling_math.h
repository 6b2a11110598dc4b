/*
 * Vector building blocks of csrc/sampling_cpu.c: the counter-based uniforms of
 * kernels/sampling.py (bit for bit), a log polynomial for 8 lanes (exp: vec_exp.h), and a running
 * first-maximum. Header-only (static inline); kernels/_cbuild.py hashes every header here
 * into each source's build key.
 */
#ifndef SAMPLING_MATH_H
#define SAMPLING_MATH_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "vec_exp.h"

#define MUL 0x45D9F3Bu

/* ------------------------------------------------------------------ counter-based uniforms */
static inline uint32_t h32(uint32_t x) {
    x ^= x >> 16;
    x *= MUL;
    x ^= x >> 16;
    x *= MUL;
    return x ^ (x >> 16);
}

static inline __m256i h32_8(__m256i x) {
    const __m256i mul = _mm256_set1_epi32((int)MUL);
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, mul);
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, mul);
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

typedef struct {
    uint32_t k1, k2;
} Keys;

/* The row keys of kernels/sampling.py's _row_keys: the 32-bit halves of the two's-complement
 * seed and position, mixed in order. */
static inline Keys row_keys(int64_t seed, int64_t position) {
    const uint64_t s = (uint64_t)seed, p = (uint64_t)position;
    uint32_t k = h32((uint32_t)s ^ 0x9E3779B9u);
    k = h32(k ^ (uint32_t)(s >> 32));
    k = h32(k ^ (uint32_t)p);
    k = h32(k ^ (uint32_t)(p >> 32));
    return (Keys){k, h32(k ^ 0x85EBCA6Bu)};
}

/* Uniforms in (0, 1) of indices i..i+7: (bits >> 9) * 2^-23 + 2^-24, exact in fp32. */
static inline __m256 uniform8(Keys keys, int64_t i) {
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)i),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i bits = h32_8(_mm256_add_epi32(idx, _mm256_set1_epi32((int)keys.k1)));
    bits = h32_8(_mm256_xor_si256(bits, _mm256_set1_epi32((int)keys.k2)));
    const __m256 top = _mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 9));
    return _mm256_add_ps(_mm256_mul_ps(top, _mm256_set1_ps(0x1p-23f)), _mm256_set1_ps(0x1p-24f));
}

static inline float uniform1(Keys keys, int64_t i) {
    const uint32_t bits = h32(h32((uint32_t)i + keys.k1) ^ keys.k2);
    return (float)(bits >> 9) * 0x1p-23f + 0x1p-24f;
}

/* ------------------------------------------------------------------ vector log */
/* log(x), 8 lanes, for positive normal x (all this file asks for): x = m 2^e with m in
 * [sqrt(1/2), sqrt(2)); log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its
 * series to s^13 (truncation < 1e-10 relative); plus e ln2 in two parts. */
static inline __m256 log8(__m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F800000)));
    const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
    e = _mm256_add_epi32(e, _mm256_and_si256(_mm256_castps_si256(big), _mm256_set1_epi32(1)));
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 s = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
    const __m256 s2 = _mm256_mul_ps(s, s);
    __m256 p = _mm256_set1_ps(1.0f / 13.0f);
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 11.0f));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 9.0f));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 7.0f));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 5.0f));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 3.0f));
    const __m256 two_s = _mm256_add_ps(s, s);
    const __m256 log_m = _mm256_fmadd_ps(_mm256_mul_ps(two_s, s2), p, two_s);
    const __m256 ef = _mm256_cvtepi32_ps(e);
    const __m256 hi = _mm256_fmadd_ps(ef, _mm256_set1_ps(0.693145751953125f), log_m);
    return _mm256_fmadd_ps(ef, _mm256_set1_ps(1.42860682030941723212e-6f), hi);
}

static inline float exp1(float x) {
    float lane[8];
    _mm256_storeu_ps(lane, exp8(_mm256_set1_ps(x)));
    return lane[0];
}

static inline float log1(float x) {
    float lane[8];
    _mm256_storeu_ps(lane, log8(_mm256_set1_ps(x)));
    return lane[0];
}

/* ------------------------------------------------------------------ first maximum */
/* Running first-maximum over 8 lanes: lane j holds the best of indices = j mod 8 so far
 * (strictly greater replaces, so the earliest wins within a lane); the lanes are merged by
 * value, then lowest index. NaNs are tracked apart: any NaN makes the first NaN the answer. */
typedef struct {
    __m256 best;
    __m256i at;
    __m256 nan;
} Argmax8;

static inline Argmax8 argmax8_start(void) {
    return (Argmax8){_mm256_set1_ps(-INFINITY), _mm256_set1_epi32(-1), _mm256_setzero_ps()};
}

static inline void argmax8_step(Argmax8 *a, __m256 v, int64_t i) {
    const __m256 gt = _mm256_cmp_ps(v, a->best, _CMP_GT_OQ);
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)i),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    a->best = _mm256_blendv_ps(a->best, v, gt);
    a->at = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(a->at), _mm256_castsi256_ps(idx), gt));
    a->nan = _mm256_or_ps(a->nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* Merges the lanes with the scalar tail's best (`tail_best` at `tail_at`, or -1). Returns
 * -1 when a NaN was seen (the caller scans for the first one) and 0 when nothing exceeded
 * -inf (every value -inf: index 0, as torch). */
static inline int64_t argmax8_finish(const Argmax8 *a, float tail_best, int64_t tail_at) {
    if (_mm256_movemask_ps(a->nan)) return -1;
    float best[8];
    int32_t at[8];
    _mm256_storeu_ps(best, a->best);
    _mm256_storeu_si256((__m256i *)at, a->at);
    float b = tail_best;
    int64_t where = tail_at;
    for (int j = 0; j < 8; j++)
        if (at[j] >= 0 && (best[j] > b || (best[j] == b && (where < 0 || at[j] < where))))
            b = best[j], where = at[j];
    return where < 0 ? 0 : where;
}

static inline int64_t first_nan(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (x[i] != x[i]) return i;
    return 0;
}

static inline int64_t argmax_row(const float *x, int64_t V) {
    Argmax8 a = argmax8_start();
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) argmax8_step(&a, _mm256_loadu_ps(x + i), i);
    float tail_best = -INFINITY;
    int64_t tail_at = -1;
    for (; i < V; i++) {
        if (x[i] != x[i]) return first_nan(x, V);
        if (x[i] > tail_best) tail_best = x[i], tail_at = i;
    }
    const int64_t where = argmax8_finish(&a, tail_best, tail_at);
    return where < 0 ? first_nan(x, V) : where;
}

#endif /* SAMPLING_MATH_H */
