"""``gqsa bench kernel|e2e``: a thin runner of the benchmarks, which live in the repository's benchmarks/bench/, not
in the installed package. An editable install (``pip install -e .`` of a clone) finds them next to its sources
(src/gqsa/../../benchmarks); a wheel install has none, and the command says so. Nothing else in the package
imports them."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

# gqsa bench WHAT -> the module of the repository that runs it: its main(argv) takes the arguments after WHAT
BENCHMARKS = {"kernel": "benchmarks.bench.kernel", "e2e": "benchmarks.bench.e2e"}


class BenchmarksNotFound(RuntimeError):
    """The repository's benchmarks/ directory is not next to the installed sources (a wheel install)."""


def benchmarks_dir() -> Path:
    """Where a source checkout keeps the benchmarks: benchmarks/ in the repository root, which holds src/gqsa."""
    import gqsa

    return Path(gqsa.__file__).resolve().parents[2] / "benchmarks"


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` subcommand, added to ``sub``: its arguments go to the benchmark unparsed."""
    b = sub.add_parser("bench", help="benchmarks (kernels and end to end)", add_help=False)
    b.add_argument("what", nargs="?", default="kernel", help="kernel or e2e")
    b.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="options of the benchmark (see gqsa bench kernel --help, gqsa bench e2e --help)")


def load_benchmark(what: str) -> ModuleType:
    """The module of benchmark ``what`` (a key of BENCHMARKS), imported from ``benchmarks_dir()``; the repository
    root goes on ``sys.path`` (where the spawned workers of ``gqsa bench e2e`` find it too).

    Raises:
        BenchmarksNotFound: no benchmarks/ with that module next to the sources, or a ``benchmarks`` package
            already imported from elsewhere.
    """
    directory = benchmarks_dir()
    name = BENCHMARKS[what]
    if not directory.joinpath(*name.split(".")[1:]).with_suffix(".py").is_file():
        raise BenchmarksNotFound(f"the benchmarks need a source checkout: benchmarks/ not found at {directory}; "
                                 "clone the repository and pip install -e .")
    root = str(directory.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module(name)
    if directory not in Path(module.__file__).resolve().parents:
        raise BenchmarksNotFound(f"{name} was imported from {module.__file__}, not from the checkout's {directory}")
    return module


def cmd_bench(args) -> int:
    if args.what in ("-h", "--help"):
        print("usage: gqsa bench kernel [--device cpu|cuda] [--shapes default-model|7b|13b[,...]] [--batch 1,4,16] "
              "[--sparsity 0.5[,...]] [--json PATH] ...\n"
              "       gqsa bench e2e [MODEL_OR_DIR] [--checkpoint DIR] [--shapes 7b] [--prompt-len 128] "
              "[--new-tokens 128] [--json [PATH]] ...")
        return 0
    if args.what not in BENCHMARKS:
        print(f"gqsa bench: unknown benchmark {args.what!r}; available: kernel, e2e", file=sys.stderr)
        return 2
    try:
        module = load_benchmark(args.what)
    except BenchmarksNotFound as exc:
        print(f"gqsa bench {args.what}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"gqsa bench {args.what}: the benchmark is not available in this install ({exc})", file=sys.stderr)
        return 2
    return module.main(args.bench_args)
