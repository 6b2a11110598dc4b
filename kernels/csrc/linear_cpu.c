/*
 * y = x @ w.T (+ b) on CPU with fp32 activations and fp32 or bf16 weights, fp32 accumulation.
 *
 * Why: at decode batch sizes the step reads every weight once, and BLAS sgemm/sgemv at M of
 * 1..32 on these thin shapes runs far below the memory bandwidth. This kernel streams each
 * weight row once per block of rows of x and keeps the partial sums in registers.
 *
 * Batch invariance by construction: output (m, n) is always the same sequence of operations on
 * x[m, :] and w[n, :] only -- 8-lane FMAs over k in order, the lanes summed in a fixed tree, the
 * k tail added in order, then the bias. Blocking over m and n and the split of n across threads
 * change which (m, n) are computed together, never how one is computed, so a row's result does
 * not depend on M, on the other rows, or on the thread count.
 *
 * Layouts (contiguous, row-major): x [M, K] fp32, w [N, K] fp32 or bf16 (uint16), b [N] fp32 or
 * NULL, y [M, N] fp32.
 */
#include <immintrin.h>
#include <stdint.h>

#define MR 4 /* rows of x per micro-kernel */
#define NR 3 /* rows of w per micro-kernel: MR * NR accumulators + loads fit in 16 ymm */
#define N_CHUNK 48 /* rows of w one thread keeps hot (L2) while it walks all of x */
#define PARALLEL_MIN (1 << 18) /* multiply-adds below which waking threads costs more */

static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }

static inline __m256 load_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}

/* The fixed lane tree: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)). */
static inline float reduce_lanes(__m256 acc) {
    __m128 lo = _mm256_castps256_ps128(acc), hi = _mm256_extractf128_ps(acc, 1);
    __m128 s = _mm_add_ps(lo, hi);                 /* l0+l4, l1+l5, l2+l6, l3+l7 */
    __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s)); /* (l0+l4)+(l2+l6), (l1+l5)+(l3+l7) */
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

#define DEFINE_BLOCK(NAME, WT, LOADW, TOF32)                                                     \
    static inline __attribute__((always_inline)) void NAME(                                     \
        const float *x, const WT *w, const float *b, float *y, int64_t K, int64_t N, int mr,    \
        int nr) {                                                                                \
        __m256 acc[MR][NR];                                                                      \
        for (int i = 0; i < MR; i++)                                                             \
            for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();                        \
        int64_t k = 0;                                                                           \
        for (; k + 8 <= K; k += 8) {                                                             \
            __m256 wv[NR];                                                                       \
            for (int j = 0; j < NR; j++)                                                         \
                if (j < nr) wv[j] = LOADW(w + j * K + k);                                        \
            for (int i = 0; i < MR; i++) {                                                       \
                if (i >= mr) break;                                                              \
                __m256 xv = _mm256_loadu_ps(x + i * K + k);                                      \
                for (int j = 0; j < NR; j++)                                                     \
                    if (j < nr) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);               \
            }                                                                                    \
        }                                                                                        \
        for (int i = 0; i < mr; i++)                                                             \
            for (int j = 0; j < nr; j++) {                                                       \
                float s = reduce_lanes(acc[i][j]);                                               \
                for (int64_t t = k; t < K; t++) s = fmaf(x[i * K + t], TOF32(w[j * K + t]), s);  \
                y[i * N + j] = b ? s + b[j] : s;                                                 \
            }                                                                                    \
    }                                                                                            \
    /* Constant mr/nr after inlining: the accumulators stay in registers. */                     \
    static void NAME##_dispatch(const float *x, const WT *w, const float *b, float *y,          \
                                int64_t K, int64_t N, int mr, int nr) {                          \
        if (mr == 1 && nr == 1) {                                                                \
            NAME(x, w, b, y, K, N, 1, 1);                                                        \
            return;                                                                              \
        }                                                                                        \
        if (nr == NR) {                                                                          \
            switch (mr) {                                                                        \
            case 4: NAME(x, w, b, y, K, N, 4, NR); return;                                       \
            case 3: NAME(x, w, b, y, K, N, 3, NR); return;                                       \
            case 2: NAME(x, w, b, y, K, N, 2, NR); return;                                       \
            default: NAME(x, w, b, y, K, N, 1, NR); return;                                      \
            }                                                                                    \
        }                                                                                        \
        NAME(x, w, b, y, K, N, mr, nr);                                                          \
    }                                                                                            \
    int NAME##_linear(const float *x, const WT *w, const float *b, float *y, int64_t M,        \
                      int64_t N, int64_t K) {                                                    \
        const int64_t chunks = (N + N_CHUNK - 1) / N_CHUNK;                                      \
        _Pragma("omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN)") for (int64_t c = 0; c < chunks; c++) {     \
            const int64_t n0 = c * N_CHUNK, n1 = n0 + N_CHUNK < N ? n0 + N_CHUNK : N;            \
            for (int64_t m = 0; m < M; m += MR) {                                                \
                const int mr = (int)(M - m < MR ? M - m : MR);                                   \
                /* One row of x: one weight row at a time, a single sequential stream. */       \
                const int step = mr == 1 ? 1 : NR;                                               \
                for (int64_t n = n0; n < n1; n += step) {                                        \
                    const int nr = (int)(n1 - n < step ? n1 - n : step);                         \
                    NAME##_dispatch(x + m * K, w + n * K, b ? b + n : 0, y + m * N + n, K, N,    \
                                    mr, nr);                                                     \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        return 0;                                                                                \
    }

static inline float f32_id(float v) { return v; }

DEFINE_BLOCK(f32w, float, load_f32, f32_id)
DEFINE_BLOCK(bf16w, uint16_t, load_bf16, bf16_to_f32)
