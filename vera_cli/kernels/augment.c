/* A training batch in one pass over its uint8 images: gathered from the split by index, cropped from the image
 * padded with zeros, mirrored left-right, normalised per channel through a 256-entry table. torch ran these as
 * six passes (gather, pad, strided window gather, flip, where, float/sub/div), a quarter of a training step.
 *
 *   images [N][C][H][W] uint8, index [B] int64, rows/cols [B] int64 crop offsets in [0, 2 * padding] (NULL: none),
 *   flip [B] bool (NULL: none), table [C][256] float32, out [B][C][H][W] float32.
 * Output pixel (i, j) of image b is the crop's (i, j') with j' = W - 1 - j when flipped, and the crop's (i, j')
 * is the image's (i + rows[b] - padding, j' + cols[b] - padding), zero outside it: the same as cropping the
 * padded image and then flipping, as the torch path does.
 */
#include <omp.h>
#include <stdint.h>

void vc_augment(int batch, int threads, int channels, int height, int width, int padding, const uint8_t *images,
                const int64_t *index, const int64_t *rows, const int64_t *cols, const uint8_t *flip,
                const float *table, float *out) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < batch; b++) {
        const long size = (long)channels * height * width;
        const uint8_t *image = images + index[b] * size;
        const int dy = rows ? (int)rows[b] - padding : 0, dx = cols ? (int)cols[b] - padding : 0;
        const int mirrored = flip && flip[b];
        for (int c = 0; c < channels; c++) {
            const float *lut = table + c * 256;
            for (int i = 0; i < height; i++) {
                float *row = out + b * size + ((long)c * height + i) * width;
                const int y = i + dy;
                if (y < 0 || y >= height) {
                    for (int j = 0; j < width; j++) row[j] = lut[0];
                    continue;
                }
                const uint8_t *src = image + ((long)c * height + y) * width;
                for (int j = 0; j < width; j++) {
                    const int x = (mirrored ? width - 1 - j : j) + dx;
                    row[j] = lut[x >= 0 && x < width ? src[x] : 0];
                }
            }
        }
    }
}
