/* bnlab's group normalization of an (n, c) float32 matrix, one loop nest per pass.
 *
 * The same closed form as bnlab/norms/groupnorm.py (Wu & He 2018, Eq. 1-3; layer normalization
 * is one group), per row and per group of k = c / groups consecutive columns:
 *
 *   mu = sum(x) / k,  inv_std = 1 / sqrt(sum((x - mu)^2) / k + eps)
 *   x_hat = (x - mu) * inv_std,  y = gamma_j * x_hat + beta_j        (per column j)
 *   dbeta_j = sum over rows of dy,  dgamma_j = sum over rows of dy * x_hat
 *   dx = inv_std * (h - (sum(h) + x_hat * sum(h * x_hat)) / k),  h = gamma_j * dy (sums over the group)
 *
 * Sums accumulate in double. A group is contiguous in a row-major (n, c) matrix, so each pass
 * walks memory once. norm_ops.cpp includes this file after bn_kernel.c, whose affine_backward
 * (dgamma, dbeta) it calls.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* inv_std holds n * groups values, row by row. */
void gn_forward(const float *restrict x, const float *restrict weight, const float *restrict bias,
                int64_t n, int64_t c, int64_t groups, double eps, float *restrict y,
                float *restrict x_hat, float *restrict inv_std) {
    const int64_t k = c / groups;
    for (int64_t r = 0; r < n * groups; r++) {
        const float *v = x + r * k, *w = weight + (r % groups) * k, *b = bias + (r % groups) * k;
        float *h = x_hat + r * k, *out = y + r * k;
        double sum = 0.0, sq = 0.0;
        for (int64_t j = 0; j < k; j++) sum += v[j];
        const float mu = (float)(sum / (double)k);
        for (int64_t j = 0; j < k; j++) {  /* two passes: exact when |mu| >> sigma */
            double d = (double)(v[j] - mu);
            sq += d * d;
        }
        const float s = (float)(1.0 / sqrt(sq / (double)k + eps));
        inv_std[r] = s;
        for (int64_t j = 0; j < k; j++) {
            float u = (v[j] - mu) * s;
            h[j] = u;
            out[j] = w[j] * u + b[j];
        }
    }
}

/* grad_x may be NULL (the input needs no gradient): then only dgamma and dbeta are computed.
 * Returns 0, or -1 if the workspace cannot be allocated. */
int gn_backward(const float *restrict grad_y, const float *restrict x_hat, const float *restrict inv_std,
                const float *restrict weight, int64_t n, int64_t c, int64_t groups,
                float *restrict grad_x, float *restrict grad_weight, float *restrict grad_bias) {
    if (affine_backward(grad_y, x_hat, n, c, grad_weight, grad_bias) != 0) return -1;
    if (!grad_x) return 0;
    const int64_t k = c / groups;
    for (int64_t r = 0; r < n * groups; r++) {
        const float *g = grad_y + r * k, *h = x_hat + r * k, *w = weight + (r % groups) * k;
        float *out = grad_x + r * k;
        double sum = 0.0, dot = 0.0;
        for (int64_t j = 0; j < k; j++) {
            double wg = (double)(w[j] * g[j]);
            sum += wg;
            dot += wg * h[j];
        }
        const float s = inv_std[r], shift = (float)(sum / (double)k), slope = (float)(dot / (double)k);
        for (int64_t j = 0; j < k; j++) out[j] = s * (w[j] * g[j] - (shift + h[j] * slope));
    }
    return 0;
}
