"""PackedEmbedding and pack_embedding: row lookups equal the packed table's dequantization exactly, the dense
table is released, the fused decode step and the model's own forward both use it, and checkpoints store it."""

import pytest
import torch
from torch import nn
from tiny import tiny_model

from gqsa.engine import GenerationSpec, generate
from gqsa.engine.fused import FusedDecoder
from gqsa.format import quantize_to_packed
from gqsa.models.packing import pack_embedding, pack_lm_head
from gqsa.nn import PackedEmbedding


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_dequantize_rows_equals_rows_of_the_dense_table(bits, symmetric):
    gen = torch.Generator().manual_seed(bits)
    for group_size in (8, 16, 32):
        w = torch.randn(37, group_size * 7, generator=gen)  # (N, K)
        mask = torch.rand(37, 7, generator=gen) < 0.5  # (N, G): rows of every length
        mask[0], mask[5] = True, False  # a full row and an empty one
        p = quantize_to_packed(w, mask, bits, group_size, symmetric=symmetric)
        rows = torch.tensor([0, 5, 36, 3, 3, 17, 1])  # any order, repeats, the empty row
        assert torch.equal(p.dequantize_rows(rows), p.dequantize()[rows])
        assert p.dequantize_rows(torch.tensor([], dtype=torch.long)).shape == (0, group_size * 7)


def test_lookup_is_the_packed_tables_rows_and_close_to_the_dense_ones():
    emb = torch.nn.Embedding(50, 32)
    torch.nn.init.normal_(emb.weight, std=0.5)
    packed = PackedEmbedding.from_embedding(emb, bits=8, group_size=16)
    ids = torch.tensor([[3, 49, 0], [3, 7, 7]])
    out = packed(ids)
    assert out.shape == (2, 3, 32) and out.dtype == torch.float32
    table = packed.packed_weight().dequantize()  # (50, 32)
    assert torch.equal(out, table[ids])
    torch.testing.assert_close(out, emb(ids), atol=0.01, rtol=0)  # W8 g16 rounding of weights of std 0.5
    with pytest.raises(IndexError, match=r"\[0, 50\)"):
        packed(torch.tensor([50]))


def test_pack_embedding_releases_the_table_and_keeps_the_models_outputs_close():
    model = tiny_model("llama", seed=0, tie_word_embeddings=True).eval()
    ids = torch.tensor([[3, 17, 42, 99, 7, 250, 1]])
    with torch.inference_mode():
        want = model(ids).logits
    pack_embedding(model, bits=8)
    with pytest.raises(ValueError, match="plain nn.Embedding"):
        pack_embedding(model, bits=8)  # already packed
    model = tiny_model("llama", seed=0, tie_word_embeddings=True).eval()
    dense_table = model.get_input_embeddings().weight
    pack_lm_head(model, bits=8)  # unties the head, which held the dense table
    packed = pack_embedding(model, bits=8)
    assert model.get_input_embeddings() is packed
    assert all(t is not dense_table for t in model.state_dict().values())
    with torch.inference_mode():
        got = model(ids).logits  # the model's own forward looks tokens up in the packed table
        decoder = FusedDecoder(model)
        cache = decoder.new_cache(ids.shape[1])
        fused = decoder.prefill(ids, cache)
    torch.testing.assert_close(fused, got[:, -1], atol=1e-5, rtol=1e-5)
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # W8 head and table: close to the dense model
    tokens = generate(model, ids, GenerationSpec(max_new_tokens=4, stop_at_eos=False))
    assert tokens.step == "fused" and tokens.tokens.numel() == 4


def test_a_packed_embedding_is_saved_and_loaded_without_a_dense_table(tmp_path):
    import gqsa
    from gqsa.compress import compress_model
    from gqsa.config import CompressConfig, QuantSpec, SparsitySpec
    from gqsa.format.checkpoint import checkpoint_info

    model = tiny_model("llama", seed=0, tie_word_embeddings=True)
    compress_model(model, CompressConfig(method="magnitude", quant=QuantSpec(bits=4, group_size=16),
                                         sparsity=SparsitySpec(ratio=0.5)), progress=False)
    pack_lm_head(model, bits=8)
    pack_embedding(model, bits=4)
    ids = torch.tensor([[3, 17, 42, 99, 7]])
    spec = GenerationSpec(max_new_tokens=6, stop_at_eos=False)
    with torch.inference_mode():
        want = model(ids).logits
    want_tokens = generate(model, ids, spec).tokens
    out = gqsa.save(model, None, tmp_path / "ckpt")
    info = checkpoint_info(out)
    assert info["layers"]["model.embed_tokens"]["kind"] == "embedding"
    loaded, _ = gqsa.load(out)
    embedding = loaded.get_input_embeddings()
    assert isinstance(embedding, PackedEmbedding) and embedding.bits == 4
    assert not any(isinstance(m, torch.nn.Embedding) for m in loaded.modules())  # no dense table was built
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, want)
    assert torch.equal(generate(loaded, ids, spec).tokens, want_tokens)


def test_a_checkpoint_with_an_unknown_layer_kind_is_refused(tmp_path):
    import json

    import gqsa
    from gqsa.compress import compress_model
    from gqsa.config import CompressConfig, QuantSpec, SparsitySpec
    from gqsa.format.checkpoint import CheckpointError

    model = tiny_model("llama", seed=0)
    compress_model(model, CompressConfig(method="magnitude", quant=QuantSpec(bits=4, group_size=16),
                                         sparsity=SparsitySpec(ratio=0.5)), progress=False)
    pack_embedding(model, bits=8)
    out = gqsa.save(model, None, tmp_path / "ckpt")
    for name in ("gqsa_config.json", "config.json"):
        path = out / name
        cfg = json.loads(path.read_text())
        layers = cfg["layers"] if name == "gqsa_config.json" else cfg["quantization_config"]["layers"]
        layers["model.embed_tokens"]["kind"] = "conv"
        path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown kind 'conv'"):
        gqsa.load(out)


def test_a_table_quantized_in_slices_equals_it_quantized_at_once(monkeypatch):
    from gqsa.nn import packed_embedding

    emb = torch.nn.Embedding(45, 32)
    whole = PackedEmbedding.from_embedding(emb, bits=4).packed_weight()
    monkeypatch.setattr(packed_embedding, "QUANTIZE_ROWS", 8)  # 6 slices, the last of 5 rows
    sliced = PackedEmbedding.from_embedding(emb, bits=4).packed_weight()
    for name, t in whole.tensors().items():
        assert torch.equal(t, getattr(sliced, name)), name


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_native_lookup_equals_the_torch_one(bits, monkeypatch):
    from gqsa.ops import cpu

    if not cpu.available():
        pytest.skip("gqsa._native_cpu is not built")
    emb = torch.nn.Embedding(40, 48)  # 48 = 3 groups of 16
    packed = PackedEmbedding.from_embedding(emb, bits=bits, group_size=16, symmetric=bits == 3)
    ids = torch.tensor([[39, 0, 7], [7, 7, 12]])
    native = packed(ids)
    monkeypatch.setattr(cpu, "available", lambda: False)  # the torch path
    assert torch.equal(native, packed(ids))
    assert torch.equal(native, packed.packed_weight().dequantize()[ids])


def test_a_dtype_change_keeps_the_fp16_scales_and_sets_the_output_dtype():
    torch.manual_seed(0)
    emb = PackedEmbedding.from_embedding(nn.Embedding(40, 32), bits=8, group_size=16)
    want = emb(torch.tensor([3, 7]))
    for convert, dtype in [(lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16),
                           (lambda m: m.float(), torch.float32), (lambda m: m.to("cpu"), torch.float32)]:
        convert(emb)
        assert emb.scale.dtype == torch.float16 and emb.dtype == dtype
        got = emb(torch.tensor([3, 7]))
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.to(dtype).float())
