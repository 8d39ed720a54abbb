/*
 * Portable kernels, no instruction-set extension: the scalar two-phase path of linear (dequant_scalar: a row
 * segment into float32 weights, also the dense dequantization; dot_scalar: its dot products with every row of x),
 * the fallback where the CPU has no AVX2 (or ISA_SCALAR is asked for), and add_rms_norm for the decode step.
 */
#include "gqsa_cpu.h"

/* w: compact (b - a, g) or, with scatter, a dense row (K,); off: (b - a,) x offsets j * g (may be NULL). */
void dequant_scalar(const Problem *p, int64_t a, int64_t b, float *w, int32_t *off, int scatter) {
    const int g = p->g, gbytes = g * p->bits / 8;
    for (int64_t e = a; e < b; ++e) {
        const int64_t j = col_at(p, e);
        const float s = half_to_float(p->scale[e]);
        const int z = zero_at(p, e);
        const uint8_t *codes = p->values + e * gbytes;
        float *dst = entry_dst(w, e, a, j, g, scatter);
        for (int c = 0; c < g; ++c) dst[c] = (float)(stream_code(codes, c, p->bits, gbytes) - z) * s;
        if (off) off[e - a] = (int32_t)(j * g);
    }
}

/* out[m] = sum_e sum_c w[e, c] * x[m, off[e] + c] for m < M. w: (ne, g) compact. */
void dot_scalar(const Problem *p, int64_t a, int64_t b, const float *w, const int32_t *off, float *out) {
    const int g = p->g;
    const int64_t ne = b - a;
    for (int64_t m = 0; m < p->M; ++m) {
        const float *xm = p->x + m * p->ldx;
        float acc = 0.0f;
        for (int64_t e = 0; e < ne; ++e)
            for (int c = 0; c < g; ++c) acc += w[e * g + c] * xm[off[e] + c];
        out[m] = acc;
    }
}

/*
 * RMSNorm of `rows` rows of n floats, optionally after a residual add: x += delta (when delta is not NULL, in
 * place), then out = w * (x / sqrt(mean(x^2) + eps)), the order of transformers' LlamaRMSNorm in float32 (the sum
 * of squares accumulated in double). For the decode step, where torch's rms_norm costs several small calls.
 */
void add_rms_norm(float *x, const float *delta, const float *w, float *out, int64_t rows, int64_t n,
                  float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        float *xr = x + r * n, *o = out + r * n;
        if (delta)
            for (int64_t i = 0; i < n; ++i) xr[i] += delta[r * n + i];
        double ss = 0.0;
        for (int64_t i = 0; i < n; ++i) ss += (double)xr[i] * xr[i];
        const float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
        for (int64_t i = 0; i < n; ++i) o[i] = w[i] * (xr[i] * inv);
    }
}
