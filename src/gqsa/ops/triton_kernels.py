"""Triton kernels for ``gqsa::linear`` on the packed format (docs/FORMAT.md); launched by gqsa.ops.gpu.

Imports triton at the top, so it is itself imported only lazily, on the first Triton call. Under
``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors through Triton's
interpreter: that is how the tests check them against the reference op without a GPU.

Every kernel dequantizes a kept group as the reference does, ``(code - zero_point) * scale`` in float32, then
rounds it to x's dtype: their weights equal ``dequantize_bsr(..., dtype=x.dtype)`` bit for bit; only the order
of the float32 accumulation differs from the reference's matmul.

* ``decode_kernel`` (M <= 16 rows of x), task-centric (``TASK=True``, default): the nnz kept groups cut into P
  equal ranges whatever the rows; a program finds its first and last row by a FAN-ary search in
  ``crow_indices``. A row cut by a range boundary: each program stores its partial sums in its own slot, the
  last to arrive (per-row counter) adds the slots in program order, writes the row and resets the counter, so
  the result is deterministic and no program waits. ``TASK=False``: program p takes rows [p*N/P, (p+1)*N/P).
* ``dequantize_kernel`` (M >= ``PREFILL_DENSE_MIN_M`` in gqsa.ops.gpu): the dense weight in x's dtype, for
  cuBLAS (``torch.nn.functional.linear``).
* ``prefill_kernel`` (M in between): one program per (BLOCK_M x BLOCK_N) output tile gathers GPS kept groups per
  step (zeros for pruned ones, positions from ``group_positions`` in gqsa.ops.gpu) into a dense tile for
  ``tl.dot``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # how triton.jit wrapped the kernels below


@triton.jit
def _codes(ptr, base, index, mask, limit, BITS: tl.constexpr):
    """Codes number ``index`` of the little-endian bit streams starting at byte ``base`` of ``ptr``, as int32.

    ``limit`` is the end (exclusive byte offset) of each stream: a 3-bit code may straddle two bytes, and the second
    is read only when it exists. 2-, 4- and 8-bit codes never straddle.
    """
    bit = index * BITS
    byte = base + bit // 8
    word = tl.load(ptr + byte, mask=mask, other=0).to(tl.int32)
    if BITS == 3:
        nxt = tl.load(ptr + byte + 1, mask=mask & (byte + 1 < limit), other=0).to(tl.int32)
        word = word | (nxt << 8)
    return (word >> (bit % 8)) & ((1 << BITS) - 1)


@triton.jit
def _group_zero(zero_ptr, group, mask, zero_nbytes, BITS: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Zero point of each kept group ``group`` as float32 (2**(BITS-1) when symmetric)."""
    if HAS_ZERO:
        z = _codes(zero_ptr, 0, group, mask, zero_nbytes, BITS).to(tl.float32)
    else:
        z = tl.full(group.shape, 1 << (BITS - 1), tl.float32)
    return z


@triton.jit
def _rows_ended_by(crow_ptr, g, N, FAN: tl.constexpr):
    """Number of rows r with crow[r + 1] <= g: the row holding kept group g (empty rows just before it count as
    ended). A FAN-ary search: each step loads FAN row pointers and keeps the interval between two of them."""
    lo = tl.zeros((), tl.int64)
    hi = tl.zeros((), tl.int64) + N
    probe = tl.arange(0, FAN).to(tl.int64)
    while lo < hi:
        step = (hi - lo + FAN - 1) // FAN
        pos = lo + probe * step  # (FAN,)
        valid = pos < hi
        ended = valid & (tl.load(crow_ptr + pos + 1, mask=valid, other=0).to(tl.int64) <= g)
        cnt = tl.sum(ended.to(tl.int64), axis=0)  # the first cnt probes have ended (crow is non-decreasing)
        new_lo = tl.where(cnt > 0, lo + (cnt - 1) * step + 1, lo)
        hi = tl.where(cnt > 0, tl.minimum(lo + cnt * step, hi), lo)
        lo = new_lo
    return lo


@triton.jit
def _program_of_group(g, nnz, P):
    """The program whose range [p*nnz//P, (p+1)*nnz//P) holds kept group g (P <= nnz, so no range is empty)."""
    return ((g + 1) * P - 1) // nnz


@triton.jit
def _rows_dot(x_ptr, stride_xm, M, col_ptr, values_ptr, scale_ptr, zero_ptr, zero_nbytes, first, count,
              BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, WORDS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """(BLOCK_R, BLOCK_M) float32: for each of BLOCK_R rows, the dot products of its kept groups
    first .. first + count - 1 ((BLOCK_R,) int64 each; count 0 for a masked row) with the M rows of x.

    WORDS: values_ptr points to int32 words (each group's codes fill whole words: 2/4/8 bits, group_size * bits
    a multiple of 32), read one word per 32 // BITS codes; otherwise to bytes, read one per code.
    """
    NBYTES: tl.constexpr = GS * BITS // 8
    CPW: tl.constexpr = 32 // BITS if WORDS else 1  # codes per word
    NW: tl.constexpr = GS // CPW  # words (or codes) per group
    acc = tl.zeros((BLOCK_R, BLOCK_M), tl.float32)
    jj = tl.arange(0, BLOCK_G)
    wi = tl.arange(0, NW)
    ci = tl.arange(0, CPW)
    c = wi[:, None] * CPW + ci[None, :]  # (NW, CPW) code index in the group
    mm = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:  # one row of x: products summed lane by lane, reduced across lanes once, after the loop
        prod = tl.zeros((BLOCK_R, BLOCK_G, NW, CPW), tl.float32)
    longest = tl.max(count, axis=0)
    for j in range(0, longest, BLOCK_G):
        gmask = (j + jj)[None, :] < count[:, None]  # (R, BG)
        g = first[:, None] + j + jj[None, :]  # (R, BG) kept-group index
        col = tl.load(col_ptr + g, mask=gmask, other=0).to(tl.int64)
        s = tl.load(scale_ptr + g, mask=gmask, other=0.0).to(tl.float32)
        z = _group_zero(zero_ptr, g, gmask, zero_nbytes, BITS, HAS_ZERO)
        m4 = gmask[:, :, None, None]  # (R, BG, 1, 1)
        if WORDS:
            word = tl.load(values_ptr + g[:, :, None] * NW + wi[None, None, :], mask=gmask[:, :, None], other=0)
            q = (word[:, :, :, None] >> (ci * BITS)[None, None, None, :]) & ((1 << BITS) - 1)  # (R, BG, NW, CPW)
        else:
            base = g[:, :, None, None] * NBYTES  # (R, BG, 1, 1) first byte of each group's codes
            q = _codes(values_ptr, base, c[None, None, :, :], m4, base + NBYTES, BITS)  # (R, BG, NW, 1)
        w = (q.to(tl.float32) - z[:, :, None, None]) * s[:, :, None, None]  # the reference's float32 weights
        w = w.to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to x's dtype, as the reference's weight is
        xoff = col[:, :, None, None] * GS + c[None, None, :, :]  # columns of x
        if BLOCK_M == 1:
            prod += w * tl.load(x_ptr + xoff, mask=m4, other=0.0).to(tl.float32)
        else:
            for m in tl.static_range(BLOCK_M):
                xv = tl.load(x_ptr + m * stride_xm + xoff, mask=m4 & (m < M), other=0.0).to(tl.float32)
                part = tl.sum(tl.sum(tl.sum(w * xv, axis=3), axis=2), axis=1)  # (R,)
                acc += tl.where(mm[None, :] == m, part[:, None], 0.0)
    if BLOCK_M == 1:
        acc = tl.sum(tl.sum(tl.sum(prod, axis=3), axis=2), axis=1)[:, None]
    return acc


@triton.jit
def _store_rows(y_ptr, bias_ptr, rows, rmask, acc, M, stride_ym, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr):
    """y[m, rows] = acc[:, m] (+ bias[rows]) for m < M; acc (BLOCK_R, BLOCK_M) float32."""
    mm = tl.arange(0, BLOCK_M)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + mm[None, :] * stride_ym + rows[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & (mm[None, :] < M))


@triton.jit
def _cut_row(x_ptr, y_ptr, bias_ptr, crow_ptr, col_ptr, values_ptr, scale_ptr, zero_ptr, partial_ptr, counter_ptr,
             row, s, e, slot, p, P, M, nnz, zero_nbytes, stride_xm, stride_ym,
             BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
             WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """This program's share ([s, e) of the row's groups) of a row that other programs share too; the last of them
    to arrive writes the row."""
    lane = tl.arange(0, BLOCK_R)
    mm = tl.arange(0, BLOCK_M)
    row_lo = tl.load(crow_ptr + row).to(tl.int64)
    row_hi = tl.load(crow_ptr + row + 1).to(tl.int64)
    first = tl.maximum(s, row_lo)
    count = tl.minimum(e, row_hi) - first
    acc = _rows_dot(x_ptr, stride_xm, M, col_ptr, values_ptr, scale_ptr, zero_ptr, zero_nbytes,
                    tl.where(lane == 0, first, 0), tl.where(lane == 0, count, 0),
                    BITS, GS, HAS_ZERO, WORDS, BLOCK_M, BLOCK_R, BLOCK_G)
    part = tl.sum(acc, axis=0)  # (BLOCK_M,): only lane 0 is non-zero
    tl.store(partial_ptr + (p * 2 + slot) * BLOCK_M + mm, part)
    tl.debug_barrier()  # every thread's slot store happens before the release below
    a = _program_of_group(row_lo, nnz, P)
    b = _program_of_group(row_hi - 1, nnz, P)
    arrived = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
    if arrived == b - a:  # the last of the b - a + 1 programs sharing the row
        total = tl.zeros((BLOCK_M,), tl.float32)
        for q in range(a, b + 1):
            q_slot = tl.where(q * nnz // P >= row_lo, 0, 1)  # the row holds q's first group, or else its last
            total += tl.load(partial_ptr + (q * 2 + q_slot) * BLOCK_M + mm, volatile=True)
        tl.atomic_xchg(counter_ptr + row, 0)  # ready for the next call
        rows = tl.zeros((1,), tl.int64) + row
        _store_rows(y_ptr, bias_ptr, rows, rows == row, total[None, :], M, stride_ym, HAS_BIAS, BLOCK_M)


@triton.jit
def decode_kernel(x_ptr, y_ptr, bias_ptr, crow_ptr, col_ptr, values_ptr, scale_ptr, zero_ptr, partial_ptr,
                  counter_ptr, M, N, nnz, zero_nbytes, stride_xm, stride_ym,
                  BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                  WORDS: tl.constexpr, TASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_G: tl.constexpr, FAN: tl.constexpr):
    """y (M, N) = x (M, K) @ W.T (+ bias) for M <= BLOCK_M <= 16; grid (P,), P <= nnz (task) or P <= N (rows).

    values_ptr: the codes as int32 words when WORDS (see _rows_dot), else as bytes.

    partial_ptr: (P, 2, BLOCK_M) float32 scratch; counter_ptr: (N,) int32, all zero between calls.
    """
    p = tl.program_id(0).to(tl.int64)
    P = tl.num_programs(0).to(tl.int64)
    if TASK:
        s = p * nnz // P
        e = (p + 1) * nnz // P
        r_first = _rows_ended_by(crow_ptr, s, N, FAN)  # the row holding group s
        if p == P - 1:
            r_last = N - 1 + tl.zeros((), tl.int64)  # trailing empty rows too
        else:
            r_end = _rows_ended_by(crow_ptr, e, N, FAN)  # the row holding group e
            r_last = tl.where(tl.load(crow_ptr + r_end).to(tl.int64) < e, r_end, r_end - 1)
        first_cut = (tl.load(crow_ptr + r_first).to(tl.int64) < s) | (tl.load(crow_ptr + r_first + 1) > e)
        last_cut = (r_last != r_first) & (tl.load(crow_ptr + r_last + 1) > e)
        if first_cut:
            _cut_row(x_ptr, y_ptr, bias_ptr, crow_ptr, col_ptr, values_ptr, scale_ptr, zero_ptr, partial_ptr,
                     counter_ptr, r_first, s, e, 0, p, P, M, nnz, zero_nbytes, stride_xm, stride_ym,
                     BITS, GS, HAS_ZERO, HAS_BIAS, WORDS, BLOCK_M, BLOCK_R, BLOCK_G)
        if last_cut:
            _cut_row(x_ptr, y_ptr, bias_ptr, crow_ptr, col_ptr, values_ptr, scale_ptr, zero_ptr, partial_ptr,
                     counter_ptr, r_last, s, e, 1, p, P, M, nnz, zero_nbytes, stride_xm, stride_ym,
                     BITS, GS, HAS_ZERO, HAS_BIAS, WORDS, BLOCK_M, BLOCK_R, BLOCK_G)
        full_first = r_first + first_cut.to(tl.int64)
        full_last = r_last - last_cut.to(tl.int64)
        if p == 0:  # rows before the first kept group keep nothing: y = bias (or 0)
            for r0 in range(0, r_first, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                _store_rows(y_ptr, bias_ptr, rows, rows < r_first, tl.zeros((BLOCK_R, BLOCK_M), tl.float32), M,
                            stride_ym, HAS_BIAS, BLOCK_M)
    else:
        full_first = p * N // P
        full_last = (p + 1) * N // P - 1
    lane = tl.arange(0, BLOCK_R)
    for r0 in range(full_first, full_last + 1, BLOCK_R):  # rows this program owns whole
        rows = r0 + lane
        rmask = rows <= full_last
        lo = tl.load(crow_ptr + rows, mask=rmask, other=0).to(tl.int64)
        hi = tl.load(crow_ptr + rows + 1, mask=rmask, other=0).to(tl.int64)
        acc = _rows_dot(x_ptr, stride_xm, M, col_ptr, values_ptr, scale_ptr, zero_ptr, zero_nbytes, lo, hi - lo,
                        BITS, GS, HAS_ZERO, WORDS, BLOCK_M, BLOCK_R, BLOCK_G)
        _store_rows(y_ptr, bias_ptr, rows, rmask, acc, M, stride_ym, HAS_BIAS, BLOCK_M)


@triton.jit
def prefill_kernel(x_ptr, y_ptr, bias_ptr, position_ptr, values_ptr, scale_ptr, zero_ptr,
                   M, N, K, zero_nbytes, stride_xm, stride_ym,
                   BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                   GPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """y (M, N) = x (M, K) @ W.T (+ bias); grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).

    position_ptr: (N, K // GS) int32, the kept-group index of each (row, column group), -1 where pruned
    (``group_positions``): the loads of a step do not depend on the previous step's, so they pipeline.
    IEEE: exact float32 products in tl.dot (for float32 x) instead of tf32.
    """
    NBYTES: tl.constexpr = GS * BITS // 8
    BK: tl.constexpr = GPS * GS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mmask = rm < M
    nmask = rn < N
    G = K // GS
    kk = tl.arange(0, BK)
    sub = kk // GS  # (BK,) which group of the step each k belongs to
    c = kk % GS
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for g0 in range(0, G, GPS):
        g = g0 + sub  # (BK,)
        pos = tl.load(position_ptr + rn[None, :] * G + g[:, None], mask=nmask[None, :] & (g < G)[:, None],
                      other=-1).to(tl.int64)  # (BK, BLOCK_N)
        hit = pos >= 0
        s = tl.load(scale_ptr + pos, mask=hit, other=0.0).to(tl.float32)
        z = _group_zero(zero_ptr, pos, hit, zero_nbytes, BITS, HAS_ZERO)
        base = pos * NBYTES
        q = _codes(values_ptr, base, c[:, None], hit, base + NBYTES, BITS)
        w = tl.where(hit, (q.to(tl.float32) - z) * s, 0.0).to(x_ptr.dtype.element_ty)  # (BK, BLOCK_N)
        kcol = g0 * GS + kk
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + kcol[None, :], mask=mmask[:, None] & (kcol < K)[None, :],
                     other=0.0)  # (BLOCK_M, BK)
        if IEEE:
            acc = tl.dot(xt, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def dequantize_kernel(w_ptr, position_ptr, values_ptr, scale_ptr, zero_ptr, N, K, zero_nbytes,
                      BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_G: tl.constexpr):
    """The dense weight w (N, K) in w's dtype, every element written (0 where pruned), exactly as
    ``dequantize_bsr``: float32 ``(code - zero_point) * scale`` rounded to w's dtype.

    position_ptr: (N, K // GS) int32 kept-group index, -1 where pruned (``group_positions``).
    Grid (cdiv(N, BLOCK_R), cdiv(K // GS, BLOCK_G)).
    """
    NBYTES: tl.constexpr = GS * BITS // 8
    G = K // GS
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (R,)
    cols = (tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)).to(tl.int64)  # (BG,) column groups
    inside = (rows < N)[:, None] & (cols < G)[None, :]  # (R, BG)
    pos = tl.load(position_ptr + rows[:, None] * G + cols[None, :], mask=inside, other=-1).to(tl.int64)
    hit = pos >= 0
    s = tl.load(scale_ptr + pos, mask=hit, other=0.0).to(tl.float32)
    z = _group_zero(zero_ptr, pos, hit, zero_nbytes, BITS, HAS_ZERO)
    c = tl.arange(0, GS)
    base = pos[:, :, None] * NBYTES  # (R, BG, 1)
    q = _codes(values_ptr, base, c[None, None, :], hit[:, :, None], base + NBYTES, BITS)  # (R, BG, GS)
    w = tl.where(hit[:, :, None], (q.to(tl.float32) - z[:, :, None]) * s[:, :, None], 0.0)
    offs = rows[:, None, None] * K + cols[None, :, None] * GS + c[None, None, :]
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=inside[:, :, None])
