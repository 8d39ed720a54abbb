"""A tiny program for Nsight Compute: one packed W4S50 g16 weight, a few calls of ``gqsa::linear`` per backend.

    PYTHONPATH=src ncu --clock-control none --kernel-name regex:'decode_kernel|sliced_gemv_kernel' \
        --launch-count 4 --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section MemoryWorkloadAnalysis python3 benchmarks/gpu_ncu_driver.py --backends triton

Builds one random (``--out-features``, ``--in-features``) weight on the device (default 11008 x 4096, Llama-2-7B's
gate/up projection), keeps a random half of its groups of 16 (``benchmarks.bench.kernel_common.random_group_mask``),
packs it W4 (``gqsa.format.quantize_to_packed``) and multiplies a ``--batch``-row fp16 x by it ``--calls`` times through
each ``--backends`` entry (``triton``; ``triton-a8`` where gqsa.ops offers it), synchronizing after each backend.
The first call of a backend compiles its Triton kernels before launching them, so every launch ncu sees is a
compiled kernel; profile one backend per ncu run to tell their results apart (``benchmarks/gpu_check.sh`` does).
Prints what it ran, one line per backend; exits 2 without a CUDA device (unless ``--device cpu``, a smoke test
under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # the repository's gqsa
sys.path.insert(0, str(ROOT))  # the package benchmarks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_ncu_driver.py", description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="triton,triton-a8",
                   help="comma-separated gqsa backends, in order; those not offered here are skipped with a line")
    p.add_argument("--out-features", type=int, default=11008)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1, help="rows of x (default 1: decoding)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of groups pruned")
    p.add_argument("--calls", type=int, default=3, help="calls per backend (default 3)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if min(args.out_features, args.in_features, args.batch, args.calls) < 1:
        p.error("--out-features, --in-features, --batch and --calls must be at least 1")
    if args.in_features % 16:
        p.error(f"--in-features must be a multiple of the group size 16, got {args.in_features}")
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks.bench.kernel_common import random_group_mask
    from gqsa.format import quantize_to_packed
    from gqsa.ops import available_backends, packed_linear

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_ncu_driver: error: no CUDA device visible to torch", file=sys.stderr)
        return 2
    n_out, k = args.out_features, args.in_features
    gen = torch.Generator(device=device).manual_seed(1)
    weight = torch.randn(n_out, k, generator=gen, device=device) * 0.02  # (N, K)
    mask = random_group_mask(n_out, k // 16, args.sparsity).to(device)  # (N, K / 16)
    packed = quantize_to_packed(weight, mask, 4, 16)
    x = torch.randn(args.batch, k, generator=gen, device=device).to(torch.float16)  # (M, K)
    offered = available_backends(device.type, approximate=True, named_only=True)
    status = 0
    for backend in (b for b in args.backends.split(",") if b):
        if backend not in offered:
            print(f"{backend}: skipped, not offered by gqsa.ops for {device.type} here")
            continue
        start = time.perf_counter()
        try:
            for _ in range(args.calls):
                y = packed_linear(x, packed, backend=backend)  # (M, N)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001 - report it and run the next backend
            print(f"{backend}: failed: {type(exc).__name__}: {exc}")
            status = 1
            continue
        print(f"{backend}: {args.calls} calls on {n_out}x{k} W4S{round(args.sparsity * 100)} g16, batch {args.batch}, "
              f"nnz {packed.col_indices.numel()}, y {tuple(y.shape)} {y.dtype}, "
              f"{time.perf_counter() - start:.2f} s with compilation")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
