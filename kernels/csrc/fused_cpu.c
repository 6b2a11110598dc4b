/*
 * Fused elementwise ops of a decoder layer on CPU, fp32: RMSNorm (optionally after the residual
 * add), SiLU(gate) * up, and rotary embedding applied in place.
 *
 * Why: at decode batch sizes each of these is several small torch ops (RMSNorm alone is six),
 * and a decode step of a 30-layer model issues ~2000 of them; their dispatch, allocation and
 * extra passes over memory cost about as much as the attention. One pass in C each.
 *
 * Every row is computed alone, in an order that depends only on that row (8-lane sums reduced
 * in a fixed tree, then the tail in order), so a row's output does not depend on the other rows
 * or on the thread count. RoPE is the same two products and one sum per element as the torch
 * formula (built with -ffp-contract=off: GCC would otherwise fuse a mul and an add into one
 * FMA, rounding once instead of twice), so it equals torch bit for bit.
 *
 * Layouts: contiguous rows of ``dim`` floats; RoPE's qkv rows are ``stride`` floats apart.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "vec_exp.h"

#define PARALLEL_MIN (1 << 16) /* elements below which waking threads costs more */

static inline float reduce_lanes(__m256 acc) {
    __m128 lo = _mm256_castps256_ps128(acc), hi = _mm256_extractf128_ps(acc, 1);
    __m128 s = _mm_add_ps(lo, hi);
    __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

static inline float sum_squares(const float *x, int64_t dim) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    float s = reduce_lanes(acc);
    for (; i < dim; i++) s += x[i] * x[i];
    return s;
}

/* y = w * (x * (1 / sqrt(mean(x^2) + eps))): HF's two roundings (normalize, then scale). */
static inline void norm_row(const float *x, const float *w, float *y, int64_t dim, float eps) {
    float inv = 1.0f / sqrtf(sum_squares(x, dim) / (float)dim + eps);
    __m256 vinv = _mm256_set1_ps(inv);
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {
        __m256 h = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), h));
    }
    for (; i < dim; i++) y[i] = w[i] * (x[i] * inv);
}

int rms_norm_f32(const float *x, const float *w, float *y, int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for schedule(static) if (rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * dim, w, y + r * dim, dim, eps);
    return 0;
}

/* s = x + d (stored: the new residual stream), y = rms_norm(s). */
int add_rms_norm_f32(const float *x, const float *d, float *s, const float *w, float *y,
                     int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for schedule(static) if (rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim, *dr = d + r * dim;
        float *sr = s + r * dim;
        int64_t i = 0;
        for (; i + 8 <= dim; i += 8)
            _mm256_storeu_ps(sr + i, _mm256_add_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(dr + i)));
        for (; i < dim; i++) sr[i] = xr[i] + dr[i];
        norm_row(sr, w, y + r * dim, dim, eps);
    }
    return 0;
}

/* y[r, i] = silu(gu[r, i]) * gu[r, inter + i]: the gate and up halves of one fused GEMM. */
int silu_mul_f32(const float *gu, float *y, int64_t rows, int64_t inter) {
#pragma omp parallel for schedule(static) if (rows * inter >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * inter, *u = g + inter;
        float *yr = y + r * inter;
        const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
        }
        for (; i < inter; i++) yr[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
    return 0;
}

/* In place on each of ``heads`` vectors of ``head_dim`` starting at x + r * stride: HF's
 * rotate-half RoPE, out = x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1]. */
static inline void rope_heads(float *x, const float *cos, const float *sin, int64_t heads,
                              int64_t head_dim) {
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * head_dim;
        int64_t i = 0;
        for (; i + 8 <= half; i += 8) {
            __m256 x1 = _mm256_loadu_ps(v + i), x2 = _mm256_loadu_ps(v + half + i);
            __m256 c1 = _mm256_loadu_ps(cos + i), c2 = _mm256_loadu_ps(cos + half + i);
            __m256 s1 = _mm256_loadu_ps(sin + i), s2 = _mm256_loadu_ps(sin + half + i);
            __m256 neg = _mm256_sub_ps(_mm256_setzero_ps(), x2);
            _mm256_storeu_ps(v + i, _mm256_add_ps(_mm256_mul_ps(x1, c1), _mm256_mul_ps(neg, s1)));
            _mm256_storeu_ps(v + half + i,
                             _mm256_add_ps(_mm256_mul_ps(x2, c2), _mm256_mul_ps(x1, s2)));
        }
        for (; i < half; i++) {
            float x1 = v[i], x2 = v[half + i];
            v[i] = x1 * cos[i] + -x2 * sin[i];
            v[half + i] = x2 * cos[half + i] + x1 * sin[half + i];
        }
    }
}

/* q and k rows of a fused qkv output (row stride ``stride``), rotated in place by each token's
 * cos/sin rows [rows, head_dim]. */
int rope_qk_f32(float *qkv, const float *cos, const float *sin, int64_t rows, int64_t stride,
                int64_t q_heads, int64_t k_heads, int64_t head_dim) {
#pragma omp parallel for schedule(static) if (rows * stride >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        float *row = qkv + r * stride;
        const float *c = cos + r * head_dim, *s = sin + r * head_dim;
        rope_heads(row, c, s, q_heads, head_dim);
        rope_heads(row + q_heads * head_dim, c, s, k_heads, head_dim);
    }
    return 0;
}
