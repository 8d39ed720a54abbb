"""What several subcommands of the ``gqsa`` command line share: the held-out perplexity flags (``compress --eval-*``,
``eval ppl``) and the resolution of ``--device``."""

from __future__ import annotations

import argparse
import sys


def add_ppl_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument(f"--{prefix}dataset", default=None, help="packaged corpus: wiki, c4, code, technical, ...")
    src.add_argument(f"--{prefix}text-file", default=None, help="a .txt (blank-line separated) or .jsonl file")
    p.add_argument(f"--{prefix}seq-len", type=int, default=2048, help="tokens per evaluation window")
    p.add_argument(f"--{prefix}max-tokens", type=int, default=16384, help="held-out tokens scored (0 = all)")
    p.add_argument(f"--{prefix}batch-size", type=int, default=1, help="windows per forward pass")


def resolve_device(name: str | None):
    """The torch.device of ``--device``; None (not given): a CUDA device when one is visible (said on stderr),
    else the CPU.

    Raises:
        ValueError: a device that is neither cpu nor an available CUDA device.
    """
    import torch

    if name is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        print("gqsa: computing on cuda (a CUDA device is visible; --device cpu stays on the CPU)", file=sys.stderr)
        return torch.device("cuda")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def mib_text(n: float) -> str:
    """``n`` bytes as "12.3 MiB"."""
    return f"{n / 2**20:.1f} MiB"
