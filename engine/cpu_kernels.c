/* moe-serve's CPU kernels: the parts of a decode step that torch has no cheap kernel for.
 *
 * expert_mlp: the SwiGLU experts of one MoE layer, run only for the experts that received tokens, each
 *   expert's weights read once for all of its tokens, then each token's weighted sum over its experts in
 *   expert order (the same order whatever the batch or thread count).
 * paged_decode_attention: one query token per sequence attending to its paged KV cache, read in place
 *   through the block table (no gather copy), all query heads of a KV head sharing its loads, with an
 *   online softmax. The bf16 paths use the bf16 dot-product instruction where the CPU has it, the fp32 experts
 *   AVX-512 fused multiply-adds, and all prefetch what they read next: these kernels wait on memory more than on
 *   arithmetic.
 * linears_bf16: few-row bf16 products sharing an input (the attention projections, the LM head), with the bf16
 *   dot-product instruction.
 * The bf16 experts and linears run on AMX tiles where the CPU has them and the OS grants their state (amx_enabled):
 *   16 weight rows by 16 activation rows per instruction, which turned a batch-32 expert layer from arithmetic-
 *   bound (vdpbf16ps, 4 x 4 tiles) into memory-bound.
 *
 * Plain C with OpenMP (the same libgomp torch loads), built on first use with -O3 -march=native and called
 * through ctypes (engine/cpu_kernels.py). Weights and caches may be float32 or bfloat16; activations and
 * accumulation are float32.
 */
#define _GNU_SOURCE /* syscall(), for the AMX tile state */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 v) {
    union { uint32_t u; float f; } c;
    c.u = ((uint32_t)v) << 16;
    return c.f;
}

static inline bf16 f32_to_bf16(float f) { /* round to nearest even (inputs here are finite) */
    union { uint32_t u; float f; } c;
    c.f = f;
    return (bf16)((c.u + 0x7FFFu + ((c.u >> 16) & 1u)) >> 16);
}

#define AS_F32(v) (v)
#define FROM_F32(v) (v)

/* Dot products of one weight row with up to four activation rows (n floats each). */
#define DOT_ROWS(NAME, WT, LOAD)                                                                       \
    static inline void NAME(const WT *restrict w, const float *const *rows, int nrows, int64_t n,      \
                            float *restrict out) {                                                     \
        const float *x0 = rows[0], *x1 = nrows > 1 ? rows[1] : rows[0];                                \
        const float *x2 = nrows > 2 ? rows[2] : rows[0], *x3 = nrows > 3 ? rows[3] : rows[0];          \
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                                  \
        for (int64_t h = 0; h < n; h++) {                                                              \
            float wv = LOAD(w[h]);                                                                     \
            s0 += wv * x0[h];                                                                          \
            s1 += wv * x1[h];                                                                          \
            s2 += wv * x2[h];                                                                          \
            s3 += wv * x3[h];                                                                          \
        }                                                                                              \
        out[0] = s0; if (nrows > 1) out[1] = s1; if (nrows > 2) out[2] = s2; if (nrows > 3) out[3] = s3; \
    }

DOT_ROWS(dot_rows_f32, float, AS_F32)
DOT_ROWS(dot_rows_bf16, bf16, bf16_to_f32)

static inline float silu(float g) { return g / (1.f + expf(-g)); }

/* x: [T, H] activations (the weights' dtype); expert_ids, weights: [T, k] each token's routed experts (rows of w13 and w2; ids
 * outside [0, E) are dropped slots) and routing weights; w13: [E, 2I, H] gate then up projections, w2:
 * [E, H, I] down projections; out: [T, H], accumulated (+=) with the weighted expert outputs.
 * The (token, slot) pairs are grouped by expert with a counting sort; each group's gate/up rows are read once
 * for all its tokens (parallel over groups x column blocks), then each down row once per group (parallel over
 * output column blocks, so no two threads write the same output element). */
#define EXPERT_MLP(NAME, WT, DOT, LOAD)                                                                \
    void NAME(const WT *x_in, const int64_t *expert_ids, const float *weights, int64_t T, int64_t k,   \
              int64_t E, int64_t H, int64_t I, const WT *w13, const WT *w2, float *out, int threads) { \
        float *x = malloc((T ? T : 1) * H * sizeof(float));                                            \
        for (int64_t i = 0; i < T * H; i++) x[i] = LOAD(x_in[i]);                                      \
        int64_t *count = calloc(E + 1, sizeof(int64_t)), *start = malloc((E + 1) * sizeof(int64_t));    \
        int64_t *row_token = malloc(T * k * sizeof(int64_t));                                          \
        float *row_weight = malloc(T * k * sizeof(float));                                             \
        int64_t *group_expert = malloc(E * sizeof(int64_t));                                           \
        for (int64_t i = 0; i < T * k; i++)                                                            \
            if (expert_ids[i] >= 0 && expert_ids[i] < E) count[expert_ids[i]]++;                       \
        int64_t groups = 0, rows = 0;                                                                  \
        for (int64_t e = 0; e < E; e++) {                                                              \
            start[e] = rows;                                                                           \
            rows += count[e];                                                                          \
            if (count[e]) group_expert[groups++] = e;                                                  \
            count[e] = 0;                                                                              \
        }                                                                                              \
        for (int64_t i = 0; i < T * k; i++) {                                                          \
            int64_t e = expert_ids[i];                                                                 \
            if (e < 0 || e >= E) continue;                                                             \
            int64_t r = start[e] + count[e]++;                                                         \
            row_token[r] = i / k;                                                                      \
            row_weight[r] = weights[i];                                                                \
        }                                                                                              \
        float *hidden = malloc((rows ? rows : 1) * I * sizeof(float));                                 \
        _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) collapse(2)")             \
        for (int64_t g = 0; g < groups; g++) {                                                         \
            for (int64_t jb = 0; jb < (I + 15) / 16; jb++) {                                           \
                int64_t e = group_expert[g], first = start[e], end = start[e] + count[e];              \
                const WT *gate = w13 + e * 2 * I * H, *up = gate + I * H;                              \
                int64_t j_end = (jb + 1) * 16 < I ? (jb + 1) * 16 : I;                                  \
                for (int64_t r0 = first; r0 < end; r0 += 4) {                                          \
                    int nr = (int)(end - r0 < 4 ? end - r0 : 4);                                       \
                    const float *xr[4];                                                                \
                    for (int r = 0; r < nr; r++) xr[r] = x + row_token[r0 + r] * H;                    \
                    for (int64_t j = jb * 16; j < j_end; j++) {                                        \
                        float gv[4], uv[4];                                                            \
                        DOT(gate + j * H, xr, nr, H, gv);                                              \
                        DOT(up + j * H, xr, nr, H, uv);                                                \
                        for (int r = 0; r < nr; r++) hidden[(r0 + r) * I + j] = silu(gv[r]) * uv[r];  \
                    }                                                                                  \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
        for (int64_t ib = 0; ib < (H + 15) / 16; ib++) {                                               \
            int64_t i_end = (ib + 1) * 16 < H ? (ib + 1) * 16 : H;                                      \
            for (int64_t g = 0; g < groups; g++) {                                                     \
                int64_t e = group_expert[g], first = start[e], end = start[e] + count[e];              \
                const WT *down = w2 + e * H * I;                                                       \
                for (int64_t r0 = first; r0 < end; r0 += 4) {                                          \
                    int nr = (int)(end - r0 < 4 ? end - r0 : 4);                                       \
                    const float *hr[4];                                                                \
                    for (int r = 0; r < nr; r++) hr[r] = hidden + (r0 + r) * I;                        \
                    for (int64_t i = ib * 16; i < i_end; i++) {                                        \
                        float dv[4];                                                                   \
                        DOT(down + i * I, hr, nr, I, dv);                                              \
                        for (int r = 0; r < nr; r++) out[row_token[r0 + r] * H + i] += row_weight[r0 + r] * dv[r]; \
                    }                                                                                  \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
        free(hidden); free(group_expert); free(row_weight); free(row_token); free(start); free(count);  \
        free(x);                                                                                       \
    }

EXPERT_MLP(expert_mlp_f32_generic, float, dot_rows_f32, AS_F32)
EXPERT_MLP(expert_mlp_bf16_generic, bf16, dot_rows_bf16, bf16_to_f32)

/* AVX-512 (any, bf16 dot products or not): what the fp32 and bf16 fast paths share, and the fp32 expert kernel. */
#if defined(__AVX512F__)
#include <immintrin.h>

/* The 16 horizontal sums of a[0..15] as one vector (lane i: the sum of a[i]'s lanes): pairs, then quads within
 * each 128-bit lane, then across the lanes. */
static inline __attribute__((always_inline)) __m512 sum16(const __m512 a[16]) {
    __m512 quad[4];
    for (int r = 0; r < 4; r++) {
        const __m512 *v = a + 4 * r;
        __m512 p0 = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
        __m512 p1 = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
        quad[r] = _mm512_add_ps(_mm512_shuffle_ps(p0, p1, _MM_SHUFFLE(1, 0, 1, 0)),
                                _mm512_shuffle_ps(p0, p1, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    __m512 h01 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_f32x4(quad[0], quad[1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 h23 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_f32x4(quad[2], quad[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(h01, h23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(h01, h23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* e^x, x clamped to [-87, 88]: n = round(x / ln 2) and r = x - n ln 2 (two-part ln 2), e^r by its degree-7
 * Taylor polynomial (|r| <= ln 2 / 2: relative error under 1e-8), scaled by 2^n. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* Ask for the cache lines of `bytes` from p on (of n values: prefetch_rows, prefetch_floats), into L2: a task's
 * first weight rows when it starts (they come from a new expert, where the hardware prefetcher has no history), a
 * linear's next rows, a paged KV cache's next token, whose blocks lie anywhere. Into L2, not L1: L1's few miss
 * buffers, filled by prefetches, stalled the kernels' own loads; on weights and caches streamed from memory the
 * expert kernel measured 1.4-1.8x faster at batch 8 and 32 and the attention kernel 1.2-1.5x at batch 1-32 than
 * with the same prefetches into L1 (docs/performance.md). The streams the kernels read at length prefetch a line
 * or a token at a time as they work (dot_tile_f32, prefetch_token), not a tile's or a chunk's worth at once. */
static inline void prefetch_bytes(const void *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch((const char *)p + i, _MM_HINT_T1);
}
static inline void prefetch_rows(const bf16 *p, int64_t n) { prefetch_bytes(p, n * (int64_t)sizeof(bf16)); }
static inline void prefetch_floats(const float *p, int64_t n) { prefetch_bytes(p, n * (int64_t)sizeof(float)); }

/* The weight rows of one expert a task reads (n, a multiple of 32, rows in all): the most of 256, 128, 64 and 32
 * that divides n and still leaves two tasks per thread. Longer streams read memory faster: whole 256-row experts
 * measured 1.14x faster than 64-row tasks at batch 32 on two threads, weights streamed from memory. */
static int64_t rows_per_task(int64_t n, int64_t groups, int threads) {
    int64_t rows = 256;
    while (rows > 32 && (n % rows != 0 || groups * (n / rows) < 2 * threads)) rows /= 2;
    return rows;
}

/* A layer's (token, slot) pairs as rows grouped by expert, experts ascending and tokens in order within each:
 * expert e's rows are start[e] .. start[e] + count[e]; row r is token row_token[r] with weight row_weight[r];
 * group_expert lists the experts that got rows. Slots with ids outside [0, E) are dropped. */
typedef struct {
    int64_t *count, *start, *row_token, *group_expert;
    float *row_weight;
    int64_t groups, rows;
} ExpertRows;

static ExpertRows expert_rows(const int64_t *expert_ids, const float *weights, int64_t T, int64_t k, int64_t E) {
    ExpertRows g = {calloc(E + 1, sizeof(int64_t)), malloc((E + 1) * sizeof(int64_t)),
                    malloc((T * k > 0 ? T * k : 1) * sizeof(int64_t)), malloc(E * sizeof(int64_t)),
                    malloc((T * k > 0 ? T * k : 1) * sizeof(float)), 0, 0};
    for (int64_t i = 0; i < T * k; i++)
        if (expert_ids[i] >= 0 && expert_ids[i] < E) g.count[expert_ids[i]]++;
    for (int64_t e = 0; e < E; e++) {
        g.start[e] = g.rows;
        g.rows += g.count[e];
        if (g.count[e]) g.group_expert[g.groups++] = e;
        g.count[e] = 0;
    }
    for (int64_t i = 0; i < T * k; i++) {
        int64_t e = expert_ids[i];
        if (e < 0 || e >= E) continue;
        int64_t r = g.start[e] + g.count[e]++;
        g.row_token[r] = i / k;
        g.row_weight[r] = weights[i];
    }
    return g;
}

static void free_expert_rows(ExpertRows *g) {
    free(g->count); free(g->start); free(g->row_token); free(g->group_expert); free(g->row_weight);
}

/* The weighted combine, each token's rows added in row order (experts ascending): the same sums, in the same
 * order, whatever the batch and the thread count. */
static void combine_rows(const ExpertRows *g, const float *expert_out, int64_t H, float *out, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t ib = 0; ib < H / 16; ib++)
        for (int64_t r = 0; r < g->rows; r++) {
            float *o = out + g->row_token[r] * H + ib * 16;
            __m512 y = _mm512_loadu_ps(expert_out + r * H + ib * 16);
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_mul_ps(_mm512_set1_ps(g->row_weight[r]), y)));
        }
}

/* out[r][c] = dot(x[r], w[c]) over n floats (n a multiple of 16) for NR activation rows and 4 weight rows (ws
 * apart): 4 x NR fused multiply-add accumulators, each weight and activation vector loaded once per tile. With pf,
 * the 4 rows from pf on (ws apart) are prefetched as the tile runs: a cache line of each per step (see
 * prefetch_bytes). */
static inline __attribute__((always_inline)) void dot_tile_f32(const float *w, int64_t ws, const float *const *x,
                                                               int64_t n, float out[4][4], const int NR,
                                                               const float *pf) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t h = 0; h < n; h += 16) {
        __m512 wv[4], xv[4];
        if (pf)
            for (int c = 0; c < 4; c++) _mm_prefetch((const char *)(pf + c * ws + h), _MM_HINT_T1);
        for (int c = 0; c < 4; c++) wv[c] = _mm512_loadu_ps(w + c * ws + h);
        for (int r = 0; r < NR; r++) xv[r] = _mm512_loadu_ps(x[r] + h);
        for (int r = 0; r < NR; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_fmadd_ps(xv[r], wv[c], acc[r][c]);
    }
    __m512 flat[16];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) flat[4 * r + c] = acc[r][c];
    _mm512_storeu_ps(&out[0][0], sum16(flat));
}

static void dot_tile_f32_rows(const float *w, int64_t ws, const float *const *x, int nr, int64_t n, float out[4][4],
                              const float *pf) {
    switch (nr) {
    case 1: dot_tile_f32(w, ws, x, n, out, 1, pf); break;
    case 2: dot_tile_f32(w, ws, x, n, out, 2, pf); break;
    case 3: dot_tile_f32(w, ws, x, n, out, 3, pf); break;
    default: dot_tile_f32(w, ws, x, n, out, 4, pf); break;
    }
}

/* SwiGLU on a tile's 16 (row, unit) pairs at once: silu(gate) * up. */
static inline __m512 swiglu16(__m512 gate, __m512 up) {
    __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate));
    return _mm512_mul_ps(_mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.f), e)), up);
}

static inline void swiglu_tile_f32(const float gate[4][4], const float up[4][4], float act[16]) {
    _mm512_storeu_ps(act, swiglu16(_mm512_loadu_ps(&gate[0][0]), _mm512_loadu_ps(&up[0][0])));
}

/* expert_mlp on tiles of dot products (H and I multiples of 32), over a layer's grouped rows: tasks read RB
 * contiguous weight rows of one expert (rows_per_task): few, long streams, each read once. A task prefetches its
 * first rows (PREFETCH, of WT values), then takes 4 weight rows at a time to every group of up to 4 of the expert's
 * rows while they are in L1 (one pass over the weights: the kernel alone 1.02-1.07x faster at batch 32 than a pass
 * per row group, which re-read them from L2; stop 36). The first group's tile prefetches the rows 4-8 KiB ahead of
 * it as it runs, a line of each per step: spread so, not all at once before the tile, the prefetches overlap the
 * products whatever the weights' alignment (page-aligned weights, as tcmalloc places them, measured 1.3-1.6x slower
 * with the burst before each tile; docs/performance.md, stop 35). Then the SwiGLU of 4 rows x 4 units at a time
 * (SWIGLU, into hidden activations of type HT), the down projection, and the combine in expert order. WT: the
 * weights' and input activations' type; DOT: a 4-weight-row x up to 4-row tile (dot_tile_*_rows). In fp32 1.2x
 * faster at batch 8 and 32 than EXPERT_MLP's compiler-vectorized loops on 16-row tasks without prefetches
 * (docs/performance.md). */
#define EXPERT_TILES(NAME, WT, HT, DOT, PREFETCH, SWIGLU)                                               \
    static void NAME(const WT *x, const ExpertRows *grouped, int64_t H, int64_t I, const WT *w13,        \
                     const WT *w2, float *out, int threads) {                                            \
        const int64_t *count = grouped->count, *start = grouped->start, *row_token = grouped->row_token; \
        const int64_t *group_expert = grouped->group_expert, groups = grouped->groups;                  \
        const int64_t rows = grouped->rows;                                                              \
        const int64_t RB_I = rows_per_task(I, groups, threads), RB_H = rows_per_task(H, groups, threads); \
        const int64_t row_kib = 1024 / (int64_t)sizeof(WT); /* values in 1 KiB */                      \
        const int64_t ahead_i = 4 * (1 + row_kib / H), ahead_h = 4 * (1 + row_kib / I);                \
        HT *hidden = malloc((rows ? rows : 1) * I * sizeof(HT));                                         \
        float *expert_out = malloc((rows ? rows : 1) * H * sizeof(float));                               \
        _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) collapse(2)")               \
        for (int64_t g = 0; g < groups; g++) {                                                           \
            for (int64_t jb = 0; jb < I / RB_I; jb++) {                                                  \
                int64_t e = group_expert[g], first = start[e], end = start[e] + count[e];                \
                const WT *gate = w13 + e * 2 * I * H, *up = gate + I * H;                                \
                PREFETCH(gate + jb * RB_I * H, ahead_i * H);                                             \
                PREFETCH(up + jb * RB_I * H, ahead_i * H);                                               \
                for (int64_t j = jb * RB_I; j < (jb + 1) * RB_I; j += 4) {                               \
                    for (int64_t r0 = first; r0 < end; r0 += 4) {                                        \
                        int nr = (int)(end - r0 < 4 ? end - r0 : 4);                                     \
                        const WT *xr[4];                                                                 \
                        for (int r = 0; r < nr; r++) xr[r] = x + row_token[r0 + r] * H;                  \
                        float gv[4][4], uv[4][4];                                                        \
                        HT act[16];                                                                      \
                        const int streaming = r0 == first; /* the other row groups find the rows in L1 */ \
                        DOT(gate + j * H, H, xr, nr, H, gv, streaming ? gate + (j + ahead_i) * H : NULL); \
                        DOT(up + j * H, H, xr, nr, H, uv, streaming ? up + (j + ahead_i) * H : NULL);    \
                        SWIGLU((const float(*)[4])gv, (const float(*)[4])uv, act);                       \
                        for (int r = 0; r < nr; r++) memcpy(hidden + (r0 + r) * I + j, act + 4 * r, 4 * sizeof(HT)); \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) collapse(2)")               \
        for (int64_t g = 0; g < groups; g++) {                                                           \
            for (int64_t ib = 0; ib < H / RB_H; ib++) {                                                  \
                int64_t e = group_expert[g], first = start[e], end = start[e] + count[e];                \
                const WT *down = w2 + e * H * I;                                                         \
                PREFETCH(down + ib * RB_H * I, ahead_h * I);                                             \
                for (int64_t i = ib * RB_H; i < (ib + 1) * RB_H; i += 4) {                               \
                    for (int64_t r0 = first; r0 < end; r0 += 4) {                                        \
                        int nr = (int)(end - r0 < 4 ? end - r0 : 4);                                     \
                        const HT *hr[4];                                                                 \
                        for (int r = 0; r < nr; r++) hr[r] = hidden + (r0 + r) * I;                      \
                        float dv[4][4];                                                                  \
                        DOT(down + i * I, I, hr, nr, I, dv, r0 == first ? down + (i + ahead_h) * I : NULL); \
                        for (int r = 0; r < nr; r++) memcpy(expert_out + (r0 + r) * H + i, dv[r], 4 * sizeof(float)); \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        combine_rows(grouped, expert_out, H, out, threads);                                              \
        free(expert_out);                                                                                \
        free(hidden);                                                                                    \
    }

EXPERT_TILES(expert_mlp_f32_tiles, float, float, dot_tile_f32_rows, prefetch_floats, swiglu_tile_f32)

#endif

#if defined(__AVX512BF16__)

static inline __m512 bf16x16_to_f32(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* Each lane rounded to bf16 (to nearest even) and back to fp32. */
static inline __m512 round_bf16_ps(__m512 v) {
    __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

/* out[r][c] = dot(x[r], w[c]) over n bf16 values (n a multiple of 32) for NR activation rows and 4 weight
 * rows (ws apart): 4 x NR accumulators of vdpbf16ps, each weight and activation vector loaded once per tile; pf as
 * dot_tile_f32's. */
static inline __attribute__((always_inline)) void dot_tile_bf16(const bf16 *w, int64_t ws, const bf16 *const *x,
                                                                int64_t n, float out[4][4], const int NR,
                                                                const bf16 *pf) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t h = 0; h < n; h += 32) {
        __m512bh wv[4], xv[4];
        if (pf)
            for (int c = 0; c < 4; c++) _mm_prefetch((const char *)(pf + c * ws + h), _MM_HINT_T1);
        for (int c = 0; c < 4; c++) wv[c] = (__m512bh)_mm512_loadu_si512(w + c * ws + h);
        for (int r = 0; r < NR; r++) xv[r] = (__m512bh)_mm512_loadu_si512(x[r] + h);
        for (int r = 0; r < NR; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv[r], wv[c]);
    }
    __m512 flat[16];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) flat[4 * r + c] = acc[r][c];
    _mm512_storeu_ps(&out[0][0], sum16(flat)); /* out[r][c] = dot(x[r], w[c]) */
}

static void dot_tile_bf16_rows(const bf16 *w, int64_t ws, const bf16 *const *x, int nr, int64_t n, float out[4][4],
                               const bf16 *pf) {
    switch (nr) {
    case 1: dot_tile_bf16(w, ws, x, n, out, 1, pf); break;
    case 2: dot_tile_bf16(w, ws, x, n, out, 2, pf); break;
    case 3: dot_tile_bf16(w, ws, x, n, out, 3, pf); break;
    default: dot_tile_bf16(w, ws, x, n, out, 4, pf); break;
    }
}

/* The SwiGLU's gate and up rounded to bf16 first, and its output too, as torch's bf16 experts round them. */
static inline void swiglu_tile_bf16(const float gate[4][4], const float up[4][4], bf16 act[16]) {
    __m512 v = swiglu16(round_bf16_ps(_mm512_loadu_ps(&gate[0][0])), round_bf16_ps(_mm512_loadu_ps(&up[0][0])));
    _mm256_storeu_si256((__m256i *)act, (__m256i)_mm512_cvtneps_pbh(v));
}

/* expert_mlp in bf16 with the CPU's bf16 dot-product instruction: products of bf16 pairs accumulated in fp32. */
EXPERT_TILES(expert_mlp_bf16_dp, bf16, bf16, dot_tile_bf16_rows, prefetch_rows, swiglu_tile_bf16)

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>

/* AMX (the CPU's tile unit): 16 weight rows times 16 activation rows at a time, a 16 x 16 block of fp32 sums per
 * tile, products of bf16 pairs as with vdpbf16ps, an order of magnitude more of them per cycle. The weights are
 * read in place (tile A: 16 rows of 32 values, a row's stride apart); the activations go in tile B, which takes
 * pairs of values down its rows (kk: values 2kk and 2kk + 1 of 32) and activation rows across: packed once per
 * group of up to 16 rows (`pack_pairs`). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static int amx_state = -1; /* -1: not asked yet; 0: off; 1: on */

/* Whether the AMX path runs: the kernel asks the OS for the tile state once (Linux hands it out on request);
 * want 0 or 1 turns it off or back on (if granted), -1 only asks. MOE_SERVE_AMX=0 starts it off. */
int amx_enabled(int want) {
    if (amx_state < 0) {
        const char *env = getenv("MOE_SERVE_AMX");
        amx_state = (env == NULL || env[0] != '0') && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                                              18 /* XFEATURE_XTILEDATA */) == 0;
    }
    if (want == 0) amx_state = 0;
    if (want == 1) amx_state = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return amx_state;
}

/* AMX pays for the experts from this many activation rows per expert (on average over the experts a layer's tokens
 * use), measured on the bench shape (docs/performance.md); below it the tiles' fixed costs, and the lower clock the
 * CPU runs AMX at, made a batch-1 step 10% slower than vdpbf16ps. */
#define AMX_MIN_ROWS_PER_EXPERT 2

static void amx_configure(void) {
    TileConfig config = {0};
    config.palette = 1;
    for (int t = 0; t < 8; t++) config.rows[t] = 16, config.colsb[t] = 64;
    _tile_loadconfig(&config);
}

/* rows[0..n) (n <= 16, K values each, K a multiple of 32) as tile B takes them: per 32 values, 16 lines of 16
 * pairs, line kk holding pair kk of every row (zeros past row n). */
static void pack_pairs(const bf16 *const *rows, int n, int64_t K, uint32_t *packed) {
    for (int64_t c = 0; c < K / 32; c++)
        for (int kk = 0; kk < 16; kk++)
            for (int r = 0; r < 16; r++) {
                uint32_t pair = 0;
                if (r < n) memcpy(&pair, rows[r] + c * 32 + 2 * kk, sizeof pair);
                packed[(c * 16 + kk) * 16 + r] = pair;
            }
}

/* Tiles 0 and 1 (zeroed here) += weight rows a[0..16) and b[0..16) (each ws values apart; b NULL: tile 0 only)
 * times the packed activations (pack_pairs) over K values. Two chunks of 32 values per turn in separate tiles (2,
 * 3 and 4 for one, 5, 6 and 7 for the next), so that the next chunk's loads need not wait for this one's products. */
static inline __attribute__((always_inline)) void amx_dots(const bf16 *a, const bf16 *b, int64_t ws,
                                                           const uint32_t *packed, int64_t K) {
    const int64_t stride = ws * (int64_t)sizeof(bf16), chunks = K / 32;
    _tile_zero(0);
    _tile_zero(1);
    int64_t c = 0;
    for (; c + 1 < chunks; c += 2) {
        _tile_loadd(4, packed + c * 256, 64);
        _tile_loadd(7, packed + (c + 1) * 256, 64);
        _tile_loadd(2, a + c * 32, stride);
        _tile_loadd(5, a + (c + 1) * 32, stride);
        if (b != NULL) {
            _tile_loadd(3, b + c * 32, stride);
            _tile_loadd(6, b + (c + 1) * 32, stride);
        }
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(0, 5, 7);
        if (b != NULL) {
            _tile_dpbf16ps(1, 3, 4);
            _tile_dpbf16ps(1, 6, 7);
        }
    }
    if (c < chunks) {
        _tile_loadd(4, packed + c * 256, 64);
        _tile_loadd(2, a + c * 32, stride);
        _tile_dpbf16ps(0, 2, 4);
        if (b != NULL) {
            _tile_loadd(3, b + c * 32, stride);
            _tile_dpbf16ps(1, 3, 4);
        }
    }
}

/* expert_mlp in bf16 on AMX: the same rows, grouping, rounding and combine as expert_mlp_bf16_dp; each expert's
 * rows in groups of 16 (a tile's columns), its gate and up rows 16 at a time against every group, the SwiGLU
 * activations written straight in the packed form the down projection's tile B takes. */
static void expert_mlp_bf16_amx(const bf16 *x, const ExpertRows *rows_by_expert, int64_t H, int64_t I,
                                const bf16 *w13, const bf16 *w2, float *out, int threads) {
    const ExpertRows grouped = *rows_by_expert;
    const int64_t groups = grouped.groups;
    int64_t *first_slot = malloc((groups + 1) * sizeof(int64_t)); /* a slot: one expert's group of <= 16 rows */
    first_slot[0] = 0;
    for (int64_t g = 0; g < groups; g++)
        first_slot[g + 1] = first_slot[g] + (grouped.count[grouped.group_expert[g]] + 15) / 16;
    const int64_t slots = first_slot[groups];
    uint32_t *x_packed = malloc((slots ? slots : 1) * H * 16 * sizeof(bf16));
    uint32_t *hidden_packed = calloc((slots ? slots : 1) * I * 16, sizeof(bf16));
    float *expert_out = malloc((grouped.rows ? grouped.rows : 1) * H * sizeof(float));
    const int64_t RB_I = rows_per_task(I, groups, threads), RB_H = rows_per_task(H, groups, threads);
    #pragma omp parallel num_threads(threads)
    {
        amx_configure();
        #pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < groups; g++) {
            int64_t e = grouped.group_expert[g];
            for (int64_t s = first_slot[g]; s < first_slot[g + 1]; s++) {
                int64_t r0 = grouped.start[e] + 16 * (s - first_slot[g]), end = grouped.start[e] + grouped.count[e];
                int n = (int)(end - r0 < 16 ? end - r0 : 16);
                const bf16 *rows[16];
                for (int r = 0; r < n; r++) rows[r] = x + grouped.row_token[r0 + r] * H;
                pack_pairs(rows, n, H, x_packed + s * H * 8);
            }
        }
        const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2,
                                                                   1, 0), _mm512_set1_epi32(16));
        #pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t g = 0; g < groups; g++) {
            for (int64_t jb = 0; jb < I / RB_I; jb++) {
                int64_t e = grouped.group_expert[g];
                const bf16 *gate = w13 + e * 2 * I * H, *up = gate + I * H;
                for (int64_t j = jb * RB_I; j < (jb + 1) * RB_I; j += 16) {
                    if (j + 16 < (jb + 1) * RB_I) {
                        prefetch_rows(gate + (j + 16) * H, 16 * H);
                        prefetch_rows(up + (j + 16) * H, 16 * H);
                    }
                    for (int64_t s = first_slot[g]; s < first_slot[g + 1]; s++) {
                        int64_t r0 = grouped.start[e] + 16 * (s - first_slot[g]);
                        int64_t end = grouped.start[e] + grouped.count[e];
                        int n = (int)(end - r0 < 16 ? end - r0 : 16);
                        const uint32_t *packed = x_packed + s * H * 8;
                        float gv[16][16], uv[16][16];
                        amx_dots(gate + j * H, up + j * H, H, packed, H);
                        _tile_stored(0, gv, 64);
                        _tile_stored(1, uv, 64);
                        uint32_t *hp = hidden_packed + s * I * 8 + (j / 32) * 256 + ((j % 32) / 2) * 16;
                        for (int r = 0; r < n; r++) {
                            __m512i at = _mm512_add_epi32(column, _mm512_set1_epi32(r));
                            __m512 gate_v = round_bf16_ps(_mm512_i32gather_ps(at, &gv[0][0], 4));
                            __m512 up_v = round_bf16_ps(_mm512_i32gather_ps(at, &uv[0][0], 4));
                            __m512 silu_v = _mm512_div_ps(
                                gate_v, _mm512_add_ps(_mm512_set1_ps(1.f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate_v))));
                            uint32_t act[8];
                            _mm256_storeu_si256((__m256i *)act, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu_v, up_v)));
                            for (int m = 0; m < 8; m++) hp[m * 16 + r] = act[m];
                        }
                    }
                }
            }
        }
        #pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t g = 0; g < groups; g++) {
            for (int64_t ib = 0; ib < H / RB_H; ib++) {
                int64_t e = grouped.group_expert[g];
                const bf16 *down = w2 + e * H * I;
                for (int64_t i = ib * RB_H; i < (ib + 1) * RB_H; i += 16) {
                    if (i + 16 < (ib + 1) * RB_H) prefetch_rows(down + (i + 16) * I, 16 * I);
                    for (int64_t s = first_slot[g]; s < first_slot[g + 1]; s++) {
                        int64_t r0 = grouped.start[e] + 16 * (s - first_slot[g]);
                        int64_t end = grouped.start[e] + grouped.count[e];
                        int n = (int)(end - r0 < 16 ? end - r0 : 16);
                        float dv[16][16];
                        amx_dots(down + i * I, NULL, I, hidden_packed + s * I * 8, I);
                        _tile_stored(0, dv, 64);
                        for (int r = 0; r < n; r++) {
                            __m512i at = _mm512_add_epi32(column, _mm512_set1_epi32(r));
                            _mm512_storeu_ps(expert_out + (r0 + r) * H + i, _mm512_i32gather_ps(at, &dv[0][0], 4));
                        }
                    }
                }
            }
        }
        _tile_release();
    }
    combine_rows(&grouped, expert_out, H, out, threads);
    free(expert_out); free(hidden_packed); free(x_packed); free(first_slot);
}

/* linears_bf16 on AMX: the activation rows packed 16 at a time (pack_pairs), then per (16 rows, 16 weight rows of
 * one weight) a tile of sums, rounded to bf16 as the vdpbf16ps path rounds them. */
static void linears_bf16_amx(const bf16 *x, int64_t T, int64_t K, int64_t count, const bf16 *const *ws,
                             const int64_t *first_block, void *out, int out_bf16, int threads) {
    const int64_t groups = (T + 15) / 16, blocks = first_block[count], width = blocks * 16;
    uint32_t *packed = malloc(groups * K * 16 * sizeof(bf16));
    #pragma omp parallel num_threads(threads)
    {
        amx_configure();
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const bf16 *rows[16];
            int n = (int)(T - 16 * g < 16 ? T - 16 * g : 16);
            for (int r = 0; r < n; r++) rows[r] = x + (16 * g + r) * K;
            pack_pairs(rows, n, K, packed + g * K * 8);
        }
        const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2,
                                                                   1, 0), _mm512_set1_epi32(16));
        #pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < blocks; b++) {
            for (int64_t g = 0; g < groups; g++) {
                int64_t i = 0;
                while (b >= first_block[i + 1]) i++;
                const int64_t n0 = (b - first_block[i]) * 16;
                int n = (int)(T - 16 * g < 16 ? T - 16 * g : 16);
                float sums[16][16];
                amx_dots(ws[i] + n0 * K, NULL, K, packed + g * K * 8, K);
                _tile_stored(0, sums, 64);
                for (int r = 0; r < n; r++) {
                    __m512 v = round_bf16_ps(_mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32(r)),
                                                                 &sums[0][0], 4));
                    int64_t at = (16 * g + r) * width + b * 16;
                    if (out_bf16) _mm256_storeu_si256((__m256i *)((bf16 *)out + at), (__m256i)_mm512_cvtneps_pbh(v));
                    else _mm512_storeu_ps((float *)out + at, v);
                }
            }
        }
        _tile_release();
    }
    free(packed);
}
#endif
#endif

/* Rows this few (a batch-1 or -2 step's projections and LM head) take linears_bf16's one-row path; more take AMX
 * tiles where the CPU has them: from 3 rows a linear's 16-row tiles beat the 4 x 4 vdpbf16ps tiles, whose horizontal
 * sums cost as much as their products at these widths (batch-3 / 8 / 12 steps 1.05x / 1.12x / 1.18x faster,
 * docs/performance.md), while at 1 and 2 rows they measured equal to the one-row path. */
#define GEMV_MAX_ROWS 2
#define LINEAR_AMX_MIN_ROWS (GEMV_MAX_ROWS + 1)
/* How many weight rows ahead the one-row path prefetches (two 16-row blocks: a thread's blocks are contiguous).
 * Against none, 8 layers of hidden-512 projections and a 4096-row LM head at batch 1: 1.37x faster on one thread and
 * 1.23x on two with the weights in memory, as a step's experts leave them; 1.37x / 0.99x with them in L3; one block
 * ahead 1.26x / 1.17x in memory (docs/performance.md, stop 35). */
#define GEMV_AHEAD 32

#if defined(__AVX512BF16__)
/* dot(x, w[c]) for 16 weight rows (K apart) and one activation row, over K bf16 values (a multiple of 32): 16
 * accumulators, one horizontal sum for all of them, rounded to bf16 as torch's bf16 linear rounds. With pf, the 16
 * rows from pf on are prefetched as it runs, a line of each per step (see prefetch_bytes). */
static inline __m512 dot16_bf16(const bf16 *w, int64_t K, const bf16 *x, const bf16 *pf) {
    __m512 acc[16];
    for (int c = 0; c < 16; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t h = 0; h < K; h += 32) {
        if (pf)
            for (int c = 0; c < 16; c++) _mm_prefetch((const char *)(pf + c * K + h), _MM_HINT_T1);
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + h);
        for (int c = 0; c < 16; c++)
            acc[c] = _mm512_dpbf16_ps(acc[c], xv, (__m512bh)_mm512_loadu_si512(w + c * K + h));
    }
    return round_bf16_ps(sum16(acc));
}
#endif

/* out[T, sum N_i] = x[T, K] [ws[0]; ws[1]; ...]^T for `count` (<= 8) weights [N_i, K] sharing one input (a
 * layer's q, k and v projections, the LM head), each weight's columns after the last's. bf16 products are
 * accumulated in fp32 and rounded to bf16, as torch's bf16 linear rounds its output, and stored as bf16
 * (out_bf16) or as fp32 holding the bf16 value (the LM head's logits). Parallel over (chunk of 64 activation rows,
 * block of 16 weight rows) across all the weights, each 4-row weight tile read once for every group of up to 4
 * activation rows, the next rows prefetched. Up to 64 rows inductor's C++ GEMM template measured 2-3x slower here,
 * torch's bf16 linear slower or equal (docs/performance.md). Returns 0 (nothing written) when this CPU or these
 * shapes (K a multiple of 32, every N of 16) do not fit it. */
int linears_bf16(const bf16 *x, int64_t T, int64_t K, int64_t count, const bf16 *const *ws, const int64_t *ns,
                 void *out, int out_bf16, int threads) {
#if defined(__AVX512BF16__)
    if (K % 32 != 0 || count < 1 || count > 8) return 0;
    int64_t first_block[9] = {0};
    for (int64_t i = 0; i < count; i++) {
        if (ns[i] % 16 != 0) return 0;
        first_block[i + 1] = first_block[i] + ns[i] / 16;
    }
    const int64_t blocks = first_block[count], chunks = (T + 63) / 64, width = first_block[count] * 16;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (T >= LINEAR_AMX_MIN_ROWS && amx_enabled(-1)) {
        linears_bf16_amx(x, T, K, count, ws, first_block, out, out_bf16, threads);
        return 1;
    }
#endif
    if (T <= GEMV_MAX_ROWS) {
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t b = 0; b < blocks; b++) {
            int64_t i = 0;
            while (b >= first_block[i + 1]) i++;
            const bf16 *w = ws[i] + (b - first_block[i]) * 16 * K;
            for (int64_t r = 0; r < T; r++) {
                __m512 v = dot16_bf16(w, K, x + r * K, r == 0 ? w + GEMV_AHEAD * K : NULL);
                if (out_bf16) _mm256_storeu_si256((__m256i *)((bf16 *)out + r * width + b * 16), (__m256i)_mm512_cvtneps_pbh(v));
                else _mm512_storeu_ps((float *)out + r * width + b * 16, v);
            }
        }
        return 1;
    }
    #pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
    for (int64_t tc = 0; tc < chunks; tc++) {
        for (int64_t b = 0; b < blocks; b++) {
            int64_t i = 0;
            while (b >= first_block[i + 1]) i++;
            const int64_t n0 = (b - first_block[i]) * 16, col = b * 16 - n0;
            const int64_t t_end = (tc + 1) * 64 < T ? (tc + 1) * 64 : T;
            prefetch_rows(ws[i] + n0 * K, 16 * K); /* this block's rows, and the next block's as it runs */
            for (int64_t n = n0; n < n0 + 16; n += 4) {
                if (n0 + 16 < ns[i]) prefetch_rows(ws[i] + (n + 16) * K, 4 * K);
                for (int64_t r0 = tc * 64; r0 < t_end; r0 += 4) {
                    int nr = (int)(t_end - r0 < 4 ? t_end - r0 : 4);
                    const bf16 *xr[4];
                    for (int r = 0; r < nr; r++) xr[r] = x + (r0 + r) * K;
                    float o[4][4];
                    dot_tile_bf16_rows(ws[i] + n * K, K, xr, nr, K, o, NULL);
                    for (int r = 0; r < nr; r++)
                        for (int c = 0; c < 4; c++) {
                            bf16 v = f32_to_bf16(o[r][c]);
                            if (out_bf16) ((bf16 *)out)[(r0 + r) * width + col + n + c] = v;
                            else ((float *)out)[(r0 + r) * width + col + n + c] = bf16_to_f32(v);
                        }
                }
            }
        }
    }
    return 1;
#else
    (void)x; (void)T; (void)K; (void)count; (void)ws; (void)ns; (void)out; (void)out_bf16; (void)threads;
    return 0;
#endif
}

#if !(defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__))
int amx_enabled(int want) { (void)want; return 0; }
#endif

void expert_mlp_f32(const float *x, const int64_t *expert_ids, const float *weights, int64_t T, int64_t k,
                    int64_t E, int64_t H, int64_t I, const float *w13, const float *w2, float *out, int threads) {
#if defined(__AVX512F__)
    if (H % 32 == 0 && I % 32 == 0) {
        ExpertRows grouped = expert_rows(expert_ids, weights, T, k, E);
        expert_mlp_f32_tiles(x, &grouped, H, I, w13, w2, out, threads);
        free_expert_rows(&grouped);
        return;
    }
#endif
    expert_mlp_f32_generic(x, expert_ids, weights, T, k, E, H, I, w13, w2, out, threads);
}

void expert_mlp_bf16(const bf16 *x, const int64_t *expert_ids, const float *weights, int64_t T, int64_t k,
                     int64_t E, int64_t H, int64_t I, const bf16 *w13, const bf16 *w2, float *out, int threads) {
#if defined(__AVX512BF16__)
    if (H % 32 == 0 && I % 32 == 0) {
        ExpertRows grouped = expert_rows(expert_ids, weights, T, k, E);
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
        if (grouped.groups > 0 && grouped.rows >= AMX_MIN_ROWS_PER_EXPERT * grouped.groups && amx_enabled(-1))
            expert_mlp_bf16_amx(x, &grouped, H, I, w13, w2, out, threads);
        else
#endif
            expert_mlp_bf16_dp(x, &grouped, H, I, w13, w2, out, threads);
        free_expert_rows(&grouped);
        return;
    }
#endif
    expert_mlp_bf16_generic(x, expert_ids, weights, T, k, E, H, I, w13, w2, out, threads);
}

/* Paged decode attention. q: [B, Hq, D]; caches: [blocks, block_size, Hkv, D]; block_tables: [B, W]; seq_lens:
 * [B]; out: [B, Hq, D]; all in the cache's dtype. With k and v given ([B, Hkv, D]), each sequence's new key and
 * value are first written into its slot (slots: [B]). Each (sequence, KV head) pair is one task: its G = Hq / Hkv
 * query heads read each cached key and value once, a chunk of a cache block at a time (the chunk's scores, an
 * online-softmax update rescaling the running sums, then its values), walking the block table instead of
 * dividing every position. A task's pointers: q and out at its first query head, the caches at its KV head's
 * column of token 0 (token t of block j at (j * block_size + t) * row elements), table its block-table row. */
typedef void (*DecodeTask)(const void *q, const void *k_cache, const void *v_cache, const int64_t *table,
                           int64_t len, int64_t block_size, int64_t row, int64_t G, int64_t D, float scale, void *out,
                           int64_t kv_heads);

#define MAX_BLOCK 64
#define DECODE_TASK(NAME, CT, LOAD, STORE)                                                             \
    static void NAME(const void *q_, const void *k_cache_, const void *v_cache_, const int64_t *table,   \
                     int64_t len, int64_t block_size, int64_t row, int64_t G, int64_t D, float scale, void *out_, \
                     int64_t kv_heads) {                                                               \
        int64_t chunk = block_size < MAX_BLOCK ? block_size : MAX_BLOCK;                               \
        float m[G], l[G], acc[G][D], qf[G][D], s[G][MAX_BLOCK], vf[D];                                 \
        for (int64_t kh = 0; kh < kv_heads; kh++) {                                                    \
            const CT *q = (const CT *)q_ + kh * G * D;                                                 \
            const CT *k_cache = (const CT *)k_cache_ + kh * D, *v_cache = (const CT *)v_cache_ + kh * D; \
            CT *out = (CT *)out_ + kh * G * D;                                                         \
            for (int64_t g = 0; g < G; g++) {                                                          \
                m[g] = -INFINITY; l[g] = 0.f;                                                          \
                for (int64_t d = 0; d < D; d++) {                                                      \
                    acc[g][d] = 0.f;                                                                   \
                    qf[g][d] = LOAD(q[g * D + d]) * scale;                                             \
                }                                                                                      \
            }                                                                                          \
            for (int64_t t0 = 0; t0 < len; t0 += chunk) {                                              \
                int64_t n = len - t0 < chunk ? len - t0 : chunk;                                       \
                int64_t first = table[t0 / block_size] * block_size + t0 % block_size;                 \
                const CT *kb = k_cache + first * row, *vb = v_cache + first * row;                     \
                for (int64_t g = 0; g < G; g++) {                                                      \
                    float block_max = -INFINITY;                                                       \
                    for (int64_t i = 0; i < n; i++) {                                                  \
                        const CT *kt = kb + i * row;                                                   \
                        float dot = 0.f;                                                               \
                        for (int64_t d = 0; d < D; d++) dot += qf[g][d] * LOAD(kt[d]);                 \
                        s[g][i] = dot;                                                                 \
                        block_max = dot > block_max ? dot : block_max;                                 \
                    }                                                                                  \
                    float m_new = block_max > m[g] ? block_max : m[g];                                 \
                    float c = expf(m[g] - m_new), sum = 0.f;                                           \
                    for (int64_t i = 0; i < n; i++) {                                                  \
                        s[g][i] = expf(s[g][i] - m_new);                                               \
                        sum += s[g][i];                                                                \
                    }                                                                                  \
                    l[g] = l[g] * c + sum;                                                             \
                    m[g] = m_new;                                                                      \
                    for (int64_t d = 0; d < D; d++) acc[g][d] *= c;                                    \
                }                                                                                      \
                for (int64_t i = 0; i < n; i++) {                                                      \
                    const CT *vt = vb + i * row;                                                       \
                    for (int64_t d = 0; d < D; d++) vf[d] = LOAD(vt[d]);                               \
                    for (int64_t g = 0; g < G; g++) {                                                  \
                        float p = s[g][i];                                                             \
                        for (int64_t d = 0; d < D; d++) acc[g][d] += p * vf[d];                        \
                    }                                                                                  \
                }                                                                                      \
            }                                                                                          \
            for (int64_t g = 0; g < G; g++) {                                                          \
                float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;                                             \
                for (int64_t d = 0; d < D; d++) out[g * D + d] = STORE(acc[g][d] * inv);               \
            }                                                                                          \
        }                                                                                              \
    }

DECODE_TASK(decode_task_f32, float, AS_F32, FROM_F32)
DECODE_TASK(decode_task_bf16, bf16, bf16_to_f32, f32_to_bf16)

#if defined(__AVX512F__)
#define DP_MAX_D 256
#define DP_MAX_QD 4096
#define PREFETCH_TOKENS 32

/* The tokens of the chunk that starts at token t: up to 16, within t's block. */
static inline int chunk_tokens(int64_t t, int64_t len, int64_t block_size) {
    int64_t n = len - t < 16 ? len - t : 16, left = block_size - t % block_size;
    return (int)(n < left ? n : left);
}

/* Ask for the key and value of token t, `width` elements (of `element` bytes) of each row: the blocks of a
 * sequence lie anywhere in the cache, so the hardware prefetcher cannot run ahead across them. A task asks for its
 * first PREFETCH_TOKENS tokens at once, then for one token PREFETCH_TOKENS on with each token whose values it
 * adds: spread so over the work, not a chunk's worth at a time, the prefetches overlap it (the expert kernels'
 * reason, dot_tile_f32). */
static inline void prefetch_token(const void *k_cache, const void *v_cache, size_t element, const int64_t *table,
                                  int64_t t, int64_t block_size, int64_t row, int64_t width) {
    const int64_t first = (table[t / block_size] * block_size + t % block_size) * row;
    prefetch_bytes((const char *)k_cache + first * element, width * (int64_t)element);
    prefetch_bytes((const char *)v_cache + first * element, width * (int64_t)element);
}

/* decode_task_f32 on AVX-512 (D a multiple of 16, at most DP_MAX_D; the task's query heads times D at most
 * DP_MAX_QD): decode_task_bf16_dp's chunks, prefetches and vector softmax, with fp32 fused multiply-adds. */
static void decode_task_f32_fma(const void *q_, const void *k_cache_, const void *v_cache_, const int64_t *table,
                                int64_t len, int64_t block_size, int64_t row, int64_t G, int64_t D, float scale,
                                void *out_, int64_t kv_heads) {
    const float *q = q_, *k_cache = k_cache_, *v_cache = v_cache_;
    float *out = out_;
    const int64_t nv = D / 16, heads = kv_heads * G;
    __m512 qv[DP_MAX_QD / 16], acc[DP_MAX_QD / 16];
    float m[DP_MAX_QD / 16], l[DP_MAX_QD / 16];
    float p[DP_MAX_QD / 16][16] __attribute__((aligned(64)));
    for (int64_t h = 0; h < heads; h++) {
        m[h] = -1e30f;
        l[h] = 0.f;
        for (int64_t c = 0; c < nv; c++) {
            qv[h * nv + c] = _mm512_loadu_ps(q + h * D + 16 * c);
            acc[h * nv + c] = _mm512_setzero_ps();
        }
    }
    for (int64_t t = 0; t < len && t < PREFETCH_TOKENS; t++)
        prefetch_token(k_cache, v_cache, sizeof(float), table, t, block_size, row, kv_heads * D);
    for (int64_t t0 = 0; t0 < len;) {
        const int n = chunk_tokens(t0, len, block_size);
        const int64_t first = table[t0 / block_size] * block_size + t0 % block_size;
        const float *kb = k_cache + first * row, *vb = v_cache + first * row;
        const __mmask16 live = (__mmask16)((1u << n) - 1u);
        for (int64_t kh = 0; kh < kv_heads; kh++) {
            const float *keys[16];
            for (int i = 0; i < 16; i++) keys[i] = kb + (i < n ? i : n - 1) * row + kh * D; /* past n: masked */
            for (int64_t g = 0; g < G; g++) {
                const int64_t h = kh * G + g;
                __m512 dots[16];
                for (int i = 0; i < 16; i++) dots[i] = _mm512_setzero_ps();
                for (int64_t c = 0; c < nv; c++)
                    for (int i = 0; i < 16; i++)
                        dots[i] = _mm512_fmadd_ps(qv[h * nv + c], _mm512_loadu_ps(keys[i] + 16 * c), dots[i]);
                __m512 scores = _mm512_mask_mov_ps(_mm512_set1_ps(-1e30f), live,
                                                   _mm512_mul_ps(sum16(dots), _mm512_set1_ps(scale)));
                float chunk_max = _mm512_reduce_max_ps(scores), m_new = chunk_max > m[h] ? chunk_max : m[h];
                __m512 e = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(scores, _mm512_set1_ps(m_new))));
                float rescale = expf(m[h] - m_new);
                l[h] = l[h] * rescale + _mm512_reduce_add_ps(e);
                m[h] = m_new;
                _mm512_store_ps(p[h], e);
                if (rescale != 1.f)
                    for (int64_t c = 0; c < nv; c++) acc[h * nv + c] = _mm512_mul_ps(acc[h * nv + c], _mm512_set1_ps(rescale));
            }
        }
        for (int i = 0; i < n; i++) {
            const float *vt = vb + i * row;
            if (t0 + i + PREFETCH_TOKENS < len)
                prefetch_token(k_cache, v_cache, sizeof(float), table, t0 + i + PREFETCH_TOKENS, block_size, row, kv_heads * D);
            for (int64_t kh = 0; kh < kv_heads; kh++)
                for (int64_t c = 0; c < nv; c++) {
                    __m512 v = _mm512_loadu_ps(vt + kh * D + 16 * c);
                    for (int64_t g = 0; g < G; g++) {
                        const int64_t a = (kh * G + g) * nv + c;
                        acc[a] = _mm512_fmadd_ps(_mm512_set1_ps(p[kh * G + g][i]), v, acc[a]);
                    }
                }
        }
        t0 += n;
    }
    for (int64_t h = 0; h < heads; h++) {
        __m512 inv = _mm512_set1_ps(l[h] > 0.f ? 1.f / l[h] : 0.f);
        for (int64_t c = 0; c < nv; c++) _mm512_storeu_ps(out + h * D + 16 * c, _mm512_mul_ps(acc[h * nv + c], inv));
    }
}
#endif

#if defined(__AVX512BF16__)

/* decode_task_bf16 with the bf16 dot-product instruction (D a multiple of 32, at most DP_MAX_D; the task's query
 * heads times D at most DP_MAX_QD): a chunk is up to 16 tokens of one block, read for all the task's KV heads
 * (whole cache rows when the task has every head: contiguous memory, prefetched ahead); each query head's 16
 * scores are 16 vdpbf16ps chains summed at once (sum16), the softmax update runs on them as one vector
 * (exp_ps), and the values are accumulated in fp32 vectors, rounded to bf16 at the end. */
static void decode_task_bf16_dp(const void *q_, const void *k_cache_, const void *v_cache_, const int64_t *table,
                                int64_t len, int64_t block_size, int64_t row, int64_t G, int64_t D, float scale,
                                void *out_, int64_t kv_heads) {
    const bf16 *q = q_, *k_cache = k_cache_, *v_cache = v_cache_;
    bf16 *out = out_;
    const int64_t nq = D / 32, nv = D / 16, heads = kv_heads * G;
    __m512bh qv[DP_MAX_QD / 32];
    __m512 acc[DP_MAX_QD / 16];
    float m[DP_MAX_QD / 32], l[DP_MAX_QD / 32];
    float p[DP_MAX_QD / 32][16] __attribute__((aligned(64)));
    for (int64_t h = 0; h < heads; h++) {
        m[h] = -1e30f;
        l[h] = 0.f;
        for (int64_t c = 0; c < nq; c++) qv[h * nq + c] = (__m512bh)_mm512_loadu_si512(q + h * D + 32 * c);
        for (int64_t c = 0; c < nv; c++) acc[h * nv + c] = _mm512_setzero_ps();
    }
    for (int64_t t = 0; t < len && t < PREFETCH_TOKENS; t++)
        prefetch_token(k_cache, v_cache, sizeof(bf16), table, t, block_size, row, kv_heads * D);
    for (int64_t t0 = 0; t0 < len;) {
        const int n = chunk_tokens(t0, len, block_size);
        const int64_t first = table[t0 / block_size] * block_size + t0 % block_size;
        const bf16 *kb = k_cache + first * row, *vb = v_cache + first * row;
        const __mmask16 live = (__mmask16)((1u << n) - 1u);
        for (int64_t kh = 0; kh < kv_heads; kh++) {
            const bf16 *keys[16];
            for (int i = 0; i < 16; i++) keys[i] = kb + (i < n ? i : n - 1) * row + kh * D; /* past n: masked */
            for (int64_t g = 0; g < G; g++) {
                const int64_t h = kh * G + g;
                __m512 dots[16];
                for (int i = 0; i < 16; i++) dots[i] = _mm512_setzero_ps();
                for (int64_t c = 0; c < nq; c++)
                    for (int i = 0; i < 16; i++)
                        dots[i] = _mm512_dpbf16_ps(dots[i], qv[h * nq + c], (__m512bh)_mm512_loadu_si512(keys[i] + 32 * c));
                __m512 scores = _mm512_mask_mov_ps(_mm512_set1_ps(-1e30f), live,
                                                   _mm512_mul_ps(sum16(dots), _mm512_set1_ps(scale)));
                float chunk_max = _mm512_reduce_max_ps(scores), m_new = chunk_max > m[h] ? chunk_max : m[h];
                __m512 e = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(scores, _mm512_set1_ps(m_new))));
                float rescale = expf(m[h] - m_new);
                l[h] = l[h] * rescale + _mm512_reduce_add_ps(e);
                m[h] = m_new;
                _mm512_store_ps(p[h], e);
                if (rescale != 1.f)
                    for (int64_t c = 0; c < nv; c++) acc[h * nv + c] = _mm512_mul_ps(acc[h * nv + c], _mm512_set1_ps(rescale));
            }
        }
        for (int i = 0; i < n; i++) {
            const bf16 *vt = vb + i * row;
            if (t0 + i + PREFETCH_TOKENS < len)
                prefetch_token(k_cache, v_cache, sizeof(bf16), table, t0 + i + PREFETCH_TOKENS, block_size, row, kv_heads * D);
            for (int64_t kh = 0; kh < kv_heads; kh++)
                for (int64_t c = 0; c < nv; c++) {
                    __m512 v = bf16x16_to_f32(vt + kh * D + 16 * c);
                    for (int64_t g = 0; g < G; g++) {
                        const int64_t a = (kh * G + g) * nv + c;
                        acc[a] = _mm512_fmadd_ps(_mm512_set1_ps(p[kh * G + g][i]), v, acc[a]);
                    }
                }
        }
        t0 += n;
    }
    for (int64_t h = 0; h < heads; h++) {
        __m512 inv = _mm512_set1_ps(l[h] > 0.f ? 1.f / l[h] : 0.f);
        for (int64_t c = 0; c < nv; c++)
            _mm256_storeu_si256((__m256i *)(out + h * D + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[h * nv + c], inv)));
    }
}
#endif

/* The tasks: (sequence, group of kv_group KV heads), in parallel when there is enough work. A group is all of
 * widest_group heads (whole cache rows: contiguous reads) where the loop runs on one thread or there are enough
 * sequences to share out; else one KV head per task, so that a small batch still spreads over the threads. */
static void decode_attention(DecodeTask task, int64_t widest_group, size_t element, const char *q, const char *k,
                             const char *v, char *k_cache, char *v_cache, const int64_t *slots,
                             const int64_t *block_tables, const int64_t *seq_lens, int64_t B, int64_t W,
                             int64_t block_size, int64_t Hq, int64_t Hkv, int64_t D, float scale, char *out,
                             int threads) {
    int64_t G = Hq / Hkv, row = Hkv * D, work = 0;
    if (k != NULL) {
        for (int64_t b = 0; b < B; b++) {
            memcpy(k_cache + slots[b] * row * element, k + b * row * element, row * element);
            memcpy(v_cache + slots[b] * row * element, v + b * row * element, row * element);
        }
    }
    for (int64_t b = 0; b < B; b++) work += seq_lens[b];
    const int parallel = threads > 1 && work * Hq * D > 65536;
    const int64_t kv_group = !parallel || B >= 4 * threads ? widest_group : 1, groups = Hkv / kv_group;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) collapse(2) if(parallel)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t j = 0; j < groups; j++) {
            int64_t heads = (b * Hq + j * kv_group * G) * D * element, column = j * kv_group * D * element;
            task(q + heads, k_cache + column, v_cache + column, block_tables + b * W, seq_lens[b], block_size, row, G,
                 D, scale, out + heads, kv_group);
        }
    }
}

void paged_decode_attention_f32(const float *q, const float *k, const float *v, float *k_cache, float *v_cache,
                                const int64_t *slots, const int64_t *block_tables, const int64_t *seq_lens, int64_t B,
                                int64_t W, int64_t block_size, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                                float *out, int threads) {
    DecodeTask task = decode_task_f32;
    int64_t widest_group = 1; /* the plain task reads one KV head */
#if defined(__AVX512F__)
    if (D % 16 == 0 && D <= DP_MAX_D && (Hq / Hkv) * D <= DP_MAX_QD) {
        task = decode_task_f32_fma;
        for (widest_group = Hkv; widest_group > 1 && (Hkv % widest_group || widest_group * Hq / Hkv * D > DP_MAX_QD);)
            widest_group--;
    }
#endif
    decode_attention(task, widest_group, sizeof(float), (const char *)q, (const char *)k, (const char *)v,
                     (char *)k_cache, (char *)v_cache, slots, block_tables, seq_lens, B, W, block_size, Hq, Hkv, D,
                     scale, (char *)out, threads);
}

void paged_decode_attention_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *k_cache, bf16 *v_cache,
                                 const int64_t *slots, const int64_t *block_tables, const int64_t *seq_lens, int64_t B,
                                 int64_t W, int64_t block_size, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                                 bf16 *out, int threads) {
    DecodeTask task = decode_task_bf16;
    int64_t widest_group = 1; /* the plain task reads one KV head */
#if defined(__AVX512BF16__)
    if (D % 32 == 0 && D <= DP_MAX_D && (Hq / Hkv) * D <= DP_MAX_QD) {
        task = decode_task_bf16_dp;
        for (widest_group = Hkv; widest_group > 1 && (Hkv % widest_group || widest_group * Hq / Hkv * D > DP_MAX_QD);)
            widest_group--;
    }
#endif
    decode_attention(task, widest_group, sizeof(bf16), (const char *)q, (const char *)k, (const char *)v,
                     (char *)k_cache, (char *)v_cache, slots, block_tables, seq_lens, B, W, block_size, Hq, Hkv, D,
                     scale, (char *)out, threads);
}

/* The index of the largest of x[0..n) (n >= 1), the first of equals; the first NaN's where there is one, as
 * torch.argmax answers. NaNs are told from their bits: the library is built with -ffast-math, under which float
 * comparisons may assume there are none. */
static int64_t argmax_f32(const float *x, int64_t n) {
    int64_t i = 0, best = 0;
#if defined(__AVX512F__)
    if (n >= 16) {
        const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff), infinity = _mm512_set1_epi32(0x7f800000);
        __m512 top = _mm512_loadu_ps(x);
        __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), at = lane;
        __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(_mm512_castps_si512(top), abs_bits), infinity);
        for (i = 16; i + 16 <= n; i += 16) {
            __m512 v = _mm512_loadu_ps(x + i);
            lane = _mm512_add_epi32(lane, _mm512_set1_epi32(16));
            __mmask16 greater = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ);
            top = _mm512_mask_mov_ps(top, greater, v);
            at = _mm512_mask_mov_epi32(at, greater, lane);
            nan |= _mm512_cmpgt_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), abs_bits), infinity);
        }
        if (!nan) {
            float most = _mm512_reduce_max_ps(top);
            __mmask16 equal = _mm512_cmp_ps_mask(top, _mm512_set1_ps(most), _CMP_EQ_OQ);
            best = _mm512_mask_reduce_min_epi32(equal, at);
        } else {
            i = 0;
        }
    }
#endif
    for (; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, x + i, sizeof(bits));
        if ((bits & 0x7fffffffu) > 0x7f800000u) return i;
        if (x[i] > x[best]) best = i;
    }
    return best;
}

/* out[r] = argmax_f32 of row r of x [rows, n]: the greedy token of each row of logits. torch's argmax took 14 us
 * for one row of 4,096 logits here and 200 us for 32 rows. */
void argmax_rows_f32(const float *x, int64_t rows, int64_t n, int64_t *out, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(rows * n >= (1 << 18))
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_f32(x + r * n, n);
}
