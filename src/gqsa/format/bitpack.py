"""Bit packing of 2/3/4/8-bit codes into bytes (docs/FORMAT.md, "Code packing").

Codes form a little-endian bit stream: code j occupies bits [j * bits, (j + 1) * bits) of the stream, and
stream bit i is bit (i % 8) of byte i // 8. For 4 bits this puts code 2i in the low nibble of byte i and
code 2i + 1 in the high nibble. Every 8 codes fill exactly ``bits`` bytes, so runs of codes whose length is
a multiple of 8 pack without padding. All functions are pure torch and run on any device.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (2, 3, 4, 8)
# Runs of 8 codes packed (or unpacked) per step: the int64 words of a step take 16 MiB, so packing a 7B layer
# does not hold 8-16 bytes per code at once (the whole layer at once: 0.7 GiB for Llama-2-7B's down_proj).
_RUNS_PER_STEP = 1 << 18


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits!r}")


def packed_nbytes(num_codes: int, bits: int) -> int:
    """Bytes needed for ``num_codes`` codes (the stream is padded with zero bits to whole bytes)."""
    _check_bits(bits)
    return (num_codes * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along the last dimension.

    Args:
        codes: (..., n) uint8 codes in [0, 2**bits - 1], n a multiple of 8.
        bits: 2, 3, 4 or 8.

    Returns:
        (..., n * bits // 8) uint8.

    Raises:
        ValueError: bad bits, a last dimension that is not a multiple of 8, a non-uint8 input, or a code
            out of range.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack_bits expects uint8 codes, got {codes.dtype}")
    n = codes.shape[-1]
    if n % 8 != 0:
        raise ValueError(f"pack_bits packs runs of 8 codes; last dimension {n} is not a multiple of 8")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    if bits == 8:
        return codes.clone()
    lead = codes.shape[:-1]
    runs = codes.reshape(-1, 8)  # (R, 8): runs of 8 codes
    out = torch.empty(runs.shape[0], bits, dtype=torch.uint8, device=codes.device)  # (R, bits)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    for r in range(0, runs.shape[0], _RUNS_PER_STEP):
        word = (runs[r: r + _RUNS_PER_STEP].to(torch.int64) << shifts).sum(dim=-1)  # 8 codes in 8*bits <= 32 bits
        out[r: r + _RUNS_PER_STEP] = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(*lead, n // 8 * bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``.

    Args:
        packed: (..., n * bits // 8) uint8.
        n: number of codes per row (a multiple of 8).

    Returns:
        (..., n) uint8 codes.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_bits expects uint8, got {packed.dtype}")
    if n % 8 != 0 or packed.shape[-1] != n * bits // 8:
        raise ValueError(f"unpack_bits: last dimension {packed.shape[-1]} does not hold {n} codes of {bits} bits")
    if bits == 8:
        return packed.clone()
    lead = packed.shape[:-1]
    runs = packed.reshape(-1, bits)  # (R, bits): the bytes of 8 codes each
    codes = torch.empty(runs.shape[0], 8, dtype=torch.uint8, device=packed.device)  # (R, 8)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    for r in range(0, runs.shape[0], _RUNS_PER_STEP):
        word = (runs[r: r + _RUNS_PER_STEP].to(torch.int64) << byte_shifts).sum(dim=-1)
        codes[r: r + _RUNS_PER_STEP] = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*lead, n)


def pack_bits_padded(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D run of any length, padding with zero codes to a multiple of 8. (n,) -> (ceil(n*bits/8),)."""
    n = codes.numel()
    padded = torch.zeros(((n + 7) // 8) * 8, dtype=torch.uint8, device=codes.device)
    padded[:n] = codes.reshape(-1)
    return pack_bits(padded, bits)[: packed_nbytes(n, bits)]


def unpack_bits_padded(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits_padded``: (ceil(n*bits/8),) -> (n,) uint8."""
    if packed.dim() != 1 or packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"expected {packed_nbytes(n, bits)} bytes for {n} codes of {bits} bits, got {packed.numel()}")
    full = ((n + 7) // 8) * 8
    buf = torch.zeros(full * bits // 8, dtype=torch.uint8, device=packed.device)
    buf[: packed.numel()] = packed
    return unpack_bits(buf, bits, full)[:n]
