"""Tests for gqsa.eval.perplexity against a direct cross-entropy on the full logits."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import gqsa.eval.perplexity as perplexity_module
from gqsa.eval.perplexity import PerplexityResult, perplexity
from tiny import ARCHITECTURES, VOCAB_SIZE, tiny_model

SEQ_LEN = 24


def _sharpened(model):
    """Scale the output head so logits are far from uniform: an off-by-one target would change the NLL a lot."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model


def _windows(n: int, seq_len: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def _reference_nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits  # (n, L, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_matches_cross_entropy_on_full_logits(arch):
    overrides = {"final_logit_softcapping": 5.0} if arch == "gemma3_text" else {}
    model = _sharpened(tiny_model(arch, **overrides))
    ids = _windows(4)
    expected = _reference_nll(model, ids)
    assert expected > 6.0  # far from the uniform log(320) = 5.77, so the test can tell targets apart
    result = perplexity(model, ids, batch_size=2, progress=False)
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-5)
    assert (result.tokens, result.seq_len, result.windows) == (4 * (SEQ_LEN - 1), SEQ_LEN, 4)


def test_gemma2_softcapping_matches_full_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=4.0,
    )
    model = _sharpened(Gemma2ForCausalLM(config).eval())
    ids = _windows(2)
    assert perplexity(model, ids, progress=False).nll == pytest.approx(_reference_nll(model, ids), rel=1e-5)


def test_batch_size_and_chunking_do_not_change_the_result(monkeypatch):
    model = _sharpened(tiny_model("llama"))
    ids = _windows(5)
    one = perplexity(model, ids, batch_size=1, progress=False)
    three = perplexity(model, ids, batch_size=3, progress=False)  # batches of 3 and 2
    # Chunks of 7 positions per window: 23 targets = 3 full chunks and a tail of 2.
    monkeypatch.setattr(perplexity_module, "_CHUNK_ELEMENTS", 7 * 3 * VOCAB_SIZE)
    chunked = perplexity(model, ids, batch_size=3, progress=False)
    assert three.nll == pytest.approx(one.nll, rel=1e-6)
    assert chunked.nll == pytest.approx(one.nll, rel=1e-6)
    assert one.tokens == three.tokens == chunked.tokens == 5 * (SEQ_LEN - 1)


def test_unknown_architecture_uses_the_model_logits(monkeypatch):
    model = _sharpened(tiny_model("qwen3"))
    ids = _windows(3)
    expected = perplexity(model, ids, progress=False)
    monkeypatch.setattr(perplexity_module, "_HEAD_ON_HIDDEN_STATES", frozenset())
    monkeypatch.setattr(perplexity_module, "_CHUNK_ELEMENTS", 5 * VOCAB_SIZE)
    assert perplexity(model, ids, progress=False).nll == pytest.approx(expected.nll, rel=1e-6)


def test_windows_are_scored_independently():
    model = _sharpened(tiny_model("llama"))
    ids = _windows(3)
    alone = [perplexity(model, ids[i : i + 1], progress=False).nll for i in range(3)]
    together = perplexity(model, ids, batch_size=3, progress=False).nll
    assert together == pytest.approx(sum(alone) / 3, rel=1e-6)


class _NextTokenModel(torch.nn.Module):
    """A hand-built LM over a cyclic vocabulary: predicts token (t + 1) % V with a huge logit, or is uniform."""

    def __init__(self, vocab_size: int, confident: bool = True):
        super().__init__()
        self.config = SimpleNamespace(model_type="next_token_toy", vocab_size=vocab_size)
        self.scale = torch.nn.Parameter(torch.tensor(1e4 if confident else 0.0))

    def forward(self, input_ids, use_cache=False):
        next_token = (input_ids + 1) % self.config.vocab_size  # (B, L)
        logits = F.one_hot(next_token, self.config.vocab_size).float() * self.scale  # (B, L, V)
        return SimpleNamespace(logits=logits)


def test_perfect_predictor_has_perplexity_one():
    ids = (torch.arange(16) + torch.tensor([[0], [5]])) % 11  # (2, 16), each token is the previous + 1
    result = perplexity(_NextTokenModel(11), ids, progress=False)
    assert result.ppl == pytest.approx(1.0, abs=1e-6)
    assert result.nll == pytest.approx(0.0, abs=1e-6)
    assert result.tokens == 2 * 15


def test_uniform_predictor_has_perplexity_equal_to_vocab_size():
    ids = _windows(2, seed=3) % 11
    assert perplexity(_NextTokenModel(11, confident=False), ids, progress=False).ppl == pytest.approx(11.0)


def test_wrong_predictor_is_penalised():
    # Tokens go down by one, the model predicts up by one: every target has probability ~exp(-1e4).
    ids = torch.arange(15, -1, -1)[None] % 11
    assert perplexity(_NextTokenModel(11), ids, progress=False).ppl == math.inf


def test_result_to_dict_and_progress_bar(capsys):
    result = perplexity(_NextTokenModel(7), torch.arange(8)[None] % 7, progress=True)
    assert result.to_dict() == {"ppl": result.ppl, "nll": result.nll, "tokens": 7, "seq_len": 8, "windows": 1}
    assert isinstance(result, PerplexityResult)
    assert "perplexity" in capsys.readouterr().err


def test_invalid_inputs_raise():
    model = _NextTokenModel(7)
    with pytest.raises(ValueError, match="2-D"):
        perplexity(model, torch.arange(8), progress=False)
    with pytest.raises(ValueError, match="integer dtype"):
        perplexity(model, torch.zeros(1, 8), progress=False)
    with pytest.raises(ValueError, match="seq_len >= 2"):
        perplexity(model, torch.zeros(3, 1, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, torch.zeros(0, 8, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, torch.zeros(1, 8, dtype=torch.long), batch_size=0, progress=False)
