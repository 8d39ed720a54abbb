"""Per-call cost of the kernels' cached index check (gqsa.ops.safety) on the CPU.

The op (``torch.ops.gqsa.linear``, backend "cpu") and a GQSALinear's bound fast path, at 576 x 576 W4 g16 50%
kept (a SmolLM2-135M attention projection), batch 1, one thread: each with the check as it is and with it
replaced by a no-op, interleaved in one run; best of ``--rounds`` rounds of ``--calls`` calls, in microseconds,
and the ratio checked / unchecked.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/index_check_overhead.py
"""

from __future__ import annotations

import argparse
import time

import torch

import gqsa.ops.direct as direct
import gqsa.ops.linear as linear
from gqsa.format import quantize_to_packed
from gqsa.nn.packed_linear import GQSALinear
from gqsa.ops.safety import check_kernel_indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    packed = quantize_to_packed(torch.randn(576, 576, generator=gen), torch.rand(576, 36, generator=gen) < 0.5, 4,
                                16)
    x = torch.randn(1, 576, generator=gen)
    layer = GQSALinear.from_packed(packed)
    tensors = tuple(packed.tensors_with_none().values())

    def op():
        return torch.ops.gqsa.linear(x, *tensors, None, 576, 576, 16, 4, "cpu")

    def bound():
        return layer(x)

    checks = {"checked": check_kernel_indices, "unchecked": lambda *a, **k: None}
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for mode, check in checks.items():
            linear.check_kernel_indices = direct.check_kernel_indices = check
            layer._bound = None  # bind again under this mode
            for path, fn in (("op", op), ("bound", bound)):
                fn()
                start = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                us = (time.perf_counter() - start) / args.calls * 1e6
                best[(path, mode)] = min(best.get((path, mode), float("inf")), us)
    linear.check_kernel_indices = direct.check_kernel_indices = check_kernel_indices
    print("| path | checked (us) | unchecked (us) | checked / unchecked |\n|---|---:|---:|---:|")
    for path in ("op", "bound"):
        a, b = best[(path, "checked")], best[(path, "unchecked")]
        print(f"| {path} | {a:.2f} | {b:.2f} | {a / b:.3f} |")


if __name__ == "__main__":
    main()
