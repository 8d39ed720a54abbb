"""Peak host memory of `gqsa compress --lazy-load` on a 7B-shaped model in two safetensors shards (issue 16).

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/lazy_memory.py --workdir /tmp/lazy7b \
        --json benchmarks/results/lazy_memory_7b-shaped-4l.json \
        --markdown benchmarks/results/lazy_memory_7b-shaped-4l.md

A random Llama with Llama-2-7B's block shapes (hidden 4096, MLP 11008, 32 heads), ``--blocks`` decoder blocks and
the default model's tokenizer (SmolLM2, 49,152 tokens) is saved in bfloat16 as ``--shards`` safetensors shards.
Then ``gqsa compress`` runs on it in a fresh process per case, as a user runs it:

* ``magnitude``: W4 g16 S50 magnitude pruning, no calibration;
* ``gqsa``: W4 g16 S50 GQSA one-shot (OBS saliency, error compensation) on ``--windows`` x ``--seq-len`` tokens;

each with ``--lazy-load`` (blocks read from the shards at their turn) and, for the contrast, loaded whole.

The parent samples the child's anonymous resident memory (``RssAnon`` of ``/proc/PID/status``: the pages of the
mapped weight files are not counted, they are the page cache's) every 5 ms, and reads the kernel's high-water
mark of all resident memory (``VmHWM``, mapped file pages included) at the end.

The bound for a lazy run starts from what the model holds once loaded lazily (measured: a process that loads it
with ``load_model_lazily`` and reports its resident memory; the interpreter, the libraries, the tokenizer and
everything outside the blocks in float32) and adds what the code holds per block, derived from the shapes
(float32 bytes):

    loaded + one dense block + the packed output of every block
    + activations (a block's calibration inputs and outputs: 2 x windows x tokens x hidden)
    + the method's largest working set:
        magnitude: 3 float copies of the largest weight (quantization's intermediates)
        gqsa:      the block's Hessians (one per distinct input: q/k/v, o, gate/up, down)
                   + 3 K^2 for the largest input width K (inverting the damped Hessian: its Cholesky factor, the
                     identity, L^-1; then H^-1 and its factor) + 3 working copies of that layer's weight

A loaded-whole run holds at least the dense model in float32 (outside + every block).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/lazy_memory.py`: the root, for the package benchmarks
    sys.path.insert(0, str(ROOT))

from benchmarks.bench.kernel_common import git_revision  # noqa: E402
from gqsa.utils.io import atomic_write_text  # noqa: E402

HIDDEN, MLP, HEADS = 4096, 11008, 32
MIB = 2**20
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "I64": 8}
LOADED = ("import sys, gqsa.cli, gqsa.cli_compress, gqsa.compress, gqsa.pipeline; "
          "from gqsa.models.lazy import load_model_lazily; m = load_model_lazily(sys.argv[1]); "
          "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('RssAnon:')][0])")


def build(path: Path, blocks: int, shards: int) -> dict:
    """Save the random 7B-shaped model (bfloat16, ``shards`` files) with the default model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gqsa.models.loading import load_model

    if (path / "config.json").is_file():
        files = sorted(p.name for p in path.glob("*.safetensors"))
    else:
        _, tokenizer = load_model(None)
        config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=blocks,
                             num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=len(tokenizer),
                             max_position_embeddings=4096, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # float32 init, one copy at a time in bf16
        total = sum(p.numel() * 2 for p in model.parameters())
        # whole tensors per shard: a quarter of slack so that the greedy split gives `shards` files
        model.save_pretrained(path, max_shard_size=f"{total * 5 // 4 // shards // MIB + 1}MB")
        tokenizer.save_pretrained(path)
        del model
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if len(files) != shards:
        raise SystemExit(f"{path}: {len(files)} shards, expected {shards} (remove the directory to rebuild)")
    return {"files": files, "bytes": sum((path / f).stat().st_size for f in files)}


def sizes(path: Path) -> dict:
    """Float32 bytes of the parts the bound is made of, from the saved config."""
    config = json.loads((path / "config.json").read_text())
    h, m, v, n = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
    block = 4 * (4 * h * h + 3 * h * m + 2 * h)
    outside = 4 * (2 * v * h + h)
    hessians = 4 * (3 * h * h + m * m)  # inputs of q/k/v, o, gate/up (K = h) and of down (K = m)
    largest = max((m, h), (h, m), key=lambda s: s[1])  # (N, K) of the layer with the largest K: down
    sweep = 4 * (3 * largest[1] ** 2 + 3 * largest[0] * largest[1])
    return {"blocks": n, "block": block, "outside": outside, "dense_model": outside + n * block,
            "hessians": hessians, "sweep": sweep, "largest_weight": 4 * m * h, "hidden": h}


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; its peak RssAnon (sampled every 5 ms), VmHWM at exit and wall seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, hwm = [0], [0]

    def read() -> None:
        try:
            for line in open(f"/proc/{proc.pid}/status"):
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
                elif line.startswith("VmHWM:"):
                    hwm[0] = max(hwm[0], int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass

    def sample() -> None:
        while proc.poll() is None:
            read()
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"peak_anon": peak[0], "vm_hwm": hwm[0], "seconds": time.perf_counter() - start, "stdout": out}


def block_bytes(checkpoint: Path) -> int:
    """Bytes of the decoder blocks' tensors in a checkpoint (its packed layers, norms and biases)."""
    from safetensors import safe_open

    total = 0
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if ".layers." in name:
                    t = f.get_slice(name)
                    total += math.prod(t.get_shape()) * DTYPE_BYTES[t.get_dtype()]
    return total


def bound(method: str, s: dict, loaded: int, packed: int, windows: int, seq_len: int) -> int:
    activations = 4 * 2 * windows * seq_len * s["hidden"]
    work = 3 * s["largest_weight"] if method == "magnitude" else s["hessians"] + s["sweep"]
    return loaded + s["block"] + packed + activations + work


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="where the model and checkpoints go (kept: a second run reuses the model)")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--methods", default="magnitude,gqsa")
    p.add_argument("--windows", type=int, default=2, help="gqsa one-shot calibration windows")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--no-whole", action="store_true", help="skip the loaded-whole runs")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gqsa-lazy-"))
    model = work / "model"
    saved = build(model, args.blocks, args.shards)
    s = sizes(model)
    loaded = int(measure([sys.executable, "-c", LOADED, str(model)])["stdout"].split()[-1])
    rows = []
    for method in args.methods.split(","):
        flags = (["--method", "magnitude"] if method == "magnitude" else
                 ["--method", "gqsa", "--calib-samples", str(args.windows), "--seq-len", str(args.seq_len)])
        for mode in ("lazy",) if args.no_whole else ("lazy", "whole"):
            out = work / f"{method}-{mode}"
            cmd = [sys.executable, "-m", "gqsa", "compress", str(model), "--out", str(out), "--overwrite",
                   "--bits", "4", "--group-size", "16", "--sparsity", "0.5", "--bqpo-epochs", "0", "--e2e-epochs",
                   "0", "--device", "cpu", *flags, *(["--lazy-load"] if mode == "lazy" else [])]
            m = measure(cmd)
            del m["stdout"]
            packed = block_bytes(out)
            row = {"method": method, "mode": mode, **m, "packed_block_bytes": packed,
                   "checkpoint_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}
            if mode == "lazy":
                row["bound"] = bound(method, s, loaded, packed, args.windows, args.seq_len)
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "gqsa": git_revision()}
    gib = 2**30
    vocab = s["outside"] // 8 // s["hidden"]
    lines = [f"{args.blocks} Llama-2-7B-shaped blocks (hidden 4096, MLP 11008), vocabulary {vocab:,}, "
             f"bf16 in {args.shards} safetensors shards ({saved['bytes'] / gib:.2f} GiB); W4 g16 S50; gqsa "
             f"{machine['gqsa']}, {machine['threads']} threads. Float32 sizes: one block {s['block'] / gib:.2f} GiB, "
             f"outside the blocks {s['outside'] / gib:.2f} GiB, dense model {s['dense_model'] / gib:.2f} GiB; "
             f"loaded lazily (interpreter, libraries, tokenizer, everything outside the blocks) "
             f"{loaded / gib:.2f} GiB.",
             "",
             "| method | loading | peak anonymous memory GiB | VmHWM GiB | bound GiB | peak / dense model | seconds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = f"{r['bound'] / gib:.2f}" if "bound" in r else "-"
        lines.append(f"| {r['method']} | {r['mode']} | {r['peak_anon'] / gib:.2f} | {r['vm_hwm'] / gib:.2f} | {b} | "
                     f"{r['peak_anon'] / s['dense_model']:.2f} | {r['seconds']:.0f} |")
    over = [r for r in rows if "bound" in r and r["peak_anon"] > r["bound"]]
    lines += ["", "every lazy run within its bound" if not over else
              f"OVER THE BOUND: {[(r['method'], r['peak_anon'], r['bound']) for r in over]}"]
    text = "\n".join(lines)
    print(text)
    result = {"machine": machine, "sizes": s, "loaded_lazily": loaded, "model": saved, "windows": args.windows,
              "seq_len": args.seq_len, "rows": rows}
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1) + "\n")
    if args.markdown:
        atomic_write_text(Path(args.markdown), text + "\n")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
