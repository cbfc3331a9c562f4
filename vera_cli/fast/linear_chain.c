/* A chain of small Linear layers with ReLUs between, forward and backward, on AVX2 or AVX-512:
 *   y = W_L relu(... relu(W_1 x + c_1) ...) + c_L, and the gradients of every W_l and c_l from that of y.
 *
 * Why by hand: on cached features an adaptation step runs the ConvNet's classifier (five Linear layers of 10 to
 * 152 features) on 256 rows: eighteen matrix products of 0.1 to 5 MFLOP and some seventy small elementwise
 * operations, each dispatched on its own and each product a parallel region of its own, so that the step cost
 * three times its products. Here the forward is one call and one parallel region, and so is the backward: each
 * thread takes a slice of the rows through every layer and sums its own weight gradients, with no barrier in
 * between; the slices' sums are added up at the end.
 *
 * Inside, activations are feature-major: a feature's values for a thread's rows are contiguous, padded with zeros
 * to a multiple of 16 rows (whole vectors at either width; `width` picks the products, linear_chain_tiles.h).
 * Every product then lays its vectors along the rows and reads the weights as broadcast scalars, in whichever
 * order it needs them: no weight is ever transposed. A padded row carries finite values
 * forward and a zero gradient back, so it adds nothing to a sum.
 *
 * Layouts (float32):
 *   dims   [L + 1]          the input's features, then each layer's outputs
 *   x      rows x dims[0]   row-major, rows x_stride apart (a view into the cached features)
 *   first  rows x dims[1]   row-major, rows first_stride apart: the first layer's bias, one per row (or NULL: bias[0])
 *   w[l]   dims[l+1] x dims[l], row-major (a Linear's weight); bias[l] [dims[l+1]] or NULL
 *   saved  threads x (dims[0] + .. + dims[L-1]) x ld: each thread's input and hidden activations, feature-major,
 *          ld = the largest slice's rows rounded up to 16; written by the forward, read by the backward
 *   out    rows x dims[L]   row-major;   grad: the same, the gradient of out
 *   gw     threads x sum(dims[l+1] dims[l]), gb: threads x sum(dims[l+1]): each slice's sums, layer after layer,
 *          then their total in the first slice's place
 */
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define NONE 0
#define RELU 1
#define MASK 2 /* zero where m <= 0: the ReLU's gradient, m the ReLU's output */

static int ceil16(int n) { return (n + 15) / 16 * 16; }

static int slice_ld(int rows, int threads) { return ceil16((rows + threads - 1) / threads); }

/* Rows r[0..7] become columns. */
INLINE void transpose8(__m256 *r) {
    __m256 t[8], s[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
    }
}

/* dst[f][j] = src[j * stride + f] for j < n, zero for n <= j < ld: 8 x 8 blocks through registers (6 % faster
 * forward than a strided element at a time), the edges one at a time. */
static void to_features(const float *src, int stride, int n, int features, int ld, float *dst) {
    int whole_j = n / 8 * 8, whole_f = features / 8 * 8;
    for (int j0 = 0; j0 < whole_j; j0 += 8)
        for (int f0 = 0; f0 < whole_f; f0 += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + (long)(j0 + i) * stride + f0);
            transpose8(r);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(dst + (long)(f0 + i) * ld + j0, r[i]);
        }
    for (int f = 0; f < features; f++) {
        float *row = dst + (long)f * ld;
        for (int j = f < whole_f ? whole_j : 0; j < n; j++) row[j] = src[(long)j * stride + f];
        for (int j = n; j < ld; j++) row[j] = 0.0f;
    }
}

static void to_rows(const float *src, int n, int features, int ld, float *dst) {
    for (int j = 0; j < n; j++)
        for (int f = 0; f < features; f++) dst[(long)j * features + f] = src[(long)f * ld + j];
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define NAME(f) CAT(f, W)

#define W 8
#define VEC __m256
#define LOAD _mm256_loadu_ps
#define STORE _mm256_storeu_ps
#define SET1 _mm256_set1_ps
#define ZERO _mm256_setzero_ps()
#define FMA _mm256_fmadd_ps
#define MAX _mm256_max_ps
#define ADD _mm256_add_ps
#define REDUCE hsum
#define KEEP_ABOVE_ZERO(r, m) _mm256_and_ps(r, _mm256_cmp_ps(m, _mm256_setzero_ps(), _CMP_NLE_UQ))
#include "linear_chain_tiles.h"
#undef W
#undef VEC
#undef LOAD
#undef STORE
#undef SET1
#undef ZERO
#undef FMA
#undef MAX
#undef ADD
#undef REDUCE
#undef KEEP_ABOVE_ZERO

/* AVX-512 where the processor has it: on a 2-core Intel Xeon an adaptation epoch on cached features took 0.070-0.074
 * s against 0.078-0.084 s with the AVX2 products (timed in turn, three runs each way). */
#pragma GCC push_options
#pragma GCC target("avx512f")
#define W 16
#define VEC __m512
#define LOAD _mm512_loadu_ps
#define STORE _mm512_storeu_ps
#define SET1 _mm512_set1_ps
#define ZERO _mm512_setzero_ps()
#define FMA _mm512_fmadd_ps
#define MAX _mm512_max_ps
#define ADD _mm512_add_ps
#define REDUCE _mm512_reduce_add_ps
#define KEEP_ABOVE_ZERO(r, m) _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_NLE_UQ), r)
#include "linear_chain_tiles.h"
#pragma GCC pop_options

typedef void (*Product)(int, int, const float *, long, long, const float *, float *, int, int, const float *, int,
                        const float *);
typedef void (*WeightGrad)(int, int, const float *, const float *, int, float *, float *);

static int widest(int layers, const int *dims) {
    int most = 0;
    for (int l = 0; l <= layers; l++) most = dims[l] > most ? dims[l] : most;
    return most;
}

/* Slice t of `threads` is rows [r0, r1), with its saved activations and scratch for two layers' worth of
 * features. OpenMP, on the libgomp threads torch has loaded (see convnet_features.c); a thread takes every slice
 * left over when OpenMP gives fewer threads than asked. `failed` is set when a thread could not allocate its scratch. */
#define OVER_SLICES(rows, threads, layers, dims, ...)                                                  \
    int ld = slice_ld(rows, threads), held = 0, failed = 0;                                             \
    for (int l = 0; l < layers; l++) held += dims[l];                                                   \
    size_t scratch_floats = 2 * (size_t)widest(layers, dims) * ld;                                      \
    _Pragma("omp parallel num_threads(threads) reduction(| : failed)")                                  \
    {                                                                                                   \
        float *scratch = aligned_alloc(64, scratch_floats * sizeof(float));                             \
        if (!scratch) failed = 1;                                                                       \
        else {                                                                                          \
            for (int t = omp_get_thread_num(); t < threads; t += omp_get_num_threads()) {               \
                int r0 = (int)((long)rows * t / threads), r1 = (int)((long)rows * (t + 1) / threads);   \
                float *mine = saved + (long)t * held * ld;                                              \
                __VA_ARGS__;                                                                                 \
            }                                                                                           \
            free(scratch);                                                                              \
        }                                                                                               \
    }

int vc_chain_forward(int width, int rows, int threads, int layers, const int *dims, const float *x, int x_stride,
                     const float *first, int first_stride, const float *const *w, const float *const *bias,
                     float *saved, float *out) {
    Product product = width == 16 ? product16 : product8;
    OVER_SLICES(rows, threads, layers, dims, {
        int n = r1 - r0;
        float *in = mine;
        to_features(x + (long)r0 * x_stride, x_stride, n, dims[0], ld, in);
        for (int l = 0; l < layers; l++) {
            float *y = l < layers - 1 ? in + (long)dims[l] * ld : scratch;
            int from_rows = l == 0 && first;
            if (from_rows) to_features(first + (long)r0 * first_stride, first_stride, n, dims[1], ld, y);
            product(dims[l + 1], dims[l], w[l], dims[l], 1, in, y, ld, from_rows, bias[l],
                    l < layers - 1 ? RELU : NONE, NULL);
            in = y;
        }
        to_rows(scratch, n, dims[layers], ld, out + (long)r0 * dims[layers]);
    })
    return failed;
}

int vc_chain_backward(int width, int rows, int threads, int layers, const int *dims, const float *const *w,
                      float *saved, const float *grad, float *gw, float *gb) {
    Product product = width == 16 ? product16 : product8;
    WeightGrad weight_grad = width == 16 ? weight_grad16 : weight_grad8;
    long weights = 0, biases = 0;
    for (int l = 0; l < layers; l++) {
        weights += (long)dims[l + 1] * dims[l];
        biases += dims[l + 1];
    }
    OVER_SLICES(rows, threads, layers, dims, {
        int n = r1 - r0;
        float *g = scratch, *spare = scratch + scratch_floats / 2;
        float *gw_mine = gw + t * weights, *gb_mine = gb + t * biases;
        long w_at = weights, b_at = biases, h_at = held;
        to_features(grad + (long)r0 * dims[layers], dims[layers], n, dims[layers], ld, g);
        for (int l = layers - 1; l >= 0; l--) {
            w_at -= (long)dims[l + 1] * dims[l];
            b_at -= dims[l + 1];
            h_at -= dims[l];
            const float *h = mine + h_at * ld;
            weight_grad(dims[l + 1], dims[l], g, h, ld, gw_mine + w_at, gb_mine + b_at);
            if (l > 0) {
                product(dims[l], dims[l + 1], w[l], 1, dims[l], g, spare, ld, 0, NULL, MASK, h);
                float *swap = g;
                g = spare;
                spare = swap;
            }
        }
    })
    /* The slices' sums, added up into the first slice's. */
    for (int t = 1; t < threads; t++) {
        for (long j = 0; j < weights; j++) gw[j] += gw[t * weights + j];
        for (long j = 0; j < biases; j++) gb[j] += gb[t * biases + j];
    }
    return failed;
}

/* VeRA layers' weights for the chain, and the gradients of their vectors from those of the weights:
 *   scaled = B diag(d) A,   full = W0 + diag(b) scaled,
 *   grad d = rowsum(A * (B^T diag(b) grad_full)),   grad b = rowsum(grad_full * scaled).
 * Per layer l: shape[3 l ..] = out, in, r; w0 [out x in] or NULL (zero); a [r x in], or NULL where the layer's input
 * is A x already (the feature cache holds it; then in == r and A is the identity); bp [out x r]; d [r]; b [out].
 * As a handful of torch operations per layer, these took a third of an adaptation step on cached features.
 *
 * The weights: the layers side by side on the threads, each output row built 32 columns at a time in registers
 * over the rank, from a copy of A with its rows padded to whole vectors (masked loads ran at a third of the
 * speed). Returns 1 when a thread could not allocate its scratch. */
int vc_vera_weights(int layers, int threads, const int *shape, const float *const *w0, const float *const *a,
                    const float *const *bp, const float *const *d, const float *const *b, float *const *scaled,
                    float *const *full) {
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(| : failed)
    for (int l = 0; l < layers; l++) {
        int out = shape[3 * l], in = shape[3 * l + 1], r = shape[3 * l + 2], wide = (in + 31) / 32 * 32;
        /* A's rows padded with zeros, a row of B diag(d), and the row being built */
        float *ap = a[l] ? aligned_alloc(64, sizeof(float) * (size_t)r * wide) : NULL;
        size_t c_floats = (size_t)((r > wide ? r : wide) + 15) / 16 * 16; /* aligned_alloc takes whole alignments */
        float *c = aligned_alloc(64, sizeof(float) * c_floats), *row = aligned_alloc(64, sizeof(float) * wide);
        if ((a[l] && !ap) || !c || !row) {
            failed = 1;
        } else {
            for (int k = 0; a[l] && k < r; k++) {
                memcpy(ap + (long)k * wide, a[l] + (long)k * in, sizeof(float) * in);
                memset(ap + (long)k * wide + in, 0, sizeof(float) * (wide - in));
            }
            for (int o = 0; o < out; o++) {
                for (int k = 0; k < r; k++) c[k] = bp[l][(long)o * r + k] * d[l][k];
                if (a[l]) {
                    for (int i0 = 0; i0 < wide; i0 += 32) {
                        __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
                        /* Four vectors at once: each sum over the rank is a chain of dependent multiply-adds. */
                        for (int k = 0; k < r; k++) {
                            __m256 ck = _mm256_set1_ps(c[k]);
                            const float *from = ap + (long)k * wide + i0;
                            for (int j = 0; j < 4; j++) s[j] = _mm256_fmadd_ps(ck, _mm256_load_ps(from + 8 * j), s[j]);
                        }
                        for (int j = 0; j < 4; j++) _mm256_store_ps(row + i0 + 8 * j, s[j]);
                    }
                } else {
                    memcpy(row, c, sizeof(float) * in);
                }
                float *s_out = scaled[l] + (long)o * in, *f_out = full[l] + (long)o * in;
                const float *base = w0[l] ? w0[l] + (long)o * in : NULL;
                float scale = b[l][o];
                memcpy(s_out, row, sizeof(float) * in);
                for (int i = 0; i < in; i++) f_out[i] = (base ? base[i] : 0.0f) + scale * row[i];
            }
        }
        free(ap);
        free(c);
        free(row);
    }
    return failed;
}

INLINE float dot(const float *restrict x, const float *restrict y, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) sum += x[i] * y[i];
    return sum;
}

/* The layers side by side on the threads. Returns 1 when a thread could not allocate its scratch. */
int vc_vera_vector_grads(int layers, int threads, const int *shape, const float *const *grad_full,
                         const float *const *a, const float *const *bp, const float *const *b,
                         const float *const *scaled, float *const *grad_d, float *const *grad_b) {
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(| : failed)
    for (int l = 0; l < layers; l++) {
        int out = shape[3 * l], in = shape[3 * l + 1], r = shape[3 * l + 2];
        const float *g = grad_full[l];
        for (int o = 0; o < out; o++) grad_b[l][o] = dot(g + (long)o * in, scaled[l] + (long)o * in, in);
        float *t = calloc((size_t)r * in, sizeof(float)); /* B^T diag(b) grad_full */
        if (!t) {
            failed = 1;
            continue;
        }
        for (int o = 0; o < out; o++)
            for (int k = 0; k < r; k++) {
                float c = bp[l][(long)o * r + k] * b[l][o];
                float *restrict row = t + (long)k * in;
                const float *restrict from = g + (long)o * in;
                for (int i = 0; i < in; i++) row[i] += c * from[i];
            }
        for (int k = 0; k < r; k++)
            grad_d[l][k] = a[l] ? dot(a[l] + (long)k * in, t + (long)k * in, in) : t[(long)k * in + k];
        free(t);
    }
    return failed;
}
