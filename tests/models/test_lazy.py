"""Lazy loading: a model read block by block from its safetensors shards compresses to exactly what the model
loaded whole compresses to, with one dense block in host memory instead of the model."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_model, tiny_tokenizer

from gqsa.compress import compress_model
from gqsa.config import BQPOSpec, CalibSpec, CompressConfig, QuantSpec, SparsitySpec
from gqsa.models.adapter import decoder_layers
from gqsa.models.lazy import LazyWeights, load_model_lazily, materialize_block
from gqsa.models.loading import load_model
from gqsa.models.surgery import packed_layers

CALIB = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))
QUANT = dict(quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(ratio=0.5))
CONFIGS = {
    "magnitude": CompressConfig(method="magnitude", **QUANT),
    "gqsa": CompressConfig(calib=CalibSpec(samples=4, seq_len=24), **QUANT),
    "gqsa-bqpo": CompressConfig(calib=CalibSpec(samples=4, seq_len=24), bqpo=BQPOSpec(epochs=1, val_windows=1),
                                **QUANT),
    "sparsegpt-2of4": CompressConfig(method="sparsegpt", quant=None,
                                     sparsity=SparsitySpec(ratio=0.5, pattern="2:4", allocation="matrix"),
                                     calib=CalibSpec(samples=4, seq_len=24)),
}


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def sharded(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded") / request.param
    tiny_model(request.param).save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def test_blocks_stay_on_meta_until_read_and_everything_else_is_the_models(sharded):
    lazy, _ = load_model_lazily(sharded)
    whole, _ = load_model(sharded)
    blocks = decoder_layers(lazy)
    assert all(p.device.type == "meta" for b in blocks for p in b.parameters())
    want = whole.state_dict()
    for name, t in lazy.state_dict().items():
        if t.device.type != "meta":
            assert torch.equal(t, want[name]), name
    for name, t in whole.named_buffers():  # computed buffers (rotary tables) as the model computes them
        assert torch.equal(dict(lazy.named_buffers())[name], t), name
    materialize_block(lazy, 1, "cpu")
    for name, t in blocks[1].state_dict().items():
        assert torch.equal(t, want[f"model.layers.1.{name}"]), name
    assert all(p.device.type == "meta" for p in blocks[0].parameters())


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_lazy_compression_is_the_whole_models(sharded, method):
    config = CONFIGS[method]
    calib = None if method == "magnitude" else CALIB
    whole, _ = load_model(sharded)
    lazy, _ = load_model_lazily(sharded)
    report_whole = compress_model(whole, config, calib_ids=calib, progress=False)
    report_lazy = compress_model(lazy, config, calib_ids=calib, progress=False)
    assert report_lazy["layers"] == report_whole["layers"]
    want = whole.state_dict()
    got = lazy.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].device.type == "cpu" and torch.equal(got[name], want[name]), name
    if config.sparsity.pattern == "group":
        assert len(packed_layers(lazy)) == len(packed_layers(whole)) > 0


def test_damaged_and_missing_block_tensors_are_named(sharded, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in sharded.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = LazyWeights(broken)
    name = "model.layers.1.mlp.down_proj.weight"
    shard = weights.files[name]
    tensors = load_file(shard)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    model, _ = load_model_lazily(broken)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.weight holds 1 non-finite value .*1 NaN"):
        compress_model(model, CONFIGS["magnitude"], progress=False)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "model-99999-of-99999.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="shard"):
        load_model_lazily(broken)


MEASURE = textwrap.dedent("""
    import sys, threading, time
    import torch
    from gqsa.compress import compress_model
    from gqsa.config import CompressConfig, QuantSpec, SparsitySpec
    from gqsa.models.lazy import load_model_lazily
    from gqsa.models.loading import load_model

    def anon():  # resident anonymous memory (file-backed pages of mapped weight files excluded), bytes
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    peak, done = [anon()], [False]
    base = peak[0]
    def sample():
        while not done[0]:
            peak[0] = max(peak[0], anon())
            time.sleep(0.005)
    threading.Thread(target=sample, daemon=True).start()
    path, lazy = sys.argv[1], sys.argv[2] == "lazy"
    model, _ = (load_model_lazily if lazy else load_model)(path)
    compress_model(model, CompressConfig(method="magnitude", quant=QuantSpec(bits=4, group_size=16),
                                         sparsity=SparsitySpec(ratio=0.5)), progress=False)
    done[0] = True
    time.sleep(0.02)
    print(max(peak[0], anon()) - base)
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc")
def test_host_memory_holds_one_block_not_the_model(tmp_path):
    """8 blocks of 51 MB in float32 (26 MB in the bf16 files): loaded whole, the float32 model is in memory;
    lazily, one dense block plus the packed output. Peak anonymous resident memory (mapped weight files
    excluded), sampled every 5 ms in fresh processes. Measured: 787 MB whole, 295 MB lazily."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=320, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path / "medium"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="30MB")
    tiny_tokenizer().save_pretrained(path)
    block_bytes = sum(p.numel() * 4 for p in LlamaForCausalLM(config).model.layers[0].parameters())
    peaks = {}
    for mode in ("whole", "lazy"):
        proc = subprocess.run([sys.executable, "-c", MEASURE, str(path), mode], capture_output=True, text=True,
                              timeout=600, cwd=Path(__file__).resolve().parents[2])
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[mode] = int(proc.stdout.strip().splitlines()[-1])
    # loaded whole: the float32 model (8 blocks) plus packing's transients; lazily: one block plus the same
    # transients plus the packed output (about a tenth of a block each): at least 5 blocks less
    assert peaks["whole"] > 8 * block_bytes, (peaks, block_bytes)
    assert peaks["whole"] - peaks["lazy"] > 5 * block_bytes, (peaks, block_bytes)
