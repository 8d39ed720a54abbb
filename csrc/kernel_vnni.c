/*
 * The int8-activation path with AVX-512 VNNI (vpdpbusd): 4-bit weights, group 16, int16 column indices, any M
 * (rows of x in tiles of up to VNNI_TILE_M sharing the unpacked codes). Used by linear_a8 where the CPU has
 * AVX-512F/BW/VL/VNNI (use_vnni); the AVX2 a8 path (kernel_a8.c) is the fallback.
 *
 * Per call, x is quantized as for the AVX2 path (quantize_x: xs = amax / 127 per 16 columns, xq = round(x / xs)),
 * then rearranged once (prepare_x_vnni): xr8 (M, ldr8) holds each group's 16 int8 values even columns first,
 * then odd ones (the order in which one entry's 8 code bytes unpack into low and high nibbles), and xf (M, K/16)
 * holds xs_j * X_j with X_j the sum of the group's int8 values.
 *
 * For an entry e (scale s, zero point z, codes q) of column group j:
 *   s * sum_c (q_c - z) * xs_j * xq_c = (s * xs_j) * sum_c q_c xq_c  -  (s * z) * (xs_j * X_j)
 * The first sum is one vpdpbusd lane group (codes unsigned, x signed); the second term is weight (s z) times
 * x (xf_j) and is accumulated apart. Entries go 16 at a time: their scales, zero points and the gathered xs_j and
 * xf_j as 16-lane vectors, their codes 4 entries per 512-bit register (one entry per 128-bit lane).
 */
#include "gqsa_cpu.h"

#if GQSA_HAVE_X86
enum { VNNI_TILE_M = 4 };

/* The zero points of entries e .. e+n-1 (n <= 16) as 16 floats (0 past n); all 8 where the format is symmetric. */
GQSA_VNNI_INLINE __m512 zeros16_vnni(const Problem *p, int64_t e, const int n) {
    if (!p->zero) return _mm512_set1_ps(8.0f);
    uint64_t v = 0;
    if (n == 16) { /* nibbles e .. e+15: bytes e/2 .. e/2+8, all inside the stream since e + 16 <= nnz */
        memcpy(&v, p->zero + (e >> 1), 8);
        if (e & 1) v = (v >> 4) | ((uint64_t)p->zero[(e >> 1) + 8] << 60);
    } else {
        for (int i = 0; i < n; ++i) v |= (uint64_t)zero_at_bits(p, e + i, 4) << (4 * i);
    }
    const __m128i t = _mm_cvtsi64_si128((long long)v), m = _mm_set1_epi8(0x0F);
    const __m128i z = _mm_unpacklo_epi8(_mm_and_si128(t, m), _mm_and_si128(_mm_srli_epi16(t, 4), m));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(z));
}

/* The 16 int8 values of 4 column groups of a row of xr8, at byte offsets o[0..3], one per 128-bit lane. */
GQSA_VNNI_INLINE __m512i x4_vnni(const int8_t *xr, const int64_t o[4]) {
    __m512i xv = _mm512_castsi128_si512(_mm_load_si128((const __m128i *)(xr + o[0])));
    xv = _mm512_inserti32x4(xv, _mm_load_si128((const __m128i *)(xr + o[1])), 1);
    xv = _mm512_inserti32x4(xv, _mm_load_si128((const __m128i *)(xr + o[2])), 2);
    return _mm512_inserti32x4(xv, _mm_load_si128((const __m128i *)(xr + o[3])), 3);
}

/*
 * Entries [e, e + n) (n <= 16, all of one row) against rows m0 .. m0+mt-1 of x: acc[i] += the first term,
 * corr[i] += the second (see the top of this file), as 16 float lanes each.
 */
GQSA_VNNI_INLINE void block_vnni(const Problem *p, int64_t e, const int n, int64_t m0, const int mt, __m512 *acc,
                                 __m512 *corr) {
    const int16_t *col = (const int16_t *)p->col + e;
    const __mmask16 k16 = n == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
    const int64_t lds = p->K / 16;
    const __m512i idx = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k16, col)); /* (16,) group j, 0 past n */
    const __m512 s16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k16, p->scale + e)); /* 0 past n */
    const __m512 sz16 = _mm512_mul_ps(s16, zeros16_vnni(p, e, n));
    __m512 f16[VNNI_TILE_M];
    for (int i = 0; i < mt; ++i) {
        const float *xs = p->xs + (m0 + i) * lds, *xf = p->xf + (m0 + i) * lds;
        f16[i] = _mm512_mul_ps(s16, _mm512_i32gather_ps(idx, xs, 4));
        corr[i] = _mm512_fmadd_ps(sz16, _mm512_i32gather_ps(idx, xf, 4), corr[i]);
    }
    const __m512i dup = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0), shift = _mm512_set_epi64(4, 0, 4, 0, 4, 0, 4, 0);
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int k = 0; k < 4; ++k) {
        const int nk = n - 4 * k < 4 ? n - 4 * k : 4; /* entries in this quarter */
        if (nk <= 0) break;
        /* 4 entries' 8 code bytes -> one 128-bit lane each: low nibbles (even columns), then high (odd) */
        const __m256i c = nk == 4 ? _mm256_loadu_si256((const __m256i *)(p->values + (e + 4 * k) * 8))
                                  : _mm256_maskz_loadu_epi8((__mmask32)((1ull << (8 * nk)) - 1u),
                                                            p->values + (e + 4 * k) * 8);
        const __m512i q = _mm512_and_si512(
            _mm512_srlv_epi64(_mm512_permutexvar_epi64(dup, _mm512_castsi256_si512(c)), shift), low);
        const __m512i fidx = _mm512_set_epi32(4 * k + 3, 4 * k + 3, 4 * k + 3, 4 * k + 3, 4 * k + 2, 4 * k + 2,
                                              4 * k + 2, 4 * k + 2, 4 * k + 1, 4 * k + 1, 4 * k + 1, 4 * k + 1,
                                              4 * k, 4 * k, 4 * k, 4 * k);
        int64_t o[4];
        for (int i = 0; i < 4; ++i) o[i] = i < nk ? (int64_t)col[4 * k + i] * 16 : 0;
        for (int i = 0; i < mt; ++i) {
            const int8_t *xr = p->xr8 + (m0 + i) * p->ldr8;
            const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x4_vnni(xr, o));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(fidx, f16[i]), acc[i]);
        }
    }
}

/* out (mt,) for entries [a, b) of one row against rows m0 .. m0+mt-1 of x. */
GQSA_VNNI_INLINE void tile_vnni(const Problem *p, int64_t a, int64_t b, int64_t m0, float *out, const int mt) {
    __m512 acc[VNNI_TILE_M], corr[VNNI_TILE_M];
    for (int i = 0; i < mt; ++i) acc[i] = corr[i] = _mm512_setzero_ps();
    int64_t e = a;
    for (; e + 16 <= b; e += 16) {
        _mm_prefetch((const char *)(p->values + (e + PREFETCH_ENTRIES) * 8), _MM_HINT_T0);
        block_vnni(p, e, 16, m0, mt, acc, corr);
    }
    if (e < b) block_vnni(p, e, (int)(b - e), m0, mt, acc, corr);
    for (int i = 0; i < mt; ++i) out[i] = _mm512_reduce_add_ps(_mm512_sub_ps(acc[i], corr[i]));
}

/*
 * Batch 1: the results of entries e .. e+n-1 (n <= 16, any rows), one float lane each in entry order (0 past n).
 * Quarter k of the block holds entries k, k+4, k+8, k+12 (one per 128-bit lane), so that the transposing sums of
 * the four vpdpbusd results land each entry's total in its own lane.
 */
GQSA_VNNI_INLINE __m512 entries16_vnni(const Problem *p, int64_t e, const int n) {
    const int16_t *col = (const int16_t *)p->col + e;
    const __mmask16 k16 = n == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
    const __m512i idx = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k16, col)); /* (16,) group j, 0 past n */
    const __m512 s16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k16, p->scale + e)); /* 0 past n */
    const __m512 f16 = _mm512_mul_ps(s16, _mm512_i32gather_ps(idx, p->xs, 4));
    const __m512 c16 = _mm512_mul_ps(_mm512_mul_ps(s16, zeros16_vnni(p, e, n)), _mm512_i32gather_ps(idx, p->xf, 4));
    const uint8_t *v = p->values + e * 8;
    __m512i c0, c1; /* the 16 entries' code bytes: entries 0-7, 8-15 (one qword each) */
    if (n == 16) {
        c0 = _mm512_loadu_si512(v);
        c1 = _mm512_loadu_si512(v + 64);
    } else {
        const int n0 = n < 8 ? n : 8, n1 = n - n0;
        c0 = _mm512_maskz_loadu_epi8(n0 == 8 ? ~0ull : (1ull << (8 * n0)) - 1u, v);
        c1 = _mm512_maskz_loadu_epi8(n1 == 8 ? ~0ull : (1ull << (8 * n1)) - 1u, v + 64);
    }
    const __m512i shift = _mm512_set_epi64(4, 0, 4, 0, 4, 0, 4, 0), low = _mm512_set1_epi8(0x0F);
    __m512i d[4];
    for (int k = 0; k < 4; ++k) {
        const __m512i pick = _mm512_set_epi64(k + 12, k + 12, k + 8, k + 8, k + 4, k + 4, k, k);
        const __m512i q = _mm512_and_si512(_mm512_srlv_epi64(_mm512_permutex2var_epi64(c0, pick, c1), shift), low);
        int64_t o[4];
        for (int l = 0; l < 4; ++l) o[l] = k + 4 * l < n ? (int64_t)col[k + 4 * l] * 16 : 0;
        d[k] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x4_vnni(p->xr8, o));
    }
    /* lane 4L + k of the total = the 4 lanes of 128-bit lane L of d[k] summed = entry k + 4L's integer dot */
    const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(d[0], d[1]), _mm512_unpackhi_epi32(d[0], d[1]));
    const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(d[2], d[3]), _mm512_unpackhi_epi32(d[2], d[3]));
    const __m512i dot = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    return _mm512_fmsub_ps(_mm512_cvtepi32_ps(dot), f16, c16);
}

/* A finished row r's sum: into y where the range holds the whole row, else into a partial slot. */
static inline void vnni_row_done(const Problem *p, int64_t r, int64_t e0, int64_t e1, float sum, Partial *head,
                                 Partial *tail) {
    const int64_t lo = p->crow[r], hi = p->crow[r + 1];
    if (lo >= e0 && hi <= e1) {
        p->y[r] = sum;
    } else {
        Partial *slot = lo < e0 ? head : tail;
        slot->row = r;
        slot->sums[0] = sum;
    }
}

/*
 * One thread's range [e0, e1) of kept groups at batch 1, starting in row r: blocks of 16 entries whatever the
 * rows (a short row costs no block of its own); a block inside one row adds its 16 lanes to the row's vector sum, a
 * block across rows gives each row its lanes' masked sum.
 */
GQSA_VNNI void run_range_vnni_b1(const Problem *p, int64_t e0, int64_t e1, int64_t r, const Scratch *ws,
                                 Partial *head, Partial *tail, const Fns *fns) {
    (void)ws;
    (void)fns;
    __m512 acc = _mm512_setzero_ps();
    float part = 0.0f;
    for (int64_t e = e0; e < e1; e += 16) {
        const int n = e1 - e < 16 ? (int)(e1 - e) : 16;
        _mm_prefetch((const char *)(p->values + (e + PREFETCH_ENTRIES) * 8), _MM_HINT_T0);
        const __m512 res = n == 16 ? entries16_vnni(p, e, 16) : entries16_vnni(p, e, n);
        if (e + n < p->crow[r + 1]) { /* the block ends inside row r */
            acc = _mm512_add_ps(acc, res);
            continue;
        }
        for (int64_t pos = e; pos < e + n;) { /* the rows this block ends or crosses */
            while (p->crow[r + 1] <= pos) ++r; /* rows with no kept group: y is 0 there already */
            const int64_t end = p->crow[r + 1] < e + n ? p->crow[r + 1] : e + n;
            const __mmask16 lanes = (__mmask16)(((1u << (end - e)) - 1u) & ~((1u << (pos - e)) - 1u));
            part += _mm512_mask_reduce_add_ps(lanes, res);
            if (end == p->crow[r + 1]) {
                vnni_row_done(p, r, e0, e1, _mm512_reduce_add_ps(acc) + part, head, tail);
                acc = _mm512_setzero_ps();
                part = 0.0f;
                ++r;
            }
            pos = end;
        }
    }
    if (r < p->N && p->crow[r] < e1 && p->crow[r + 1] > e1) /* the range ends inside row r */
        vnni_row_done(p, r, e0, e1, _mm512_reduce_add_ps(acc) + part, head, tail);
}

/* out (M,) for entries [a, b) of one row, in tiles of up to VNNI_TILE_M rows of x. */
GQSA_VNNI void a8_vnni(const Problem *p, int64_t a, int64_t b, float *out) {
    for (int64_t m0 = 0; m0 < p->M; m0 += VNNI_TILE_M) {
        const int64_t rest = p->M - m0;
        switch (rest < VNNI_TILE_M ? (int)rest : VNNI_TILE_M) {
        case 1: tile_vnni(p, a, b, m0, out + m0, 1); break;
        case 2: tile_vnni(p, a, b, m0, out + m0, 2); break;
        case 3: tile_vnni(p, a, b, m0, out + m0, 3); break;
        default: tile_vnni(p, a, b, m0, out + m0, 4); break;
        }
    }
}
#endif

/*
 * xr8 (M, ldr8) and xf (M, K / 16) of a8_vnni from quantize_x's xq (M, ldq) and xs (M, K / 16): each group's 16
 * values even columns first, and xs_j times the sum of the group's values.
 */
void prepare_x_vnni(const int8_t *xq, const float *xs, int64_t M, int64_t K, int64_t ldq, int8_t *xr8, int64_t ldr8,
                    float *xf) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < K / 16; ++j) {
            const int8_t *v = xq + m * ldq + j * 16;
            int8_t *d = xr8 + m * ldr8 + j * 16;
            int32_t sum = 0;
            for (int i = 0; i < 8; ++i) {
                d[i] = v[2 * i];
                d[8 + i] = v[2 * i + 1];
                sum += v[2 * i] + v[2 * i + 1];
            }
            xf[m * (K / 16) + j] = xs[m * (K / 16) + j] * (float)sum;
        }
}
