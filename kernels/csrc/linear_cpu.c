/*
 * y = x @ w.T (+ b) on CPU with fp32 activations and fp32 or bf16 weights, fp32 accumulation,
 * on weights packed once into column panels.
 *
 * Why: at decode batch sizes the step reads every weight once; BLAS sgemm/sgemv at M of 1..64
 * on these thin shapes runs far below both the memory bandwidth and the FMA peak. Packed
 * panels let a register-blocked outer-product micro-kernel (6 rows of x by 16 outputs, twelve
 * 8-lane accumulators) stream each weight panel contiguously and broadcast x from L1.
 *
 * Packed layout: w [N, K] becomes panels [ceil(N / 16), K, 16]: panel p holds outputs
 * 16p..16p+15, k-major, so one k step reads 16 consecutive weights. Outputs past N are zero.
 *
 * Batch invariance by construction: output (m, n) is always acc = 0; for k = 0..K-1:
 * acc = fma(x[m, k], w[n, k], acc); then y = acc (* scale[n] for int8 weights) (+ b[n]). Every code path (the 1-row path, the
 * 1..6-row micro-kernels, any thread split, any row chunking) runs exactly that sequence on
 * x[m, :] and w[n, :] only, so a row's result depends neither on M, on the other rows, nor on
 * the thread count -- nor on whether the weight was packed once or per call.
 *
 * Layouts (contiguous, row-major): x [M, K] fp32, w [N, K] fp32, bf16 (uint16) or int8
 * (symmetric, with per-output fp32 scales [N]; NULL for the float types), panels as above,
 * b [N] fp32 or NULL, y [M, N] fp32.
 */
#include <immintrin.h>
#include <stdint.h>

#define P 16 /* outputs per panel: two ymm */
#define MC 96 /* rows of x kept hot (L2) while every panel streams past them */
#define PARALLEL_MIN (1 << 18) /* multiply-adds below which waking threads costs more */
#define SPREAD 4 /* row blocks of a panel that share the prefetch of the next one */

static inline __m256 lo8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 hi8_f32(const float *p) { return _mm256_loadu_ps(p + 8); }

/* bf16 -> fp32 is exact: the 16 bits are the high half of the float. */
static inline __m256 widen_bf16(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline __m256 lo8_bf16(const uint16_t *p) {
    return widen_bf16(_mm_loadu_si128((const __m128i *)p));
}
static inline __m256 hi8_bf16(const uint16_t *p) {
    return widen_bf16(_mm_loadu_si128((const __m128i *)(p + 8)));
}

/* int8 -> fp32 is exact; the per-output scale is applied once, after the sum. */
static inline __m256 lo8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline __m256 hi8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
}

/* Masks and bias for a panel with `valid` real outputs (the last panel may be partial). */
typedef struct {
    __m256i m0, m1;
    __m256 b0, b1, s0, s1;
    int has_bias, has_scale;
} Tail;

/* `scale` (int8 weights' per-output scales) or NULL; `b` the bias or NULL. */
static inline Tail panel_tail(const float *scale, const float *b, int valid) {
    Tail t;
    t.m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    t.m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid),
                              _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15));
    t.has_bias = b != 0;
    t.b0 = b ? _mm256_maskload_ps(b, t.m0) : _mm256_setzero_ps();
    t.b1 = b ? _mm256_maskload_ps(b + 8, t.m1) : _mm256_setzero_ps();
    t.has_scale = scale != 0;
    t.s0 = scale ? _mm256_maskload_ps(scale, t.m0) : _mm256_setzero_ps();
    t.s1 = scale ? _mm256_maskload_ps(scale + 8, t.m1) : _mm256_setzero_ps();
    return t;
}

static inline void store_row(float *y, __m256 r0, __m256 r1, const Tail *t) {
    if (t->has_scale) {
        r0 = _mm256_mul_ps(r0, t->s0);
        r1 = _mm256_mul_ps(r1, t->s1);
    }
    if (t->has_bias) {
        r0 = _mm256_add_ps(r0, t->b0);
        r1 = _mm256_add_ps(r1, t->b1);
    }
    _mm256_maskstore_ps(y, t->m0, r0);
    _mm256_maskstore_ps(y + 8, t->m1, r1);
}

/* Named accumulators, one pair per row: GCC keeps them in registers (an array spills). */
#define DECL(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();
#define STEP(i)                                                                                  \
    {                                                                                            \
        __m256 a = _mm256_broadcast_ss(x + (i) * K + k);                                         \
        c##i##0 = _mm256_fmadd_ps(a, w0, c##i##0);                                               \
        c##i##1 = _mm256_fmadd_ps(a, w1, c##i##1);                                               \
    }
#define STORE(i) store_row(y + (i) * N, c##i##0, c##i##1, &t);
#define REP1(F) F(0)
#define REP2(F) REP1(F) F(1)
#define REP3(F) REP2(F) F(2)
#define REP4(F) REP3(F) F(3)
#define REP5(F) REP4(F) F(4)
#define REP6(F) REP5(F) F(5)

/* MR rows of x times one panel; meanwhile, when `next` is set, one k-row of the next panel
 * from `next` on is pulled toward L2 every `every` k steps (a prefetch never faults, so one
 * that runs past the slice only warms lines early). */
#define DEFINE_MICRO(NAME, WT, LO, HI, MR)                                                       \
    static void NAME##_micro##MR(const float *x, const WT *panel, const float *sc,              \
                                 const float *b, float *y, int64_t K, int64_t N, int valid,      \
                                 const WT *next, int64_t every) {                                \
        REP##MR(DECL);                                                                           \
        int64_t due = every;                                                                     \
        for (int64_t k = 0; k < K; k++) {                                                        \
            const __m256 w0 = LO(panel + k * P), w1 = HI(panel + k * P);                         \
            if (next && --due == 0) {                                                            \
                _mm_prefetch((const char *)next, _MM_HINT_T1);                                   \
                next += P, due = every;                                                          \
            }                                                                                    \
            REP##MR(STEP)                                                                        \
        }                                                                                        \
        const Tail t = panel_tail(sc, b, valid);                                                 \
        REP##MR(STORE)                                                                           \
    }

/* One row of x times four whole panels (eight chains in flight instead of two); named
 * accumulators, as in the micro-kernels. Fewer than four panels left: micro1 per panel. */
#define ROW_STEP(q, LO, HI)                                                                            \
    r##q##0 = _mm256_fmadd_ps(a, LO(w##q + k * P), r##q##0);                                     \
    r##q##1 = _mm256_fmadd_ps(a, HI(w##q + k * P), r##q##1);
#define ROW_STORE(q)                                                                             \
    {                                                                                            \
        const int64_t n0 = (p0 + q) * P;                                                         \
        const int valid = (int)(N - n0 < P ? N - n0 : P);                                        \
        const Tail t = panel_tail(sc ? sc + n0 : 0, b ? b + n0 : 0, valid);                      \
        store_row(y + n0, r##q##0, r##q##1, &t);                                                 \
    }
#define DEFINE_ROW(NAME, WT, LO, HI)                                                             \
    static void NAME##_row4(const float *x, const WT *panels, const float *sc, const float *b,  \
                            float *y, int64_t K, int64_t N, int64_t p0) {                        \
        __m256 r00 = _mm256_setzero_ps(), r01 = r00, r10 = r00, r11 = r00;                       \
        __m256 r20 = r00, r21 = r00, r30 = r00, r31 = r00;                                       \
        const WT *w0 = panels + p0 * K * P, *w1 = w0 + K * P, *w2 = w1 + K * P,                  \
                 *w3 = w2 + K * P;                                                               \
        for (int64_t k = 0; k < K; k++) {                                                        \
            const __m256 a = _mm256_broadcast_ss(x + k);                                         \
            ROW_STEP(0, LO, HI) ROW_STEP(1, LO, HI) ROW_STEP(2, LO, HI) ROW_STEP(3, LO, HI)      \
        }                                                                                        \
        ROW_STORE(0) ROW_STORE(1) ROW_STORE(2) ROW_STORE(3)                                      \
    }

#define DEFINE_LINEAR(NAME, WT, LO, HI)                                                          \
    DEFINE_MICRO(NAME, WT, LO, HI, 1)                                                            \
    DEFINE_MICRO(NAME, WT, LO, HI, 2)                                                            \
    DEFINE_MICRO(NAME, WT, LO, HI, 3)                                                            \
    DEFINE_MICRO(NAME, WT, LO, HI, 4)                                                            \
    DEFINE_MICRO(NAME, WT, LO, HI, 5)                                                            \
    DEFINE_MICRO(NAME, WT, LO, HI, 6)                                                            \
    DEFINE_ROW(NAME, WT, LO, HI)                                                                 \
    static void NAME##_block(const float *x, const WT *panel, const float *sc, const float *b,  \
                             float *y, int64_t K, int64_t N, int mr, int valid,                  \
                             const WT *next, int64_t every) {                                    \
        switch (mr) {                                                                            \
        case 6: NAME##_micro6(x, panel, sc, b, y, K, N, valid, next, every); return;             \
        case 5: NAME##_micro5(x, panel, sc, b, y, K, N, valid, next, every); return;             \
        case 4: NAME##_micro4(x, panel, sc, b, y, K, N, valid, next, every); return;             \
        case 3: NAME##_micro3(x, panel, sc, b, y, K, N, valid, next, every); return;             \
        case 2: NAME##_micro2(x, panel, sc, b, y, K, N, valid, next, every); return;             \
        default: NAME##_micro1(x, panel, sc, b, y, K, N, valid, next, every); return;            \
        }                                                                                        \
    }                                                                                            \
    int NAME##_packed_linear(const float *x, const WT *panels, const float *sc, const float *b, \
                             float *y, int64_t M, int64_t N, int64_t K) {                        \
        const int64_t np = (N + P - 1) / P;                                                      \
        const int par = M * N * K >= PARALLEL_MIN;                                               \
        if (M == 1) {                                                                            \
            const int64_t groups = (np + 3) / 4;                                                 \
            _Pragma("omp parallel for schedule(static) if (par)")                                \
            for (int64_t g = 0; g < groups; g++) {                                               \
                if (4 * g + 4 <= np) {                                                           \
                    NAME##_row4(x, panels, sc, b, y, K, N, 4 * g);                               \
                    continue;                                                                    \
                }                                                                                \
                for (int64_t p = 4 * g; p < np; p++) {                                           \
                    const int valid = (int)(N - p * P < P ? N - p * P : P);                      \
                    NAME##_micro1(x, panels + p * K * P, sc ? sc + p * P : 0, b ? b + p * P : 0, \
                                  y + p * P, K, N, valid, 0, 1);                                 \
                }                                                                                \
            }                                                                                    \
            return 0;                                                                            \
        }                                                                                        \
        for (int64_t m0 = 0; m0 < M; m0 += MC) {                                                 \
            const int64_t m1 = m0 + MC < M ? m0 + MC : M;                                        \
            _Pragma("omp parallel for schedule(static) if (par)")                                \
            for (int64_t p = 0; p < np; p++) {                                                   \
                const int valid = (int)(N - p * P < P ? N - p * P : P);                          \
                /* Rows split evenly over ceil(rows / 6) blocks: 32 = 5+5+5+5+6+6, not 6*5+2 \
                 * (a 2-row block waits on FMA latency as long as a full one). */               \
                const int64_t rows = m1 - m0, blocks = (rows + 5) / 6;                            \
                /* The first (up to) SPREAD blocks pull the next panel toward L2 while they   \
                 * compute, a slice each, so the next panel's blocks do not wait on DRAM one \
                 * line at a time. One block asking for a whole panel at once outran the    \
                 * core's outstanding misses (M=8/32: 0.75x/0.82x the time spread over 4). */  \
                const WT *next = p + 1 < np ? panels + (p + 1) * K * P : 0;                      \
                const int64_t spread = blocks < SPREAD ? blocks : SPREAD;                        \
                for (int64_t i = 0, m = m0; i < blocks; i++) {                                   \
                    const int mr = (int)(rows / blocks + (i < rows % blocks));                    \
                    const int64_t k0 = K * i / spread, k1 = K * (i + 1) / spread;                 \
                    const int pulls = next && i < spread && k1 > k0;                             \
                    NAME##_block(x + m * K, panels + p * K * P, sc ? sc + p * P : 0,             \
                                 b ? b + p * P : 0, y + m * N + p * P, K, N, mr, valid,          \
                                 pulls ? next + k0 * P : 0, pulls ? K / (k1 - k0) : 1);          \
                    m += mr;                                                                     \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        return 0;                                                                                \
    }                                                                                            \
    int NAME##_pack(const WT *w, WT *panels, int64_t N, int64_t K) {                             \
        const int64_t np = (N + P - 1) / P;                                                      \
        _Pragma("omp parallel for schedule(static)")                                             \
        for (int64_t p = 0; p < np; p++)                                                         \
            for (int j = 0; j < P; j++) {                                                        \
                const int64_t n = p * P + j;                                                     \
                WT *out = panels + p * K * P + j;                                                \
                if (n < N)                                                                       \
                    for (int64_t k = 0; k < K; k++) out[k * P] = w[n * K + k];                   \
                else                                                                             \
                    for (int64_t k = 0; k < K; k++) out[k * P] = 0;                              \
            }                                                                                    \
        return 0;                                                                                \
    }

DEFINE_LINEAR(f32w, float, lo8_f32, hi8_f32)
DEFINE_LINEAR(bf16w, uint16_t, lo8_bf16, hi8_bf16)
DEFINE_LINEAR(i8w, int8_t, lo8_i8, hi8_i8)
