/*
 * gqsa_cpu.h: the internal header of the native CPU kernel for gqsa::linear (shared by every file in csrc/).
 *
 * The kernel computes y = x @ W^T on the packed block-sparse-row group-quantized format (docs/FORMAT.md). Built as
 * the CPython extension module gqsa._native_cpu; the Python wrapper is src/gqsa/ops/cpu.py (it owns dtype
 * conversion, bias and the choice of split).
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
 *         M = 1 (decode): b1_g16_q4_avx2, which computes s * ((q - z) . x) (same sum, other rounding; faster
 *         than the general tile: docs/RESULTS.md), with the row loop in the same function (run_range_b1);
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
 *
 * Files (each includes this header, binding.c after Python.h; setup.py compiles them all into one module):
 *   gqsa_cpu.h        this header: the Problem struct (the kernel contract), the per-row-segment function types,
 *                     the scalar helpers and the range walker every kernel inlines, the x86 target macros, and
 *                     the declarations of what each file exports to the others
 *   kernel_scalar.c   portable two-phase path (dequantize, then dot) and add_rms_norm
 *   kernel_avx2.c     AVX2+FMA+F16C: dequantization, the register tiles, the W4 g16 paths (batch 1 and M >= 2)
 *   kernel_avx512.c   AVX-512F: the batch-1 W4 g16 path (opt-in, see use_avx512)
 *   kernel_a8.c       int8 activations: quantize_x, and the scalar and AVX2 integer-dot paths
 *   kernel_vnni.c     int8 activations with AVX-512 VNNI (4-bit, group 16), and its rearrangement of x
 *   driver.c          run-time CPU-feature dispatch, preparation of x, the work split over threads (linear,
 *                     dequantize_dense)
 *   binding.c         the CPython module gqsa._native_cpu (argument parsing, checks, GIL release)
 * Instruction sets are chosen per function (target attributes, GQSA_AVX2 / GQSA_AVX512), never per file or with
 * -m flags: the module is built for baseline x86-64 and loads on any CPU; driver.c calls an AVX2 or AVX-512
 * function only after __builtin_cpu_supports said yes.
 */
#ifndef GQSA_CPU_H
#define GQSA_CPU_H

/* posix_memalign under -std=c11 (binding.c includes Python.h first, which defines it already). */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define GQSA_HAVE_X86 1
#include <immintrin.h>
#define GQSA_AVX2 __attribute__((target("avx2,fma,f16c")))
#define GQSA_AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))
#define GQSA_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define GQSA_AVX512_INLINE static inline __attribute__((always_inline, target("avx512f,avx2,fma,f16c")))
#define GQSA_VNNI_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"
#define GQSA_VNNI __attribute__((target(GQSA_VNNI_TARGET)))
#define GQSA_VNNI_INLINE static inline __attribute__((always_inline, target(GQSA_VNNI_TARGET)))
#else
#define GQSA_HAVE_X86 0
#endif

/* Functions one file exports to the others: not exported from the shared object. */
#if defined(__GNUC__)
#define GQSA_INTERNAL __attribute__((visibility("hidden")))
#else
#define GQSA_INTERNAL
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
    /* ... and for the AVX-512 VNNI path (kernel_vnni.c): each group's 16 values even columns first, and xs_j times
       the sum of group j's values */
    const int8_t *xr8;       /* (M, ldr8) or NULL */
    int64_t ldr8;
    const float *xf;         /* (M, K / 16) */
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

/* One row segment (row_segment, or a batch-1 kernel): out (M,) for entries [a, b) of one row. */
typedef void (*SegmentFn)(const Problem *, int64_t, int64_t, const Scratch *, const Fns *, float *);
/* One thread's range of entries [e0, e1), starting in row r (run_range and its batch-1 variants). */
typedef void (*RangeFn)(const Problem *, int64_t, int64_t, int64_t, const Scratch *, Partial *, Partial *,
                        const Fns *);

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

/* ---- x86 helpers shared by kernel_avx2.c, kernel_avx512.c and kernel_a8.c ---------------------------- */

#if GQSA_HAVE_X86
GQSA_AVX2_INLINE float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 2^23 + z as floats: (2^23 + q) - (2^23 + z) = q - z exactly, with 2^23 + q built by or-ing q into 2^23's bits. */
static const float B1_ZTAB[16] = {8388608.f, 8388609.f, 8388610.f, 8388611.f, 8388612.f, 8388613.f, 8388614.f,
                                  8388615.f, 8388616.f, 8388617.f, 8388618.f, 8388619.f, 8388620.f, 8388621.f,
                                  8388622.f, 8388623.f};
#endif

/* ---- what each file exports ------------------------------------------------------------------------------ */

/* kernel_scalar.c */
GQSA_INTERNAL void dequant_scalar(const Problem *p, int64_t a, int64_t b, float *w, int32_t *off, int scatter);
GQSA_INTERNAL void dot_scalar(const Problem *p, int64_t a, int64_t b, const float *w, const int32_t *off, float *out);
GQSA_INTERNAL void add_rms_norm(float *x, const float *delta, const float *w, float *out, int64_t rows, int64_t n,
                                float eps);

/* kernel_a8.c */
GQSA_INTERNAL void quantize_x(const float *x, int64_t M, int64_t K, int64_t ldx, int8_t *xq, int64_t ldq, float *xs);
GQSA_INTERNAL void a8_scalar(const Problem *p, int64_t a, int64_t b, float *out);
/* kernel_vnni.c, portable part */
GQSA_INTERNAL void prepare_x_vnni(const int8_t *xq, const float *xs, int64_t M, int64_t K, int64_t ldq, int8_t *xr8,
                                  int64_t ldr8, float *xf);

#if GQSA_HAVE_X86
/* kernel_avx2.c: call only where use_avx2 says so */
GQSA_INTERNAL GQSA_AVX2 void dequant_avx2(const Problem *p, int64_t a, int64_t b, float *w, int32_t *off,
                                          int scatter);
GQSA_INTERNAL GQSA_AVX2 void fused_avx2(const Problem *p, int64_t a, int64_t b, float *out);
GQSA_INTERNAL GQSA_AVX2 void dot_avx2(const Problem *p, int64_t a, int64_t b, const float *w, const int32_t *off,
                                      float *out);
GQSA_INTERNAL GQSA_AVX2 void run_range_b1(const Problem *p, int64_t e0, int64_t e1, int64_t r, const Scratch *ws,
                                          Partial *head, Partial *tail, const Fns *fns);
/* kernel_a8.c, AVX2 part: call only where use_avx2 says so */
GQSA_INTERNAL GQSA_AVX2 void a8_avx2(const Problem *p, int64_t a, int64_t b, float *out);
/* kernel_vnni.c: call only where use_vnni says so */
GQSA_INTERNAL GQSA_VNNI void a8_vnni(const Problem *p, int64_t a, int64_t b, float *out);
GQSA_INTERNAL GQSA_VNNI void run_range_vnni_b1(const Problem *p, int64_t e0, int64_t e1, int64_t r,
                                               const Scratch *ws, Partial *head, Partial *tail, const Fns *fns);
/* kernel_avx512.c: call only where use_avx512 (or, for the tiles, use_avx512_tiles) says so */
GQSA_INTERNAL GQSA_AVX512 void fused_q4g16_avx512(const Problem *p, int64_t a, int64_t b, float *out);
GQSA_INTERNAL GQSA_AVX512 void run_range_b1_avx512(const Problem *p, int64_t e0, int64_t e1, int64_t r,
                                                   const Scratch *ws, Partial *head, Partial *tail, const Fns *fns);
#endif

/* driver.c */
GQSA_INTERNAL int use_avx2(int isa);
GQSA_INTERNAL int avx512_supported(void);
GQSA_INTERNAL int use_avx512(int isa);
GQSA_INTERNAL int use_avx512_tiles(int isa);
GQSA_INTERNAL int vnni_supported(void);
GQSA_INTERNAL int use_vnni(int isa);
GQSA_INTERNAL int linear(const Problem *problem, int threads, int mode, int isa, int act8);
GQSA_INTERNAL void dequantize_dense(const Problem *p, int threads, int isa);

#endif /* GQSA_CPU_H */
