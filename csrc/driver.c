/*
 * The driver of the native kernels: run-time CPU-feature dispatch (use_avx2, use_avx512, pick_fns), the
 * rearrangements of x made once per call (reorder_x, padded_x; quantize_x comes from kernel_a8.c), one thread's
 * walk over its range of kept groups (run_range), and the whole call with its work split over OpenMP threads
 * (linear) or the dense dequantization (dequantize_dense).
 */
#include "gqsa_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* A cache-line-aligned buffer (free with free()), or NULL: x rearrangements are read in 64-byte chunks. */
static void *alloc_lines(size_t nbytes) {
    void *ptr = NULL;
    return posix_memalign(&ptr, 64, nbytes ? nbytes : 64) == 0 ? ptr : NULL;
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

/* ---- one thread's range ---------------------------------------------------------------------------------- */

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

static void run_range(const Problem *p, int64_t e0, int64_t e1, int64_t r, const Scratch *ws, Partial *head,
                      Partial *tail, const Fns *fns) {
    run_range_with(p, e0, e1, r, ws, head, tail, fns, row_segment);
}

int use_avx2(int isa) {
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
int avx512_supported(void) {
#if GQSA_HAVE_X86
    return use_avx2(ISA_AUTO) && __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

int use_avx512(int isa) {
    if (isa == ISA_SCALAR || isa == ISA_AVX2 || !avx512_supported()) return 0;
    if (isa == ISA_AVX512) return 1;
    const char *optin = getenv("GQSA_CPU_AVX512");
    return optin != NULL && strcmp(optin, "1") == 0;
}

/*
 * The AVX-512 tiles of 4-bit group-16 weights for M >= 2 (fused_q4g16_avx512): wherever the CPU has AVX-512F,
 * unless isa asks for AVX2 or scalar code (measured faster than the AVX2 tiles at batch 4 and 16 on an AVX-512
 * Xeon, docs/RESULTS.md; the batch-1 AVX-512 path measured slower there and stays opt-in, use_avx512).
 */
int use_avx512_tiles(int isa) {
    return isa != ISA_SCALAR && isa != ISA_AVX2 && avx512_supported();
}

/* Whether the CPU has what the VNNI int8-activation path needs (AVX-512F/BW/VL/DQ and VNNI besides AVX2). */
int vnni_supported(void) {
#if GQSA_HAVE_X86
    return avx512_supported() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

/* The VNNI path for linear_a8: wherever the CPU has it, unless isa asks for AVX2 or scalar code. */
int use_vnni(int isa) {
    return isa != ISA_SCALAR && isa != ISA_AVX2 && vnni_supported();
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
int linear(const Problem *problem, int threads, int mode, int isa, int act8) {
    Problem padded = *problem, *p = &padded;
    float *xcopy = NULL;
    int8_t *xq = NULL;
    float *xs = NULL, *xf = NULL;
    int8_t *xr8 = NULL;
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
        if (p->bits == 4 && p->g == 16 && !p->col_int32 && use_vnni(isa)) {
            padded.ldr8 = p->K + 64;
            xr8 = alloc_lines((size_t)(p->M * padded.ldr8));
            xf = malloc((size_t)(p->M * (p->K / 16)) * sizeof(float));
            if (xr8 == NULL || xf == NULL) {
                free(xq);
                free(xs);
                free(xr8);
                free(xf);
                return -1;
            }
            prepare_x_vnni(xq, xs, p->M, p->K, padded.ldq, xr8, padded.ldr8, xf);
            padded.xr8 = xr8;
            padded.xf = xf;
        }
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
    Fns fns = pick_fns(isa);
#if GQSA_HAVE_X86
    if (p->xr8) fns.a8 = a8_vnni;
    if (p->xr && p->M > 1 && use_avx512_tiles(isa)) fns.fused = fused_q4g16_avx512;
#endif
    RangeFn range = run_range;
#if GQSA_HAVE_X86
    if (p->xr && p->M == 1) range = use_avx512(isa) ? run_range_b1_avx512 : run_range_b1;
    if (p->xr8 && p->M == 1 && mode == MODE_TASK) range = run_range_vnni_b1;
#endif
    memset(p->y, 0, (size_t)(p->M * p->N) * sizeof(float));
    if (p->nnz == 0 || p->M == 0) {
        free(xcopy);
        free(xq);
        free(xs);
        free(xr8);
        free(xf);
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
    free(xr8);
    free(xf);
    return failed ? -1 : 0;
}

/* Dense W (N, K) float32 into p->y (used as the output buffer), rows split across threads. */
void dequantize_dense(const Problem *p, int threads, int isa) {
    const Fns fns = pick_fns(isa);
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < p->N; ++r) {
        float *row = p->y + r * p->K;
        memset(row, 0, (size_t)p->K * sizeof(float));
        fns.dequant(p, p->crow[r], p->crow[r + 1], row, NULL, 1);
    }
}
