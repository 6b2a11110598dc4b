/*
 * Token choice for fp32 logits rows on CPU: greedy argmax, and seeded sampling with
 * temperature and min-p (kernels/sampling.py's semantics; top-k / top-p rows stay in torch).
 *
 * Why: the torch formulation materializes a dozen [rows, vocab] temporaries (an int64 hash
 * chain, log_softmax, two logs, masks) -- ~58 ms a step for 32 rows of a 49k vocabulary on
 * two cores, more than half a decode step -- where one pass per row over the logits suffices.
 *
 * Per row (independent of every other row, in a fixed order: batch invariant):
 *   greedy (temperature <= 0): the index of the first maximum of the logits; a NaN counts as
 *     the maximum (as torch.argmax).
 *   sampled: z = logits / T; c = max(z) + log(sum(exp(z - max(z)))); logp = z - c;
 *     min-p (> 0) keeps tokens with exp(logp) >= min_p * exp(max(z) - c);
 *     u = the counter-based uniform of (seed, position, index) (bitwise kernels/sampling.py's);
 *     token = the first maximum of logp - log(-log(u)) over the kept tokens (Gumbel-max).
 * The uniforms are bit for bit the torch reference's; exp and log are this file's vector
 * polynomials (a few ulp from libm's), so a token can differ from the torch path's only where
 * two perturbed scores are within float rounding of each other.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define MUL 0x45D9F3Bu
#define PARALLEL_MIN_ROWS 2

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
static Keys row_keys(int64_t seed, int64_t position) {
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

/* ------------------------------------------------------------------ vector exp and log */
/* exp(x), 8 lanes, for x <= 0: x = n ln2 + r (|r| <= ln2 / 2), e^r by its degree-7 Taylor
 * polynomial (relative error < 1e-8 before rounding), times 2^n; 0 below -87; NaN stays NaN. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f), nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), given = x;
    x = _mm256_max_ps(x, lo);
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

static int64_t first_nan(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (x[i] != x[i]) return i;
    return 0;
}

static int64_t argmax_row(const float *x, int64_t V) {
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

/* ------------------------------------------------------------------ entry points */
/* out[r] = the token of row r of logits [rows, V] (module comment): temperatures[r] <= 0 is
 * greedy; min_ps, seeds, positions per row. */
int sample_rows_f32(const float *logits, const float *temperatures, const float *min_ps,
                    const int64_t *seeds, const int64_t *positions, int64_t *out, int64_t rows,
                    int64_t V) {
    int failed = 0;
#pragma omp parallel if (rows >= PARALLEL_MIN_ROWS)
    {
        float *z = malloc((size_t)V * sizeof(float)); /* this thread's x / T */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *x = logits + r * V;
            const float T = temperatures[r];
            if (!(T > 0.0f))
                out[r] = argmax_row(x, V);
            else if (z)
                out[r] = sample_row(x, z, V, T, min_ps[r], row_keys(seeds[r], positions[r]));
            else {
#pragma omp atomic write
                failed = 1;
            }
        }
        free(z);
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
