"""Fixtures shared by the tests that need a model or text on disk: a saved tiny llama with its tokenizer, and a
small text file (both per test module, so no module sees another's files).

Without a GPU, Triton's kernels run through its interpreter (tests/ops/test_ops_triton.py): TRITON_INTERPRET
must be in the environment before anything imports triton, because triton.language's own helpers (tl.sum, ...)
are wrapped for one mode or the other when triton is imported."""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The repository root, for the package `benchmarks` (benchmarks/bench: the benchmarks of `gqsa bench`, tests/bench).
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from tiny import SAMPLE_TEXT, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A tiny random llama saved as a transformers model directory, with its tokenizer."""
    path = tmp_path_factory.mktemp("dense") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small plain-text corpus (calibration and held-out parts both non-empty)."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text((SAMPLE_TEXT * 6).strip() + "\n")
    return path
