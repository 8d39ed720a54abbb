/*
 * AVX2+FMA+F16C kernels of linear (every function compiled for that target by GQSA_AVX2; driver.c picks them only
 * where the CPU has it): dequantization (dequant_avx2), the fused register tiles for M <= 8 and the tiles of the
 * two-phase path (fused_avx2, dot_avx2), and the 4-bit group-16 paths on the reordered x (p->xr): batch 1
 * (run_range_b1, row loop and kernel in one function) and tiles of up to 8 rows (tile_q4g16_avx2).
 */
#include "gqsa_cpu.h"

#if GQSA_HAVE_X86
/* 8 codes of `bits` bits (2, 3 or 4) starting at byte p, as 8 int32 lanes. */
GQSA_AVX2_INLINE __m256i unpack8_avx2(const uint8_t *p, const int bits, __m256i shifts, __m256i mask) {
    uint32_t word = 0;
    memcpy(&word, p, (size_t)bits); /* 8 codes fill exactly `bits` bytes */
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), shifts), mask);
}

/*
 * The 8 weights s * (q - z) of codes c .. c+7 of one entry, as float32 lanes: (q - z) exactly in int32, then
 * one rounding, so the weight is the reference's float32 weight bit for bit.
 */
GQSA_AVX2_INLINE __m256 weights8_avx2(const uint8_t *codes, int c, __m256i z, __m256 s, const int bits,
                                      __m256i shifts, __m256i mask) {
    __m256i q;
    if (bits == 8)
        q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + c)));
    else
        q = unpack8_avx2(codes + ((unsigned)c >> 3) * bits, bits, shifts, mask);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, z)), s);
}

#define GQSA_SHIFTS(bits) _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits)

/* G: the group size when it is a compile-time constant (16), else 0 (read p->g). */
GQSA_AVX2_INLINE void dequant_avx2_bits(const Problem *p, int64_t a, int64_t b, float *w, int32_t *off,
                                        int scatter, const int bits, const int G) {
    const int g = G ? G : p->g, gbytes = g * bits / 8;
    const __m256i shifts = GQSA_SHIFTS(bits), mask = _mm256_set1_epi32((1 << bits) - 1);
    for (int64_t e = a; e < b; ++e) {
        const int64_t j = col_at(p, e);
        const __m256 s = _mm256_set1_ps(_cvtsh_ss(p->scale[e]));
        const __m256i z = _mm256_set1_epi32(zero_at_bits(p, e, bits));
        const uint8_t *codes = p->values + e * gbytes;
        float *dst = entry_dst(w, e, a, j, g, scatter);
        for (int c = 0; c < g; c += 8) _mm256_storeu_ps(dst + c, weights8_avx2(codes, c, z, s, bits, shifts, mask));
        if (off) off[e - a] = (int32_t)(j * g);
    }
}

#define GQSA_DEQUANT_G(BITS)                                                                                    \
    if (p->g == 16)                                                                                             \
        dequant_avx2_bits(p, a, b, w, off, scatter, BITS, 16);                                                  \
    else                                                                                                        \
        dequant_avx2_bits(p, a, b, w, off, scatter, BITS, 0);

GQSA_AVX2 void dequant_avx2(const Problem *p, int64_t a, int64_t b, float *w, int32_t *off, int scatter) {
    switch (p->bits) { /* constant bits and group size: one specialised loop each */
    case 2: GQSA_DEQUANT_G(2) break;
    case 3: GQSA_DEQUANT_G(3) break;
    case 4: GQSA_DEQUANT_G(4) break;
    default: GQSA_DEQUANT_G(8) break;
    }
}


/*
 * out[i] = sum over entries e in [a, b) (one row) of W[e, :] . x[i, j_e * g ..] for i < mt (<= 8), x (mt, K)
 * with row stride p->ldx. The weights are unpacked here (wbuf NULL: the fused path) or read from wbuf, the
 * entries dequantized by dequant_avx2 (compact (b - a, g)). For mt <= 4, two accumulators per row (even and
 * odd chunks) hide the FMA latency; above, the mt rows are enough independent chains.
 */
GQSA_AVX2_INLINE void tile_avx2(const Problem *p, int64_t a, int64_t b, const float *x, float *out,
                                const float *wbuf, const int mt, const int bits, const int G, const int from_buf) {
    const int64_t g = G ? G : p->g, gbytes = g * bits / 8, ldx = p->ldx;
    const __m256i shifts = GQSA_SHIFTS(bits), mask = _mm256_set1_epi32((1 << bits) - 1);
    __m256 acc0[MAX_TILE_M], acc1[MAX_TILE_M];
    const int two = mt <= 4;
    for (int i = 0; i < mt; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
    for (int64_t e = a; e < b; ++e) {
        const float *xe = x + col_at(p, e) * g;
        const float *we = from_buf ? wbuf + (e - a) * g : NULL;
        __m256 s = _mm256_setzero_ps();
        __m256i z = _mm256_setzero_si256();
        if (!from_buf) {
            s = _mm256_set1_ps(_cvtsh_ss(p->scale[e]));
            z = _mm256_set1_epi32(zero_at_bits(p, e, bits));
        }
        const uint8_t *codes = p->values + e * gbytes;
        for (int c = 0; c < (int)g; c += 16) {
            __m256 w0, w1 = _mm256_setzero_ps();
            w0 = from_buf ? _mm256_loadu_ps(we + c) : weights8_avx2(codes, c, z, s, bits, shifts, mask);
            if (g > 8)
                w1 = from_buf ? _mm256_loadu_ps(we + c + 8) : weights8_avx2(codes, c + 8, z, s, bits, shifts, mask);
            for (int i = 0; i < mt; ++i) {
                acc0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xe + i * ldx + c), w0, acc0[i]);
                if (g == 8) continue;
                if (two)
                    acc1[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xe + i * ldx + c + 8), w1, acc1[i]);
                else
                    acc0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xe + i * ldx + c + 8), w1, acc0[i]);
            }
        }
    }
    for (int i = 0; i < mt; ++i) out[i] = hsum_avx2(_mm256_add_ps(acc0[i], acc1[i]));
}

/* Dispatch on constant (mt, bits, group size 16 or any): one specialised loop each. */
#define GQSA_TILE_G(MT, BITS, FROM_BUF)                                                                         \
    if (p->g == 16)                                                                                             \
        tile_avx2(p, a, b, x, out, wbuf, MT, BITS, 16, FROM_BUF);                                               \
    else                                                                                                        \
        tile_avx2(p, a, b, x, out, wbuf, MT, BITS, 0, FROM_BUF);

#define GQSA_TILE_BITS(MT)                                                                                      \
    if (wbuf) {                                                                                                 \
        GQSA_TILE_G(MT, 8, 1) /* bits unused */                                                                 \
    } else {                                                                                                    \
        switch (p->bits) {                                                                                      \
        case 2: GQSA_TILE_G(MT, 2, 0) break;                                                                    \
        case 3: GQSA_TILE_G(MT, 3, 0) break;                                                                    \
        case 4: GQSA_TILE_G(MT, 4, 0) break;                                                                    \
        default: GQSA_TILE_G(MT, 8, 0) break;                                                                   \
        }                                                                                                       \
    }

GQSA_AVX2 static void tile_dispatch_avx2(const Problem *p, int64_t a, int64_t b, const float *x, float *out,
                                         const float *wbuf, int mt) {
    switch (mt) {
    case 1: GQSA_TILE_BITS(1) break;
    case 2: GQSA_TILE_BITS(2) break;
    case 3: GQSA_TILE_BITS(3) break;
    case 4: GQSA_TILE_BITS(4) break;
    case 5: GQSA_TILE_BITS(5) break;
    case 6: GQSA_TILE_BITS(6) break;
    case 7: GQSA_TILE_BITS(7) break;
    default: GQSA_TILE_BITS(8) break;
    }
}

/*
 * Batch 1, 4-bit codes, group 16: out = sum_e s_e * ((q_e - z_e) . xr_j), xr_j = group j of x reordered even
 * then odd columns. Per entry: one zero-extending load of its 8 code bytes, (q - z) formed exactly in the float
 * lanes (q4_minus_z, no int-to-float conversion), two FMAs against xr_j, and the fp16 scale broadcast straight
 * into the FMA that accumulates. Two entries per iteration with their own accumulators (the variants that were
 * tried and not faster: docs/RESULTS.md, "Measurements behind code constants").
 */


/*
 * (q - z) of the 16 codes of entry e as float32, even columns in *lo and odd ones in *hi: the entry's 8 bytes
 * zero-extended to 8 int32 lanes (byte i holds codes 2i and 2i+1), each nibble or-ed into the bits of 2^23 (the
 * float 2^23 + q), minus 2^23 + z (zp: from B1_ZTAB). Exact: every value is an integer below 2^24.
 */
GQSA_AVX2_INLINE void q4_minus_z(const Problem *p, int64_t e, __m256 zp, __m256 *lo, __m256 *hi) {
    const __m256i magic = _mm256_set1_epi32(0x4B000000);
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p->values + e * 8)));
    *lo = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xF)), magic)), zp);
    *hi = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_srli_epi32(v, 4), magic)), zp);
}

/* The scale of entry e broadcast to 8 lanes, straight from its fp16 bits. */
GQSA_AVX2_INLINE __m256 scale8(const Problem *p, int64_t e) {
    return _mm256_cvtph_ps(_mm_set1_epi16((short)p->scale[e]));
}

/* acc + s * ((q - z) . xp_j) for entry e of batch 1; zp = 2^23 + z broadcast. */
GQSA_AVX2_INLINE __m256 b1_entry(const Problem *p, int64_t e, __m256 zp, __m256 acc) {
    const float *xe = p->xr + ((const int16_t *)p->col)[e] * 16;
    __m256 lo, hi;
    q4_minus_z(p, e, zp, &lo, &hi);
    const __m256 d = _mm256_fmadd_ps(lo, _mm256_load_ps(xe), _mm256_mul_ps(hi, _mm256_load_ps(xe + 8)));
    return _mm256_fmadd_ps(d, scale8(p, e), acc);
}

GQSA_AVX2_INLINE void b1_g16_q4_avx2(const Problem *p, int64_t a, int64_t b, float *out) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t e = a;
    if ((e & 1) && e < b) {
        acc0 = b1_entry(p, e, _mm256_broadcast_ss(B1_ZTAB + zero_at_bits(p, e, 4)), acc0);
        ++e;
    }
    for (; e + 1 < b; e += 2) {
        _mm_prefetch((const char *)(p->values + (e + PREFETCH_ENTRIES) * 8), _MM_HINT_T0);
        const int zz = p->zero ? p->zero[e >> 1] : 0x88;
        acc0 = b1_entry(p, e, _mm256_broadcast_ss(B1_ZTAB + (zz & 0xF)), acc0);
        acc1 = b1_entry(p, e + 1, _mm256_broadcast_ss(B1_ZTAB + (zz >> 4)), acc1);
    }
    if (e < b) acc0 = b1_entry(p, e, _mm256_broadcast_ss(B1_ZTAB + zero_at_bits(p, e, 4)), acc0);
    *out = hsum_avx2(_mm256_add_ps(acc0, acc1));
}


/*
 * Up to 8 rows of x (xr: rows of p->xr), 4-bit codes, group 16: the entry's 16 weights s * (q - z) (the
 * reference's float32 weights) built in two registers from one zero-extending load (low nibbles = even columns,
 * high = odd, as in b1_g16_q4_avx2), then two FMAs per row of x against that row's even/odd reordered columns.
 * Up to 4 rows: two accumulators per row.
 */
GQSA_AVX2_INLINE void tile_q4g16_avx2(const Problem *p, int64_t a, int64_t b, const float *xr, float *out,
                                     const int mt) {
    __m256 acc0[MAX_TILE_M], acc1[MAX_TILE_M];
    const int two = mt <= 4;
    for (int i = 0; i < mt; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
    for (int64_t e = a; e < b; ++e) {
        const int64_t j = ((const int16_t *)p->col)[e];
        __m256 lo, hi;
        q4_minus_z(p, e, _mm256_broadcast_ss(B1_ZTAB + zero_at_bits(p, e, 4)), &lo, &hi);
        const __m256 s = scale8(p, e);
        const __m256 w0 = _mm256_mul_ps(lo, s), w1 = _mm256_mul_ps(hi, s);
        const float *xe = xr + j * 16;
        for (int i = 0; i < mt; ++i) {
            acc0[i] = _mm256_fmadd_ps(w0, _mm256_load_ps(xe + i * p->ldr), acc0[i]);
            if (two)
                acc1[i] = _mm256_fmadd_ps(w1, _mm256_load_ps(xe + i * p->ldr + 8), acc1[i]);
            else
                acc0[i] = _mm256_fmadd_ps(w1, _mm256_load_ps(xe + i * p->ldr + 8), acc0[i]);
        }
    }
    for (int i = 0; i < mt; ++i) out[i] = hsum_avx2(_mm256_add_ps(acc0[i], acc1[i]));
}

/* All M rows of x, in tiles of up to MAX_TILE_M rows (each tile rebuilds the weights in registers). */
GQSA_AVX2 static void tile_q4g16_dispatch_avx2(const Problem *p, int64_t a, int64_t b, float *out) {
    for (int64_t m0 = 0; m0 < p->M; m0 += MAX_TILE_M) {
        const int64_t rest = p->M - m0;
        const float *xr = p->xr + m0 * p->ldr;
        switch (rest < MAX_TILE_M ? rest : MAX_TILE_M) {
        case 1: tile_q4g16_avx2(p, a, b, xr, out + m0, 1); break;
        case 2: tile_q4g16_avx2(p, a, b, xr, out + m0, 2); break;
        case 3: tile_q4g16_avx2(p, a, b, xr, out + m0, 3); break;
        case 4: tile_q4g16_avx2(p, a, b, xr, out + m0, 4); break;
        case 5: tile_q4g16_avx2(p, a, b, xr, out + m0, 5); break;
        case 6: tile_q4g16_avx2(p, a, b, xr, out + m0, 6); break;
        case 7: tile_q4g16_avx2(p, a, b, xr, out + m0, 7); break;
        default: tile_q4g16_avx2(p, a, b, xr, out + m0, 8); break;
        }
    }
}


/* Fused path: out (M,) for entries [a, b) of one row, unpacked in registers (M <= MAX_TILE_M unless p->xr is
   set; batch 1 with p->xr goes through run_range_b1 instead). */
GQSA_AVX2 void fused_avx2(const Problem *p, int64_t a, int64_t b, float *out) {
    if (p->xr)
        tile_q4g16_dispatch_avx2(p, a, b, out);
    else
        tile_dispatch_avx2(p, a, b, p->x, out, NULL, (int)p->M);
}

/* Two-phase path, phase 2: out (M,) from the row segment w (b - a, g) dequantized by dequant_avx2. */
GQSA_AVX2 void dot_avx2(const Problem *p, int64_t a, int64_t b, const float *w, const int32_t *off,
                        float *out) {
    (void)off;
    for (int64_t m0 = 0; m0 < p->M; m0 += MAX_TILE_M) {
        const int64_t rest = p->M - m0;
        tile_dispatch_avx2(p, a, b, p->x + m0 * p->ldx, out + m0, w, rest < MAX_TILE_M ? (int)rest : MAX_TILE_M);
    }
}

GQSA_AVX2_INLINE void b1_segment(const Problem *p, int64_t a, int64_t b, const Scratch *ws, const Fns *fns,
                                 float *out) {
    (void)ws;
    (void)fns;
    b1_g16_q4_avx2(p, a, b, out);
}

/* run_range for the batch-1 path (p->xr set, M = 1), with the row loop and the kernel in one function. */
GQSA_AVX2 void run_range_b1(const Problem *p, int64_t e0, int64_t e1, int64_t r, const Scratch *ws,
                            Partial *head, Partial *tail, const Fns *fns) {
    run_range_with(p, e0, e1, r, ws, head, tail, fns, b1_segment);
}
#endif
