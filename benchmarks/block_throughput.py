"""Seconds to compress one Llama-2-7B-shaped decoder block, one-shot and with BQPO, and the whole 7B extrapolated.

    PYTHONPATH=src python benchmarks/block_throughput.py --device cpu --windows 8 --seq-len 512 \
        --bqpo-windows 8 --json out.json --markdown out.md

A random Llama with 7B's block shapes (hidden 4096, MLP 11008, 32 heads; a 512-token vocabulary: the embedding
and head are not what is measured) and ``--blocks`` decoder blocks is compressed with ``gqsa.compress_model``:

* one-shot: method gqsa, W4 g16, 50% of groups pruned, OBS saliency, on ``--windows`` x ``--seq-len`` tokens;
* BQPO: the same one-shot step, then one BQPO epoch over ``--bqpo-windows`` windows (one held out for its early
  stopping, the others trained on), once per ``--train-dtype`` (float32; bfloat16 computes under autocast), with
  the block's held-out output MSE after training, so that a faster dtype is also seen to train as well.

Reported per stage: wall seconds per block (compress_model's own wall time over the blocks; the calibration
capture included), and the time for Llama-2-7B's 32 blocks extrapolated linearly in blocks and, for BQPO, in
training tokens to the paper's budget (``--target-windows`` x ``--target-seq-len``: 128 x 2048 by default), which
is what issue 16's targets are stated in. The extrapolation assumes the time grows linearly with tokens (the
sweep's cost does not depend on them: it is counted once), so it is an estimate, marked as such.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/block_throughput.py`: the root, for the package benchmarks
    sys.path.insert(0, str(ROOT))

from benchmarks.bench.kernel_common import git_revision  # noqa: E402
from gqsa.compress import compress_model  # noqa: E402
from gqsa.config import BQPOSpec, CalibSpec, CompressConfig, QuantSpec, SparsitySpec  # noqa: E402
from gqsa.utils.io import atomic_write_text  # noqa: E402

BLOCKS_7B = 32


def build(blocks: int, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=blocks, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=512, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.eval()


def stage(name: str, args: argparse.Namespace, config: CompressConfig) -> dict:
    model = build(args.blocks, "cpu")
    calib = torch.randint(0, 512, (config.calib.samples, config.calib.seq_len),
                          generator=torch.Generator().manual_seed(1))
    if args.device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    report = compress_model(model, config, calib_ids=calib, progress=False, device=args.device)
    if args.device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    per_block = seconds / args.blocks
    row = {"stage": name, "blocks": args.blocks, "windows": config.calib.samples, "seq_len": config.calib.seq_len,
           "seconds": seconds, "seconds_per_block": per_block, "model_7b_minutes": per_block * BLOCKS_7B / 60}
    if config.bqpo.epochs:
        row["train_dtype"] = config.bqpo.train_dtype
        row["bqpo_loss"] = [[b["loss_before"], b["loss_after"]] for b in report["bqpo_blocks"]]
        oneshot = args.oneshot_seconds_per_block
        train = max(0.0, per_block - oneshot)
        trained = (config.calib.samples - config.bqpo.val_windows) * config.calib.seq_len  # tokens trained on
        scale = args.target_windows * args.target_seq_len / trained
        row["train_seconds_per_block"] = train
        row["target_seconds_per_block_est"] = oneshot + train * scale
        row["target_7b_minutes_est"] = (oneshot + train * scale) * BLOCKS_7B / 60
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bqpo-windows", type=int, default=8, help="at least 2 (one is held out); 0: skip the BQPO stage")
    p.add_argument("--train-dtype", default="float32", help="BQPO compute dtypes, comma-separated (float32,bfloat16)")
    p.add_argument("--target-windows", type=int, default=128)
    p.add_argument("--target-seq-len", type=int, default=2048)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    if args.bqpo_windows == 1:
        p.error("--bqpo-windows must be 0 or at least 2 (one window is held out)")
    quant = dict(quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(ratio=0.5))
    rows = [stage("one-shot", args, CompressConfig(calib=CalibSpec(samples=args.windows, seq_len=args.seq_len),
                                                   **quant))]
    args.oneshot_seconds_per_block = rows[0]["seconds_per_block"]
    for dtype in args.train_dtype.split(",") if args.bqpo_windows else ():
        bqpo = BQPOSpec(epochs=1, val_windows=1, batch_size=1, train_dtype=dtype)
        name = "one-shot + BQPO 1 epoch" + ("" if dtype == "float32" else f" ({dtype})")
        rows.append(stage(name, args, CompressConfig(calib=CalibSpec(samples=args.bqpo_windows, seq_len=args.seq_len),
                                                     bqpo=bqpo, **quant)))
    machine = {"device": args.device, "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "gqsa": git_revision()}
    if args.device != "cpu":
        machine["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    lines = [f"Llama-2-7B-shaped blocks, W4 g16 S50, device {args.device}, {machine['threads']} threads, "
             f"gqsa {machine['gqsa']}", "",
             "| stage | windows x tokens | s per block | 7B (32 blocks) | at 128 x 2048 tokens, per block (est.) "
             "| 7B at 128 x 2048 (est.) | block MSE before -> after BQPO |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        est = (f"{r['target_seconds_per_block_est']:.0f} s | {r['target_7b_minutes_est']:.0f} min"
               if "target_seconds_per_block_est" in r else "- | -")
        loss = "; ".join(f"{a:.4g} -> {b:.4g}" for a, b in r.get("bqpo_loss", [])) or "-"
        lines.append(f"| {r['stage']} | {r['windows']} x {r['seq_len']} | {r['seconds_per_block']:.1f} | "
                     f"{r['model_7b_minutes']:.1f} min | {est} | {loss} |")
    text = "\n".join(lines)
    print(text)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    if args.markdown:
        atomic_write_text(Path(args.markdown), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
