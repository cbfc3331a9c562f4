/* The ConvNet's convolutional prefix on AVX2, forward and backward, one image at a time:
 *   relu(max_pool2d(conv2d(x, 5x5), 2)) twice: 3 -> 6 channels, 32x32 -> 28x28 -> 14x14, then
 *   6 -> 16 channels, 14x14 -> 10x10 -> 5x5, flattened channel-major as torch.flatten does on NCHW.
 *
 * Why by hand: with 3-16 channels oneDNN ran these convolutions at 20-60 GFLOP/s where one core's sgemm runs 85,
 * and with their pools they were over two thirds of a training step. Here each kernel lays its vectors along
 * the dimension that fills them (output columns for conv1's forward, conv2's 16 output channels, a kernel row's
 * 15 taps for conv1's weight gradient), keeps a block of sums in registers over all the taps, and skips what
 * the pool's gradient makes zero (conv2's input gradient). Every size is a compile-time constant, so all
 * addressing is immediate offsets. An image's intermediate maps stay in a thread's scratch (in cache); only
 * the first layer's output (the second layer's input, needed for its weight gradient) and one bit per pool
 * window, position and channel (where its gradient goes) are kept for the backward. Each thread takes a slice
 * of the batch and sums its own weight gradients; the caller adds the slices up.
 *
 * Layouts (float32 unless said, channels innermost inside an image unless said):
 *   x    [B][3][32][32]   input images, planar (NCHW)
 *   w1   [6][3][5][5]     conv1's weights as torch holds them; b1 [8], padded with zeros
 *   w2   [5][5][6][16]    conv2's weights (kh, kw, in, out); b2 [16]; w2t [5][5][16][8]: (kh, kw, out, in),
 *                         inputs padded to 8
 *   p1   [B][14][14][8]   the first layer's output
 *   m1   [B][14][14][4]   uint8: per pool window, per position in it (row-major), a bit per channel (8 lanes)
 *                         set where that position is the first maximum and the maximum is positive: where the
 *                         gradient goes. m2 [B][5][5][2][4] likewise for the second layer's two vectors.
 *   out  [B][16][5][5]    the second layer's output, channel-major
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define K 5
#define INLINE static inline __attribute__((always_inline))
/* Loops over register blocks are unrolled completely, so that the sums stay in registers. */
#define UNROLL _Pragma("GCC unroll 64")
/* Register blocks are fixed-size arrays (a variable-length one would live on the stack), used up to the sizes
 * each layer gives. */
#define MAX_C 8
#define MAX_NV 2
#define MAX_CIN 6
#define MAX_OUT 8

/* ---- forward ---- */

/* Two output rows x C output columns x NV vectors of sums over all 5 x 5 x CIN taps. */
INLINE void conv_block(const float *x, const float *w, const float *bias, float *y, int oh, int ow,
                       const int W, const int XS, const int CIN, const int NV, const int C) {
    const int OW = W - K + 1;
    __m256 acc[2][MAX_C][MAX_NV];
    UNROLL for (int v = 0; v < NV; v++) {
        __m256 b = _mm256_loadu_ps(bias + 8 * v);
        UNROLL for (int r = 0; r < 2; r++)
            UNROLL for (int c = 0; c < C; c++) acc[r][c][v] = b;
    }
    for (int kh = 0; kh < K; kh++)
        for (int kw = 0; kw < K; kw++) {
            const float *wk = w + (kh * K + kw) * CIN * NV * 8;
            const float *xk = x + ((oh + kh) * W + ow + kw) * XS;
            UNROLL for (int ci = 0; ci < CIN; ci++) {
                __m256 wv[MAX_NV];
                UNROLL for (int v = 0; v < NV; v++) wv[v] = _mm256_loadu_ps(wk + (ci * NV + v) * 8);
                UNROLL for (int r = 0; r < 2; r++)
                    UNROLL for (int c = 0; c < C; c++) {
                        __m256 xb = _mm256_broadcast_ss(xk + (r * W + c) * XS + ci);
                        UNROLL for (int v = 0; v < NV; v++) acc[r][c][v] = _mm256_fmadd_ps(xb, wv[v], acc[r][c][v]);
                    }
            }
        }
    UNROLL for (int r = 0; r < 2; r++)
        UNROLL for (int c = 0; c < C; c++)
            UNROLL for (int v = 0; v < NV; v++) _mm256_storeu_ps(y + ((oh + r) * OW + ow + c) * NV * 8 + 8 * v, acc[r][c][v]);
}

/* relu(max_pool(y, 2)) into p, and the windows' gradient bits into m. A NaN anywhere in a window is the
 * window's output, as in torch. */
/* r[i][j] <- r[j][i] for an 8 x 8 block of floats. */
INLINE void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++)
        for (int h = 0; h < 2; h++) {
            u[4 * i + 2 * h] = _mm256_shuffle_ps(t[4 * i + h], t[4 * i + h + 2], 0x44);
            u[4 * i + 2 * h + 1] = _mm256_shuffle_ps(t[4 * i + h], t[4 * i + h + 2], 0xEE);
        }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* The first convolution from the planar image, its 6 output channels each with vectors of 8 output columns:
 * each weight is broadcast against two vectors of input columns. Input values are loaded, not broadcast, and
 * no lane holds a padded channel, so it runs on the FMA units rather than on loads. Columns 12-15 are computed
 * twice (blocks 0-15 and 12-27), to the same sums. The sums are transposed to channels innermost for the pool. */
INLINE void first_conv(const float *x, const float *w, const float *bias, float *y) {
    const int H = 32, W = 32, CIN = 3, OUT = 6, OW = W - K + 1;
    for (int oh = 0; oh < H - K + 1; oh++)
        for (int c0 = 0; c0 <= OW - 16; c0 += OW - 16) {
            __m256 acc[MAX_OUT][2];
            UNROLL for (int o = 0; o < OUT; o++) acc[o][0] = acc[o][1] = _mm256_broadcast_ss(bias + o);
            for (int ci = 0; ci < CIN; ci++)
                for (int kh = 0; kh < K; kh++)
                    for (int kw = 0; kw < K; kw++) {
                        const float *xr = x + (ci * H + oh + kh) * W + c0 + kw;
                        const __m256 a = _mm256_loadu_ps(xr), b = _mm256_loadu_ps(xr + 8);
                        UNROLL for (int o = 0; o < OUT; o++) {
                            const __m256 wv = _mm256_broadcast_ss(w + ((o * CIN + ci) * K + kh) * K + kw);
                            acc[o][0] = _mm256_fmadd_ps(a, wv, acc[o][0]);
                            acc[o][1] = _mm256_fmadd_ps(b, wv, acc[o][1]);
                        }
                    }
            UNROLL for (int v = 0; v < 2; v++) {
                __m256 r[8];
                UNROLL for (int o = 0; o < 8; o++) r[o] = o < OUT ? acc[o][v] : _mm256_setzero_ps();
                transpose8(r);
                UNROLL for (int p = 0; p < 8; p++) _mm256_storeu_ps(y + (oh * OW + c0 + 8 * v + p) * 8, r[p]);
            }
        }
}

INLINE void pool_relu(const float *y, float *p, uint8_t *m, const int OH, const int OW, const int NV) {
    const __m256 zero = _mm256_setzero_ps();
    for (int i = 0; i < OH / 2; i++)
        for (int j = 0; j < OW / 2; j++)
            UNROLL for (int v = 0; v < NV; v++) {
                const float *q = y + ((2 * i) * OW + 2 * j) * NV * 8 + 8 * v;
                __m256 a[4] = {_mm256_loadu_ps(q), _mm256_loadu_ps(q + NV * 8), _mm256_loadu_ps(q + OW * NV * 8),
                               _mm256_loadu_ps(q + (OW + 1) * NV * 8)};
                __m256 top = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
                __m256 nan = _mm256_or_ps(_mm256_cmp_ps(a[0], a[1], _CMP_UNORD_Q), _mm256_cmp_ps(a[2], a[3], _CMP_UNORD_Q));
                top = _mm256_or_ps(top, nan);
                /* As torch: the ReLU's gradient passes unless the output is <= 0 (a NaN passes it); the pool's
                 * goes to the first maximum, or in a window with a NaN to its last NaN. */
                __m256 taken = _mm256_cmp_ps(top, zero, _CMP_LE_OQ), taken_nan = taken, hits[4];
                UNROLL for (int k = 0; k < 4; k++) {
                    hits[k] = _mm256_andnot_ps(taken, _mm256_cmp_ps(a[k], top, _CMP_EQ_OQ));
                    taken = _mm256_or_ps(taken, hits[k]);
                }
                if (_mm256_movemask_ps(nan))  /* rare: a branch that is almost never taken costs nothing */
                    UNROLL for (int k = 3; k >= 0; k--) {
                        __m256 last = _mm256_andnot_ps(taken_nan, _mm256_cmp_ps(a[k], a[k], _CMP_UNORD_Q));
                        taken_nan = _mm256_or_ps(taken_nan, last);
                        hits[k] = _mm256_or_ps(hits[k], last);
                    }
                uint8_t *bits = m + ((i * (OW / 2) + j) * NV + v) * 4;
                UNROLL for (int k = 0; k < 4; k++) bits[k] = (uint8_t)_mm256_movemask_ps(hits[k]);
                /* max(0, NaN) is the NaN: the second operand is returned when either is one. */
                _mm256_storeu_ps(p + (i * (OW / 2) + j) * NV * 8 + 8 * v, _mm256_max_ps(zero, top));
            }
}

/* The gradient at the convolution output, into the interior of a buffer with a zero border of K - 1: each pool
 * output's gradient to the position its bits name. */
INLINE void unpool(const uint8_t *m, const float *dp, float *dypad, const int OH, const int OW, const int NV) {
    const int PW = OW + 2 * (K - 1);
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int i = 0; i < OH / 2; i++)
        for (int j = 0; j < OW / 2; j++)
            UNROLL for (int v = 0; v < NV; v++) {
                const uint8_t *bits = m + ((i * (OW / 2) + j) * NV + v) * 4;
                __m256 g = _mm256_loadu_ps(dp + (i * (OW / 2) + j) * NV * 8 + 8 * v);
                UNROLL for (int k = 0; k < 4; k++) {
                    __m256i set = _mm256_and_si256(_mm256_set1_epi32(bits[k]), lane_bit);
                    __m256 hit = _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane_bit));
                    int oh = 2 * i + k / 2, ow = 2 * j + k % 2;
                    _mm256_storeu_ps(dypad + ((oh + K - 1) * PW + ow + K - 1) * NV * 8 + 8 * v, _mm256_and_ps(g, hit));
                }
            }
}

/* ---- backward ---- */

#define DY(oh, ow) (dypad + (((oh) + K - 1) * (OW + 2 * (K - 1)) + (ow) + K - 1) * NV * 8)

INLINE void bias_grad(const float *dypad, float *db, const int OH, const int OW, const int NV) {
    UNROLL for (int v = 0; v < NV; v++) {
        __m256 acc = _mm256_loadu_ps(db + 8 * v);
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) acc = _mm256_add_ps(acc, _mm256_loadu_ps(DY(oh, ow) + 8 * v));
        _mm256_storeu_ps(db + 8 * v, acc);
    }
}

/* dw[kh][kw][ci][:] += sum over output pixels of x[pixel + (kh, kw)][ci] * dy[pixel][:], one tap (kh, kw) at a
 * time: CIN x NV sums held in registers across the pixels. */
INLINE void weight_grad_by_tap(const float *x, const float *dypad, float *dw, const int H, const int W, const int XS,
                               const int CIN, const int NV) {
    const int OH = H - K + 1, OW = W - K + 1;
    for (int kh = 0; kh < K; kh++)
        for (int kw = 0; kw < K; kw++) {
            __m256 acc[MAX_CIN][MAX_NV];
            UNROLL for (int ci = 0; ci < CIN; ci++)
                UNROLL for (int v = 0; v < NV; v++) acc[ci][v] = _mm256_setzero_ps();
            for (int oh = 0; oh < OH; oh++)
                for (int ow = 0; ow < OW; ow++) {
                    __m256 g[MAX_NV];
                    UNROLL for (int v = 0; v < NV; v++) g[v] = _mm256_loadu_ps(DY(oh, ow) + 8 * v);
                    const float *xq = x + ((oh + kh) * W + ow + kw) * XS;
                    UNROLL for (int ci = 0; ci < CIN; ci++) {
                        __m256 xb = _mm256_broadcast_ss(xq + ci);
                        UNROLL for (int v = 0; v < NV; v++) acc[ci][v] = _mm256_fmadd_ps(xb, g[v], acc[ci][v]);
                    }
                }
            UNROLL for (int ci = 0; ci < CIN; ci++)
                UNROLL for (int v = 0; v < NV; v++) {
                    float *t = dw + ((kh * K + kw) * CIN + ci) * NV * 8 + 8 * v;
                    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_loadu_ps(t), acc[ci][v]));
                }
        }
}

/* The same sums for a dense input (XS == CIN, 8 < K * CIN <= 15, one vector of output channels): the K x CIN
 * taps of a kernel row are consecutive floats of x, so they make the vectors (taps 0-7 and 7-14, overlapping so
 * that no load reads past the image), and each of the OUT real output channels' gradient is broadcast against
 * them. No lane is spent on padded channels. */
INLINE void weight_grad_by_row(const float *x, const float *dypad, float *dw, const int H, const int W,
                               const int CIN, const int OUT) {
    const int OH = H - K + 1, OW = W - K + 1, NV = 1, TAPS = K * CIN;
    for (int kh = 0; kh < K; kh++) {
        __m256 low[MAX_OUT], high[MAX_OUT];
        UNROLL for (int o = 0; o < OUT; o++) low[o] = high[o] = _mm256_setzero_ps();
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                const float *xq = x + ((oh + kh) * W + ow) * CIN;
                __m256 lo = _mm256_loadu_ps(xq), hi = _mm256_loadu_ps(xq + TAPS - 8);
                UNROLL for (int o = 0; o < OUT; o++) {
                    __m256 g = _mm256_broadcast_ss(DY(oh, ow) + o);
                    low[o] = _mm256_fmadd_ps(lo, g, low[o]);
                    high[o] = _mm256_fmadd_ps(hi, g, high[o]);
                }
            }
        /* Two arrays, not one with overlapping stores: GCC would keep such sums in memory inside the loop. */
        float lows[MAX_OUT][8], highs[MAX_OUT][8];
        UNROLL for (int o = 0; o < OUT; o++) {
            _mm256_storeu_ps(lows[o], low[o]);
            _mm256_storeu_ps(highs[o], high[o]);
        }
        for (int t = 0; t < TAPS; t++)
            for (int o = 0; o < OUT; o++) dw[(kh * TAPS + t) * 8 + o] += t < 8 ? lows[o][t] : highs[o][t - (TAPS - 8)];
    }
}

/* The gradient at the input of a layer with NV output vectors, from its pool's: each window's gradient reached
 * one position per channel (the bits of m) and none where the output was not positive, so at most a quarter of
 * the convolution's output gradient is nonzero. Each position with any channel's gradient adds that channel's
 * 5x5 kernel (wt[kh][kw][co][:8]) times it into dx around it; the rest costs nothing. */
INLINE void input_grad(const uint8_t *m, const float *dp, const float *wt, float *dx, const int H, const int W,
                       const int NV) {
    const int OW = W - K + 1, CO = NV * 8;
    memset(dx, 0, sizeof(float) * H * W * 8);
    for (int i = 0; i < (H - K + 1) / 2; i++)
        for (int j = 0; j < OW / 2; j++) {
            const uint8_t *bits = m + (i * (OW / 2) + j) * NV * 4;
            const float *g = dp + (i * (OW / 2) + j) * CO;
            for (int k = 0; k < 4; k++) {
                unsigned channels = 0;
                UNROLL for (int v = 0; v < NV; v++) channels |= (unsigned)bits[v * 4 + k] << (8 * v);
                if (!channels) continue;
                const int oh = 2 * i + k / 2, ow = 2 * j + k % 2;
                for (int kh = 0; kh < K; kh++) {
                    float *row = dx + ((oh + kh) * W + ow) * 8;
                    __m256 acc[K];
                    UNROLL for (int kw = 0; kw < K; kw++) acc[kw] = _mm256_loadu_ps(row + kw * 8);
                    for (unsigned left = channels; left; left &= left - 1) {
                        const int co = __builtin_ctz(left);
                        const __m256 gco = _mm256_broadcast_ss(g + co);
                        UNROLL for (int kw = 0; kw < K; kw++)
                            acc[kw] = _mm256_fmadd_ps(gco, _mm256_loadu_ps(wt + ((kh * K + kw) * CO + co) * 8), acc[kw]);
                    }
                    UNROLL for (int kw = 0; kw < K; kw++) _mm256_storeu_ps(row + kw * 8, acc[kw]);
                }
            }
        }
}

/* ---- the two layers, image by image ---- */

#define PAD(n) ((n) + 2 * (K - 1))

typedef struct {
    float x[32 * 32 * 3];              /* the image, channels innermost */
    float y1[28 * 28 * 8], y2[10 * 10 * 16], p2[5 * 5 * 16], dx2[14 * 14 * 8];
    float dy1[PAD(28) * PAD(28) * 8];  /* zero-bordered output gradients */
    float dy2[PAD(10) * PAD(10) * 16];
} Scratch;

INLINE void planar_to_packed(const float *planar, float *packed) {
    for (int q = 0; q < 32 * 32; q++)
        UNROLL for (int c = 0; c < 3; c++) packed[q * 3 + c] = planar[c * 32 * 32 + q];
}

static void forward_image(Scratch *s, const float *x, const float *w1, const float *b1, const float *w2,
                          const float *b2, float *p1, uint8_t *m1, uint8_t *m2, float *out) {
    first_conv(x, w1, b1, s->y1);
    pool_relu(s->y1, p1, m1, 28, 28, 1);
    for (int oh = 0; oh < 10; oh += 2)
        for (int ow = 0; ow < 10; ow += 2) conv_block(p1, w2, b2, s->y2, oh, ow, 14, 8, 6, 2, 2);
    pool_relu(s->y2, s->p2, m2, 10, 10, 2);
    for (int q = 0; q < 25; q++)
        for (int c = 0; c < 16; c++) out[c * 25 + q] = s->p2[q * 16 + c];
}

static void backward_image(Scratch *s, const float *x, const float *p1, const uint8_t *m1, const uint8_t *m2,
                           const float *grad, const float *w2t, float *dw1, float *db1, float *dw2, float *db2) {
    for (int q = 0; q < 25; q++)
        for (int c = 0; c < 16; c++) s->p2[q * 16 + c] = grad[c * 25 + q];
    unpool(m2, s->p2, s->dy2, 10, 10, 2);
    bias_grad(s->dy2, db2, 10, 10, 2);
    weight_grad_by_tap(p1, s->dy2, dw2, 14, 14, 8, 6, 2);
    input_grad(m2, s->p2, w2t, s->dx2, 14, 14, 2);
    unpool(m1, s->dx2, s->dy1, 28, 28, 1);
    bias_grad(s->dy1, db1, 28, 28, 1);
    planar_to_packed(x, s->x);
    weight_grad_by_row(s->x, s->dy1, dw1, 32, 32, 3, 6);
}

int vc_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* Slices of the batch on `threads` threads. OpenMP, not threads of our own: the library links the libgomp that
 * torch has already loaded, so the slices run on torch's worker threads, which spin for a while after each of
 * torch's operators and would otherwise take a core from a thread started here. Returns 1 when a thread could
 * not allocate its scratch. */
#define OVER_BATCH(threads, batch, body)                                                      \
    int failed = 0;                                                                             \
    _Pragma("omp parallel num_threads(threads > batch ? (batch > 0 ? batch : 1) : threads) reduction(| : failed)") \
    {                                                                                           \
        int t = omp_get_thread_num(), n = omp_get_num_threads();                                \
        Scratch *s = aligned_alloc(64, sizeof(Scratch));                                        \
        if (!s) failed = 1;                                                                     \
        else {                                                                                  \
            memset(s, 0, sizeof(Scratch));                                                      \
            for (long b = (long)batch * t / n; b < (long)batch * (t + 1) / n; b++) body;        \
            free(s);                                                                            \
        }                                                                                       \
    }                                                                                           \
    return failed;

int vc_forward(int batch, int threads, const float *x, const float *w1, const float *b1, const float *w2,
               const float *b2, float *p1, uint8_t *m1, uint8_t *m2, float *out) {
    OVER_BATCH(threads, batch,
               forward_image(s, x + b * 3072, w1, b1, w2, b2, p1 + b * 1568, m1 + b * 784, m2 + b * 200, out + b * 400))
}

/* dw1: threads x [5][5][3][8], db1: threads x [8], dw2: threads x [5][5][6][16], db2: threads x [16], all zeros. */
int vc_backward(int batch, int threads, const float *x, const float *p1, const uint8_t *m1, const uint8_t *m2,
                const float *grad, const float *w2t, float *dw1, float *db1, float *dw2, float *db2) {
    OVER_BATCH(threads, batch,
               backward_image(s, x + b * 3072, p1 + b * 1568, m1 + b * 784, m2 + b * 200, grad + b * 400, w2t,
                              dw1 + t * 600, db1 + t * 8, dw2 + t * 2400, db2 + t * 16))
}
