/* A `cblas_sgemm` for the few-row float32 matmuls of decoding, in front of the BLAS that runs the rest.

MLX's CPU backend computes every float32 `x @ W.T` with `cblas_sgemm(RowMajor, NoTrans, Trans, ...)`.
For a few rows of x (a batch of decode rows, a speculative verify pass) MKL 2026.2 on this project's
2-core AMD EPYC costs nearly as much per row as for one row: a 6144x1280 weight took 2.6 ms for 1 row
and 10.3 ms for 8 on one thread, with weights streamed from memory. Here each block of 3 weight rows
is read from memory once and multiplied by every row of x while it sits in L1: 8 rows then cost
3.3-3.5 ms. One row, larger calls, other transposes and other orders go to the BLAS that
`openelm_gemm_configure` names (openelm_mlx/blas.py loads this library first, then that BLAS);
the large ones among them get a 64-byte-aligned output to write into (`forward_aligned`).

Every output element is one dot product whose summation order depends only on K: a row of x gives
bit for bit the same result among any other rows of a call (2 to 16) and against any slice of the
weight's rows (the split over CPU streams).

Built by setup.py as an optional extension on Linux x86-64 and loaded with ctypes (never imported).
The kernels use AVX2 and FMA; `openelm_gemm_supported` says whether this CPU has them. */

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KERNEL __attribute__((target("avx2,fma")))
#endif

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { ROWS = 4, COLS = 3 };    /* a block: 4 rows of x by 3 rows of the weight, 12 accumulators */
enum { PANEL_BYTES = 256 << 10 };  /* rows of x per pass over the weight: as many as fit in 256 KB of L2 */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);

static sgemm_fn fallback;       /* the BLAS behind this one */
static long kernel_calls, fallback_calls;

void openelm_gemm_configure(sgemm_fn next) { fallback = next; }

/* Where the kernel beat MKL on the project's EPYC, in the 270M model and alone (weights of 1280 to 10240
   rows by 1280 or 5120, streamed from memory): from 2 rows (MKL's matvec is as fast for one) to 16 rows
   (a 64-token prefill already ran faster on MKL), for dot products of at least 256 terms (attention's
   64-term ones are left to the BLAS: the kernel's per-dot overhead does not pay there). */
static int kernel_fits(int M, int K) { return M >= 2 && M <= 16 && K >= 256; }

void openelm_gemm_counts(long *kernel, long *forwarded) {
    *kernel = __atomic_load_n(&kernel_calls, __ATOMIC_RELAXED);
    *forwarded = __atomic_load_n(&fallback_calls, __ATOMIC_RELAXED);
}

#ifdef KERNEL
int openelm_gemm_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

KERNEL static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Ask for the next block's weight rows (3 rows on) while this block computes: without it the loads of
   a block's first pass waited on memory (8 rows through a 6144x1280 weight: 3.3-3.5 ms against 3.9-4.5).
   A prefetch past the weight's end is harmless: prefetches never fault. */
KERNEL static inline void prefetch_next(const float *w0, const float *w1, const float *w2, long ahead, int k) {
    if (k & 15) return;  /* one 64-byte line per row every 16 floats */
    _mm_prefetch((const char *)(w0 + ahead + k), _MM_HINT_T1);
    _mm_prefetch((const char *)(w1 + ahead + k), _MM_HINT_T1);
    _mm_prefetch((const char *)(w2 + ahead + k), _MM_HINT_T1);
}

KERNEL static inline float finish(__m256 acc, int K, const float *a, const float *w) {
    float dot = sum8(acc);
    for (int k = K & ~7; k < K; k++) dot = __builtin_fmaf(a[k], w[k], dot);
    return dot;
}

KERNEL static inline void store(float *out, float dot, float alpha, float beta) {
    *out = beta == 0.0f ? alpha * dot : __builtin_fmaf(beta, *out, alpha * dot);  /* beta 0: c is not read */
}

/* Each dot product: 8 lanes over K rounded down to 8, summed by sum8, then the last K % 8 terms in
   order (`finish`). A full block of 4 rows of a by 3 rows of w keeps its 12 accumulators in registers. */
KERNEL static void full_block(int K, float alpha, const float *a, int lda, const float *w, int ldw,
                              float beta, float *c, int ldc) {
    const float *a0 = a, *a1 = a + lda, *a2 = a + 2L * lda, *a3 = a + 3L * lda;
    const float *w0 = w, *w1 = w + ldw, *w2 = w + 2L * ldw;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
    __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
    for (int k = 0; k + 8 <= K; k += 8) {
        const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k), v2 = _mm256_loadu_ps(w2 + k);
        prefetch_next(w0, w1, w2, COLS * (long)ldw, k);
        __m256 x = _mm256_loadu_ps(a0 + k);
        c00 = _mm256_fmadd_ps(x, v0, c00); c01 = _mm256_fmadd_ps(x, v1, c01); c02 = _mm256_fmadd_ps(x, v2, c02);
        x = _mm256_loadu_ps(a1 + k);
        c10 = _mm256_fmadd_ps(x, v0, c10); c11 = _mm256_fmadd_ps(x, v1, c11); c12 = _mm256_fmadd_ps(x, v2, c12);
        x = _mm256_loadu_ps(a2 + k);
        c20 = _mm256_fmadd_ps(x, v0, c20); c21 = _mm256_fmadd_ps(x, v1, c21); c22 = _mm256_fmadd_ps(x, v2, c22);
        x = _mm256_loadu_ps(a3 + k);
        c30 = _mm256_fmadd_ps(x, v0, c30); c31 = _mm256_fmadd_ps(x, v1, c31); c32 = _mm256_fmadd_ps(x, v2, c32);
    }
    const __m256 acc[ROWS][COLS] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
    for (int i = 0; i < ROWS; i++)
        for (int j = 0; j < COLS; j++)
            store(c + (long)i * ldc + j, finish(acc[i][j], K, a + (long)i * lda, w + (long)j * ldw), alpha, beta);
}

/* The same dot products, one row of a by one row of w, for the edges of the output. */
KERNEL static void one(int K, float alpha, const float *a, const float *w, float beta, float *out) {
    __m256 acc = _mm256_setzero_ps();
    for (int k = 0; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(w + k), acc);
    store(out, finish(acc, K, a, w), alpha, beta);
}

/* A row of a by 3 rows of w: the rows left over after the blocks of 4. */
KERNEL static void row_block(int K, float alpha, const float *a, const float *w, int ldw, float beta, float *c) {
    const float *w0 = w, *w1 = w + ldw, *w2 = w + 2L * ldw;
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0;
    for (int k = 0; k + 8 <= K; k += 8) {
        const __m256 x = _mm256_loadu_ps(a + k);
        prefetch_next(w0, w1, w2, COLS * (long)ldw, k);
        c0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(w0 + k), c0);
        c1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(w1 + k), c1);
        c2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(w2 + k), c2);
    }
    store(c, finish(c0, K, a, w0), alpha, beta);
    store(c + 1, finish(c1, K, a, w1), alpha, beta);
    store(c + 2, finish(c2, K, a, w2), alpha, beta);
}

KERNEL static void rows_times_weight_t(int M, int N, int K, float alpha, const float *a, int lda,
                                       const float *w, int ldw, float beta, float *c, int ldc) {
    const long fit = PANEL_BYTES / ((long)K * sizeof(float)) / ROWS * ROWS;
    const int panel = fit < ROWS ? ROWS : (int)fit;
    for (int m0 = 0; m0 < M; m0 += panel) {
        const int m1 = m0 + panel < M ? m0 + panel : M;
        for (int n = 0; n < N; n += COLS) {
            const int cols = N - n < COLS ? N - n : COLS;
            const float *wn = w + (long)n * ldw;
            int m = m0;
            if (cols == COLS)
                for (; m + ROWS <= m1; m += ROWS)
                    full_block(K, alpha, a + (long)m * lda, lda, wn, ldw, beta, c + (long)m * ldc + n, ldc);
            for (; m < m1; m++) {
                const float *am = a + (long)m * lda;
                float *cm = c + (long)m * ldc + n;
                if (cols == COLS)
                    row_block(K, alpha, am, wn, ldw, beta, cm);
                else
                    for (int j = 0; j < cols; j++) one(K, alpha, am, wn + (long)j * ldw, beta, cm + j);
            }
        }
    }
}
#else
int openelm_gemm_supported(void) { return 0; }
#endif

/* MLX's CPU allocator returns buffers 8 bytes past a 16-byte boundary, and MKL's sgemm runs slower when
   the output is not 64-byte aligned: on the project's EPYC, 512 rows through a 6144x1280 weight reached
   46 GFLOP/s on one thread against 65 with an aligned output (2 threads: 93 against 124; medians),
   while the inputs' alignment made no difference. So a large call whose output is misaligned writes
   into an aligned per-thread scratch, OUTPUT_CHUNK_BYTES at most (in row chunks), and is copied out:
   through the kernel the same call reached 67.5 GFLOP/s, against 67.6 into an aligned output. */
enum { ALIGN = 64, ALIGN_FLOATS = ALIGN / sizeof(float), OUTPUT_CHUNK_BYTES = 16 << 20 };
static const double REALIGN_MIN_FLOPS = 1 << 25;  /* smaller calls (attention's) gained nothing measurable */

/* One row (a decode step's matrix-vector product) is left as it is: not measured to pay. */
static int realigns(int M, int N, int K, const float *c) {
    return ((size_t)c % ALIGN) != 0 && M > 1 && N >= ALIGN_FLOATS &&
           2.0 * M * N * K >= REALIGN_MIN_FLOPS;
}

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static void make_scratch_key(void) { pthread_key_create(&scratch_key, free); }  /* freed at thread exit */

/* This thread's scratch of at least `bytes`, 64-byte aligned; NULL if it cannot be had. */
static float *scratch(size_t bytes) {
    static __thread size_t held;
    pthread_once(&scratch_once, make_scratch_key);
    float *buffer = pthread_getspecific(scratch_key);
    if (buffer && held >= bytes) return buffer;
    free(buffer);
    buffer = NULL;
    if (posix_memalign((void **)&buffer, ALIGN, bytes) != 0) buffer = NULL;
    held = buffer ? bytes : 0;
    pthread_setspecific(scratch_key, buffer);
    return buffer;
}

static void forward_aligned(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *a, int lda,
                            const float *b, int ldb, float *c, int ldc) {
    const int ld = (N + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS;  /* every row starts aligned */
    const long fit = OUTPUT_CHUNK_BYTES / ((long)ld * sizeof(float));
    const int chunk = fit < 1 ? 1 : (fit < M ? (int)fit : M);
    float *out = scratch((size_t)chunk * ld * sizeof(float));
    if (!out) {  /* no memory for the scratch: write straight into c */
        fallback(ROW_MAJOR, trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, 0.0f, c, ldc);
        return;
    }
    for (int m0 = 0; m0 < M; m0 += chunk) {
        const int rows = M - m0 < chunk ? M - m0 : chunk;
        const float *a0 = trans_a == NO_TRANS ? a + (long)m0 * lda : a + m0;  /* row m0 of op(a) */
        fallback(ROW_MAJOR, trans_a, trans_b, rows, N, K, alpha, a0, lda, b, ldb, 0.0f, out, ld);
        for (int m = 0; m < rows; m++) memcpy(c + (long)(m0 + m) * ldc, out + (long)m * ld, N * sizeof(float));
    }
}

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
#ifdef KERNEL
    if (order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == TRANS && kernel_fits(M, K) && N > 0) {
        __atomic_fetch_add(&kernel_calls, 1, __ATOMIC_RELAXED);
        rows_times_weight_t(M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
#endif
    if (!fallback) {
        fprintf(stderr, "openelm_mlx small_gemm: cblas_sgemm called before openelm_gemm_configure\n");
        abort();
    }
    __atomic_fetch_add(&fallback_calls, 1, __ATOMIC_RELAXED);
    if (order == ROW_MAJOR && beta == 0.0f && realigns(M, N, K, c))
        forward_aligned(trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, c, ldc);
    else
        fallback(order, trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
}
