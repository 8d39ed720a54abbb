"""Choosing the next token: greedy is argmax, top-p is transformers' nucleus, seeded draws follow the probabilities."""

import pytest
import torch

from gqsa.engine.sampling import logits_to_probs, sample


def test_greedy_is_argmax_per_row():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits).tolist() == [1, 0]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    torch.testing.assert_close(logits_to_probs(logits, 1.0, 0.8), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert (logits_to_probs(logits, 1.0, 0.81) > 0).tolist() == [True, True, True, False]
    assert (logits_to_probs(logits, 1.0, 0.01) > 0).tolist() == [True, False, False, False]  # the top one stays
    torch.testing.assert_close(logits_to_probs(logits, 1.0, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_nucleus_and_temperature_match_transformers(top_p, temperature):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(7)) * 3  # (B, V)
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    want = torch.softmax(warped, dim=-1)
    torch.testing.assert_close(logits_to_probs(logits, temperature, top_p), want)


def test_seeded_draws_reproduce_and_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.log().expand(4000, 4)  # (draws, V)

    def draw(seed):
        return sample(logits, 1.0, 1.0, torch.Generator().manual_seed(seed))

    first = draw(0)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(first, draw(0)) and not torch.equal(first, draw(1))
    freq = torch.bincount(first, minlength=4).float() / first.numel()
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
