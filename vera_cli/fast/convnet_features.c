/* The ConvNet's convolutional prefix on AVX2 or AVX-512, forward and backward, one image at a time:
 *   relu(max_pool2d(conv2d(x, 5x5), 2)) twice: 3 -> 6 channels, 32x32 -> 28x28 -> 14x14, then
 *   6 -> 16 channels, 14x14 -> 10x10 -> 5x5, flattened channel-major as torch.flatten does on NCHW.
 *
 * Why by hand: with 3-16 channels oneDNN ran these convolutions at 20-60 GFLOP/s where one core's sgemm runs 85,
 * and with their pools they were over two thirds of a training step. Here each kernel lays its vectors along
 * the dimension that fills them (output columns for conv1's forward, conv2's 16 output channels, a kernel row's
 * 15 taps for conv1's weight gradient), keeps a block of sums in registers over all the taps, and skips what
 * the pool's gradient makes zero: a max pool sends each window's gradient to one position per channel, so the
 * weight gradients sum over those sites alone (a quarter of the positions) and conv2's input gradient adds
 * only their kernels. Every size is a compile-time constant, so all addressing is immediate offsets. An
 * image's intermediate maps stay in a thread's scratch (in cache); only the first layer's output (the second
 * layer's input, needed for its weight gradient) and one bit per pool window, position and channel (where its
 * gradient goes) are kept for the backward. Each thread takes a slice of the batch and sums its own weight
 * gradients; the caller adds the slices up. The kernels whose vectors fill 16 lanes have an AVX-512 twin,
 * chosen per call (`width`); the rest run AVX2 at either width.
 *
 * Layouts (float32 unless said, channels innermost inside an image unless said):
 *   x    [B][3][32][32]   input images, planar (NCHW)
 *   w1   [6][3][5][5]     conv1's weights as torch holds them; b1 [8], padded with zeros
 *   w2   [5][5][6][16]    conv2's weights (kh, kw, in, out); b2 [16]; w2t [5][16][5][8]: (kh, out, kw, in),
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

/* relu(max_pool(y, 2)) into p, and the windows' gradient bits into m. A NaN anywhere in a window is the
 * window's output, as in torch. */
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

/* The dense weight gradients, over every output position, for an image holding an inf or NaN (all_finite): the
 * others sum over the pools' gradient sites alone (below).
 * dw[co][kh][kw][ci] += sum over output pixels of x[pixel + (kh, kw)][ci] * dy[pixel][co], one tap (kh, kw) at a
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
                    float sums[8];
                    _mm256_storeu_ps(sums, acc[ci][v]);
                    for (int l = 0; l < 8; l++) dw[(((v * 8 + l) * K + kh) * K + kw) * 8 + ci] += sums[l];
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

/* The gradient at conv2's input, from its pool's: each window's gradient reached one position per channel (the
 * bits of m) and none where the output was not positive, so at most a quarter of the convolution's output
 * gradient is nonzero. Each position with any channel's gradient adds that channel's 5x5 kernel
 * (wt[kh][co][kw][:8]) times it into dx around it; the rest costs nothing. The kernel rows' sums stay in
 * registers across the position's channels, one chain each (three rows, then two), so that the products of
 * successive channels overlap. */
#define IN_W 14
#define IN_CO 16

INLINE void add_kernel_rows(float *dx, const float *g, const float *wt, const unsigned channels, const int KH0,
                            const int ROWS) {
    __m256 acc[3][K];
    UNROLL for (int r = 0; r < ROWS; r++)
        UNROLL for (int kw = 0; kw < K; kw++) acc[r][kw] = _mm256_loadu_ps(dx + ((KH0 + r) * IN_W + kw) * 8);
    for (unsigned left = channels; left; left &= left - 1) {
        const int co = __builtin_ctz(left);
        const __m256 gco = _mm256_broadcast_ss(g + co);
        UNROLL for (int r = 0; r < ROWS; r++)
            UNROLL for (int kw = 0; kw < K; kw++)
                acc[r][kw] = _mm256_fmadd_ps(gco, _mm256_loadu_ps(wt + (((KH0 + r) * IN_CO + co) * K + kw) * 8),
                                             acc[r][kw]);
    }
    UNROLL for (int r = 0; r < ROWS; r++)
        UNROLL for (int kw = 0; kw < K; kw++) _mm256_storeu_ps(dx + ((KH0 + r) * IN_W + kw) * 8, acc[r][kw]);
}

/* Calls add(dx at the position, its gradients, the channels with one there) for each position of the 10 x 10
 * output that any channel's gradient reached. */
#define FOR_EACH_SITE(m, dp, dx, add)                                                             \
    for (int i = 0; i < 5; i++)                                                                   \
        for (int j = 0; j < 5; j++)                                                               \
            for (int k = 0; k < 4; k++) {                                                         \
                const uint8_t *bits = m + (i * 5 + j) * 8;                                        \
                const unsigned channels = bits[k] | (unsigned)bits[4 + k] << 8;                   \
                if (channels)                                                                     \
                    add(dx + ((2 * i + k / 2) * IN_W + 2 * j + k % 2) * 8, dp + (i * 5 + j) * IN_CO, channels); \
            }

INLINE void add_kernels(float *dx, const float *g, const float *wt, const unsigned channels) {
    add_kernel_rows(dx, g, wt, channels, 0, 3);
    add_kernel_rows(dx, g, wt, channels, 3, 2);
}

static void input_grad(const uint8_t *m, const float *dp, const float *wt, float *dx) {
    memset(dx, 0, sizeof(float) * IN_W * IN_W * 8);
#define ADD(at, g, channels) add_kernels(at, g, wt, channels)
    FOR_EACH_SITE(m, dp, dx, ADD)
#undef ADD
}

/* ---- weight gradients from the pools' bits ---- */

/* A layer's output gradient is nonzero at one position per pool window and channel at most (the bits of m), and
 * nowhere its pooled output was not positive: a quarter of the dense gradient or less. Its sites, per window and
 * output channel: the position's offset in the layer's input (positions of XS floats, rows of W) and the gradient
 * there, zero where the window sent none; their sum per channel is the bias gradient. */
#define FIRST_WINDOWS (14 * 14) /* conv1's pool windows, the more of the two layers' */

typedef struct {
    int at[FIRST_WINDOWS][16];
    float g[FIRST_WINDOWS][16];
} Sites;

INLINE void list_sites(const uint8_t *m, const float *dp, Sites *sites, float *db, const int OH, const int OW,
                       const int NV, const int W, const int XS) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256 bias[MAX_NV];
    UNROLL for (int v = 0; v < NV; v++) bias[v] = _mm256_loadu_ps(db + 8 * v);
    for (int i = 0; i < OH / 2; i++)
        for (int j = 0; j < OW / 2; j++) {
            const int w = i * (OW / 2) + j;
            const __m256i corner = _mm256_set1_epi32((2 * i * W + 2 * j) * XS);
            UNROLL for (int v = 0; v < NV; v++) {
                const uint8_t *bits = m + (w * NV + v) * 4;
                __m256i hit[4];
                UNROLL for (int k = 0; k < 4; k++)
                    hit[k] = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits[k]), lane_bit), lane_bit);
                /* At most one of a channel's four bits is set: its position's offset from the window's corner. */
                __m256i at = _mm256_add_epi32(corner, _mm256_and_si256(hit[1], _mm256_set1_epi32(XS)));
                at = _mm256_add_epi32(at, _mm256_and_si256(hit[2], _mm256_set1_epi32(W * XS)));
                at = _mm256_add_epi32(at, _mm256_and_si256(hit[3], _mm256_set1_epi32((W + 1) * XS)));
                const __m256i any = _mm256_or_si256(_mm256_or_si256(hit[0], hit[1]), _mm256_or_si256(hit[2], hit[3]));
                const __m256 g = _mm256_and_ps(_mm256_loadu_ps(dp + w * NV * 8 + 8 * v), _mm256_castsi256_ps(any));
                _mm256_storeu_si256((__m256i *)(sites->at[w] + 8 * v), at);
                _mm256_storeu_ps(sites->g[w] + 8 * v, g);
                bias[v] = _mm256_add_ps(bias[v], g);
            }
        }
    UNROLL for (int v = 0; v < NV; v++) _mm256_storeu_ps(db + 8 * v, bias[v]);
}

/* conv1's weight gradient, dw[kh][kw][ci][o] (o padded to 8), from its sites over the channels-innermost image:
 * a kernel row's 15 taps are consecutive floats, two overlapping vectors (taps 0-7 and 7-14), five rows of
 * them per site. */
static void first_weight_grad(const float *x, const Sites *sites, float *dw) {
    const int W = 32, CIN = 3, TAPS = K * CIN, OUT = 6;
    for (int o = 0; o < OUT; o++) {
        __m256 low[K], high[K];
        UNROLL for (int kh = 0; kh < K; kh++) low[kh] = high[kh] = _mm256_setzero_ps();
        for (int n = 0; n < FIRST_WINDOWS; n++) {
            const float *xq = x + sites->at[n][o];
            const __m256 g = _mm256_broadcast_ss(&sites->g[n][o]);
            UNROLL for (int kh = 0; kh < K; kh++) {
                low[kh] = _mm256_fmadd_ps(_mm256_loadu_ps(xq + kh * W * CIN), g, low[kh]);
                high[kh] = _mm256_fmadd_ps(_mm256_loadu_ps(xq + kh * W * CIN + TAPS - 8), g, high[kh]);
            }
        }
        float lows[K][8], highs[K][8];
        UNROLL for (int kh = 0; kh < K; kh++) {
            _mm256_storeu_ps(lows[kh], low[kh]);
            _mm256_storeu_ps(highs[kh], high[kh]);
        }
        for (int kh = 0; kh < K; kh++)
            for (int t = 0; t < TAPS; t++) dw[(kh * TAPS + t) * 8 + o] += t < 8 ? lows[kh][t] : highs[kh][t - (TAPS - 8)];
    }
}

/* conv2's weight gradient, dw[co][kh][kw][ci] (ci padded to 8), from its sites over p1 (8 floats a position):
 * per output channel, the 25 taps' sums of input vectors in registers, in two passes of kernel rows. */
INLINE void second_weight_grad_rows(const float *x, const Sites *sites, float *dw, const int co, const int KH0,
                                    const int ROWS) {
    const int W = 14, XS = 8;
    __m256 acc[3][K];
    UNROLL for (int r = 0; r < ROWS; r++)
        UNROLL for (int kw = 0; kw < K; kw++) acc[r][kw] = _mm256_setzero_ps();
    for (int n = 0; n < 25; n++) {
        const float *xq = x + sites->at[n][co] + KH0 * W * XS;
        const __m256 g = _mm256_broadcast_ss(&sites->g[n][co]);
        UNROLL for (int r = 0; r < ROWS; r++)
            UNROLL for (int kw = 0; kw < K; kw++)
                acc[r][kw] = _mm256_fmadd_ps(_mm256_loadu_ps(xq + (r * W + kw) * XS), g, acc[r][kw]);
    }
    UNROLL for (int r = 0; r < ROWS; r++)
        UNROLL for (int kw = 0; kw < K; kw++) {
            float *t = dw + ((co * K + KH0 + r) * K + kw) * 8;
            _mm256_storeu_ps(t, _mm256_add_ps(_mm256_loadu_ps(t), acc[r][kw]));
        }
}

static void second_weight_grad(const float *x, const Sites *sites, float *dw) {
    for (int co = 0; co < 16; co++) {
        second_weight_grad_rows(x, sites, dw, co, 0, 3);
        second_weight_grad_rows(x, sites, dw, co, 3, 2);
    }
}

/* Whether n floats are all finite: a site list skips the positions whose gradient is zero, where torch's dense
 * products give 0 x inf = NaN. An image with an inf or NaN takes the dense kernels above. */
INLINE int all_finite(const float *x, const int n) {
    __m256 bad = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));
    }
    return !_mm256_movemask_ps(bad);
}

/* ---- the same on AVX-512, 16 floats a vector ---- */

#pragma GCC push_options
#pragma GCC target("avx512f")

/* Lanes [8 h, 8 h + 8) of r. */
INLINE __m256 half_of(__m512 r, const int h) {
    return h ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r), 1)) : _mm512_castps512_ps256(r);
}

/* first_conv with a vector for each of the two blocks of 16 output columns (0-15 and 12-27). */
static void first_conv16(const float *x, const float *w, const float *bias, float *y) {
    const int H = 32, W = 32, CIN = 3, OUT = 6, OW = W - K + 1;
    for (int oh = 0; oh < OW; oh++) {
        __m512 acc[MAX_OUT][2];
        UNROLL for (int o = 0; o < OUT; o++) acc[o][0] = acc[o][1] = _mm512_set1_ps(bias[o]);
        for (int ci = 0; ci < CIN; ci++)
            for (int kh = 0; kh < K; kh++)
                UNROLL for (int kw = 0; kw < K; kw++) {
                    const float *xr = x + (ci * H + oh + kh) * W + kw;
                    const __m512 a = _mm512_loadu_ps(xr), b = _mm512_loadu_ps(xr + OW - 16);
                    UNROLL for (int o = 0; o < OUT; o++) {
                        const __m512 wv = _mm512_set1_ps(w[((o * CIN + ci) * K + kh) * K + kw]);
                        acc[o][0] = _mm512_fmadd_ps(a, wv, acc[o][0]);
                        acc[o][1] = _mm512_fmadd_ps(b, wv, acc[o][1]);
                    }
                }
        UNROLL for (int v = 0; v < 2; v++)
            UNROLL for (int h = 0; h < 2; h++) {
                __m256 r[8];
                UNROLL for (int o = 0; o < 8; o++) r[o] = o < OUT ? half_of(acc[o][v], h) : _mm256_setzero_ps();
                transpose8(r);
                UNROLL for (int p = 0; p < 8; p++)
                    _mm256_storeu_ps(y + (oh * OW + v * (OW - 16) + 8 * h + p) * 8, r[p]);
            }
    }
}

/* The second convolution, its 16 output channels one vector: blocks of 2 rows x 5 columns of sums. */
static void second_conv16(const float *x, const float *w, const float *bias, float *y) {
    const int W = 14, XS = 8, CIN = 6, OW = 10, R = 2, C = 5;
    for (int oh = 0; oh < OW; oh += R)
        for (int ow = 0; ow < OW; ow += C) {
            __m512 acc[R][C];
            UNROLL for (int r = 0; r < R; r++)
                UNROLL for (int c = 0; c < C; c++) acc[r][c] = _mm512_loadu_ps(bias);
            for (int kh = 0; kh < K; kh++)
                for (int kw = 0; kw < K; kw++) {
                    const float *wk = w + (kh * K + kw) * CIN * 16;
                    const float *xk = x + ((oh + kh) * W + ow + kw) * XS;
                    UNROLL for (int ci = 0; ci < CIN; ci++) {
                        const __m512 wv = _mm512_loadu_ps(wk + ci * 16);
                        UNROLL for (int r = 0; r < R; r++)
                            UNROLL for (int c = 0; c < C; c++)
                                acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(xk[(r * W + c) * XS + ci]), wv, acc[r][c]);
                    }
                }
            UNROLL for (int r = 0; r < R; r++)
                UNROLL for (int c = 0; c < C; c++) _mm512_storeu_ps(y + ((oh + r) * OW + ow + c) * 16, acc[r][c]);
        }
}

/* first_weight_grad with a kernel row's 15 taps in one vector (a masked load: nothing past them is read), two
 * output channels at a time so that ten sums are in flight. */
static void first_weight_grad16(const float *x, const Sites *sites, float *dw) {
    const int W = 32, CIN = 3, TAPS = K * CIN, OUT = 6;
    const __mmask16 taps = (1 << TAPS) - 1;
    for (int o = 0; o < OUT; o += 2) {
        __m512 acc[2][K];
        UNROLL for (int u = 0; u < 2; u++)
            UNROLL for (int kh = 0; kh < K; kh++) acc[u][kh] = _mm512_setzero_ps();
        for (int n = 0; n < FIRST_WINDOWS; n++)
            UNROLL for (int u = 0; u < 2; u++) {
                const float *xq = x + sites->at[n][o + u];
                const __m512 g = _mm512_set1_ps(sites->g[n][o + u]);
                UNROLL for (int kh = 0; kh < K; kh++)
                    acc[u][kh] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(taps, xq + kh * W * CIN), g, acc[u][kh]);
            }
        float sums[2][K][16];
        UNROLL for (int u = 0; u < 2; u++)
            UNROLL for (int kh = 0; kh < K; kh++) _mm512_storeu_ps(sums[u][kh], acc[u][kh]);
        for (int u = 0; u < 2; u++)
            for (int kh = 0; kh < K; kh++)
                for (int t = 0; t < TAPS; t++) dw[(kh * TAPS + t) * 8 + o + u] += sums[u][kh][t];
    }
}

/* second_weight_grad with two taps of a kernel row in a vector (kw 0-1 and 2-3; kw 4 half a vector). */
static void second_weight_grad16(const float *x, const Sites *sites, float *dw) {
    const int W = 14, XS = 8;
    for (int co = 0; co < 16; co++) {
        __m512 pairs[K][2];
        __m256 last[K];
        UNROLL for (int kh = 0; kh < K; kh++) {
            pairs[kh][0] = pairs[kh][1] = _mm512_setzero_ps();
            last[kh] = _mm256_setzero_ps();
        }
        for (int n = 0; n < 25; n++) {
            const float *xq = x + sites->at[n][co];
            const __m512 g = _mm512_set1_ps(sites->g[n][co]);
            UNROLL for (int kh = 0; kh < K; kh++) {
                const float *row = xq + kh * W * XS;
                pairs[kh][0] = _mm512_fmadd_ps(_mm512_loadu_ps(row), g, pairs[kh][0]);
                pairs[kh][1] = _mm512_fmadd_ps(_mm512_loadu_ps(row + 16), g, pairs[kh][1]);
                last[kh] = _mm256_fmadd_ps(_mm256_loadu_ps(row + 32), _mm512_castps512_ps256(g), last[kh]);
            }
        }
        UNROLL for (int kh = 0; kh < K; kh++) {
            float *t = dw + (co * K + kh) * K * 8;
            _mm512_storeu_ps(t, _mm512_add_ps(_mm512_loadu_ps(t), pairs[kh][0]));
            _mm512_storeu_ps(t + 16, _mm512_add_ps(_mm512_loadu_ps(t + 16), pairs[kh][1]));
            _mm256_storeu_ps(t + 32, _mm256_add_ps(_mm256_loadu_ps(t + 32), last[kh]));
        }
    }
}

/* input_grad with two positions of a kernel row in a vector (kw 0-1 and 2-3; kw 4 half a vector): all five
 * rows' sums in registers at once. */
INLINE void add_kernels16(float *dx, const float *g, const float *wt, const unsigned channels) {
    __m512 pairs[K][2];
    __m256 last[K];
    UNROLL for (int kh = 0; kh < K; kh++) {
        pairs[kh][0] = _mm512_loadu_ps(dx + kh * IN_W * 8);
        pairs[kh][1] = _mm512_loadu_ps(dx + kh * IN_W * 8 + 16);
        last[kh] = _mm256_loadu_ps(dx + kh * IN_W * 8 + 32);
    }
    for (unsigned left = channels; left; left &= left - 1) {
        const int co = __builtin_ctz(left);
        const __m512 gco = _mm512_set1_ps(g[co]);
        UNROLL for (int kh = 0; kh < K; kh++) {
            const float *w = wt + (kh * IN_CO + co) * K * 8;
            pairs[kh][0] = _mm512_fmadd_ps(gco, _mm512_loadu_ps(w), pairs[kh][0]);
            pairs[kh][1] = _mm512_fmadd_ps(gco, _mm512_loadu_ps(w + 16), pairs[kh][1]);
            last[kh] = _mm256_fmadd_ps(_mm512_castps512_ps256(gco), _mm256_loadu_ps(w + 32), last[kh]);
        }
    }
    UNROLL for (int kh = 0; kh < K; kh++) {
        _mm512_storeu_ps(dx + kh * IN_W * 8, pairs[kh][0]);
        _mm512_storeu_ps(dx + kh * IN_W * 8 + 16, pairs[kh][1]);
        _mm256_storeu_ps(dx + kh * IN_W * 8 + 32, last[kh]);
    }
}

static void input_grad16(const uint8_t *m, const float *dp, const float *wt, float *dx) {
    memset(dx, 0, sizeof(float) * IN_W * IN_W * 8);
#define ADD(at, g, channels) add_kernels16(at, g, wt, channels)
    FOR_EACH_SITE(m, dp, dx, ADD)
#undef ADD
}

#pragma GCC pop_options

/* ---- the two layers, image by image ---- */

#define PAD(n) ((n) + 2 * (K - 1))

typedef struct {
    float x[32 * 32 * 3];              /* the image, channels innermost */
    float y1[28 * 28 * 8], y2[10 * 10 * 16], p2[5 * 5 * 16], dx2[14 * 14 * 8];
    float dy1[PAD(28) * PAD(28) * 8];  /* zero-bordered output gradients */
    float dy2[PAD(10) * PAD(10) * 16];
    Sites sites;
} Scratch;

INLINE void planar_to_packed(const float *planar, float *packed) {
    for (int q = 0; q < 32 * 32; q++)
        UNROLL for (int c = 0; c < 3; c++) packed[q * 3 + c] = planar[c * 32 * 32 + q];
}

static void forward_image(Scratch *s, int width, const float *x, const float *w1, const float *b1, const float *w2,
                          const float *b2, float *p1, uint8_t *m1, uint8_t *m2, float *out) {
    if (width == 16)
        first_conv16(x, w1, b1, s->y1);
    else
        first_conv(x, w1, b1, s->y1);
    pool_relu(s->y1, p1, m1, 28, 28, 1);
    if (width == 16)
        second_conv16(p1, w2, b2, s->y2);
    else
        for (int oh = 0; oh < 10; oh += 2)
            for (int ow = 0; ow < 10; ow += 2) conv_block(p1, w2, b2, s->y2, oh, ow, 14, 8, 6, 2, 2);
    pool_relu(s->y2, s->p2, m2, 10, 10, 2);
    for (int q = 0; q < 25; q++)
        for (int c = 0; c < 16; c++) out[c * 25 + q] = s->p2[q * 16 + c];
}

static void backward_image(Scratch *s, int width, const float *x, const float *p1, const uint8_t *m1, const uint8_t *m2,
                           const float *grad, const float *w2t, float *dw1, float *db1, float *dw2, float *db2) {
    for (int q = 0; q < 25; q++)
        for (int c = 0; c < 16; c++) s->p2[q * 16 + c] = grad[c * 25 + q];
    list_sites(m2, s->p2, &s->sites, db2, 10, 10, 2, 14, 8);
    if (all_finite(p1, 14 * 14 * 8))
        (width == 16 ? second_weight_grad16 : second_weight_grad)(p1, &s->sites, dw2);
    else {
        unpool(m2, s->p2, s->dy2, 10, 10, 2);
        weight_grad_by_tap(p1, s->dy2, dw2, 14, 14, 8, 6, 2);
    }
    (width == 16 ? input_grad16 : input_grad)(m2, s->p2, w2t, s->dx2);
    list_sites(m1, s->dx2, &s->sites, db1, 28, 28, 1, 32, 3);
    planar_to_packed(x, s->x);
    if (all_finite(s->x, 32 * 32 * 3))
        (width == 16 ? first_weight_grad16 : first_weight_grad)(s->x, &s->sites, dw1);
    else {
        unpool(m1, s->dx2, s->dy1, 28, 28, 1);
        weight_grad_by_row(s->x, s->dy1, dw1, 32, 32, 3, 6);
    }
}

int vc_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* 16 where the processor runs AVX-512 (the foundation), else 8: the vector widths the kernels take. */
int vc_vector_width(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") ? 16 : 8;
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

int vc_forward(int width, int batch, int threads, const float *x, const float *w1, const float *b1, const float *w2,
               const float *b2, float *p1, uint8_t *m1, uint8_t *m2, float *out) {
    OVER_BATCH(threads, batch,
               forward_image(s, width, x + b * 3072, w1, b1, w2, b2, p1 + b * 1568, m1 + b * 784, m2 + b * 200, out + b * 400))
}

/* dw1: threads x [5][5][3][8], db1: threads x [8], dw2: threads x [16][5][5][8], db2: threads x [16], all zeros. */
int vc_backward(int width, int batch, int threads, const float *x, const float *p1, const uint8_t *m1, const uint8_t *m2,
                const float *grad, const float *w2t, float *dw1, float *db1, float *dw2, float *db2) {
    OVER_BATCH(threads, batch,
               backward_image(s, width, x + b * 3072, p1 + b * 1568, m1 + b * 784, m2 + b * 200, grad + b * 400, w2t,
                              dw1 + t * 600, db1 + t * 8, dw2 + t * 3200, db2 + t * 16))
}
