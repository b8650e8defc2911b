/* bnlab's train-mode batch normalization of an (m, c) float32 matrix, one loop nest per pass.
 *
 * The same closed form as bnlab/norms/batchnorm.py (Ioffe & Szegedy 2015, Alg. 1 and Sec. 3),
 * per column j over its m rows:
 *
 *   mu = sum(x) / m,  squares = sum((x - mu)^2),  inv_std = 1 / sqrt(squares / m + eps)
 *   x_hat = (x - mu) * inv_std,  y = gamma * x_hat + beta
 *   dbeta = sum(dy),  dgamma = sum(dy * x_hat),
 *   dx = gamma * inv_std * (dy - (dbeta + x_hat * dgamma) / m)
 *
 * Why C: on the small MLP each torch operation costs 2-5 us of dispatch and allocation, as
 * much as its arithmetic, and the closed form is about twenty of them per layer and step; here
 * a pass is one call. Sums accumulate in double, so long batches lose no precision.
 * Matrices are row-major (an (m, c) contiguous tensor); the inner loops run along a row, over
 * the columns, so they vectorize (the arrays never overlap: restrict). The passes return 0, or
 * -1 if their workspace cannot be allocated. norm_ops.cpp includes this file: it is also valid C++
 * once `restrict` is defined (the allocations are cast).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* The batch statistics of each column: mean, sum of squared deviations, 1 / sqrt(var + eps). */
int bn_statistics(const float *restrict x, int64_t m, int64_t c, double eps, float *restrict mean,
                  float *restrict squares, float *restrict inv_std) {
    double *sum = (double *)calloc((size_t)c, sizeof(double)), *sq = (double *)calloc((size_t)c, sizeof(double));
    if (!sum || !sq) { free(sum); free(sq); return -1; }
    for (int64_t i = 0; i < m; i++) {
        const float *row = x + i * c;
        for (int64_t j = 0; j < c; j++) sum[j] += row[j];
    }
    for (int64_t j = 0; j < c; j++) mean[j] = (float)(sum[j] / (double)m);
    /* two passes: exact when |mu| >> sigma */
    for (int64_t i = 0; i < m; i++) {
        const float *row = x + i * c;
        for (int64_t j = 0; j < c; j++) {
            double d = (double)(row[j] - mean[j]);
            sq[j] += d * d;
        }
    }
    for (int64_t j = 0; j < c; j++) {
        squares[j] = (float)sq[j];
        inv_std[j] = (float)(1.0 / sqrt(sq[j] / (double)m + eps));
    }
    free(sum);
    free(sq);
    return 0;
}

/* x_hat = (x - mean) * inv_std and y = scale * x_hat + shift, per column (BN: scale = gamma, shift = beta). */
void bn_normalize(const float *restrict x, const float *restrict mean, const float *restrict inv_std,
                  const float *restrict scale, const float *restrict shift, int64_t m, int64_t c,
                  float *restrict y, float *restrict x_hat) {
    for (int64_t i = 0; i < m; i++) {
        const float *row = x + i * c;
        float *h = x_hat + i * c, *out = y + i * c;
        for (int64_t j = 0; j < c; j++) {
            float v = (row[j] - mean[j]) * inv_std[j];
            h[j] = v;
            out[j] = scale[j] * v + shift[j];
        }
    }
}

/* The affine parameters' gradients, per column over the m rows (sums in double):
 * dbeta = sum(dy), dgamma = sum(dy * x_hat). Shared with gn_kernel.c. */
int affine_backward(const float *restrict grad_y, const float *restrict x_hat, int64_t m, int64_t c,
                    float *restrict grad_weight, float *restrict grad_bias) {
    double *db = (double *)calloc((size_t)c, sizeof(double)), *dg = (double *)calloc((size_t)c, sizeof(double));
    if (!db || !dg) { free(db); free(dg); return -1; }
    for (int64_t i = 0; i < m; i++) {
        const float *g = grad_y + i * c, *h = x_hat + i * c;
        for (int64_t j = 0; j < c; j++) {
            db[j] += g[j];
            dg[j] += (double)(g[j] * h[j]);
        }
    }
    for (int64_t j = 0; j < c; j++) {
        grad_bias[j] = (float)db[j];
        grad_weight[j] = (float)dg[j];
    }
    free(db);
    free(dg);
    return 0;
}

/* grad_x may be NULL (the input needs no gradient): then only dgamma and dbeta are computed. */
int bn_backward(const float *restrict grad_y, const float *restrict x_hat, const float *restrict inv_std,
                const float *restrict weight, int64_t m, int64_t c, float *restrict grad_x,
                float *restrict grad_weight, float *restrict grad_bias) {
    if (affine_backward(grad_y, x_hat, m, c, grad_weight, grad_bias) != 0) return -1;
    if (grad_x) {
        /* per column: gamma * inv_std, dbeta / m and dgamma / m, in float for the vector loop */
        float *k = (float *)malloc(3 * (size_t)c * sizeof(float));
        if (!k) return -1;
        float *scale = k, *shift = k + c, *slope = k + 2 * c;
        for (int64_t j = 0; j < c; j++) {
            scale[j] = weight[j] * inv_std[j];
            shift[j] = grad_bias[j] / (float)m;
            slope[j] = grad_weight[j] / (float)m;
        }
        for (int64_t i = 0; i < m; i++) {
            const float *g = grad_y + i * c, *h = x_hat + i * c;
            float *out = grad_x + i * c;
            for (int64_t j = 0; j < c; j++) out[j] = scale[j] * (g[j] - (shift[j] + h[j] * slope[j]));
        }
        free(k);
    }
    return 0;
}

/* The running estimates' update from one batch of m rows, torch's convention (record_batch in
 * batchnorm.py): tracked += 1, f = momentum (the cumulative average 1 / tracked if momentum < 0),
 *   running_mean = running_mean + f * (mean - running_mean),
 *   running_var = (1 - f) * running_var + f / (m - 1) * squares   (the unbiased batch variance) */
void bn_running_update(const float *restrict mean, const float *restrict squares,
                       float *restrict running_mean, float *restrict running_var, int64_t *restrict tracked,
                       int64_t c, int64_t m, double momentum) {
    *tracked += 1;
    double f = momentum < 0 ? 1.0 / (double)*tracked : momentum;
    float factor = (float)f, keep = (float)(1.0 - f), weight = (float)(f / (double)(m - 1));
    for (int64_t j = 0; j < c; j++) {
        running_mean[j] += factor * (mean[j] - running_mean[j]);
        running_var[j] = keep * running_var[j] + weight * squares[j];
    }
}

/* NaN stays NaN (as torch.clamp), where fminf / fmaxf would drop it. */
static float clip(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* Batch renormalization's correction (Ioffe 2017, Alg. 1), per column, from bn_statistics and
 * the moving mu and sigma, with the limits r_max and d_max in force:
 *   sigma_B = sqrt(squares / m + eps),  r = clip(sigma_B / sigma, 1 / r_max, r_max),
 *   d = clip((mu_B - mu) / sigma, -d_max, d_max),
 *   y = gamma * (x_hat * r + d) + beta = (gamma * r) * x_hat + (gamma * d + beta)
 * Writes r, d and the output's scale gamma * r and shift gamma * d + beta (for bn_normalize).
 * r and d are constants for backprop, so the backward pass is BN's with gamma * r for gamma,
 * then dgamma = r * sum(dy * x_hat) + d * sum(dy). */
void brn_correction(const float *restrict mean, const float *restrict squares,
                    const float *restrict running_mean, const float *restrict running_std,
                    const float *restrict weight, const float *restrict bias, int64_t m, int64_t c,
                    double eps, double r_max, double d_max, float *restrict r, float *restrict d,
                    float *restrict scale, float *restrict shift) {
    const float r_lo = (float)(1.0 / r_max), r_hi = (float)r_max, d_hi = (float)d_max;
    for (int64_t j = 0; j < c; j++) {
        float sigma = (float)sqrt((double)squares[j] / (double)m + eps);
        r[j] = clip(sigma / running_std[j], r_lo, r_hi);
        d[j] = clip((mean[j] - running_mean[j]) / running_std[j], -d_hi, d_hi);
        scale[j] = weight[j] * r[j];
        shift[j] = weight[j] * d[j] + bias[j];
    }
}

/* Batch renormalization's moving averages (Alg. 1): tracked += 1,
 *   mu = mu + momentum * (mu_B - mu),  sigma = sigma + momentum * (sigma_B - sigma) */
void brn_running_update(const float *restrict mean, const float *restrict squares,
                        float *restrict running_mean, float *restrict running_std, int64_t *restrict tracked,
                        int64_t c, int64_t m, double eps, double momentum) {
    *tracked += 1;
    const float f = (float)momentum;
    for (int64_t j = 0; j < c; j++) {
        float sigma = (float)sqrt((double)squares[j] / (double)m + eps);
        running_mean[j] += f * (mean[j] - running_mean[j]);
        running_std[j] += f * (sigma - running_std[j]);
    }
}
