/*
 * One whole Llama decoder layer on CPU, fp32, in one call: the existing C kernels
 * (linear_cpu.c, fused_cpu.c, paged_attention_cpu.c) run in the order the module path runs
 * them, with the glue between them (q copied out of the fused qkv output, the KV rows written
 * by slot, the final residual add) done here instead of by torch.
 *
 * Why: at decode batch sizes a layer is ~10 small kernel calls plus ~20 torch ops and views;
 * their Python and dispatch cost ~250 us per layer on the 2-core machine, a third of a batch-1
 * step (docs/PERFORMANCE.md). One call per layer removed that; decoder_stack_f32 runs every
 * layer of the model from one call, which removes the ~36 us of Python a layer call still
 * cost (~1 ms of a ~18 ms batch-1 step).
 *
 * Bitwise the module path's: the kernels are called through the function pointers the Python
 * side took from the very libraries the module path calls (the same machine code), on the same
 * inputs; the glue is copies and one fp32 add per element, exact in any order. So deterministic
 * mode and the trainer-side alignment, which rest on those kernels, hold unchanged.
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* Rows a thread's group needs before a step is split by rows: 8 + 8 rows lost to the column
 * split (decode step 43 -> 48 ms), 16 + 16 and 32 + 32 won (docs/PERFORMANCE.md). */
#define GROUP_MIN_ROWS 16

typedef int (*linear_fn)(const float *x, const void *panels, const float *scales, const float *b,
                         float *y, int64_t M, int64_t N, int64_t K);
typedef int (*rms_norm_fn)(const float *x, const float *w, float *y, int64_t rows, int64_t dim,
                           float eps);
typedef int (*add_rms_norm_fn)(const float *x, const float *d, float *s, const float *w,
                               float *y, int64_t rows, int64_t dim, float eps);
typedef int (*silu_mul_fn)(const float *gu, float *y, int64_t rows, int64_t inter);
typedef int (*rope_fn)(float *qkv, const float *cos, const float *sin, int64_t rows,
                       int64_t stride, int64_t q_heads, int64_t k_heads, int64_t head_dim);
typedef int (*attention_fn)(const float *q, const float *k_cache, const float *v_cache,
                            const int64_t *page_table, const int64_t *row_seq,
                            const int64_t *row_pos, float *out, int64_t T, int64_t Hq,
                            int64_t Hk, int64_t D, int64_t ps, int64_t max_pages, float scale);

/* The kernels, taken once per engine from their own libraries. */
typedef struct {
    linear_fn linear; /* the packed linear of the layer's weight dtype (fp32, bf16 or int8) */
    rms_norm_fn rms_norm;
    add_rms_norm_fn add_rms_norm;
    silu_mul_fn silu_mul;
    rope_fn rope;
    attention_fn attention;
} Kernels;

/* One layer's parameters: packed matrices (with int8 scales or NULL), norms, optional qkv bias,
 * and the layer's KV cache [pages, page_size, Hk, D]. */
typedef struct {
    const float *in_norm, *post_norm;
    const void *qkv, *o, *gate_up, *down;
    const float *qkv_scales, *o_scales, *gate_up_scales, *down_scales;
    const float *qkv_bias;
    float *k_cache, *v_cache;
    float in_eps, post_eps;
} Layer;

/* A step: shapes, the attention metadata shared by every layer, RoPE rows [T, D] and a
 * workspace of workspace_floats(T, ...) floats. */
typedef struct {
    int64_t T, H, Hq, Hk, D, I, page_size, max_pages;
    float scale;
    const float *cos, *sin;
    const int64_t *slots, *page_table, *row_seq, *row_pos;
    float *work;
} Step;

int64_t workspace_floats(int64_t T, int64_t H, int64_t Hq, int64_t Hk, int64_t D, int64_t I) {
    return T * (2 * H + (Hq + 2 * Hk) * D + 2 * Hq * D + 3 * I);
}

/* out = the layer applied to x [T, H] (out and x do not overlap). Returns the attention
 * kernel's status (non-zero: out of memory for its score buffer). */
static int decoder_layer_f32(const Kernels *kn, const Layer *w, const Step *s, const float *x,
                             float *out) {
    const int64_t T = s->T, H = s->H, D = s->D, I = s->I;
    const int64_t q_width = s->Hq * D, kv_width = s->Hk * D, qkv_width = q_width + 2 * kv_width;
    float *h = s->work;            /* [T, H]: normed input, then normed attention output */
    float *qkv = h + T * H;        /* [T, qkv_width] */
    float *q = qkv + T * qkv_width; /* [T, q_width]: q heads, contiguous for the kernel */
    float *att = q + T * q_width;  /* [T, q_width] */
    float *proj = att + T * q_width; /* [T, H]: o_proj, later down_proj */
    float *gate_up = proj + T * H; /* [T, 2 I] */
    float *act = gate_up + 2 * T * I; /* [T, I] */

    kn->rms_norm(x, w->in_norm, h, T, H, w->in_eps);
    kn->linear(h, w->qkv, w->qkv_scales, w->qkv_bias, qkv, T, qkv_width, H);
    kn->rope(qkv, s->cos, s->sin, T, qkv_width, s->Hq, s->Hk, D);
    for (int64_t t = 0; t < T; t++) {
        const float *row = qkv + t * qkv_width;
        memcpy(q + t * q_width, row, sizeof(float) * q_width);
        memcpy(w->k_cache + s->slots[t] * kv_width, row + q_width, sizeof(float) * kv_width);
        memcpy(w->v_cache + s->slots[t] * kv_width, row + q_width + kv_width,
               sizeof(float) * kv_width);
    }
    const int failed = kn->attention(q, w->k_cache, w->v_cache, s->page_table, s->row_seq,
                                     s->row_pos, att, T, s->Hq, s->Hk, D, s->page_size,
                                     s->max_pages, s->scale);
    if (failed) return failed;
    kn->linear(att, w->o, w->o_scales, 0, proj, T, H, q_width);
    kn->add_rms_norm(x, proj, out, w->post_norm, h, T, H, w->post_eps); /* out = residual */
    kn->linear(h, w->gate_up, w->gate_up_scales, 0, gate_up, T, 2 * I, H);
    kn->silu_mul(gate_up, act, T, I);
    kn->linear(act, w->down, w->down_scales, 0, proj, T, H, I);
    for (int64_t i = 0; i < T * H; i++) out[i] += proj[i];
    return 0;
}

/* layers[0 .. n) in turn over the step's rows, on the calling thread's kernels. */
static int stack_rows(const Kernels *kn, const Layer *layers, int64_t n, const Step *s,
                      const float *x, float *out, float *spare) {
    const float *in = x;
    for (int64_t i = 0; i < n; i++) {
        float *dst = (n - 1 - i) % 2 == 0 ? out : spare;
        const int failed = decoder_layer_f32(kn, layers + i, s, in, dst);
        if (failed) return failed;
        in = dst;
    }
    return 0;
}

/* How many row groups a step runs as: one per thread when every row is its own sequence (a
 * decode step: row_seq strictly increasing, so no row reads K/V another row of the step
 * writes) and each group keeps GROUP_MIN_ROWS rows; else 1. */
static int64_t row_groups(const Step *s) {
    int64_t groups = omp_get_max_threads();
    if (s->T / GROUP_MIN_ROWS < groups) groups = s->T / GROUP_MIN_ROWS;
    if (groups < 2 || omp_in_parallel()) return 1;
    for (int64_t t = 1; t < s->T; t++)
        if (s->row_seq[t] <= s->row_seq[t - 1]) return 1;
    return groups;
}

/* out = layers[0 .. n) applied in turn to x [T, H] (n >= 1; x, out and spare [T, H] do not
 * overlap). Layer i writes into out when n - 1 - i is even, else into spare, so the layers
 * ping-pong between the two and the last one lands in out. Same status as decoder_layer_f32.
 *
 * A decode step of enough rows is split by rows instead of by each kernel's columns: every
 * thread runs its rows through all the layers on its own (the kernels inside run on that one
 * thread), so there is no fork and join per kernel (~200 a step), and one thread's attention,
 * waiting on K/V from DRAM, overlaps the other's matmuls. Rows are independent in every
 * kernel (row-invariant by construction), so the bits are the column split's. */
int decoder_stack_f32(const Kernels *kn, const Layer *layers, int64_t n, const Step *s,
                      const float *x, float *out, float *spare) {
    const int64_t groups = row_groups(s);
    if (groups == 1) return stack_rows(kn, layers, n, s, x, out, spare);
    int failed = 0;
#pragma omp parallel num_threads(groups)
    {
        const int64_t g = omp_get_thread_num(), r0 = s->T * g / groups;
        Step part = *s;
        part.T = s->T * (g + 1) / groups - r0;
        part.cos = s->cos + r0 * s->D, part.sin = s->sin + r0 * s->D;
        part.slots = s->slots + r0, part.row_seq = s->row_seq + r0, part.row_pos = s->row_pos + r0;
        /* The workspace is linear in rows: group g's share starts after the first r0 rows'. */
        part.work = s->work + workspace_floats(r0, s->H, s->Hq, s->Hk, s->D, s->I);
        const int64_t at = r0 * s->H;
        const int f = stack_rows(kn, layers, n, &part, x + at, out + at, spare + at);
        if (f) {
#pragma omp atomic write
            failed = f;
        }
    }
    return failed;
}
