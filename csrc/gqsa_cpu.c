/*
 * Native CPU kernel for gqsa::linear: y = x @ W^T on the packed block-sparse-row group-quantized format
 * (docs/FORMAT.md). Built as the CPython extension module gqsa._native_cpu; the Python wrapper is
 * src/gqsa/ops/cpu.py (it owns dtype conversion, bias and the choice of split).
 *
 * Layout of the arguments (all contiguous, little-endian):
 *   x            float32  (M, K)               activations
 *   crow_indices int32    (N + 1,)             kept groups of row r: entries crow[r] .. crow[r+1]-1
 *   col_indices  int16 | int32 (nnz,)          group index j of each entry
 *   values       uint8    (nnz, g * bits / 8)  codes, a little-endian bit stream per entry
 *   scale        float16  (nnz,)
 *   zero_point   uint8    (ceil(nnz*bits/8),)  packed zero points, or NULL: symmetric, z = 2^(bits-1)
 *   y            float32  (M, N)               output, fully written (rows with no kept group are 0)
 *
 * Work split (mode):
 *   TASK: the nnz kept groups are cut into T equal ranges whatever the rows. A thread finds its first row by
 *         binary search in crow_indices and walks its rows; a row cut by a range boundary is written to a
 *         per-thread partial slot (at most two per thread: its first and its last row) and the partials are
 *         added in thread order after the parallel region: no atomics, deterministic for a given T.
 *   ROWS: rows are cut into T equal ranges (the data-centric split, for comparison).
 *
 * Per row segment (the entries of one row inside a thread's range), each entry is unpacked once per call into
 * float32 weights s * (q - z) (exactly the reference's float32 weight) and used for all M rows of x:
 *   4 bits, group 16 (AVX2, the default format): x is first copied with each group's columns reordered even
 *         then odd (p->xr), the order in which one zero-extending load unpacks an entry's nibbles;
 *         M = 1 (decode): b1_g16_q4_avx2, which computes s * ((q - z) . x) (same sum, other rounding; 35% less
 *         time than the general tile), with the row loop in the same function (run_range_b1);
 *         M >= 2: tile_q4g16_avx2, the weights built in registers once per tile of 8 rows of x;
 *   M <= 8 (AVX2), other bits and group sizes: fused, the weights stay in registers and meet the M rows' x at
 *         once (tile_avx2);
 *   otherwise: 1. dequantize the segment into a per-thread buffer w (ne, g) and record x offsets j * g;
 *              2. dot: for every tile of up to 8 rows of x, accumulate w . x[m, offsets] in registers.
 * Group size 16 and every bits value get their own specialised loops (compile-time constants).
 *
 * Instruction sets: functions marked GQSA_AVX2 are compiled for AVX2+FMA+F16C and used only when
 * __builtin_cpu_supports says so; the scalar functions are the portable fallback. The batch-1 W4 g16 path also
 * has an AVX-512F version (b1_g16_q4_avx512), used where the CPU has AVX-512F and GQSA_CPU_AVX512=1 is set
 * (opt-in: the machine it was written on has no AVX-512, so it has not yet been measured or tested on hardware).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define GQSA_HAVE_X86 1
#include <immintrin.h>
#define GQSA_AVX2 __attribute__((target("avx2,fma,f16c")))
#define GQSA_AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))
#define GQSA_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define GQSA_AVX512_INLINE static inline __attribute__((always_inline, target("avx512f,avx2,fma,f16c")))
#else
#define GQSA_HAVE_X86 0
#endif

enum { MODE_TASK = 0, MODE_ROWS = 1 };
/* ISA_AUTO: AVX2 where the CPU has it, and the AVX-512 batch-1 path too where the CPU has AVX-512F and the
   environment sets GQSA_CPU_AVX512=1 (opt-in until measured on such a CPU). ISA_AVX2: never AVX-512.
   ISA_AVX512: the AVX-512 path wherever the CPU has it, whatever the environment (tests). */
enum { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };
enum { MAX_TILE_M = 8 };
/* software prefetch distance of the batch-1 loop, in kept groups */
enum { PREFETCH_ENTRIES = 128 };

/* One call's problem; pointers borrowed from the caller's tensors. */
typedef struct {
    const float *x;          /* (M, K) */
    const int32_t *crow;     /* (N + 1,) */
    const void *col;         /* (nnz,) int16 or int32 */
    int col_int32;
    const uint8_t *values;   /* (nnz, g * bits / 8) */
    const uint16_t *scale;   /* (nnz,) fp16 bits */
    const uint8_t *zero;     /* packed zero points or NULL */
    int64_t zero_nbytes;
    float *y;                /* (M, N) */
    int64_t M, N, K, nnz;
    int64_t ldx;             /* row stride of x (>= K) */
    int g, bits;
    /* int8-activation path (linear_a8): x quantized per 16 columns, x ~= xs[m, c / 16] * xq[m, c] */
    const int8_t *xq;        /* (M, ldq) or NULL: the float path */
    const float *xs;         /* (M, K / 16) */
    int64_t ldq;             /* row stride of xq (>= K) */
    /* 4-bit group-16 weights (AVX2): every row of x with each group's 16 columns reordered even-then-odd (the lane
       order of unpacked nibbles), rows cache-line aligned (reorder_x) */
    const float *xr;         /* (M, ldr) or NULL */
    int64_t ldr;
} Problem;

/* A row cut by a range boundary: its row index (-1: unused) and its M partial sums. */
typedef struct {
    int64_t row;
    float *sums; /* (M,) */
} Partial;

/* A cache-line-aligned buffer (free with free()), or NULL: x rearrangements are read in 64-byte chunks. */
static void *alloc_lines(size_t nbytes) {
    void *ptr = NULL;
    return posix_memalign(&ptr, 64, nbytes ? nbytes : 64) == 0 ? ptr : NULL;
}

/* ---- scalar helpers ------------------------------------------------------------------------------------ */

static inline int64_t col_at(const Problem *p, int64_t e) {
    return p->col_int32 ? (int64_t)((const int32_t *)p->col)[e] : (int64_t)((const int16_t *)p->col)[e];
}

/* Code i of a little-endian bit stream of nbytes bytes (bits <= 8). */
static inline int stream_code(const uint8_t *s, int64_t i, int bits, int64_t nbytes) {
    int64_t t = i * bits, byte = t >> 3;
    unsigned v = s[byte];
    if (byte + 1 < nbytes) v |= (unsigned)s[byte + 1] << 8;
    return (int)((v >> (t & 7)) & ((1u << bits) - 1u));
}

static inline int zero_at(const Problem *p, int64_t e) {
    return p->zero ? stream_code(p->zero, e, p->bits, p->zero_nbytes) : 1 << (p->bits - 1);
}

/* zero_at for a constant bits: 2, 4 and 8 bits never straddle a byte. */
static inline __attribute__((always_inline)) int zero_at_bits(const Problem *p, int64_t e, const int bits) {
    if (!p->zero) return 1 << (bits - 1);
    if (bits == 3) return stream_code(p->zero, e, 3, p->zero_nbytes);
    const int64_t t = e * bits;
    return (p->zero[t >> 3] >> (t & 7)) & ((1 << bits) - 1);
}

/* IEEE half -> float, exact (normals, subnormals, inf/nan). */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400u)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Destination of entry e's g weights: compact (e - a) * g in a row-segment buffer, or j * g in a dense row. */
static inline float *entry_dst(float *w, int64_t e, int64_t a, int64_t j, int g, int scatter) {
    return w + (scatter ? j : (e - a)) * (int64_t)g;
}

/* ---- dequantization (portable and AVX2) and the AVX2 register tiles ----------------------------------- */

/* w: compact (b - a, g) or, with scatter, a dense row (K,); off: (b - a,) x offsets j * g (may be NULL). */
static void dequant_scalar(const Problem *p, int64_t a, int64_t b, float *w, int32_t *off, int scatter) {
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

GQSA_AVX2 static void dequant_avx2(const Problem *p, int64_t a, int64_t b, float *w, int32_t *off, int scatter) {
    switch (p->bits) { /* constant bits and group size: one specialised loop each */
    case 2: GQSA_DEQUANT_G(2) break;
    case 3: GQSA_DEQUANT_G(3) break;
    case 4: GQSA_DEQUANT_G(4) break;
    default: GQSA_DEQUANT_G(8) break;
    }
}

GQSA_AVX2_INLINE float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
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
 * into the FMA that accumulates. Two entries per iteration with their own accumulators. Measured no faster:
 * unrolling to four entries, a horizontal add of 8 entries' partial dots against 8 scales at once, and
 * broadcasting scales and zero points from 8-entry vectors with permutes (all slower on this AMD EPYC).
 */
/* 2^23 + z as floats: (2^23 + q) - (2^23 + z) = q - z exactly, with 2^23 + q built by or-ing q into 2^23's bits. */
static const float B1_ZTAB[16] = {8388608.f, 8388609.f, 8388610.f, 8388611.f, 8388612.f, 8388613.f, 8388614.f,
                                  8388615.f, 8388616.f, 8388617.f, 8388618.f, 8388619.f, 8388620.f, 8388621.f,
                                  8388622.f, 8388623.f};

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

/* xr (M, ldr) of tile_q4g16_avx2 from x (M, K) with row stride ldx. */
static void reorder_x(const float *x, int64_t M, int64_t K, int64_t ldx, float *xr, int64_t ldr) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < K / 16; ++j) {
            const float *v = x + m * ldx + j * 16;
            float *d = xr + m * ldr + j * 16;
            for (int i = 0; i < 8; ++i) {
                d[i] = v[2 * i];
                d[8 + i] = v[2 * i + 1];
            }
        }
}

/* Fused path: out (M,) for entries [a, b) of one row, unpacked in registers (M <= MAX_TILE_M unless p->xr is
   set; batch 1 with p->xr goes through run_range_b1 instead). */
GQSA_AVX2 static void fused_avx2(const Problem *p, int64_t a, int64_t b, float *out) {
    if (p->xr)
        tile_q4g16_dispatch_avx2(p, a, b, out);
    else
        tile_dispatch_avx2(p, a, b, p->x, out, NULL, (int)p->M);
}

/* Two-phase path, phase 2: out (M,) from the row segment w (b - a, g) dequantized by dequant_avx2. */
GQSA_AVX2 static void dot_avx2(const Problem *p, int64_t a, int64_t b, const float *w, const int32_t *off,
                               float *out) {
    (void)off;
    for (int64_t m0 = 0; m0 < p->M; m0 += MAX_TILE_M) {
        const int64_t rest = p->M - m0;
        tile_dispatch_avx2(p, a, b, p->x + m0 * p->ldx, out + m0, w, rest < MAX_TILE_M ? (int)rest : MAX_TILE_M);
    }
}
#endif

/* ---- int8 activations (4-bit weights, group a multiple of 16) -------------------------------------------- */

/*
 * x (M, K) float32 -> xq (M, ldq) int8 and xs (M, K / 16) float32, symmetric per 16 columns:
 * xs = amax / 127, xq = round_half_even(x * (127 / amax)) (0 where amax is 0). gqsa.quant.activations computes the
 * same numbers in torch, bit for bit (the tests' oracle).
 */
static void quantize_x(const float *x, int64_t M, int64_t K, int64_t ldx, int8_t *xq, int64_t ldq, float *xs) {
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
static void a8_scalar(const Problem *p, int64_t a, int64_t b, float *out) {
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
GQSA_AVX2 static void a8_avx2(const Problem *p, int64_t a, int64_t b, float *out) {
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

/* ---- portable phase 2: dot products of one row segment with every row of x ----------------------------- */

/* out[m] = sum_e sum_c w[e, c] * x[m, off[e] + c] for m < M. w: (ne, g) compact. */
static void dot_scalar(const Problem *p, int64_t a, int64_t b, const float *w, const int32_t *off, float *out) {
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

/* ---- one thread's range ---------------------------------------------------------------------------------- */

typedef void (*DequantFn)(const Problem *, int64_t, int64_t, float *, int32_t *, int);
typedef void (*DotFn)(const Problem *, int64_t, int64_t, const float *, const int32_t *, float *);
typedef void (*FusedFn)(const Problem *, int64_t, int64_t, float *);

/* The functions for this CPU: two-phase dequant + dot, and (M <= MAX_TILE_M) a fused one or NULL. */
typedef struct {
    DequantFn dequant;
    DotFn dot;
    FusedFn fused;
    FusedFn a8; /* int8 activations (p->xq set) */
} Fns;

/* Per-thread scratch: a row segment's weights (G, g) = K floats, its x offsets (G,), its sums (M,). */
typedef struct {
    float *w;
    int32_t *off;
    float *sums;
} Scratch;

/* out (M,) = dot products of entries [a, b) (one row) with every row of x. */
static void row_segment(const Problem *p, int64_t a, int64_t b, const Scratch *ws, const Fns *fns, float *out) {
    if (p->xq) {
        fns->a8(p, a, b, out);
    } else if (fns->fused && (p->M <= MAX_TILE_M || p->xr)) {
        fns->fused(p, a, b, out);
    } else {
        fns->dequant(p, a, b, ws->w, ws->off, 0);
        fns->dot(p, a, b, ws->w, ws->off, out);
    }
}

/* Last row r with crow[r] <= e (e < nnz), i.e. the row holding entry e. */
static int64_t row_of_entry(const int32_t *crow, int64_t n, int64_t e) {
    int64_t lo = 0, hi = n; /* crow[lo] <= e < crow[hi] */
    while (hi - lo > 1) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (crow[mid] <= e) lo = mid; else hi = mid;
    }
    return lo;
}

typedef void (*SegmentFn)(const Problem *, int64_t, int64_t, const Scratch *, const Fns *, float *);

/*
 * Entries [e0, e1) starting in row r. Whole rows go straight to y; a row cut by e0 goes to head, one cut by
 * e1 to tail (the same row cut by both goes to head). `segment` computes one row segment; it is a constant at
 * every call site, so the compiler inlines it (no indirect call per row).
 */
static inline __attribute__((always_inline)) void run_range_with(const Problem *p, int64_t e0, int64_t e1, int64_t r,
                                                                 const Scratch *ws, Partial *head, Partial *tail,
                                                                 const Fns *fns, SegmentFn segment) {
    for (; r < p->N && p->crow[r] < e1; ++r) {
        const int64_t lo = p->crow[r], hi = p->crow[r + 1];
        const int64_t a = lo > e0 ? lo : e0, b = hi < e1 ? hi : e1;
        if (a >= b) continue; /* a row with no kept group (or none in this range) */
        if (a == lo && b == hi) {
            segment(p, a, b, ws, fns, ws->sums);
            for (int64_t m = 0; m < p->M; ++m) p->y[m * p->N + r] = ws->sums[m];
        } else {
            Partial *slot = a > lo ? head : tail;
            slot->row = r;
            segment(p, a, b, ws, fns, slot->sums);
        }
    }
}

static void run_range(const Problem *p, int64_t e0, int64_t e1, int64_t r, const Scratch *ws, Partial *head,
                      Partial *tail, const Fns *fns) {
    run_range_with(p, e0, e1, r, ws, head, tail, fns, row_segment);
}

#if GQSA_HAVE_X86
GQSA_AVX2_INLINE void b1_segment(const Problem *p, int64_t a, int64_t b, const Scratch *ws, const Fns *fns,
                                 float *out) {
    (void)ws;
    (void)fns;
    b1_g16_q4_avx2(p, a, b, out);
}

/* run_range for the batch-1 path (p->xr set, M = 1), with the row loop and the kernel in one function. */
GQSA_AVX2 static void run_range_b1(const Problem *p, int64_t e0, int64_t e1, int64_t r, const Scratch *ws,
                                   Partial *head, Partial *tail, const Fns *fns) {
    run_range_with(p, e0, e1, r, ws, head, tail, fns, b1_segment);
}

GQSA_AVX512_INLINE void b1_segment512(const Problem *p, int64_t a, int64_t b, const Scratch *ws, const Fns *fns,
                                      float *out) {
    (void)ws;
    (void)fns;
    b1_g16_q4_avx512(p, a, b, out);
}

GQSA_AVX512 static void run_range_b1_avx512(const Problem *p, int64_t e0, int64_t e1, int64_t r, const Scratch *ws,
                                            Partial *head, Partial *tail, const Fns *fns) {
    run_range_with(p, e0, e1, r, ws, head, tail, fns, b1_segment512);
}
#endif

static int use_avx2(int isa) {
#if GQSA_HAVE_X86
    if (isa == ISA_SCALAR) return 0;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    (void)isa;
    return 0;
#endif
}

/* Whether the CPU has what the AVX-512 path needs (AVX-512F besides the AVX2 set). */
static int avx512_supported(void) {
#if GQSA_HAVE_X86
    return use_avx2(ISA_AUTO) && __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

static int use_avx512(int isa) {
    if (isa == ISA_SCALAR || isa == ISA_AVX2 || !avx512_supported()) return 0;
    if (isa == ISA_AVX512) return 1;
    const char *optin = getenv("GQSA_CPU_AVX512");
    return optin != NULL && strcmp(optin, "1") == 0;
}

static Fns pick_fns(int isa) {
    Fns fns = {dequant_scalar, dot_scalar, NULL, a8_scalar};
#if GQSA_HAVE_X86
    if (use_avx2(isa)) fns = (Fns){dequant_avx2, dot_avx2, fused_avx2, a8_avx2};
#else
    (void)isa;
#endif
    return fns;
}

/*
 * Rows of x whose stride is a multiple of 4 KiB (K = 4096, 11008 ...) fall in the same L1 sets and alias each
 * other's addresses; a copy with one cache line of padding per row avoids both. Returns the copy or NULL.
 */
static float *padded_x(const Problem *p, int64_t *ldx) {
    *ldx = p->K + 16;
    float *x = alloc_lines((size_t)(p->M * *ldx) * sizeof(float));
    if (x)
        for (int64_t m = 0; m < p->M; ++m) memcpy(x + m * *ldx, p->x + m * p->K, (size_t)p->K * sizeof(float));
    return x;
}

/*
 * y = x @ W^T for the whole problem with T threads; act8: x quantized to int8 per 16 columns first (4-bit weights,
 * group a multiple of 16; checked by the caller). Returns 0, or -1 when out of memory.
 */
static int linear(const Problem *problem, int threads, int mode, int isa, int act8) {
    Problem padded = *problem, *p = &padded;
    float *xcopy = NULL;
    int8_t *xq = NULL;
    float *xs = NULL;
    if (act8) {
        padded.ldq = p->K + 64; /* a cache line of padding: no 4 KiB aliasing between rows */
        xq = alloc_lines((size_t)(p->M * padded.ldq));
        xs = malloc((size_t)(p->M * (p->K / 16)) * sizeof(float));
        if (xq == NULL || xs == NULL) {
            free(xq);
            free(xs);
            return -1;
        }
        quantize_x(p->x, p->M, p->K, p->ldx, xq, padded.ldq, xs);
        padded.xq = xq;
        padded.xs = xs;
    } else if (p->bits == 4 && p->g == 16 && !p->col_int32 && use_avx2(isa)) {
        padded.ldr = p->K + 16; /* a cache line of padding: no 4 KiB aliasing between rows */
        xcopy = alloc_lines((size_t)(p->M * padded.ldr) * sizeof(float));
        if (xcopy == NULL) return -1;
        reorder_x(p->x, p->M, p->K, p->ldx, xcopy, padded.ldr);
        padded.xr = xcopy;
    } else if (p->M > 1 && (p->K * (int64_t)sizeof(float)) % 4096 == 0) {
        xcopy = padded_x(problem, &padded.ldx);
        if (xcopy == NULL) return -1;
        padded.x = xcopy;
    }
    const Fns fns = pick_fns(isa);
    void (*range)(const Problem *, int64_t, int64_t, int64_t, const Scratch *, Partial *, Partial *, const Fns *) =
        run_range;
#if GQSA_HAVE_X86
    if (p->xr && p->M == 1) range = use_avx512(isa) ? run_range_b1_avx512 : run_range_b1;
#endif
    memset(p->y, 0, (size_t)(p->M * p->N) * sizeof(float));
    if (p->nnz == 0 || p->M == 0) {
        free(xcopy);
        free(xq);
        free(xs);
        return 0;
    }
    if (threads < 1) threads = 1;
    /* Partial slots: 2 per thread, each with M sums. */
    Partial *parts = calloc((size_t)threads * 2, sizeof(Partial));
    float *part_sums = calloc((size_t)threads * 2 * (size_t)p->M, sizeof(float));
    int failed = parts == NULL || part_sums == NULL;
    if (!failed) {
        for (int i = 0; i < 2 * threads; ++i) {
            parts[i].row = -1;
            parts[i].sums = part_sums + (int64_t)i * p->M;
        }
#pragma omp parallel num_threads(threads)
        {
            int t = 0, nt = 1;
#ifdef _OPENMP
            t = omp_get_thread_num();
            nt = omp_get_num_threads();
#endif
            Scratch ws = {malloc((size_t)p->K * sizeof(float)), malloc((size_t)(p->K / p->g) * sizeof(int32_t)),
                          malloc((size_t)p->M * sizeof(float))};
            if (ws.w == NULL || ws.off == NULL || ws.sums == NULL) {
#pragma omp atomic write
                failed = 1;
            } else if (mode == MODE_ROWS) {
                const int64_t r0 = p->N * t / nt, r1 = p->N * (t + 1) / nt;
                range(p, p->crow[r0], p->crow[r1], r0, &ws, &parts[2 * t], &parts[2 * t + 1], &fns);
            } else {
                const int64_t e0 = p->nnz * t / nt, e1 = p->nnz * (t + 1) / nt;
                if (e0 < e1)
                    range(p, e0, e1, row_of_entry(p->crow, p->N, e0), &ws, &parts[2 * t], &parts[2 * t + 1], &fns);
            }
            free(ws.w);
            free(ws.off);
            free(ws.sums);
        }
        /* Rows cut between threads: y (still 0 there) += partials in thread order, deterministically. */
        for (int i = 0; i < 2 * threads; ++i)
            if (parts[i].row >= 0)
                for (int64_t m = 0; m < p->M; ++m) p->y[m * p->N + parts[i].row] += parts[i].sums[m];
    }
    free(parts);
    free(part_sums);
    free(xcopy);
    free(xq);
    free(xs);
    return failed ? -1 : 0;
}

/* Dense W (N, K) float32 into p->y (used as the output buffer), rows split across threads. */
static void dequantize_dense(const Problem *p, int threads, int isa) {
    const Fns fns = pick_fns(isa);
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < p->N; ++r) {
        float *row = p->y + r * p->K;
        memset(row, 0, (size_t)p->K * sizeof(float));
        fns.dequant(p, p->crow[r], p->crow[r + 1], row, NULL, 1);
    }
}

/* ---- Python bindings ----------------------------------------------------------------------------------- */

static void *as_ptr(unsigned long long v) { return (void *)(uintptr_t)v; }

static int check_problem(const Problem *p) {
    if (p->g < 8 || p->g > 256 || (p->g & (p->g - 1)) || p->K % p->g) {
        PyErr_SetString(PyExc_ValueError, "group_size must be a power of two in [8, 256] dividing in_features");
        return -1;
    }
    if (p->bits != 2 && p->bits != 3 && p->bits != 4 && p->bits != 8) {
        PyErr_SetString(PyExc_ValueError, "bits must be 2, 3, 4 or 8");
        return -1;
    }
    if (p->M < 0 || p->N < 1 || p->K < 1 || p->nnz < 0) {
        PyErr_SetString(PyExc_ValueError, "bad sizes");
        return -1;
    }
    return 0;
}

/*
 * Parse the common arguments: pointers (integers, data_ptr()) and sizes. Format (see py_linear's docstring):
 * x, crow, col, col_int32, values, scale, zero, y, M, N, K, nnz, group_size, bits.
 */
static int parse_problem(PyObject *args, Problem *p, int *threads, int *mode, int *isa) {
    unsigned long long x, crow, col, values, scale, zero, y;
    long long M, N, K, nnz;
    if (!PyArg_ParseTuple(args, "KKKiKKKKLLLLiiiii", &x, &crow, &col, &p->col_int32, &values, &scale, &zero, &y, &M,
                          &N, &K, &nnz, &p->g, &p->bits, threads, mode, isa))
        return -1;
    p->x = as_ptr(x);
    p->crow = as_ptr(crow);
    p->col = as_ptr(col);
    p->values = as_ptr(values);
    p->scale = as_ptr(scale);
    p->zero = as_ptr(zero);
    p->y = as_ptr(y);
    p->M = M;
    p->N = N;
    p->K = K;
    p->ldx = K;
    p->xq = NULL;
    p->xs = NULL;
    p->xr = NULL;
    p->ldr = 0;
    p->ldq = K;
    p->nnz = nnz;
    p->zero_nbytes = (nnz * p->bits + 7) / 8;
    return check_problem(p);
}

PyDoc_STRVAR(py_linear_doc,
             "linear(x, crow, col, col_int32, values, scale, zero, y, M, N, K, nnz, group_size, bits, threads, "
             "mode, isa)\n\n"
             "y (M, N) float32 = x (M, K) float32 @ W^T. Every tensor argument is a data pointer (int) of a "
             "contiguous tensor; zero is 0 for symmetric weights. mode: 0 task-centric, 1 row split. "
             "isa: 0 best available, 1 scalar, 2 AVX2 (never AVX-512), 3 AVX-512 where the CPU has it.");

/* linear / linear_a8: parse, check, run without the GIL. */
static PyObject *run_linear(PyObject *args, int act8) {
    Problem p;
    int threads, mode, isa, rc;
    if (parse_problem(args, &p, &threads, &mode, &isa) < 0) return NULL;
    if (act8 && (p.bits != 4 || p.g % 16)) {
        PyErr_SetString(PyExc_ValueError, "linear_a8: 4-bit weights with a group size multiple of 16 only");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = linear(&p, threads, mode, isa, act8);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_linear(PyObject *self, PyObject *args) {
    (void)self;
    return run_linear(args, 0);
}

PyDoc_STRVAR(py_linear_a8_doc,
             "linear_a8(...same arguments as linear...)\n\n"
             "y ~= x @ W^T with x quantized to int8 per 16 columns (symmetric, scale amax / 127) and integer "
             "dot products: 4-bit weights with a group size that is a multiple of 16 only.");

static PyObject *py_linear_a8(PyObject *self, PyObject *args) {
    (void)self;
    return run_linear(args, 1);
}

/*
 * RMSNorm of `rows` rows of n floats, optionally after a residual add: x += delta (when delta is not NULL, in
 * place), then out = w * (x / sqrt(mean(x^2) + eps)), the order of transformers' LlamaRMSNorm in float32 (the sum
 * of squares accumulated in double). For the decode step, where torch's rms_norm costs several small calls.
 */
static void add_rms_norm(float *x, const float *delta, const float *w, float *out, int64_t rows, int64_t n,
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

static PyObject *py_add_rms_norm(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, delta, w, out;
    long long rows, n;
    double eps;
    if (!PyArg_ParseTuple(args, "KKKKLLd", &x, &delta, &w, &out, &rows, &n, &eps)) return NULL;
    if (rows < 0 || n < 1) {
        PyErr_SetString(PyExc_ValueError, "add_rms_norm: rows must be >= 0 and n >= 1");
        return NULL;
    }
    add_rms_norm(as_ptr(x), as_ptr(delta), as_ptr(w), as_ptr(out), rows, n, (float)eps);
    Py_RETURN_NONE;
}

static PyObject *py_quantize_x(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, xq, xs;
    long long M, K;
    if (!PyArg_ParseTuple(args, "KKKLL", &x, &xq, &xs, &M, &K)) return NULL;
    if (M < 0 || K < 16 || K % 16) {
        PyErr_SetString(PyExc_ValueError, "quantize_x: K must be a positive multiple of 16");
        return NULL;
    }
    quantize_x(as_ptr(x), M, K, K, as_ptr(xq), K, as_ptr(xs));
    Py_RETURN_NONE;
}

PyDoc_STRVAR(py_dequantize_doc,
             "dequantize(0, crow, col, col_int32, values, scale, zero, w, 0, N, K, nnz, group_size, bits, threads, "
             "0, isa)\n\nDense W (N, K) float32 written to the pointer w (same argument order as linear).");

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    (void)self;
    Problem p;
    int threads, mode, isa;
    if (parse_problem(args, &p, &threads, &mode, &isa) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    dequantize_dense(&p, threads, isa);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_isa(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyUnicode_FromString(use_avx512(ISA_AUTO) ? "avx512" : use_avx2(ISA_AUTO) ? "avx2" : "scalar");
}

static PyObject *py_avx512_supported(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(avx512_supported());
}

static PyObject *py_openmp(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS, py_linear_doc},
    {"dequantize", py_dequantize, METH_VARARGS, py_dequantize_doc},
    {"linear_a8", py_linear_a8, METH_VARARGS, py_linear_a8_doc},
    {"quantize_x", py_quantize_x, METH_VARARGS,
     "quantize_x(x, xq, xs, M, K): x (M, K) float32 -> xq (M, K) int8, xs (M, K / 16) float32 (pointers)."},
    {"add_rms_norm", py_add_rms_norm, METH_VARARGS,
     "add_rms_norm(x, delta, w, out, rows, n, eps): x (rows, n) += delta (0: none), out = w * rmsnorm(x)."},
    {"isa", py_isa, METH_NOARGS,
     "Instruction set the kernels use here: 'avx512' (the batch-1 path; opt-in), 'avx2' or 'scalar'."},
    {"avx512_supported", py_avx512_supported, METH_NOARGS, "Whether this CPU has what the AVX-512 path needs."},
    {"openmp", py_openmp, METH_NOARGS, "Whether the module was built with OpenMP."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "gqsa._native_cpu",
                                    "Native CPU kernels for gqsa::linear (see csrc/gqsa_cpu.c).", -1, methods};

PyMODINIT_FUNC PyInit__native_cpu(void) { return PyModule_Create(&module); }
