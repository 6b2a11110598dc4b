/*
 * Token choice for fp32 logits rows on CPU: greedy argmax, and seeded sampling with
 * temperature, top-k, top-p and min-p (kernels/sampling.py's semantics).
 *
 * Why: the torch formulation materializes a dozen [rows, vocab] temporaries (an int64 hash
 * chain, log_softmax, two logs, masks) -- ~58 ms a step for 32 rows of a 49k vocabulary on
 * two cores, more than half a decode step -- where one pass per row over the logits suffices.
 *
 * Per row (independent of every other row, in a fixed order: batch invariant):
 *   greedy (temperature <= 0): the index of the first maximum of the logits; a NaN counts as
 *     the maximum (as torch.argmax).
 *   sampled: z = logits / T; c = max(z) + log(sum(exp(z - max(z)))); logp = z - c;
 *     with p = exp(logp) ranked descending (ties: lower id first): top-k (0 < k < V) keeps
 *     the first k; top-p (< 1) the first j whose mass before them, over the kept mass, is
 *     < top_p (the first always); min-p (> 0) tokens with p >= min_p * max(p);
 *     u = the counter-based uniform of (seed, position, index) (bitwise kernels/sampling.py's);
 *     token = the first maximum of logp - log(-log(u)) over the kept tokens (Gumbel-max).
 * The uniforms are bit for bit the torch reference's; exp (vec_exp.h) and log
 * (sampling_math.h) are polynomials (a few ulp from libm's) and top-p's masses are summed in
 * double, so a token can differ from the torch path's only where float rounding decides: two
 * perturbed scores, or a top-p boundary, within rounding of each other. Top-k / top-p never sort: a quickselect
 * finds top-k's set, one weighted by mass top-p's, and the kept tokens are scored one by one
 * when few, in one vector pass over the vocabulary when many.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "sampling_math.h"

#define PARALLEL_MIN_ROWS 2

/* ------------------------------------------------------------------ one sampled row */
/* z = x / T (the division torch's `logits / T` does) and the largest z. */
static float scale_and_max(const float *x, float *z, int64_t V, float T) {
    const __m256 t = _mm256_set1_ps(T);
    __m256 m = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) {
        const __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + i), t);
        _mm256_storeu_ps(z + i, v);
        m = _mm256_max_ps(m, v);
    }
    float lane[8], best = -INFINITY;
    _mm256_storeu_ps(lane, m);
    for (int j = 0; j < 8; j++) best = lane[j] > best ? lane[j] : best;
    for (; i < V; i++) {
        z[i] = x[i] / T;
        best = z[i] > best ? z[i] : best;
    }
    return best;
}

/* sum of exp(z - mx): 8-lane partial sums in index order, then lanes 0..7 in order, then the
 * tail in order. */
static float sum_exp(const float *z, int64_t V, float mx) {
    const __m256 m = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(z + i), m)));
    float lane[8], sum = 0.0f;
    _mm256_storeu_ps(lane, acc);
    for (int j = 0; j < 8; j++) sum += lane[j];
    for (; i < V; i++) sum += exp1(z[i] - mx);
    return sum;
}

typedef struct {
    float c, floor_p; /* max + log(sum), min_p * the largest probability */
    int filter;          /* min-p on */
    Keys keys;
} Row;

/* One token's score, the same operations as a lane of the vector loop (so the same bits). */
static inline float score1(const float *z, int64_t i, const Row *p) {
    const float logp = z[i] - p->c;
    const float score = logp - log1(0.0f - log1(uniform1(p->keys, i)));
    return p->filter && !(exp1(logp) >= p->floor_p) ? -INFINITY : score;
}

/* `z` is scratch for V floats. */
static int64_t sample_row(const float *x, float *z, int64_t V, float T, float min_p, Keys keys) {
    const float mx = scale_and_max(x, z, V, T);
    const float c = mx + log1(sum_exp(z, V, mx));
    const Row p = {c, min_p * exp1(mx - c), min_p > 0.0f, keys};
    const __m256 cv = _mm256_set1_ps(c), fv = _mm256_set1_ps(p.floor_p);
    Argmax8 a = argmax8_start();
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) {
        const __m256 logp = _mm256_sub_ps(_mm256_loadu_ps(z + i), cv);
        const __m256 noise = log8(_mm256_sub_ps(_mm256_setzero_ps(), log8(uniform8(keys, i))));
        __m256 score = _mm256_sub_ps(logp, noise);
        if (p.filter) {
            const __m256 kept = _mm256_cmp_ps(exp8(logp), fv, _CMP_GE_OQ);
            score = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), score, kept);
        }
        argmax8_step(&a, score, i);
    }
    float tail_best = -INFINITY;
    int64_t tail_at = -1;
    int nan = 0;
    for (; i < V; i++) {
        const float score = score1(z, i, &p);
        nan |= score != score;
        if (score > tail_best) tail_best = score, tail_at = i;
    }
    const int64_t where = nan ? -1 : argmax8_finish(&a, tail_best, tail_at);
    if (where >= 0) return where;
    for (i = 0; i < V; i++) { /* a NaN score wins, the first one (as torch.argmax) */
        const float score = score1(z, i, &p);
        if (score != score) return i;
    }
    return 0;
}

/* ------------------------------------------------------------------ top-k / top-p rows */
typedef struct {
    float *z, *prob; /* x / T; exp(z - c) */
    int32_t *order;  /* token ids, the first ones brought forward by rank */
} Scratch;

/* Whether token a ranks before token b: higher probability, then lower id (a total order). */
static inline int ranks_before(const float *prob, int32_t a, int32_t b) {
    return prob[a] > prob[b] || (prob[a] == prob[b] && a < b);
}

static inline int median_of_three(const float *prob, int32_t a, int32_t b, int32_t c) {
    if (ranks_before(prob, a, b) == ranks_before(prob, b, c)) return b;
    return ranks_before(prob, a, b) == ranks_before(prob, a, c) ? c : a;
}

static inline void swap_ids(int32_t *order, int64_t i, int64_t j) {
    const int32_t t = order[i];
    order[i] = order[j];
    order[j] = t;
}

/* Lomuto partition of order[lo..hi] around a median-of-three pivot: the tokens ranking
 * before it first, then it; returns its position and (in *before) their mass. */
static int64_t partition(const float *prob, int32_t *order, int64_t lo, int64_t hi,
                         double *before) {
    const int64_t mid = lo + (hi - lo) / 2;
    const int32_t pivot = median_of_three(prob, order[lo], order[mid], order[hi]);
    swap_ids(order, pivot == order[lo] ? lo : pivot == order[mid] ? mid : hi, hi);
    int64_t q = lo;
    double mass = 0.0;
    for (int64_t i = lo; i < hi; i++)
        if (ranks_before(prob, order[i], pivot)) {
            mass += prob[order[i]];
            swap_ids(order, i, q++);
        }
    swap_ids(order, q, hi);
    *before = mass;
    return q;
}

/* Reorders order[0..n) so that its first m entries are the m best-ranked (quickselect). */
static void select_best(const float *prob, int32_t *order, int64_t n, int64_t m) {
    int64_t lo = 0, hi = n - 1;
    double unused;
    while (lo < hi) {
        const int64_t q = partition(prob, order, lo, hi, &unused);
        if (q == m - 1) return;
        if (q > m - 1)
            hi = q - 1;
        else
            lo = q + 1;
    }
}

/* How many of order[0..n) top-p keeps, brought to its front: a token is kept while the
 * mass ranked before it is below `target`, so the kept tokens are those up to the one at
 * which the cumulative mass in rank order first reaches it (all of them if it never does).
 * A quickselect weighted by mass: each partition tells on which side that token lies. */
static int64_t mass_cutoff(const float *prob, int32_t *order, int64_t n, double target) {
    int64_t lo = 0, hi = n - 1;
    double reached = 0.0; /* mass of order[0..lo), all ranking before order[lo..hi] */
    while (lo < hi) {
        double before;
        const int64_t q = partition(prob, order, lo, hi, &before);
        if (reached + before >= target)
            hi = q - 1;
        else if (reached + before + prob[order[q]] >= target)
            return q + 1;
        else {
            reached += before + prob[order[q]];
            lo = q + 1;
        }
    }
    return lo + 1;
}

/* How many tokens top-k / top-p keep, brought to the front of `order` (in no rank order). */
static int64_t nucleus(const float *prob, int32_t *order, int64_t V, int64_t k, float top_p) {
    const int64_t limit = k > 0 && k < V ? k : V;
    for (int64_t i = 0; i < V; i++) order[i] = (int32_t)i;
    if (limit < V) select_best(prob, order, V, limit);
    if (!(top_p < 1.0f)) return limit;
    double total = 0.0; /* the mass top-p renormalizes by: what top-k kept */
    for (int64_t i = 0; i < limit; i++) total += prob[order[i]];
    return mass_cutoff(prob, order, limit, (double)top_p * total);
}

/* The first maximum of the kept tokens' scores when few are kept: scored one by one. */
static int64_t score_kept(const Scratch *s, int64_t kept, float c, float floor_p, Keys keys) {
    int64_t best = -1;
    float best_score = -INFINITY;
    for (int64_t j = 0; j < kept; j++) {
        const int32_t t = s->order[j];
        if (!(s->prob[t] >= floor_p)) continue;
        const float logp = s->z[t] - c;
        const float score = logp - log1(0.0f - log1(uniform1(keys, t)));
        if (score > best_score || (score == best_score && t < best)) best_score = score, best = t;
    }
    return best < 0 ? 0 : best; /* nothing kept (min_p > 1): every score -inf, torch gives 0 */
}

static int64_t filtered_row(const float *x, const Scratch *s, int64_t V, float T, int64_t k,
                            float top_p, float min_p, Keys keys) {
    const float mx = scale_and_max(x, s->z, V, T);
    const float c = mx + log1(sum_exp(s->z, V, mx));
    if (!(c - c == 0.0f)) return 0; /* inf or NaN logits: every score is NaN (torch: the first) */
    const __m256 cv = _mm256_set1_ps(c);
    int64_t i = 0;
    for (; i + 8 <= V; i += 8)
        _mm256_storeu_ps(s->prob + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(s->z + i), cv)));
    for (; i < V; i++) s->prob[i] = exp1(s->z[i] - c);
    const int64_t kept = nucleus(s->prob, s->order, V, k, top_p);
    const float floor_p = min_p > 0.0f ? min_p * exp1(mx - c) : 0.0f; /* min-p's bar */
    if (kept <= V / 16) return score_kept(s, kept, c, floor_p, keys);
    /* Many kept: one vector pass over the vocabulary. A token is kept when it ranks before
     * the last kept one or is it (probability above, or equal with an id not above). */
    int32_t last = s->order[0];
    for (int64_t j = 1; j < kept; j++)
        if (ranks_before(s->prob, last, s->order[j])) last = s->order[j];
    const float edge = s->prob[last];
    const __m256 ev = _mm256_set1_ps(edge), fv = _mm256_set1_ps(floor_p);
    Argmax8 a = argmax8_start();
    for (i = 0; i + 8 <= V; i += 8) {
        const __m256 prob = _mm256_loadu_ps(s->prob + i);
        const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)i),
                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 upto = _mm256_castsi256_ps(
            _mm256_cmpgt_epi32(_mm256_set1_epi32(last + 1), idx)); /* id <= last */
        __m256 in = _mm256_or_ps(_mm256_cmp_ps(prob, ev, _CMP_GT_OQ),
                                 _mm256_and_ps(_mm256_cmp_ps(prob, ev, _CMP_EQ_OQ), upto));
        in = _mm256_and_ps(in, _mm256_cmp_ps(prob, fv, _CMP_GE_OQ));
        const __m256 logp = _mm256_sub_ps(_mm256_loadu_ps(s->z + i), cv);
        const __m256 noise = log8(_mm256_sub_ps(_mm256_setzero_ps(), log8(uniform8(keys, i))));
        const __m256 score = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY),
                                              _mm256_sub_ps(logp, noise), in);
        argmax8_step(&a, score, i);
    }
    float tail_best = -INFINITY;
    int64_t tail_at = -1;
    for (; i < V; i++) {
        const float prob = s->prob[i];
        if (!((prob > edge || (prob == edge && i <= last)) && prob >= floor_p)) continue;
        const float logp = s->z[i] - c;
        const float score = logp - log1(0.0f - log1(uniform1(keys, i)));
        if (score > tail_best) tail_best = score, tail_at = i;
    }
    const int64_t where = argmax8_finish(&a, tail_best, tail_at);
    return where < 0 ? 0 : where; /* no NaN here: c is finite */
}

/* top-k = 1: the best-ranked token is the first maximum of z = x / T, no noise needed (as
 * SGLang, which takes top_k = 1 as greedy). A NaN or +inf among z: 0, filtered_row's answer. */
static int64_t top1_row(const float *x, float *z, int64_t V, float T) {
    scale_and_max(x, z, V, T);
    const int64_t at = argmax_row(z, V);
    return z[at] - z[at] == 0.0f ? at : 0;
}

/* ------------------------------------------------------------------ entry points */
/* out[r] = the token of row r of logits [rows, V] (module comment): temperatures[r] <= 0 is
 * greedy; top_ks, top_ps, min_ps, seeds, positions per row. Returns -1 (and leaves rows
 * unset) when a thread cannot get its scratch memory. */
int sample_rows_f32(const float *logits, const float *temperatures, const int64_t *top_ks,
                    const float *top_ps, const float *min_ps, const int64_t *seeds,
                    const int64_t *positions, int64_t *out, int64_t rows, int64_t V) {
    int failed = 0;
#pragma omp parallel if (rows >= PARALLEL_MIN_ROWS)
    {
        Scratch s = {malloc((size_t)V * sizeof(float)), malloc((size_t)V * sizeof(float)),
                     malloc((size_t)V * sizeof(int32_t))};
        const int ok = s.z && s.prob && s.order;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *x = logits + r * V;
            const float T = temperatures[r];
            const Keys keys = row_keys(seeds[r], positions[r]);
            const int64_t k = top_ks[r];
            if (!(T > 0.0f))
                out[r] = argmax_row(x, V);
            else if (!ok) {
#pragma omp atomic write
                failed = 1;
            } else if (k == 1 && min_ps[r] <= 1.0f)
                out[r] = top1_row(x, s.z, V, T);
            else if ((k > 0 && k < V) || top_ps[r] < 1.0f)
                out[r] = filtered_row(x, &s, V, T, k, top_ps[r], min_ps[r], keys);
            else
                out[r] = sample_row(x, s.z, V, T, min_ps[r], keys);
        }
        free(s.z);
        free(s.prob);
        free(s.order);
    }
    return failed ? -1 : 0;
}

/* out[r] = the first maximum of row r (a NaN wins), as torch.argmax. */
int argmax_rows_f32(const float *logits, int64_t *out, int64_t rows, int64_t V) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_MIN_ROWS)
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(logits + r * V, V);
    return 0;
}

/* u[r, i] for rows of (seed, position): kernels/sampling.py's seeded_uniform, bit for bit. */
int seeded_uniform_f32(const int64_t *seeds, const int64_t *positions, float *u, int64_t rows,
                       int64_t V) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_MIN_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        const Keys keys = row_keys(seeds[r], positions[r]);
        float *ur = u + r * V;
        int64_t i = 0;
        for (; i + 8 <= V; i += 8) _mm256_storeu_ps(ur + i, uniform8(keys, i));
        for (; i < V; i++) ur[i] = uniform1(keys, i);
    }
    return 0;
}
