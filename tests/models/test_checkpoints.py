"""Save/load of compressed models: exact round trips, transformers interop, and every corruption named."""

import json
import shutil
import struct

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

import gqsa
from gqsa.compress import compress_model
from gqsa.config import CompressConfig, QuantSpec, SparsitySpec
from gqsa.format.checkpoint import GQSA_CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from gqsa.models.packing import pack_lm_head
from gqsa.models.surgery import packed_layers

IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 1, 64, 12, 5]])


def _compressed(arch="llama", bits=4, group_size=16, ratio=0.5, symmetric=False, allocation="row"):
    model = tiny_model(arch)
    cfg = CompressConfig(
        method="magnitude",
        quant=QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric),
        sparsity=SparsitySpec(ratio=ratio, allocation=allocation),
    )
    compress_model(model, cfg, progress=False)
    return model, cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, cfg = _compressed("llama")
    path = tmp_path_factory.mktemp("ckpt") / "llama-w4s50"
    gqsa.save(model, tiny_tokenizer(), path, compression=cfg.to_dict())
    return model, path


def _copy(path, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, True)])
def test_save_load_is_exact(arch, bits, symmetric, tmp_path):
    model, cfg = _compressed(arch, bits=bits, symmetric=symmetric)
    with torch.inference_mode():
        ref = model(IDS).logits
    gqsa.save(model, tiny_tokenizer(), tmp_path / "ckpt", compression=cfg.to_dict())
    loaded, tokenizer = gqsa.load(tmp_path / "ckpt")
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    with torch.inference_mode():
        assert torch.equal(loaded(IDS).logits, ref)
    assert tokenizer is not None and tokenizer("hello")["input_ids"] == tiny_tokenizer()("hello")["input_ids"]


def test_checkpoints_name_no_layer_class(saved):
    """PackedLinear was GQSALinear: checkpoint files record layers by kind, never by class name, so one saved
    under either name loads as a PackedLinear (which the name GQSALinear still is)."""
    model, path = saved
    for file in path.iterdir():
        data = file.read_bytes()
        assert b"GQSALinear" not in data and b"PackedLinear" not in data, file.name
    loaded, _ = gqsa.load(path)
    layers = packed_layers(loaded)
    assert layers and all(type(m) is gqsa.PackedLinear is gqsa.GQSALinear for m in layers.values())
    assert layers.keys() == packed_layers(model).keys()
    assert len(packed_layers(loaded)) == 2 * 7


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_from_pretrained_loads_gqsa_checkpoints(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model, cfg = _compressed(arch)
    gqsa.save(model, tiny_tokenizer(), tmp_path / "ckpt", compression=cfg.to_dict())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert isinstance(hf.model.layers[0].mlp.down_proj, gqsa.PackedLinear)
    assert hf.model.layers[0].mlp.down_proj.scale.dtype == torch.float16
    with torch.inference_mode():
        assert torch.equal(hf(IDS).logits, model(IDS).logits)
    with pytest.raises(ValueError, match="serializ|gqsa"):
        hf.save_pretrained(tmp_path / "resaved")


def test_generate_after_load_matches(saved):
    model, path = saved
    loaded, _ = gqsa.load(path)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(IDS, **kw), model.generate(IDS, **kw))


def test_tied_embeddings_stay_tied(tmp_path):
    model, cfg = _compressed("gemma3_text")  # gemma3 ties lm_head to the embeddings
    gqsa.save(model, tiny_tokenizer(), tmp_path / "ckpt")
    loaded, _ = gqsa.load(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    record = json.loads((tmp_path / "ckpt" / GQSA_CONFIG_NAME).read_text())
    assert "lm_head.weight" in record["tied"] and "lm_head.weight" not in record["weights"]["tensors"]


def test_loading_never_materializes_dense_linears(saved, monkeypatch):
    _, path = saved
    created = []
    original = torch.nn.Linear.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        created.append(self.weight.device.type)

    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)
    gqsa.load(path)
    assert created and set(created) == {"meta"}


# ---- atomic writes ---------------------------------------------------------------------------------------


def test_failed_save_leaves_nothing_and_keeps_existing(saved, tmp_path):
    model, _ = saved

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        gqsa.save(model, BrokenTokenizer(), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert list(tmp_path.iterdir()) == []

    gqsa.save(model, tiny_tokenizer(), tmp_path / "old")
    before = sorted(p.name for p in (tmp_path / "old").iterdir())
    with pytest.raises(RuntimeError):
        gqsa.save(model, BrokenTokenizer(), tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == before
    gqsa.load(tmp_path / "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_save_refuses_to_overwrite_without_flag(saved, tmp_path):
    model, path = saved
    with pytest.raises(FileExistsError, match="overwrite"):
        gqsa.save(model, None, path)


# ---- corrupt checkpoints -----------------------------------------------------------------------------------


def _rewrite_weights(path, edit):
    """Load the safetensors file, apply ``edit(tensors)``, write it back and re-record shapes and digests."""
    from safetensors.torch import load_file

    from gqsa.format.checkpoint import write_weights

    tensors = load_file(str(path / WEIGHTS_NAME))
    edit(tensors)
    record = json.loads((path / GQSA_CONFIG_NAME).read_text())
    record["weights"] = write_weights(path, tensors)
    (path / GQSA_CONFIG_NAME).write_text(json.dumps(record))


def test_missing_config_is_named(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    (path / GQSA_CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match=GQSA_CONFIG_NAME):
        gqsa.load(path)


def test_invalid_json_is_named(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    (path / GQSA_CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{GQSA_CONFIG_NAME}.*invalid JSON"):
        gqsa.load(path)


def test_version_mismatch_is_named(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    record = json.loads((path / GQSA_CONFIG_NAME).read_text())
    record["format_version"] = 99
    (path / GQSA_CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=f"{GQSA_CONFIG_NAME}.*format_version 99"):
        gqsa.load(path)


def test_truncated_weights_name_file_and_tensor(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    weights = path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME}: truncated: tensor '[\w.]+'"):
        gqsa.load(path)
    weights.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_NAME}: truncated"):
        gqsa.load(path)


def test_corrupted_bytes_name_the_tensor(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    weights = path / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = "model.layers.1.mlp.up_proj.values"
    start = 8 + n + header[name]["data_offsets"][0]
    data[start] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME}: tensor '{name}' is corrupted"):
        gqsa.load(path)


def test_shape_mismatch_with_model_names_tensor(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    _rewrite_weights(path, lambda t: t.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' has shape \[65\].*model expects \[64\]"):
        gqsa.load(path)


def test_shape_mismatch_with_record_names_tensor(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    record = json.loads((path / GQSA_CONFIG_NAME).read_text())
    record["weights"]["tensors"]["model.layers.0.self_attn.q_proj.scale"]["shape"] = [3]
    (path / GQSA_CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.q_proj.scale' has shape"):
        gqsa.load(path)


def test_missing_tensor_is_named(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    record = json.loads((path / GQSA_CONFIG_NAME).read_text())
    _rewrite_weights(path, lambda t: t.pop("model.layers.0.mlp.gate_proj.col_indices"))
    record2 = json.loads((path / GQSA_CONFIG_NAME).read_text())
    record2["weights"]["tensors"] = record["weights"]["tensors"]
    (path / GQSA_CONFIG_NAME).write_text(json.dumps(record2))
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.gate_proj.col_indices' is missing"):
        gqsa.load(path)


def test_metadata_disagreeing_with_tensors_is_caught(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    record = json.loads((path / GQSA_CONFIG_NAME).read_text())
    record["layers"]["model.layers.0.mlp.down_proj"]["nnz"] += 1
    (path / GQSA_CONFIG_NAME).write_text(json.dumps(record))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["layers"] = record["layers"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.down_proj"):
        gqsa.load(path)


def test_format_rule_violation_is_named(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    name = "model.layers.1.self_attn.o_proj.col_indices"

    def break_cols(t):
        t[name] = t[name].clone()
        t[name][0] = 1000

    _rewrite_weights(path, break_cols)
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.o_proj.col_indices: values must be in"):
        gqsa.load(path)


def test_hf_config_disagreeing_with_gqsa_config(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]["bits"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json.*disagrees"):
        gqsa.load(path)


def test_loading_peak_memory_is_a_fraction_of_the_dense_weights(tmp_path):
    """A fresh process's peak resident memory grows by the packed bytes and some overhead, not the dense ones."""
    import subprocess
    import sys
    import textwrap

    model = tiny_model("llama", hidden_size=768, intermediate_size=3072, num_hidden_layers=3, num_attention_heads=12,
                       num_key_value_heads=4, head_dim=64)
    dense = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = CompressConfig(method="magnitude", quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(ratio=0.5))
    compress_model(model, cfg, progress=False)
    gqsa.save(model, None, tmp_path / "ckpt")
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        import torch, gqsa, gqsa.models.checkpoints
        from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

        def peak():
            status = Path("/proc/self/status").read_text().splitlines()
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) * 1024

        before = peak()
        model, _ = gqsa.load(sys.argv[1])
        print(json.dumps({"growth": peak() - before}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    assert growth < 0.4 * dense, (growth, dense)  # dense fp32 linears alone would be 2.5x this bound


# ---- packed LM head --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # gemma3 ties its LM head to the embeddings
@pytest.mark.parametrize("bits", [4, 8])
def test_packed_lm_head_round_trips_through_gqsa_and_transformers(arch, bits, tmp_path):
    from transformers import AutoModelForCausalLM

    model, cfg = _compressed(arch)
    dense_head = model.get_output_embeddings().weight.detach().clone()  # (vocab, hidden)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    head = pack_lm_head(model, bits=bits)
    assert model.get_output_embeddings() is head and head.nnz == dense_head.shape[0] * dense_head.shape[1] // 16
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.get_input_embeddings().weight, embeddings)  # the lookup table stays dense
    err = (head.packed_weight().dequantize() - dense_head).abs().max() / dense_head.abs().max()
    assert 0 < err < (0.1 if bits == 4 else 0.01)
    with torch.inference_mode():
        ref = model(IDS).logits
    gqsa.save(model, tiny_tokenizer(), tmp_path / "ckpt", compression=cfg.to_dict())
    loaded, _ = gqsa.load(tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    for m in (loaded, hf):
        assert isinstance(m.get_output_embeddings(), gqsa.PackedLinear)
        with torch.inference_mode():
            assert torch.equal(m(IDS).logits, ref)


def test_pack_lm_head_refuses_a_packed_head_and_a_group_size_that_does_not_divide():
    model = tiny_model("llama")
    pack_lm_head(model)
    with pytest.raises(ValueError, match="already packed"):
        pack_lm_head(model)
    with pytest.raises(ValueError, match="does not divide"):
        pack_lm_head(tiny_model("llama"), group_size=128)  # hidden size 64
