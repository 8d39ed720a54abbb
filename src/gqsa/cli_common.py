"""What several subcommands of the ``gqsa`` command line share: the held-out perplexity flags (``compress --eval-*``,
``eval ppl``) and their text source, the tokenizer a text command needs, and the resolution of ``--device``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_ppl_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument(f"--{prefix}dataset", default=None, help="packaged corpus: wiki, c4, code, technical, ...")
    src.add_argument(f"--{prefix}text-file", default=None, help="a .txt (blank-line separated) or .jsonl file")
    p.add_argument(f"--{prefix}seq-len", type=int, default=2048, help="tokens per evaluation window")
    p.add_argument(f"--{prefix}max-tokens", type=int, default=16384, help="held-out tokens scored (0 = all)")
    p.add_argument(f"--{prefix}batch-size", type=int, default=1, help="windows per forward pass")


def ppl_source(args: argparse.Namespace, prefix: str = ""):
    """The text of ``add_ppl_args``' flags (attribute prefix ``"eval_"`` for ``compress --eval-*``): a file as a
    Path, so that a file named like a packaged corpus ("code", "wiki") is still that file; else the corpus name."""
    text_file = getattr(args, prefix + "text_file")
    return Path(text_file) if text_file else (getattr(args, prefix + "dataset") or "wiki")


def require_tokenizer(model_path, tokenizer, what: str) -> None:
    """Refuse a model without tokenizer files (a checkpoint saved with ``gqsa.save(model, None, ...)``) for a
    command that reads or writes text."""
    if tokenizer is None:
        raise ValueError(f"{model_path} has no tokenizer files; {what} needs one (save the checkpoint with its "
                         "tokenizer)")


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
