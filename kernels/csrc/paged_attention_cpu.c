/*
 * Paged attention for fp32 on CPU, reading K/V pages in place (no gather copy).
 *
 * Each (query row, KV head) is computed independently, in a fixed order that depends only on
 * that row's own query, position and KV: dot products use 8-lane FMAs summed in a fixed lane
 * tree, the softmax numerators come from one vector exp (the same instructions for every
 * score) and are summed in 8-lane partial sums and the tree, and values accumulate in position
 * order. A row's
 * result is therefore bitwise identical whatever else is in the batch, however its prefill was
 * chunked, and whether it runs as prefill or decode (batch invariance by construction).
 *
 * Layouts: q, out [T, Hq, D]; caches [P, page_size, Hk, D]; page_table [B, max_pages] int64;
 * row_seq [T] (row of page_table), row_pos [T] (absolute position; attends to 0..pos).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec_exp.h"

#define LANES 8
#define PARALLEL_MIN (1 << 19) /* query-key multiply-adds */
#define PARALLEL_MIN_HEADS (1 << 15) /* the same, with a task per query head */

/* The fixed lane tree: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)). */
static inline float reduce_lanes(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

/* q . k over D: 8-lane FMAs over d in order, then the lane tree; a scalar tail in order. */
static inline float dot(const float *a, const float *b, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    float s = reduce_lanes(acc);
    for (; d < D; d++) s = fmaf(a[d], b[d], s);
    return s;
}

/* dot() of q with the keys at k, k + kstride, k + 2 kstride, k + 3 kstride, times scale: each
 * the same sequence as dot() (so the same bits), four chains in flight instead of one. */
static inline void dot4(const float *q, const float *k, int64_t kstride, int64_t D, float scale,
                        float *s) {
    const float *k1 = k + kstride, *k2 = k1 + kstride, *k3 = k2 + kstride;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + d), a3);
    }
    float s0 = reduce_lanes(a0), s1 = reduce_lanes(a1), s2 = reduce_lanes(a2);
    float s3 = reduce_lanes(a3);
    for (; d < D; d++) {
        s0 = fmaf(q[d], k[d], s0);
        s1 = fmaf(q[d], k1[d], s1);
        s2 = fmaf(q[d], k2[d], s2);
        s3 = fmaf(q[d], k3[d], s3);
    }
    s[0] = s0 * scale, s[1] = s1 * scale, s[2] = s2 * scale, s[3] = s3 * scale;
}

/* s[0..n) = exp(s - max) in place; returns their sum (8-lane partial sums in order, the lane
 * tree). `s` has room for n rounded up to 8; the padding lanes are computed and dropped. */
static float softmax_numerators(float *s, int64_t n) {
    float m = -INFINITY;
    for (int64_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
    const __m256 mv = _mm256_set1_ps(m);
    __m256 total = _mm256_setzero_ps();
    const int64_t padded = (n + LANES - 1) / LANES * LANES;
    for (int64_t j = n; j < padded; j++) s[j] = -INFINITY;
    for (int64_t j = 0; j < padded; j += LANES) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        total = _mm256_add_ps(total, e);
    }
    return reduce_lanes(total);
}

/* Positions 0..n-1 in order, page by page: `j` the position, `row` its cache row. The page
 * walk replaces a division and a modulo by the (runtime) page size per position, which cost
 * more than the arithmetic they addressed. */
#define FOR_POSITIONS(n, pages, ps, j, row)                                                      \
    for (int64_t page_ = 0, j = 0; j < (n); page_++)                                             \
        for (int64_t row = (pages)[page_] * (ps), end_ = row + ((n) - j < (ps) ? (n) - j : (ps)); \
             row < end_; row++, j++)

#define CHUNK (4 * LANES) /* value dims per pass: four 8-lane accumulators per head */

/* out[d] for d in [d_from, D) = sum_j w[j] v_j[d] / total, accumulated in position order. */
static void weighted_values(const float *w, int64_t n, const float *v_cache, const int64_t *pages,
                            int64_t ps, int64_t row_stride, int64_t D, float total, float *out,
                            int64_t d_from) {
    for (int64_t d0 = d_from; d0 < D; d0 += CHUNK) {
        const int64_t width = D - d0 < CHUNK ? D - d0 : CHUNK;
        if (width == CHUNK) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            FOR_POSITIONS(n, pages, ps, j, row) {
                const float *v = v_cache + row * row_stride + d0;
                const __m256 wj = _mm256_set1_ps(w[j]);
                a0 = _mm256_fmadd_ps(wj, _mm256_loadu_ps(v), a0);
                a1 = _mm256_fmadd_ps(wj, _mm256_loadu_ps(v + 8), a1);
                a2 = _mm256_fmadd_ps(wj, _mm256_loadu_ps(v + 16), a2);
                a3 = _mm256_fmadd_ps(wj, _mm256_loadu_ps(v + 24), a3);
            }
            const __m256 inv = _mm256_set1_ps(1.0f / total);
            _mm256_storeu_ps(out + d0, _mm256_mul_ps(a0, inv));
            _mm256_storeu_ps(out + d0 + 8, _mm256_mul_ps(a1, inv));
            _mm256_storeu_ps(out + d0 + 16, _mm256_mul_ps(a2, inv));
            _mm256_storeu_ps(out + d0 + 24, _mm256_mul_ps(a3, inv));
            continue;
        }
        for (int64_t d = d0; d < d0 + width; d++) { /* head_dim not a multiple of 32 */
            float acc = 0.0f;
            FOR_POSITIONS(n, pages, ps, j, row) acc = fmaf(w[j], v_cache[row * row_stride + d], acc);
            out[d] = acc * (1.0f / total);
        }
    }
}

/* Three query heads of one KV head at once, over the full 32-wide chunks of D: per head the
 * same accumulation as weighted_values (position order, so the same bits), but twelve
 * independent FMA chains instead of four and each V row read once for the three. Four chains
 * waited on FMA latency at every position. */
#define ACC4(h) __m256 h##0 = _mm256_setzero_ps(), h##1 = h##0, h##2 = h##0, h##3 = h##0;
#define FMA4(h, wv)                                                                              \
    h##0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v), h##0);                                        \
    h##1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + 8), h##1);                                    \
    h##2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + 16), h##2);                                   \
    h##3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + 24), h##3);
#define STORE4(h, total, o)                                                                      \
    {                                                                                            \
        const __m256 inv = _mm256_set1_ps(1.0f / (total));                                       \
        _mm256_storeu_ps(o + d0, _mm256_mul_ps(h##0, inv));                                      \
        _mm256_storeu_ps(o + d0 + 8, _mm256_mul_ps(h##1, inv));                                  \
        _mm256_storeu_ps(o + d0 + 16, _mm256_mul_ps(h##2, inv));                                 \
        _mm256_storeu_ps(o + d0 + 24, _mm256_mul_ps(h##3, inv));                                 \
    }
static void weighted_values3(const float *w, int64_t stride, int64_t n, const float *v_cache,
                             const int64_t *pages, int64_t ps, int64_t row_stride, int64_t D,
                             const float *total, float *out) {
    const float *w0 = w, *w1 = w + stride, *w2 = w + 2 * stride;
    float *o0 = out, *o1 = out + D, *o2 = out + 2 * D;
    for (int64_t d0 = 0; d0 + CHUNK <= D; d0 += CHUNK) {
        ACC4(a) ACC4(b) ACC4(c)
        FOR_POSITIONS(n, pages, ps, j, row) {
            const float *v = v_cache + row * row_stride + d0;
            const __m256 x = _mm256_set1_ps(w0[j]), y = _mm256_set1_ps(w1[j]);
            const __m256 z = _mm256_set1_ps(w2[j]);
            FMA4(a, x) FMA4(b, y) FMA4(c, z)
        }
        STORE4(a, total[0], o0) STORE4(b, total[1], o1) STORE4(c, total[2], o2)
    }
}

static void attend_row(const float *q, const float *k_cache, const float *v_cache,
                       const int64_t *pages, int64_t pos, int64_t hk, int64_t group,
                       int64_t Hk, int64_t D, int64_t ps, float scale, float *scores,
                       int64_t stride, float *out) {
    const int64_t n = pos + 1;
    const int64_t row_stride = Hk * D;
    /* scores[g * stride + j] for the `group` query heads sharing this KV head */
    for (int64_t page = 0, j = 0; j < n; page++) {
        const int64_t first = pages[page] * ps, count = n - j < ps ? n - j : ps;
        int64_t r = 0;
        for (; r + 4 <= count; r += 4, j += 4) { /* four consecutive rows of the page */
            const float *k = k_cache + (first + r) * row_stride + hk * D;
            for (int64_t g = 0; g < group; g++)
                dot4(q + g * D, k, row_stride, D, scale, scores + g * stride + j);
        }
        for (; r < count; r++, j++) {
            const float *k = k_cache + (first + r) * row_stride + hk * D;
            for (int64_t g = 0; g < group; g++)
                scores[g * stride + j] = dot(q + g * D, k, D) * scale;
        }
    }
    const float *values = v_cache + hk * D;
    int64_t g = 0;
    for (; g + 3 <= group; g += 3) {
        float total[3];
        for (int i = 0; i < 3; i++) total[i] = softmax_numerators(scores + (g + i) * stride, n);
        weighted_values3(scores + g * stride, stride, n, values, pages, ps, row_stride, D, total,
                         out + g * D);
        for (int i = 0; i < 3; i++) /* the dims past the last full chunk, if any */
            weighted_values(scores + (g + i) * stride, n, values, pages, ps, row_stride, D,
                            total[i], out + (g + i) * D, D / CHUNK * CHUNK);
    }
    for (; g < group; g++) {
        float *s = scores + g * stride;
        const float total = softmax_numerators(s, n);
        weighted_values(s, n, values, pages, ps, row_stride, D, total, out + g * D, 0);
    }
}

int paged_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                        const int64_t *page_table, const int64_t *row_seq,
                        const int64_t *row_pos, float *out, int64_t T, int64_t Hq, int64_t Hk,
                        int64_t D, int64_t ps, int64_t max_pages, float scale) {
    const int64_t group = Hq / Hk;
    int failed = 0;
    /* Few (row, KV head) tasks -- a decode step of a few sequences -- would leave a thread
     * idle while the other waits on the KV rows from DRAM (a batch-1 layer: 3 tasks, ~40 us
     * on one thread); then every query head is its own task, on every thread. The same bits:
     * a head's scores, softmax and values never depend on the heads it is grouped with. */
    const int per_head = T * Hk < 4 * (int64_t)omp_get_max_threads();
    /* Below this much work waking the second thread costs more than it saves (per-head
     * tasks pay off sooner: their reads wait on DRAM). Which thread computes a row never
     * changes its result. */
    const int64_t work = T * Hq * max_pages * ps * D;
    const int par = work >= (per_head ? PARALLEL_MIN_HEADS : PARALLEL_MIN);
    const int64_t heads = per_head ? 1 : group, tasks_per_row = Hq / heads;
#pragma omp parallel if (par)
    {
        const int64_t stride = (max_pages * ps + LANES - 1) / LANES * LANES;
        float *scores = (float *)malloc(sizeof(float) * heads * stride);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t task = 0; task < T * tasks_per_row; task++) {
                const int64_t t = task / tasks_per_row, h = task % tasks_per_row * heads;
                const int64_t *pages = page_table + row_seq[t] * max_pages;
                attend_row(q + (t * Hq + h) * D, k_cache, v_cache, pages, row_pos[t], h / group,
                           heads, Hk, D, ps, scale, scores, stride, out + (t * Hq + h) * D);
            }
            free(scores);
        }
    }
    return failed;
}
