/*
 * Paged attention for fp32 on CPU, reading K/V pages in place (no gather copy).
 *
 * Each (query row, KV head) is computed independently, in a fixed order that depends only on
 * that row's own query, position and KV: dot products use 8 explicit lanes summed in a fixed
 * order, softmax sums run left to right, and values accumulate in position order. A row's
 * result is therefore bitwise identical whatever else is in the batch, however its prefill was
 * chunked, and whether it runs as prefill or decode (batch invariance by construction).
 *
 * Layouts: q, out [T, Hq, D]; caches [P, page_size, Hk, D]; page_table [B, max_pages] int64;
 * row_seq [T] (row of page_table), row_pos [T] (absolute position; attends to 0..pos).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define LANES 8

static float dot_fixed(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[d + l] * b[d + l];
    for (int64_t l = 0; d < n; d++, l++) acc[l] += a[d] * b[d];
    float s01 = acc[0] + acc[1], s23 = acc[2] + acc[3];
    float s45 = acc[4] + acc[5], s67 = acc[6] + acc[7];
    return (s01 + s23) + (s45 + s67);
}

static void attend_row(const float *q, const float *k_cache, const float *v_cache,
                       const int64_t *pages, int64_t pos, int64_t hk, int64_t group,
                       int64_t Hk, int64_t D, int64_t ps, float scale, float *scores,
                       float *out) {
    const int64_t n = pos + 1;
    const int64_t row_stride = Hk * D;
    /* scores[g * n + j] for the `group` query heads sharing this KV head */
    for (int64_t j = 0; j < n; j++) {
        const float *k = k_cache + (pages[j / ps] * ps + j % ps) * row_stride + hk * D;
        for (int64_t g = 0; g < group; g++) scores[g * n + j] = dot_fixed(q + g * D, k, D) * scale;
    }
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * n;
        float m = -INFINITY;
        for (int64_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
        float total = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            s[j] = expf(s[j] - m);
            total += s[j];
        }
        float *o = out + g * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            const float *v = v_cache + (pages[j / ps] * ps + j % ps) * row_stride + hk * D;
            const float w = s[j];
            for (int64_t d = 0; d < D; d++) o[d] += w * v[d];
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < D; d++) o[d] *= inv;
    }
}

int paged_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                        const int64_t *page_table, const int64_t *row_seq,
                        const int64_t *row_pos, float *out, int64_t T, int64_t Hq, int64_t Hk,
                        int64_t D, int64_t ps, int64_t max_pages, float scale) {
    const int64_t group = Hq / Hk;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * group * max_pages * ps);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t task = 0; task < T * Hk; task++) {
                const int64_t t = task / Hk, hk = task % Hk;
                const int64_t *pages = page_table + row_seq[t] * max_pages;
                const float *qrow = q + (t * Hq + hk * group) * D;
                float *orow = out + (t * Hq + hk * group) * D;
                attend_row(qrow, k_cache, v_cache, pages, row_pos[t], hk, group, Hk, D, ps,
                           scale, scores, orow);
            }
            free(scores);
        }
    }
    return failed;
}
