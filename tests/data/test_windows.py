"""Tests for gqsa.data.windows: tokenizing a text and cutting evaluation and calibration windows."""

from __future__ import annotations

import pytest
import torch

from gqsa.data.windows import calibration_windows, eval_windows, tokenize_text
from tiny import SAMPLE_TEXT, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_tokenize_text_equals_encoding_the_whole_text(tokenizer):
    tokens = tokenize_text(tokenizer, SAMPLE_TEXT)
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert tokens.tolist() == tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokens.tolist()) == SAMPLE_TEXT


def test_tokenize_text_does_not_warn_about_long_sequences(tokenizer):
    tokenizer.model_max_length = 8
    tokenize_text(tokenizer, SAMPLE_TEXT * 3)
    # transformers records the warning here once it has been emitted.
    assert not tokenizer.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")


def test_tokenize_text_rejects_empty_text(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        tokenize_text(tokenizer, "")


def test_eval_windows_are_consecutive_non_overlapping_slices():
    tokens = torch.arange(103)
    windows = eval_windows(tokens, 10)
    assert windows.shape == (10, 10) and windows.dtype == torch.long
    for i in range(10):
        assert torch.equal(windows[i], tokens[i * 10 : (i + 1) * 10])
    windows[0, 0] = -1  # a copy: the token stream is not modified
    assert tokens[0] == 0


def test_eval_windows_max_tokens_rounds_down_to_full_windows():
    tokens = torch.arange(100, dtype=torch.int32)
    assert eval_windows(tokens, 10, max_tokens=35).shape == (3, 10)
    assert eval_windows(tokens, 10, max_tokens=40).shape == (4, 10)
    assert eval_windows(tokens, 10, max_tokens=10_000).shape == (10, 10)
    assert eval_windows(tokens, 10, max_tokens=35).dtype == torch.long
    assert torch.equal(eval_windows(tokens, 10, max_tokens=35).flatten(), torch.arange(30))


def test_eval_windows_errors_name_the_token_count():
    with pytest.raises(ValueError, match="only 7 tokens"):
        eval_windows(torch.arange(7), 8)
    with pytest.raises(ValueError, match="only 5 tokens available .max_tokens=5.*has 100 tokens"):
        eval_windows(torch.arange(100), 8, max_tokens=5)
    with pytest.raises(ValueError, match="seq_len"):
        eval_windows(torch.arange(10), 0)
    with pytest.raises(ValueError, match="max_tokens"):
        eval_windows(torch.arange(10), 2, max_tokens=0)
    with pytest.raises(ValueError, match="1-D"):
        eval_windows(torch.arange(10).reshape(2, 5), 2)
    with pytest.raises(ValueError, match="integer dtype"):
        eval_windows(torch.rand(10), 2)


def test_calibration_windows_are_slices_of_the_stream():
    tokens = torch.arange(1000)
    windows = calibration_windows(tokens, n_windows=16, seq_len=32, seed=0)
    assert windows.shape == (16, 32) and windows.dtype == torch.long
    starts = windows[:, 0]
    assert torch.equal(windows, starts[:, None] + torch.arange(32))
    assert int(starts.max()) <= 1000 - 32
    assert len(set(starts.tolist())) > 1


def test_calibration_windows_depend_only_on_the_seed():
    tokens = torch.arange(5000)
    torch.manual_seed(123)  # the global generator must not matter
    first = calibration_windows(tokens, 8, 16, seed=7)
    torch.manual_seed(456)
    assert torch.equal(first, calibration_windows(tokens, 8, 16, seed=7))
    assert not torch.equal(first, calibration_windows(tokens, 8, 16, seed=8))


def test_calibration_windows_can_cover_the_whole_stream():
    tokens = torch.arange(16)
    windows = calibration_windows(tokens, 3, 16, seed=0)
    assert torch.equal(windows, tokens.expand(3, 16))


def test_calibration_windows_errors():
    with pytest.raises(ValueError, match="only 15 tokens"):
        calibration_windows(torch.arange(15), 1, 16, seed=0)
    with pytest.raises(ValueError, match="n_windows"):
        calibration_windows(torch.arange(100), 0, 16, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        calibration_windows(torch.arange(100), 1, 0, seed=0)
    with pytest.raises(ValueError, match="integer dtype"):
        calibration_windows(torch.arange(100.0), 1, 4, seed=0)
