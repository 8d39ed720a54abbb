/*
 * The int8-activation path (linear_a8): 4-bit weights with a group size multiple of 16, x quantized per 16 columns
 * (quantize_x), integer dot products per 16 codes: the portable a8_scalar and the AVX2 a8_avx2 (compiled for that
 * target by GQSA_AVX2; driver.c picks it only where the CPU has AVX2).
 */
#include "gqsa_cpu.h"

/*
 * x (M, K) float32 -> xq (M, ldq) int8 and xs (M, K / 16) float32, symmetric per 16 columns:
 * xs = amax / 127, xq = round_half_even(x * (127 / amax)) (0 where amax is 0). gqsa.quant.activations computes the
 * same numbers in torch, bit for bit (the tests' oracle).
 */
void quantize_x(const float *x, int64_t M, int64_t K, int64_t ldx, int8_t *xq, int64_t ldq, float *xs) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t c0 = 0; c0 < K; c0 += 16) {
            const float *v = x + m * ldx + c0;
            float amax = 0.0f;
            for (int c = 0; c < 16; ++c) amax = fabsf(v[c]) > amax ? fabsf(v[c]) : amax;
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int c = 0; c < 16; ++c) xq[m * ldq + c0 + c] = (int8_t)nearbyintf(v[c] * inv);
            xs[m * (K / 16) + c0 / 16] = amax / 127.0f;
        }
}

/* out[m] = sum over entries [a, b) (one row) of s_e * sum_c (q - z) xs * xq, for every m < M (portable). */
void a8_scalar(const Problem *p, int64_t a, int64_t b, float *out) {
    const int g = p->g, gbytes = g / 2;
    const int64_t lds = p->K / 16;
    for (int64_t m = 0; m < p->M; ++m) {
        const int8_t *xq = p->xq + m * p->ldq;
        const float *xs = p->xs + m * lds;
        float acc = 0.0f;
        for (int64_t e = a; e < b; ++e) {
            const int64_t col = col_at(p, e) * g;
            const int z = zero_at(p, e);
            const uint8_t *codes = p->values + e * gbytes;
            float sum = 0.0f;
            for (int c0 = 0; c0 < g; c0 += 16) {
                int32_t dot = 0;
                for (int c = c0; c < c0 + 16; ++c) dot += (stream_code(codes, c, 4, gbytes) - z) * xq[col + c];
                sum += xs[(col + c0) / 16] * (float)dot;
            }
            acc += half_to_float(p->scale[e]) * sum;
        }
        out[m] = acc;
    }
}

#if GQSA_HAVE_X86
/* 16 bytes of 4-bit codes (32 codes, low nibble first) -> 32 unsigned bytes in code order. */
GQSA_AVX2_INLINE __m256i nibbles32_avx2(__m128i v) {
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
}

/*
 * acc += (sw * xs_lanes) * sum over byte pairs of (q - z) * xq, as 8 float lanes (4 per 16 codes):
 * maddubs gives q*x and z*x pair sums exactly in int16 (|15 * 127 * 2| < 2^15), madd the int32 lane sums.
 */
GQSA_AVX2_INLINE __m256 a8_step(__m256i q, __m256i zb, __m256i xv, __m256 scale, __m256 acc) {
    const __m256i d16 = _mm256_sub_epi16(_mm256_maddubs_epi16(q, xv), _mm256_maddubs_epi16(zb, xv));
    const __m256i d32 = _mm256_madd_epi16(d16, _mm256_set1_epi16(1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d32), scale, acc);
}

GQSA_AVX2_INLINE __m256 xs_pair(const float *xs, int64_t ga, int64_t gb) {
    return _mm256_set_m128(_mm_broadcast_ss(xs + gb), _mm_broadcast_ss(xs + ga));
}

/*
 * out (mt,) for entries [a, b) of one row, 4-bit weights, int8 x. Group 16: two entries per 256-bit step (their
 * 16-byte code block is contiguous); group 32k: one entry, 32 codes per step.
 */
GQSA_AVX2_INLINE void tile_a8_avx2(const Problem *p, int64_t a, int64_t b, int64_t m0, float *out, const int mt,
                                   const int G16) {
    const int64_t g = G16 ? 16 : p->g, ldq = p->ldq, lds = p->K / 16;
    const int8_t *xq = p->xq + m0 * ldq;
    const float *xs = p->xs + m0 * lds;
    const __m256i pick = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    __m256 acc[MAX_TILE_M];
    for (int i = 0; i < mt; ++i) acc[i] = _mm256_setzero_ps();
    int64_t e = a;
    if (G16) {
        for (; e < b; e += 2) {
            const int two = e + 1 < b;
            const int64_t ja = col_at(p, e), jb = two ? col_at(p, e + 1) : ja;
            __m128i v;
            uint32_t sbits = p->scale[e];
            if (two) {
                v = _mm_loadu_si128((const __m128i *)(p->values + e * 8));
                sbits |= (uint32_t)p->scale[e + 1] << 16;
            } else {
                v = _mm_loadl_epi64((const __m128i *)(p->values + e * 8)); /* high entry: codes 0, scale 0 */
            }
            const __m256i q = nibbles32_avx2(v);
            const int za = zero_at_bits(p, e, 4), zb_ = two ? zero_at_bits(p, e + 1, 4) : 0;
            const __m256i zb = _mm256_set_m128i(_mm_set1_epi8((char)zb_), _mm_set1_epi8((char)za));
            const __m256 sw = _mm256_permutevar8x32_ps(
                _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128((int)sbits))), pick);
            for (int i = 0; i < mt; ++i) {
                const int8_t *xi = xq + i * ldq;
                const __m256i xv = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(xi + jb * 16)),
                                                    _mm_loadu_si128((const __m128i *)(xi + ja * 16)));
                acc[i] = a8_step(q, zb, xv, _mm256_mul_ps(sw, xs_pair(xs + i * lds, ja, jb)), acc[i]);
            }
        }
    } else {
        for (; e < b; ++e) {
            const int64_t col = col_at(p, e) * g;
            const __m256 sw = _mm256_set1_ps(_cvtsh_ss(p->scale[e]));
            const __m256i zb = _mm256_set1_epi8((char)zero_at_bits(p, e, 4));
            const uint8_t *codes = p->values + e * (g / 2);
            for (int64_t c = 0; c < g; c += 32) {
                const __m256i q = nibbles32_avx2(_mm_loadu_si128((const __m128i *)(codes + c / 2)));
                const int64_t gi = (col + c) / 16;
                for (int i = 0; i < mt; ++i) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + i * ldq + col + c));
                    acc[i] = a8_step(q, zb, xv, _mm256_mul_ps(sw, xs_pair(xs + i * lds, gi, gi + 1)), acc[i]);
                }
            }
        }
    }
    for (int i = 0; i < mt; ++i) out[i] = hsum_avx2(acc[i]);
}

#define GQSA_A8_G(MT)                                                                                           \
    if (p->g == 16)                                                                                             \
        tile_a8_avx2(p, a, b, m0, out + m0, MT, 1);                                                             \
    else                                                                                                        \
        tile_a8_avx2(p, a, b, m0, out + m0, MT, 0);

/* out (M,) for entries [a, b) of one row, in tiles of up to MAX_TILE_M rows of x. */
GQSA_AVX2 void a8_avx2(const Problem *p, int64_t a, int64_t b, float *out) {
    for (int64_t m0 = 0; m0 < p->M; m0 += MAX_TILE_M) {
        const int64_t rest = p->M - m0;
        switch (rest < MAX_TILE_M ? (int)rest : MAX_TILE_M) {
        case 1: GQSA_A8_G(1) break;
        case 2: GQSA_A8_G(2) break;
        case 3: GQSA_A8_G(3) break;
        case 4: GQSA_A8_G(4) break;
        case 5: GQSA_A8_G(5) break;
        case 6: GQSA_A8_G(6) break;
        case 7: GQSA_A8_G(7) break;
        default: GQSA_A8_G(8) break;
        }
    }
}
#endif
