/*
 * AVX-512F kernels of linear for 4-bit group-16 weights: the batch-1 path (run_range_b1_avx512, the twin of
 * run_range_b1 in kernel_avx2.c; used where asked for: use_avx512, GQSA_CPU_AVX512=1 or ISA_AVX512) and the tiles
 * of M >= 2 rows of x (fused_q4g16_avx512; used wherever the CPU has AVX-512F: use_avx512_tiles). Compiled for
 * that target by GQSA_AVX512.
 */
#include "gqsa_cpu.h"

#if GQSA_HAVE_X86
/*
 * The batch-1 path with AVX-512F: the 16 codes of an entry fill one zmm, even columns in lanes 0-7 and odd ones in
 * 8-15 (the order of xr), so an entry takes one subtraction, one multiply by its scale and one FMA against x.
 * Only used where the CPU has AVX-512F (use_avx512).
 */
GQSA_AVX512_INLINE __m512 b1_entry512(const Problem *p, int64_t e, __m512 zp, __m512 acc) {
    const float *xe = p->xr + ((const int16_t *)p->col)[e] * 16;
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p->values + e * 8)));
    const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi32(0xF)), hi = _mm256_srli_epi32(v, 4);
    const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); /* 16 codes, xr's order */
    const __m512 w = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_or_si512(q, _mm512_set1_epi32(0x4B000000))), zp);
    const __m512 s = _mm512_cvtph_ps(_mm256_set1_epi16((short)p->scale[e]));
    return _mm512_fmadd_ps(_mm512_mul_ps(w, s), _mm512_load_ps(xe), acc);
}

GQSA_AVX512_INLINE void b1_g16_q4_avx512(const Problem *p, int64_t a, int64_t b, float *out) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t e = a;
    if ((e & 1) && e < b) {
        acc0 = b1_entry512(p, e, _mm512_set1_ps(B1_ZTAB[zero_at_bits(p, e, 4)]), acc0);
        ++e;
    }
    for (; e + 1 < b; e += 2) {
        _mm_prefetch((const char *)(p->values + (e + PREFETCH_ENTRIES) * 8), _MM_HINT_T0);
        const int zz = p->zero ? p->zero[e >> 1] : 0x88;
        acc0 = b1_entry512(p, e, _mm512_set1_ps(B1_ZTAB[zz & 0xF]), acc0);
        acc1 = b1_entry512(p, e + 1, _mm512_set1_ps(B1_ZTAB[zz >> 4]), acc1);
    }
    if (e < b) acc0 = b1_entry512(p, e, _mm512_set1_ps(B1_ZTAB[zero_at_bits(p, e, 4)]), acc0);
    *out = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/*
 * Up to MAX_TILE_M rows of x (xr: rows of p->xr), 4-bit codes, group 16, M >= 2: an entry's 16 weights s * (q - z)
 * (the reference's float32 weights, as tile_q4g16_avx2 builds them) fill one zmm in xr's even-then-odd order, then
 * one FMA per row of x. Used where use_avx512_tiles says so.
 */
GQSA_AVX512_INLINE void tile_q4g16_avx512(const Problem *p, int64_t a, int64_t b, const float *xr, float *out,
                                          const int mt) {
    __m512 acc[MAX_TILE_M];
    for (int i = 0; i < mt; ++i) acc[i] = _mm512_setzero_ps();
    const __m512i magic = _mm512_set1_epi32(0x4B000000);
    for (int64_t e = a; e < b; ++e) {
        const float *xe = xr + ((const int16_t *)p->col)[e] * 16;
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p->values + e * 8)));
        const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi32(0xF)), hi = _mm256_srli_epi32(v, 4);
        const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        const __m512 zp = _mm512_set1_ps(B1_ZTAB[zero_at_bits(p, e, 4)]);
        const __m512 w = _mm512_mul_ps(_mm512_sub_ps(_mm512_castsi512_ps(_mm512_or_si512(q, magic)), zp),
                                       _mm512_cvtph_ps(_mm256_set1_epi16((short)p->scale[e])));
        for (int i = 0; i < mt; ++i) acc[i] = _mm512_fmadd_ps(w, _mm512_load_ps(xe + i * p->ldr), acc[i]);
    }
    for (int i = 0; i < mt; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

/* out (M,) for entries [a, b) of one row: every row of x in tiles of up to MAX_TILE_M (fused_avx2's twin). */
GQSA_AVX512 void fused_q4g16_avx512(const Problem *p, int64_t a, int64_t b, float *out) {
    for (int64_t m0 = 0; m0 < p->M; m0 += MAX_TILE_M) {
        const int64_t rest = p->M - m0;
        const float *xr = p->xr + m0 * p->ldr;
        switch (rest < MAX_TILE_M ? rest : MAX_TILE_M) {
        case 1: tile_q4g16_avx512(p, a, b, xr, out + m0, 1); break;
        case 2: tile_q4g16_avx512(p, a, b, xr, out + m0, 2); break;
        case 3: tile_q4g16_avx512(p, a, b, xr, out + m0, 3); break;
        case 4: tile_q4g16_avx512(p, a, b, xr, out + m0, 4); break;
        case 5: tile_q4g16_avx512(p, a, b, xr, out + m0, 5); break;
        case 6: tile_q4g16_avx512(p, a, b, xr, out + m0, 6); break;
        case 7: tile_q4g16_avx512(p, a, b, xr, out + m0, 7); break;
        default: tile_q4g16_avx512(p, a, b, xr, out + m0, 8); break;
        }
    }
}

GQSA_AVX512_INLINE void b1_segment512(const Problem *p, int64_t a, int64_t b, const Scratch *ws, const Fns *fns,
                                      float *out) {
    (void)ws;
    (void)fns;
    b1_g16_q4_avx512(p, a, b, out);
}

GQSA_AVX512 void run_range_b1_avx512(const Problem *p, int64_t e0, int64_t e1, int64_t r, const Scratch *ws,
                                     Partial *head, Partial *tail, const Fns *fns) {
    run_range_with(p, e0, e1, r, ws, head, tail, fns, b1_segment512);
}
#endif
