/* Causal attention of a long prefill in one call, on all cores: openelm_mlx/cpu_attention.py calls it.

Written out as MLX ops (model.py), a 512-token prefill's attention took ~18-30 ms per 270M layer on the
project's 2-core EPYC: every step (scores, mask, max, exp, sum, normalize, weighted sum) is its own pass
over a T x S float32 array in memory, and MLX runs the elementwise ones on one thread. Here each block
of 64 queries of one head computes its scores over only the keys it can see, turns them into weights
while they sit in L2 (max, exp, sum), and multiplies them by the values straight into the output's
[T, heads * head_dim] layout; the blocks are shared among `threads` threads: ~5.6 ms on 2 threads.

Both products are this file's own (`matmul`: 6 rows by 16 columns of accumulators): MKL's sgemm
reached only 35-40 GFLOP/s on these 64-deep shapes, and the kernel then needs no BLAS at all. exp is
2^x = 2^n * 2^f with 2^f by the polynomial of openelm_mlx/cpu_math.py. Each output element is computed
by one thread in a fixed order: the result does not depend on the thread count. */

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KERNEL __attribute__((target("avx2,fma")))
#endif

enum { BLOCK = 64, MAX_THREADS = 64 };

typedef struct {
    int nq, nkv, T, S, hd, past;
    float scale;
    const float *q, *v;
    long q_head, q_row, v_head, v_row;
    const float *kt;    /* keys transposed, per kv head [hd, ldk] */
    int ldk;
    const float *q_norm;        /* per-head RMSNorm weight of the queries [hd], or NULL: q comes normed */
    float eps;
    const float *cos, *sin;     /* RoPE of query t: [T, hd / 2] each, or NULL: q comes rotated */
    float *out;
    int items;          /* query heads x query blocks */
    int next;           /* the next item to take (atomic) */
} Job;

#ifdef KERNEL
static const float EXP2_COEFFICIENTS[7] = {1.0f, 0.6931468880112098f, 0.24023079619430074f, 0.05547964643368558f,
                                           0.009685424987020436f, 0.001238488860585682f, 0.00021874799045870993f};

/* e^(x - max) for x <= max, 8 lanes; tiny results (below 2^-126) flush to 0. */
KERNEL static inline __m256 exp_minus(__m256 x, __m256 max) {
    __m256 t = _mm256_mul_ps(_mm256_sub_ps(x, max), _mm256_set1_ps(1.4426950408889634f));
    t = _mm256_max_ps(t, _mm256_set1_ps(-127.0f));
    const __m256 n = _mm256_floor_ps(t);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(EXP2_COEFFICIENTS[6]);
    for (int i = 5; i >= 0; i--) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_COEFFICIENTS[i]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* Row `s[0..visible)` -> e^(s - max) in place, zeros up to `width`; returns their sum. */
KERNEL static float softmax_numerators(float *s, int visible, int width) {
    __m256 vmax = _mm256_set1_ps(-__builtin_inff());
    int j = 0;
    for (; j + 8 <= visible; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
    float max = -__builtin_inff();
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    for (int i = 0; i < 8; i++) max = lanes[i] > max ? lanes[i] : max;
    for (; j < visible; j++) max = s[j] > max ? s[j] : max;
    const __m256 m = _mm256_set1_ps(max);
    __m256 vsum = _mm256_setzero_ps();
    j = 0;
    for (; j + 8 <= visible; j += 8) {
        const __m256 e = exp_minus(_mm256_loadu_ps(s + j), m);
        _mm256_storeu_ps(s + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    _mm256_storeu_ps(lanes, vsum);
    float sum = 0.0f;
    for (int i = 0; i < 8; i++) sum += lanes[i];
    if (j < visible) {  /* the last few through a padded lane block */
        float tail[8] = {0};
        int n = visible - j;
        memcpy(tail, s + j, n * sizeof(float));
        const __m256 e = exp_minus(_mm256_loadu_ps(tail), m);
        _mm256_storeu_ps(tail, e);
        for (int i = 0; i < n; i++) sum += tail[i];
        memcpy(s + j, tail, n * sizeof(float));
    }
    if (width > visible) memset(s + visible, 0, (size_t)(width - visible) * sizeof(float));
    return sum;
}

/* Keys of one kv head, transposed: kt[d * ldk + j] = k[j][d], zero past the last key (ldk is a multiple
   of 16), so that 16 keys' values of one dimension are two vector loads. */
static void transpose_keys(const float *k, long k_row, int S, int hd, float *kt, int ldk) {
    for (int d = 0; d < hd; d++) {
        float *row = kt + (long)d * ldk;
        for (int j = 0; j < S; j++) row[j] = k[(long)j * k_row + d];
        for (int j = S; j < ldk; j++) row[j] = 0.0f;
    }
}

/* c[r][0..16) = sum over p < n of a[r * lda + p] * b[p * ldb + 0..16), for the first R (<= 6) rows: 6 rows
   by 2 vectors keep 12 accumulators in registers. Inlined with R a constant, one loop per row count. */
KERNEL static inline __attribute__((always_inline)) void micro(const int R, int n, const float *a, long lda,
                                                              const float *b, long ldb, float *c, long ldc) {
    __m256 acc[6][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int p = 0; p < n; p++) {
        const __m256 b0 = _mm256_loadu_ps(b + p * ldb), b1 = _mm256_loadu_ps(b + p * ldb + 8);
        for (int r = 0; r < R; r++) {
            const __m256 x = _mm256_broadcast_ss(a + r * lda + p);
            acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(c + r * ldc, acc[r][0]);
        _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
    }
}

/* c[rows x cols] = a[rows x n] b[n x cols]; cols a multiple of 16 (c and b may be read and written past
   a caller's true width up to it). Column panels of b (n x 16) stay in L1 across the row blocks. */
KERNEL static void matmul(int rows, int cols, int n, const float *a, long lda, const float *b, long ldb, float *c,
                          long ldc) {
    for (int j = 0; j < cols; j += 16) {
        int i = 0;
        for (; i + 6 <= rows; i += 6) micro(6, n, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc);
        switch (rows - i) {
        case 5: micro(5, n, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc); break;
        case 4: micro(4, n, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc); break;
        case 3: micro(3, n, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc); break;
        case 2: micro(2, n, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc); break;
        case 1: micro(1, n, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc); break;
        }
    }
}

/* One query row: RMSNorm with the q_norm weight (mean of squares in float32, as MLX's), then RoPE in
   the rotate-half form of mx.fast.rope(traditional=False), then the softmax scale. */
static void prepare_query(const Job *job, const float *from, int t, float *to) {
    const int hd = job->hd, half = hd / 2;
    float inverse_rms = 1.0f;
    if (job->q_norm) {
        float squares = 0.0f;
        for (int d = 0; d < hd; d++) squares += from[d] * from[d];
        inverse_rms = 1.0f / sqrtf(squares / hd + job->eps);
    }
    for (int d = 0; d < hd; d++) to[d] = job->q_norm ? from[d] * inverse_rms * job->q_norm[d] : from[d];
    if (job->cos) {
        const float *c = job->cos + (long)t * half, *s = job->sin + (long)t * half;
        for (int i = 0; i < half; i++) {
            const float x1 = to[i], x2 = to[i + half];
            to[i] = x1 * c[i] - x2 * s[i];
            to[i + half] = x2 * c[i] + x1 * s[i];
        }
    }
    for (int d = 0; d < hd; d++) to[d] *= job->scale;
}

/* Item i: query head i / blocks, query block i % blocks. Larger items (later blocks) are taken first. */
KERNEL static void run_item(const Job *job, int item, float *q, float *scores, int ld, float *out_block) {
    const int blocks = (job->T + BLOCK - 1) / BLOCK, hd = job->hd;
    const int head = item / blocks, block = blocks - 1 - item % blocks;
    const int kv = head / (job->nq / job->nkv);
    const int t0 = block * BLOCK, rows = job->T - t0 < BLOCK ? job->T - t0 : BLOCK;
    const int keys = job->past + t0 + rows;  /* what the block's last query sees */
    const int padded = (keys + 15) / 16 * 16;
    for (int r = 0; r < rows; r++)  /* the block's queries, normed, rotated, scaled, contiguous */
        prepare_query(job, job->q + head * job->q_head + (long)(t0 + r) * job->q_row, t0 + r, q + r * hd);
    matmul(rows, padded, hd, q, hd, job->kt + (long)kv * hd * job->ldk, job->ldk, scores, ld);
    float inverse[BLOCK];
    for (int r = 0; r < rows; r++)
        inverse[r] = 1.0f / softmax_numerators(scores + (long)r * ld, job->past + t0 + r + 1, keys);
    matmul(rows, hd, keys, scores, ld, job->v + kv * job->v_head, job->v_row, out_block, hd);
    const int ldo = job->nq * hd;
    for (int r = 0; r < rows; r++) {
        float *o = job->out + (long)(t0 + r) * ldo + (long)head * hd;
        for (int d = 0; d < hd; d++) o[d] = out_block[r * hd + d] * inverse[r];
    }
}

static void *worker(void *arg) {
    Job *job = arg;
    float *q = NULL, *scores = NULL, *out_block = NULL;
    if (posix_memalign((void **)&q, 64, (size_t)BLOCK * job->hd * sizeof(float)) == 0 &&
        posix_memalign((void **)&scores, 64, (size_t)BLOCK * job->ldk * sizeof(float)) == 0 &&
        posix_memalign((void **)&out_block, 64, (size_t)BLOCK * job->hd * sizeof(float)) == 0)
        for (int item; (item = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED)) < job->items;)
            run_item(job, item, q, scores, job->ldk, out_block);
    /* else the other threads take this one's items */
    free(q);
    free(scores);
    free(out_block);
    return NULL;
}
#endif

/* Causal attention of one sequence. q: [nq heads, T, hd] with strides q_head, q_row (in floats; rows
   contiguous); k, v: [nkv, S, hd] likewise, S = past + T (query t sits at key position past + t); out:
   [T, nq * hd], contiguous. nq must be a multiple of nkv (query head j reads kv head j / (nq / nkv)),
   hd a multiple of 16. With q_norm (a [hd] weight) the queries are RMSNorm'd first (eps), and with
   rope_cos and rope_sin ([T, hd / 2] each: query t's cos and sin of position * base^(-2i/hd)) rotated
   as mx.fast.rope(traditional=False) does; the keys come normed and rotated. Returns 0, or -1 if this
   CPU or build cannot run it or memory ran out (out is then incomplete). */
int openelm_causal_attention(int nq, int nkv, int T, int S, int hd, float scale, const float *q, long q_head,
                             long q_row, const float *k, long k_head, long k_row, const float *v, long v_head,
                             long v_row, float *out, int threads, const float *q_norm, float eps,
                             const float *rope_cos, const float *rope_sin) {
#ifdef KERNEL
    if (nkv <= 0 || nq % nkv || T <= 0 || S < T || hd <= 0 || hd % 16 || threads < 1 || !rope_cos != !rope_sin)
        return -1;
    const int ldk = (S + 15) / 16 * 16;
    float *kt = NULL;
    if (posix_memalign((void **)&kt, 64, (size_t)nkv * hd * ldk * sizeof(float)) != 0) return -1;
    for (int h = 0; h < nkv; h++) transpose_keys(k + h * k_head, k_row, S, hd, kt + (long)h * hd * ldk, ldk);
    Job job = {nq, nkv, T, S, hd, S - T, scale, q, v, q_head, q_row, v_head, v_row, kt, ldk, q_norm, eps,
               rope_cos, rope_sin, out, nq * ((T + BLOCK - 1) / BLOCK), 0};
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    pthread_t others[MAX_THREADS];
    int started = 0;
    for (; started < threads - 1; started++)
        if (pthread_create(&others[started], NULL, worker, &job) != 0) break;
    worker(&job);
    for (int i = 0; i < started; i++) pthread_join(others[i], NULL);
    free(kt);
    return job.next >= job.items ? 0 : -1;  /* short only if no thread had memory for its blocks */
#else
    return -1;
#endif
}
