"""``gqsa compress``: its parser (the preset, its overrides, ``--target-bpw``, memory and device flags) and its
handler (``gqsa.compress.run``, then a summary of the report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gqsa.cli_common import add_ppl_args, mib_text, ppl_source, resolve_device
from gqsa.utils import jsonio


def add_compress_parser(sub: argparse._SubParsersAction) -> None:
    """The ``compress`` subcommand added to ``sub``."""
    from gqsa.config import ALLOCATIONS, COMPRESS_METHODS, QPARAM_METHODS, SALIENCIES
    from gqsa.presets import DEFAULT_PRESET, PRESETS

    c = sub.add_parser("compress", help="compress a model into the packed GQSA format")
    c.add_argument("model", nargs="?", default=None, help="HF model dir or .gguf file (default: SmolLM2-135M)")
    c.add_argument("--out", required=True, help="output checkpoint directory")
    c.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of {sorted(PRESETS)} (default {DEFAULT_PRESET})")
    c.add_argument("--fast", action="store_true",
                   help="the preset's cheap variant: 32 x 512-token calibration windows, at most one BQPO epoch, no "
                        "E2E-OQP (flags given below still override it)")
    c.add_argument("--method", choices=COMPRESS_METHODS, help="override the preset's method")
    c.add_argument("--bits", type=int, help="override: code width (2, 3, 4, 8)")
    c.add_argument("--group-size", type=int, help="override: columns per group (power of two, 8..256)")
    c.add_argument("--sparsity", type=float, help="override: fraction of groups (or weights) pruned, in [0, 1)")
    c.add_argument("--allocation", choices=ALLOCATIONS, help="override: sparsity allocation")
    c.add_argument("--pattern", help="override: 'group' (packed GQSA), 'unstructured' or 'N:M' such as '2:4' "
                                     "(float baselines)")
    c.add_argument("--symmetric", action="store_true", help="symmetric quantization (no stored zero point)")
    c.add_argument("--qparams", choices=QPARAM_METHODS, help="override: how scales/zero points are chosen")
    c.add_argument("--saliency", choices=SALIENCIES, help="override: group importance of method gqsa")
    c.add_argument("--damp", type=float, help="override: Hessian dampening (relative to its mean diagonal)")
    c.add_argument("--calib-dataset", help="calibration text: packaged corpus name or .txt/.jsonl path (default wiki)")
    c.add_argument("--calib-samples", type=int, help="calibration windows (default: the preset's; 32 for w4s*)")
    c.add_argument("--seq-len", type=int, help="tokens per calibration window (default: the preset's; 512 for w4s*)")
    c.add_argument("--seed", type=int, help="seed of the calibration window sampler (default 0)")
    c.add_argument("--bqpo-epochs", type=int,
                   help="block-wise training epochs after the one-shot step (0 = off; w4s* presets: 2)")
    c.add_argument("--bqpo-lr-weight", type=float, help="BQPO learning rate of the weights")
    c.add_argument("--bqpo-lr-qparams", type=float, help="BQPO learning rate of scales and zero points")
    c.add_argument("--bqpo-mask-updates", type=int, metavar="N",
                   help="BQPO chooses each layer's kept groups again N times from the trained weights (mask frozen "
                        "in the last epoch; needs 2+ epochs; 0 = keep the one-shot mask)")
    c.add_argument("--bqpo-targets", choices=("dense", "compressed"),
                   help="BQPO matches the dense block's outputs on the dense model's inputs (default) or on the "
                        "compressed model's inputs")
    c.add_argument("--train-dtype", choices=("float32", "bfloat16"),
                   help="BQPO and E2E-OQP compute in this dtype (bfloat16: autocast; trained values stay float32)")
    c.add_argument("--e2e-epochs", type=int, help="end-to-end training epochs of the scales (0 = off; w4s*: 3)")
    c.add_argument("--e2e-lr", type=float, help="E2E-OQP learning rate of the scales")
    c.add_argument("--e2e-zero-point", action="store_true", help="E2E-OQP also trains the zero points")
    c.add_argument("--e2e-distill", type=float, metavar="W",
                   help="E2E-OQP loss: (1 - W) * next-token loss + W * KL from the dense model (0..1)")
    c.add_argument("--e2e-distill-top-k", type=int, metavar="K",
                   help="tokens of the dense model's distribution kept per position for --e2e-distill")
    c.add_argument("--target-bpw", type=float, metavar="B",
                   help="choose each layer's bits, group size and sparsity for at most B stored bits per weight "
                        "(Fisher-estimated KL from the dense model, checked on held-out calibration windows; "
                        "report.json's format_search says what it measured and its cost)")
    c.add_argument("--search-bits", type=_int_list, metavar="LIST", help="--target-bpw's code widths (default 2,3,4)")
    c.add_argument("--search-group-sizes", type=_int_list, metavar="LIST",
                   help="--target-bpw's group sizes (default 32,64,128)")
    c.add_argument("--search-ratios", type=_float_list, metavar="LIST",
                   help="--target-bpw's fractions of groups pruned (default 0,0.1,0.25,0.5)")
    c.add_argument("--search-uniform", action="store_true",
                   help="--target-bpw picks one format for every layer instead of one per layer")
    c.add_argument("--activation-budget-mb", type=int, default=None,
                   help="memory for calibration activations on the compute device (default: a quarter of its "
                        "memory); beyond it a GPU's go to host memory, then to disk")
    c.add_argument("--host-activation-budget-mb", type=int, default=None,
                   help="host memory for a GPU's calibration activations past --activation-budget-mb (default: a "
                        "quarter of RAM); beyond it they go to disk")
    c.add_argument("--offload-dir", default=None, help="where offloaded activations go (default: system temp dir)")
    c.add_argument("--lazy-load", action="store_true",
                   help="read the model block by block from its safetensors shards: host memory holds one dense "
                        "block, not the model (--eval then measures after compressing only)")
    c.add_argument("--device", default=None,
                   help="where calibration, the block-wise methods, training and evaluation compute: cpu or "
                        "cuda[:N] (default: a CUDA device when one is visible); the model itself stays on the CPU")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.add_argument("--eval", action="store_true", help="measure held-out perplexity before and after")
    add_ppl_args(c, prefix="eval-")
    c.add_argument("--sample-prompt", default=None, help="also generate a sample from this prompt after compressing")
    c.add_argument("--json", action="store_true", help="print the report as JSON")


def _resolve_compress_config(args):
    from gqsa.presets import resolve_config

    return resolve_config(
        args.preset, args.fast, method=args.method, bits=args.bits, group_size=args.group_size,
        sparsity=args.sparsity, allocation=args.allocation, pattern=args.pattern,
        symmetric=True if args.symmetric else None, qparams=args.qparams, saliency=args.saliency, damp=args.damp,
        calib_dataset=args.calib_dataset, calib_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed,
        bqpo_epochs=args.bqpo_epochs, bqpo_lr_weight=args.bqpo_lr_weight, bqpo_lr_qparams=args.bqpo_lr_qparams,
        bqpo_mask_updates=args.bqpo_mask_updates, bqpo_targets=args.bqpo_targets, train_dtype=args.train_dtype,
        e2e_epochs=args.e2e_epochs, e2e_lr=args.e2e_lr, e2e_zero_point=True if args.e2e_zero_point else None,
        e2e_distill=args.e2e_distill, e2e_distill_top_k=args.e2e_distill_top_k, target_bpw=args.target_bpw,
        search_bits=args.search_bits, search_group_sizes=args.search_group_sizes, search_ratios=args.search_ratios,
        search_per_layer=False if args.search_uniform else None)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _mib(mb: int | None, flag: str) -> int | None:
    """``mb`` MiB in bytes (None: not given, the library's default)."""
    if mb is None:
        return None
    if mb < 0:
        raise ValueError(f"{flag} must be >= 0, got {mb}")
    return mb * 2**20


def cmd_compress(args) -> int:
    from gqsa.compress import HeldoutSpec, run

    config = _resolve_compress_config(args)
    device = resolve_device(args.device)
    heldout = None
    if args.eval:
        heldout = HeldoutSpec(source=ppl_source(args, "eval_"), seq_len=args.eval_seq_len,
                              max_tokens=args.eval_max_tokens or None, batch_size=args.eval_batch_size)
    out = Path(args.out)
    report = run(out, config, args.model, overwrite=args.overwrite, heldout=heldout, sample_prompt=args.sample_prompt,
                 activation_budget_bytes=_mib(args.activation_budget_mb, "--activation-budget-mb"),
                 host_activation_budget_bytes=_mib(args.host_activation_budget_mb, "--host-activation-budget-mb"),
                 offload_dir=args.offload_dir, device=device, lazy_load=args.lazy_load)
    packed = config.sparsity.pattern == "group"
    if args.json:
        print(jsonio.dumps(report, indent=1))
        return 0
    s = report["summary"]
    q, sp = config.quant, config.sparsity
    print(f"compressed {report['model']} -> {out}")
    if packed:
        if "format_search" in report:
            fs = report["format_search"]
            mix = ", ".join(f"{n} x {label}" for label, n in fs["formats"].items())
            print(f"  method {config.method}, formats chosen for {config.search.target_bpw:g} bits per weight "
                  f"({fs['choice']}, search {fs['time_s']['total']:.0f} s): {mix}")
        elif config.layer_formats:
            print(f"  method {config.method}: per-layer formats ({len(config.layer_formats)} layers set)")
        else:
            print(f"  method {config.method}: W{q.bits} group {q.group_size} {'sym' if q.symmetric else 'asym'}, "
                  f"{sp.ratio:.0%} of groups pruned ({sp.allocation} allocation)")
        print(f"  {s['num_layers']} linear layers: {s['bits_per_weight']:.3f} bits per weight (all metadata "
              f"counted), {s['sparsity']:.1%} groups pruned")
        print(f"  model tensors: {mib_text(report['dense_model_bytes'])} dense fp32 -> {mib_text(s['model_bytes'])} "
              f"(linear layers {mib_text(s['weights_in_packed_layers'] * 4)} -> {mib_text(s['packed_bytes'])})")
    else:
        print(f"  method {config.method}: {sp.pattern} sparsity {sp.ratio:.0%}, kept weights in float "
              f"(saved as a plain transformers checkpoint with zeros)")
        print(f"  {s['num_layers']} linear layers: {s['sparsity']:.1%} of weights pruned, "
              f"{s['bits_per_weight']:.3f} bits per weight in an fp16 sparse format (docs/FORMAT.md)")
    if args.eval:
        a = report["ppl_after"]
        before = f"{report['ppl_before']['ppl']:.2f} -> " if "ppl_before" in report else ""
        print(f"  perplexity on held-out {a['dataset']} ({a['tokens']} tokens, windows of {a['seq_len']}): "
              f"{before}{a['ppl']:.2f}")
    if args.sample_prompt:
        print(f"  sample: {args.sample_prompt!r} -> {report['sample']['completion']!r}")
    print(f"  compression {report['wall_time_s']:.1f} s, peak memory {report['peak_rss_mb']:.0f} MiB")
    return 0
