"""Triton kernels of the ``triton-a8`` backend: decode (M <= 16) on the sliced layout with int8 activations.

Imported lazily (by gqsa.ops.gpu_a8, on the first call), never by ``import gqsa``. Under ``TRITON_INTERPRET=1``
(set before the import) they run on CPU tensors through Triton's interpreter; ``ASM=False`` then replaces the
``dp4a`` instruction by the same integer arithmetic.

``quantize_x_kernel``: x (M, K) float -> int8 per group of 16 inputs, exactly as
``gqsa.quant.int8_activations.quantize_activations`` (``xs = amax / 127``, ``q = round_half_even(x * (127 / amax))``,
both divisions correctly rounded), with the bytes of each group permuted for the weights' code width (see
``x_byte_source``) and, per group, (xs, sum of q) as two float32 (the sum is an integer below 2**11: exact).

``sliced_gemv_kernel``: one program per slice of the layout (gqsa.ops.sliced_layout), the longest slices first.
A program walks its slice's slots BLOCK_S at a time: every code plane and the meta plane with 16-byte loads along
the slots, the activation words of each kept group gathered (x is small and stays in L1/L2). Per kept group and
16 inputs: 4 ``dp4a`` (unsigned codes x signed activations, exact int32), ``d - zero * sum(q)`` removes the zero
point exactly, then one float32 multiply by the activation scale; the group's sum is scaled by the weight's scale
and accumulated in float32. ``y = sum_groups s_w * sum_16 xs * (sum (q_w - z) * q_x)``: the reference op applied
to the dequantized int8 activations, up to float32 rounding.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # how triton.jit wrapped the kernels below
ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds a float32 |v| < 2**22 to the nearest, ties to even


@triton.jit
def dp4a(a, b, c, ASM: tl.constexpr):
    """c + the dot product of a's four unsigned bytes with b's four signed bytes (int32 tensors)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = c
        for i in tl.static_range(4):
            r += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return r


@triton.jit
def x_byte_source(p, BITS: tl.constexpr):
    """Input (0..15, within a group of 16) held by byte p of the group's quantized activations.

    Activation word t = 4 bytes meets ``(code_word >> (BITS * (t % SH))) & mask`` of code word ``t // SH`` of
    the 16 inputs (SH = 8 // BITS shifts per word): its byte j holds input ``(t // SH) * (32 // BITS) + j * SH
    + t % SH``, the code in byte lane j of that masked word.
    """
    SH: tl.constexpr = 8 // BITS
    t = p // 4
    j = p % 4
    return (t // SH) * (32 // BITS) + j * SH + t % SH


@triton.jit
def quantize_x_kernel(x_ptr, xq_ptr, xsc_ptr, G, stride_xm, BITS: tl.constexpr, BLOCK_A: tl.constexpr):
    """x (M, 16 G) -> xq (M, 16 G) int8 (bytes permuted by x_byte_source), xsc (M, G, 2) float32 (xs, sum q).

    Grid (M, cdiv(G, BLOCK_A)).
    """
    m = tl.program_id(0).to(tl.int64)
    a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)  # (A,) activation groups
    amask = a < G
    p = tl.arange(0, 16)
    src = x_byte_source(p, BITS)
    xv = tl.load(x_ptr + m * stride_xm + a[:, None] * 16 + src[None, :], mask=amask[:, None],
                 other=0.0).to(tl.float32)  # (A, 16)
    amax = tl.max(tl.abs(xv), axis=1)
    inv = tl.where(amax > 0, tl.math.div_rn(tl.full(amax.shape, 127.0, tl.float32), tl.maximum(amax, 1e-30)),
                   0.0)
    q = (xv * inv[:, None] + ROUND_MAGIC) - ROUND_MAGIC
    tl.store(xq_ptr + m * G * 16 + a[:, None] * 16 + p[None, :], q.to(tl.int8), mask=amask[:, None])
    xs = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
    tl.store(xsc_ptr + m * G * 2 + a * 2, xs, mask=amask)
    tl.store(xsc_ptr + m * G * 2 + a * 2 + 1, tl.sum(q, axis=1), mask=amask)


@triton.jit
def sliced_gemv_kernel(xw_ptr, xsc_ptr, words_ptr, slices_ptr, rows_ptr, bias_ptr, y_ptr, M, G, stride_ym,
                       BITS: tl.constexpr, GS: tl.constexpr, R: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, ASM: tl.constexpr):
    """y (M, N) = dequant(xq) (M, K) @ W.T (+ bias) for M <= BLOCK_M; grid (n_slices,).

    xw_ptr: the quantized activations (M, 16 G) as int32 words (M, 4 G); xsc_ptr: (M, G, 2) float32;
    words_ptr, slices_ptr, rows_ptr: the sliced layout (R rows per slice).
    """
    WPG: tl.constexpr = GS * BITS // 32  # code words per kept group
    WPS: tl.constexpr = BITS // 2  # code words per 16 inputs
    SH: tl.constexpr = 8 // BITS  # masked shifts per code word
    NSUB: tl.constexpr = GS // 16  # activation groups per kept group
    ZB: tl.constexpr = 16 - BITS  # bits of the column group in the meta word
    LANES: tl.constexpr = (1 << BITS) - 1
    MASK4: tl.constexpr = LANES * 0x01010101 if BITS < 8 else 0  # the code bits of each byte (BITS < 8)
    s = tl.program_id(0)
    offset = tl.multiple_of(tl.load(slices_ptr + 2 * s).to(tl.int64), 4)
    width = tl.load(slices_ptr + 2 * s + 1).to(tl.int64) * 4  # a multiple of 4 slots: 16-byte loads
    plane = R * width
    lane = tl.arange(0, R)
    mm = tl.arange(0, BLOCK_M)
    mmask = (mm < M)[:, None, None]  # (BM, 1, 1)
    x_row = mm.to(tl.int64)[:, None, None] * (4 * G)  # (BM, 1, 1) first word of each activation row
    sc_row = mm.to(tl.int64)[:, None, None] * (2 * G)
    acc = tl.zeros((BLOCK_M, R, BLOCK_S), tl.float32)
    for j0 in range(0, width, BLOCK_S):
        j = j0 + tl.arange(0, BLOCK_S)
        elem = offset + lane[:, None] * width + j[None, :]  # (R, BS) element of plane 0
        live = (lane[:, None] >= 0) & (j[None, :] < width)  # (R, BS)
        meta = tl.load(words_ptr + elem + WPG * plane, mask=live, other=0, eviction_policy="evict_first")
        col = (meta & ((1 << ZB) - 1)).to(tl.int64)
        zero = (meta >> ZB) & LANES
        w_scale = (meta >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        xlive = mmask & live[None, :, :]  # (BM, R, BS)
        part = tl.zeros((BLOCK_M, R, BLOCK_S), tl.float32)
        for sub in range(NSUB):  # a loop, not unrolled: large groups keep the registers of one
            act = col * NSUB + sub  # (R, BS) activation group of these 16 inputs
            x4 = tl.load(xw_ptr + x_row[:, :, :, None] + act[None, :, :, None] * 4 + tl.arange(0, 4)[None, None, None, :],
                         mask=xlive[:, :, :, None], other=0, eviction_policy="evict_last")  # (BM, R, BS, 4)
            x_even, x_odd = tl.split(tl.reshape(x4, (BLOCK_M, R, BLOCK_S, 2, 2)))
            x0, x2 = tl.split(x_even)
            x1, x3 = tl.split(x_odd)
            d = tl.zeros((BLOCK_M, R, BLOCK_S), tl.int32)
            for wl in tl.static_range(WPS):
                word = tl.load(words_ptr + elem + (sub * WPS + wl) * plane, mask=live, other=0,
                               eviction_policy="evict_first")[None, :, :]  # (1, R, BS)
                for sh in tl.static_range(SH):
                    # activation word wl * SH + sh (0..3)
                    xt = x0 if wl * SH + sh == 0 else (x1 if wl * SH + sh == 1 else (x2 if wl * SH + sh == 2 else x3))
                    piece = word >> (sh * BITS) if sh > 0 else word
                    if BITS < 8:  # 8-bit codes fill their bytes: nothing to mask
                        piece = piece & MASK4
                    d = dp4a(tl.broadcast_to(piece, (BLOCK_M, R, BLOCK_S)), xt, d, ASM)
            sc2 = tl.load(xsc_ptr + sc_row[:, :, :, None] + act[None, :, :, None] * 2 + tl.arange(0, 2)[None, None, None, :],
                          mask=xlive[:, :, :, None], other=0.0, eviction_policy="evict_last")  # (BM, R, BS, 2)
            x_scale, x_sum = tl.split(sc2)
            part += x_scale * (d - zero[None, :, :] * x_sum.to(tl.int32)).to(tl.float32)
        acc += w_scale[None, :, :] * part
    out = tl.sum(acc, axis=2)  # (BM, R)
    rows = tl.load(rows_ptr + s * R + lane)  # (R,) output rows, -1 for padding
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=rows >= 0, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + mm[:, None].to(tl.int64) * stride_ym + rows[None, :], out.to(y_ptr.dtype.element_ty),
             mask=(mm < M)[:, None] & (rows >= 0)[None, :])
