/* A training batch in one pass over its uint8 images: gathered from the split by index, cropped from the image
 * padded with zeros, mirrored left-right, normalised per channel. torch ran these as six passes (gather, pad,
 * strided window gather, flip, where, float/sub/div), a quarter of a training step at batch 512.
 *
 *   images [N][C][H][W] uint8, index [B] int64, rows/cols [B] int64 crop offsets in [0, 2 * padding] (NULL: none),
 *   flip [B] bool (NULL: none), mean/std [C] float32 (0-255 scale), out [B][C][H][W] float32.
 * Output pixel (i, j) of image b is the crop's (i, j') with j' = W - 1 - j when flipped, and the crop's (i, j')
 * is the image's (i + rows[b] - padding, j' + cols[b] - padding), zero outside it: the same as cropping the
 * padded image and then flipping, as the torch path does. Each value is (float(v) - mean) / std in float32,
 * subtraction then division, both correctly rounded: the same floats as torch's normalisation.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define WIDTH 32   /* CIFAR-10's: one row is one 256-bit vector of bytes */

/* One output row from a source row (NULL: all padding) shifted by dx columns (|dx| <= WIDTH) and maybe
 * mirrored: the row is placed between two vectors of zeros and read back at the shift. */
static inline void row_out(const uint8_t *src, int dx, int mirrored, __m256 mean, __m256 stdev, float *row) {
    uint8_t line[3 * WIDTH] __attribute__((aligned(32)));
    const __m256i zero = _mm256_setzero_si256();
    _mm256_store_si256((__m256i *)line, zero);
    _mm256_store_si256((__m256i *)(line + WIDTH), src ? _mm256_loadu_si256((const __m256i *)src) : zero);
    _mm256_store_si256((__m256i *)(line + 2 * WIDTH), zero);
    __m256i v = _mm256_loadu_si256((const __m256i *)(line + WIDTH + dx));
    if (mirrored) {
        const __m256i reverse = _mm256_setr_epi8(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
                                                 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        v = _mm256_shuffle_epi8(v, reverse);
        v = _mm256_permute2x128_si256(v, v, 1);
    }
    __m128i halves[2] = {_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)};
    for (int k = 0; k < 4; k++) {
        __m128i bytes = k % 2 ? _mm_srli_si128(halves[k / 2], 8) : halves[k / 2];
        __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
        _mm256_storeu_ps(row + 8 * k, _mm256_div_ps(_mm256_sub_ps(x, mean), stdev));
    }
}

/* Returns 1 (nothing written) for rows other than WIDTH wide or crops of more than WIDTH. */
int vc_augment(int batch, int threads, int channels, int height, int width, int padding, const uint8_t *images,
               const int64_t *index, const int64_t *rows, const int64_t *cols, const uint8_t *flip,
               const float *mean, const float *stdev, float *out) {
    if (width != WIDTH || padding > WIDTH) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < batch; b++) {
        const long size = (long)channels * height * WIDTH;
        const uint8_t *image = images + index[b] * size;
        const int dy = rows ? (int)rows[b] - padding : 0, dx = cols ? (int)cols[b] - padding : 0;
        for (int c = 0; c < channels; c++)
            for (int i = 0; i < height; i++) {
                const int y = i + dy;
                const uint8_t *src = y >= 0 && y < height ? image + ((long)c * height + y) * WIDTH : NULL;
                row_out(src, dx, flip && flip[b], _mm256_set1_ps(mean[c]), _mm256_set1_ps(stdev[c]),
                        out + b * size + ((long)c * height + i) * WIDTH);
            }
    }
    return 0;
}
