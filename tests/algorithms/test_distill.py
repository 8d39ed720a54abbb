"""Distillation from the dense model: the teacher's top-k, the coarsened KL, and E2E-OQP trained on it."""

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer
from torch.nn import functional as F

from gqsa.algorithms.distill import TeacherTopK, teacher_top_k, top_k_kl
from gqsa.compress import compress_model
from gqsa.config import CalibSpec, CompressConfig, E2ESpec, QuantSpec, SparsitySpec
from gqsa.models.surgery import packed_layers


def _teacher_of(logits: torch.Tensor, k: int) -> TeacherTopK:
    """A TeacherTopK built by hand from (B, L, V) logits (independent of teacher_top_k)."""
    logp = logits.log_softmax(-1)
    top, idx = logp.topk(k, dim=-1)
    rest = logp.sort(dim=-1, descending=True).values[..., k:].logsumexp(-1)  # -inf when k is the vocabulary
    return TeacherTopK(idx.to(torch.int32), top, rest)


def test_with_every_token_kept_it_is_the_full_kl():
    gen = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    full = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    assert torch.allclose(top_k_kl(s, _teacher_of(t, 11)), full, atol=1e-6)


def test_top_k_is_the_kl_of_the_distributions_coarsened_to_k_plus_one_outcomes():
    gen = torch.Generator().manual_seed(1)
    t, s = torch.randn(1, 4, 30, generator=gen) * 3, torch.randn(1, 4, 30, generator=gen) * 3
    k = 5
    teacher = _teacher_of(t, k)
    p, q = t.softmax(-1), s.softmax(-1)
    expected = 0.0
    for pos in range(4):
        kept = teacher.indices[0, pos].long()
        others = torch.ones(30, dtype=torch.bool)
        others[kept] = False
        pc = torch.cat([p[0, pos, kept], p[0, pos, others].sum()[None]])
        qc = torch.cat([q[0, pos, kept], q[0, pos, others].sum()[None]])
        expected += float((pc * (pc / qc).log()).sum()) / 4
    assert float(top_k_kl(s, teacher)) == pytest.approx(expected, rel=1e-5)
    # a student that puts the same mass on the k tokens and on the rest has zero divergence, however it
    # spreads the rest; any other student has a positive one
    same = t.clone()
    for pos in range(4):
        others = torch.ones(30, dtype=torch.bool).scatter(0, teacher.indices[0, pos].long(), False)
        same[0, pos, others] = t[0, pos, others].flip(0)  # the other tokens' logits swapped among themselves
    assert not torch.equal(same, t)
    assert float(top_k_kl(same, teacher)) == pytest.approx(0.0, abs=1e-6)
    assert float(top_k_kl(s, teacher)) > 0.01


def test_a_teacher_with_no_mass_left_gives_finite_gradients():
    t = torch.full((1, 2, 4), -1e4)
    t[..., 0] = 10.0  # all the mass on token 0; k = 4 keeps everything and the rest is exactly 0
    teacher = TeacherTopK(torch.arange(4, dtype=torch.int32).expand(1, 2, 4).contiguous(),
                          t.log_softmax(-1), torch.full((1, 2), float("-inf")))
    s = torch.zeros(1, 2, 4, requires_grad=True)
    loss = top_k_kl(s, teacher)
    loss.backward()
    loss = loss.detach()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert float(loss) == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-4)  # KL(one-hot || uniform)


def test_teacher_top_k_keeps_the_dense_models_most_likely_tokens_and_leaves_it_unchanged():
    model = _model()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    teacher = teacher_top_k(model, ids, k=8)
    assert teacher.indices.shape == (3, 16, 8) and teacher.indices.dtype == torch.int32
    assert teacher.rest.shape == (3, 16)
    with torch.no_grad():
        logits = model(ids).logits
    expected = _teacher_of(logits, 8)
    assert torch.equal(teacher.indices, expected.indices)
    assert torch.allclose(teacher.logprobs, expected.logprobs, atol=1e-5)
    # the k log-probabilities and the rest are one distribution
    total = torch.logsumexp(torch.cat([teacher.logprobs, teacher.rest[..., None]], -1), -1)
    assert torch.allclose(total, torch.zeros_like(total), atol=1e-5)
    assert model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="top-k must be in"):
        teacher_top_k(model, ids, k=321)


def _model():
    """The tiny random Llama with initial weights 10x the default spread: peaked next-token distributions, which
    compression changes measurably (the default's are nearly uniform)."""
    return tiny_model("llama", initializer_range=0.2)


def _config(distill: float, epochs: int = 3) -> CompressConfig:
    return CompressConfig(quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(ratio=0.5),
                          calib=CalibSpec(samples=10, seq_len=32),
                          e2e=E2ESpec(epochs=epochs, lr=3e-3, batch_size=2, val_windows=3, patience=3,
                                      distill=distill, distill_top_k=16))


def test_e2e_oqp_on_the_kl_brings_the_compressed_model_closer_to_the_dense_one():
    calib = torch.randint(0, 320, (10, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = _model()(calib[-3:]).logits  # the held-out windows
    held_out = _teacher_of(dense, 16)

    def kl_to_dense(model):
        with torch.no_grad():
            return float(top_k_kl(model(calib[-3:]).logits, held_out))

    untrained = _model()
    compress_model(untrained, _config(1.0, epochs=0), calib_ids=calib, progress=False)
    model = _model()
    report = compress_model(model, _config(1.0), calib_ids=calib, progress=False)
    e2e = report["e2e"]
    assert "top-16 KL" in e2e["objective"] and e2e["objective"].startswith("0 * next-token")
    assert e2e["loss_before"] == pytest.approx(kl_to_dense(untrained), rel=1e-4)  # the objective is that KL
    assert e2e["loss_after"] < 0.98 * e2e["loss_before"]
    assert kl_to_dense(model) == pytest.approx(e2e["loss_after"], rel=1e-4)
    assert report["config"]["e2e"]["distill"] == 1.0
    # the mixed objective is its weighted sum with the next-token loss
    mixed = compress_model(_model(), _config(0.25, epochs=1), calib_ids=calib, progress=False)["e2e"]
    lm = compress_model(_model(), _config(0.0, epochs=1), calib_ids=calib, progress=False)["e2e"]
    assert mixed["loss_before"] == pytest.approx(0.75 * lm["loss_before"] + 0.25 * e2e["loss_before"], rel=1e-4)
    assert lm["objective"] == "next-token loss"


def test_distillation_needs_a_teacher_and_a_whole_model(tmp_path):
    from gqsa.algorithms.e2e_oqp import e2e_oqp
    from gqsa.models.lazy import load_model_lazily

    calib = torch.randint(0, 320, (10, 32), generator=torch.Generator().manual_seed(0))
    model = _model()
    compress_model(model, _config(0.0, epochs=0), calib_ids=calib, progress=False)
    codes = {n: m.packed_weight().scale.clone() for n, m in packed_layers(model).items()}
    with pytest.raises(ValueError, match="needs the dense model's top-k"):
        e2e_oqp(model, calib, _config(0.5).e2e)
    assert all(torch.equal(m.packed_weight().scale, codes[n]) for n, m in packed_layers(model).items())
    _model().save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    lazy, _ = load_model_lazily(str(tmp_path / "dense"))
    with pytest.raises(ValueError, match="without --lazy-load"):
        compress_model(lazy, _config(0.5), calib_ids=calib, progress=False)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="distill"):
            E2ESpec(distill=bad)
