"""The ``gqsa`` command line: subcommands fill configs and call the library; results are printed here.

This file holds the parser, ``compress``, ``generate``, ``info`` and the error handling of every subcommand;
``eval`` is in cli_eval, ``bench`` (a runner of the repository's benchmarks/) in cli_bench, and what several
subcommands share (perplexity flags, ``--device``) in cli_common."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from gqsa.cli_bench import add_bench_parser, cmd_bench
from gqsa.cli_common import mib_text, require_tokenizer, resolve_device
from gqsa.cli_compress import add_compress_parser, cmd_compress
from gqsa.cli_eval import add_eval_parser, cmd_eval
from gqsa.utils import jsonio

logger = logging.getLogger("gqsa")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gqsa", description="Group quantization and sparsity for LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    add_compress_parser(sub)
    add_eval_parser(sub)

    g = sub.add_parser("generate", help="generate text with a model or compressed checkpoint")
    g.add_argument("model", nargs="?", default=None, help="model dir, gqsa checkpoint or .gguf (default model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling, in (0, 1]")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler (same seed, same text)")
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument("--lm-head-bits", type=int, choices=(4, 8), default=None,
                   help="pack the LM head W4/W8 g16 (sparsity 0) when loading: faster decoding, some accuracy")
    g.add_argument("--embedding-bits", type=int, choices=(4, 8), default=None,
                   help="pack the input embedding table W4/W8 g16 when loading: less memory (with --lm-head-bits "
                        "for a tied model, whose head otherwise keeps the dense table)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow to start)")
    g.add_argument("--no-fused", action="store_true",
                   help="decode through the model's own forward instead of gqsa's fused step (Llama family)")
    g.add_argument("--no-cuda-graph", action="store_true",
                   help="on CUDA, run the fused decode step eagerly instead of replaying it from a CUDA graph")
    g.add_argument("--device", default="cpu",
                   help="where the model runs: cpu (native kernels) or cuda / cuda:N (Triton kernels)")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="activations and dense weights (auto: float32 on CPU, float16 on CUDA); packed weights "
                        "keep their format")

    i = sub.add_parser("info", help="check and describe a compressed checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.add_argument("--skip-checksums", action="store_true",
                   help="do not hash the tensors (faster); the format's rules and the files' structure are still "
                        "checked")

    add_bench_parser(sub)
    return parser


def _generate(model, tokenizer, prompt: str, max_new_tokens: int, temperature=0.0, top_p=1.0, seed=0,
              chat=True, stream=False, compile=False, fused=None, cuda_graph=None):
    """Text generated after ``prompt`` by gqsa's decode loop (static KV cache), and the GenerationResult."""
    from gqsa.engine import GenerationSpec, generate_text

    spec = GenerationSpec(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          compile=compile, fused=fused, cuda_graph=cuda_graph)
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate_text(model, tokenizer, prompt, spec, chat=chat, streamer=streamer)


def _runresolve_device(name: str, dtype: str):
    """(torch.device, torch.dtype) of ``--device`` / ``--dtype``.

    Raises:
        ValueError: a device that is neither cpu nor an available CUDA device.
    """
    import torch

    device = resolve_device(name)
    if dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, dtype)


def cmd_generate(args) -> int:
    from gqsa.engine import GenerationSpec, use_fastest_backend
    from gqsa.models.loading import load_model

    GenerationSpec(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)  # fail early
    if not args.prompt:
        raise ValueError("--prompt is empty")
    device, dtype = _runresolve_device(args.device, args.dtype)
    model, tokenizer = load_model(args.model)
    require_tokenizer(args.model, tokenizer, "generation")
    if args.lm_head_bits:
        from gqsa.models.packing import pack_lm_head

        pack_lm_head(model, bits=args.lm_head_bits)
    if args.embedding_bits:
        from gqsa.models.packing import pack_embedding

        pack_embedding(model, bits=args.embedding_bits)
    model.to(device=device, dtype=dtype)
    backend = use_fastest_backend(model)
    text, result = _generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                             args.seed, chat=not args.no_chat_template, stream=args.stream, compile=args.compile,
                             fused=False if args.no_fused else None,
                             cuda_graph=False if args.no_cuda_graph or args.no_fused else None)
    if not args.stream:
        print(text)
    print(f"[backend {backend}, {result.step} step: {result.prompt_tokens} prompt tokens, {result.tokens.numel()} "
          f"new; time to first token {result.first_token_s:.2f} s, decode {result.decode_tok_s:.1f} tokens/s]",
          file=sys.stderr)
    return 0


def _pruned_info(path: Path, as_json: bool) -> int:
    """``gqsa info`` of a float baseline checkpoint (plain transformers files + gqsa_pruned.json)."""
    from gqsa.models.checkpoints import PRUNED_CONFIG_NAME

    record = json.loads((path / PRUNED_CONFIG_NAME).read_text())
    report = path / "report.json"
    if as_json:
        summary = json.loads(report.read_text())["summary"] if report.exists() else None
        print(jsonio.dumps({"path": str(path), **record, "summary": summary}, indent=1))
        return 0
    comp = record.get("compression") or {}
    sp = comp.get("sparsity", {})
    print(f"{path}: pruned float checkpoint (plain transformers files, zeros stored), gqsa "
          f"{record.get('gqsa_version')}")
    print(f"  compressed with {comp.get('method')}: {sp.get('pattern')} sparsity {sp.get('ratio')}")
    if report.exists():
        s = json.loads(report.read_text())["summary"]
        print(f"  {s['num_layers']} linear layers: {s['sparsity']:.1%} of weights pruned, "
              f"{s['bits_per_weight']:.3f} bits per weight in an fp16 sparse format")
    return 0


def cmd_info(args) -> int:
    from gqsa.format.checkpoint import checkpoint_info
    from gqsa.models.checkpoints import PRUNED_CONFIG_NAME, check_checkpoint, check_pruned_checkpoint

    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / PRUNED_CONFIG_NAME).is_file():
        check_pruned_checkpoint(path)
        return _pruned_info(path, args.json)
    check_checkpoint(path, verify_checksums=not args.skip_checksums)  # names what is wrong, as loading would
    info = checkpoint_info(path)
    if args.json:
        print(jsonio.dumps(info, indent=1))
        return 0
    print(f"{info['path']}: gqsa checkpoint, format version {info['format_version']}")
    print(f"  {info['num_layers']} packed layers, {info['bits_per_weight']:.3f} bits per weight, "
          f"{info['sparsity']:.1%} of groups pruned")
    print(f"  packed linear weights {mib_text(info['packed_bytes'])}, directory {mib_text(info['bytes'])}")
    if info["compression"]:
        q, s = info["compression"]["quant"], info["compression"]["sparsity"]
        target = (info["compression"].get("search") or {}).get("target_bpw")
        if info["compression"].get("layer_formats"):
            print(f"  compressed with {info['compression']['method']}: per-layer formats"
                  + (f" chosen for {target:g} bits per weight" if target else ""))
        else:
            print(f"  compressed with {info['compression']['method']}: W{q['bits']} g{q['group_size']}, "
                  f"sparsity {s['ratio']} ({s['allocation']})")
    mix: dict[str, int] = {}
    for layer in info["layers"].values():
        label = f"W{layer['bits']} g{layer['group_size']} sparsity {layer['sparsity']:.0%}"
        mix[label] = mix.get(label, 0) + 1
    if len(mix) > 1:
        print("  formats: " + ", ".join(f"{n} layers {label}" for label, n in sorted(mix.items())))
    return 0


# Errors in what the user gave (options, paths, files): exit 2, like argparse's own usage errors.
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                    PermissionError)
# OSErrors that say a path the user gave cannot be used as asked (a read-only file system for --out): bad input too.
_BAD_PATH_ERRNOS = frozenset({errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP})
EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_BROKEN_PIPE = 2, 1, 130, 143, 141
# What to do about an OSError of the machine, by errno.
_OS_ERROR_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "write to a writable file system",
    errno.EACCES: "choose a path you may write to, or change its permissions",
    errno.EPERM: "choose a path you may write to, or change its permissions",
}


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread so that ``finally`` blocks (temporaries, locks) still run."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"signal {signum}")


def _command_name(args: argparse.Namespace) -> str:
    """``compress``, ``eval ppl``, ``info``, ...: the words of the command line that chose the handler."""
    sub = getattr(args, "eval_command", None)
    return f"{args.command} {sub}" if args.command == "eval" and sub else args.command


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_error(exc: BaseException) -> str:
    """A one-line description of an error: an OSError as "<reason>: <path>[; what to do]", else its message.

    Args:
        exc: the exception.

    Returns:
        One line (newlines of multi-line messages are folded).
    """
    if isinstance(exc, OSError) and exc.strerror:
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        text = f"{exc.strerror}: {paths}" if paths else exc.strerror
        hint = _OS_ERROR_HINTS.get(exc.errno)
        return _one_line(f"{text}; {hint}" if hint else text)
    return _one_line(str(exc)) or type(exc).__name__


def _run_handler(handler, args: argparse.Namespace) -> int:
    """Run one subcommand; every error becomes one line on stderr and an exit code (see ``main``)."""
    import torch

    name = _command_name(args)
    resume = "; rerun the same command to resume" if args.command == "compress" else ""
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"gqsa {name}: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"gqsa {name}: terminated{resume}", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:  # the reader of stdout went away (`gqsa info DIR | head -1`): nothing to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush fails no more
        return EXIT_BROKEN_PIPE
    except BAD_INPUT_ERRORS as exc:
        if args.verbose:
            logger.exception("gqsa %s failed", name)
        print(f"gqsa {name}: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (MemoryError, torch.OutOfMemoryError) as exc:
        if args.verbose:
            logger.exception("gqsa %s failed", name)
        print(f"gqsa {name}: error: out of memory ({describe_error(exc)}); use a smaller model, fewer or shorter "
              "windows, or a smaller --activation-budget-mb", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        if args.verbose:
            logger.exception("gqsa %s failed", name)
        print(f"gqsa {name}: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT if exc.errno in _BAD_PATH_ERRNOS else EXIT_FAILURE
    except Exception as exc:  # anything else is a bug of gqsa or of a library: one line, traceback on request
        if args.verbose:
            logger.exception("gqsa %s failed", name)
        hint = "" if args.verbose else " (rerun with --verbose for the traceback)"
        print(f"gqsa {name}: internal error: {type(exc).__name__}: {describe_error(exc)}{hint}", file=sys.stderr)
        return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Run the ``gqsa`` command line.

    Exit codes: 0 success; 2 bad input (argparse's usage errors, ``BAD_INPUT_ERRORS``, a read-only file system
    for an output); 1 another OSError (the message names the path), out of memory, or an internal error (one line; ``--verbose`` adds the traceback);
    130 interrupted (Ctrl-C); 143 terminated (SIGTERM, turned into an exception while the command runs so that
    cleanup runs). Every error is one line on stderr: ``gqsa <command>: error: <what is wrong, what to do>``.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    handlers = {"compress": cmd_compress, "eval": cmd_eval, "generate": cmd_generate, "info": cmd_info,
                "bench": cmd_bench}
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return _run_handler(handlers[args.command], args)
    except Terminated:  # arrived after the handler's own error handling
        return EXIT_TERMINATED
    finally:
        if in_main_thread:  # None: a handler set outside Python, which cannot be put back; use the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
