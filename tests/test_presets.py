"""Every named preset compresses a tiny model into a checkpoint that loads back and gives the same logits."""

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

import gqsa
from gqsa.compress import compress_model
from gqsa.presets import PRESETS
from gqsa.models.checkpoints import save_pruned
from gqsa.models.surgery import packed_layers
from gqsa.models.loading import load_model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_checkpoint_loads_and_runs(name, tmp_path):
    cfg = PRESETS[name].replace(calib=PRESETS[name].calib.replace(samples=4, seq_len=16))
    # hidden 128 and MLP 256 so that group size 128 divides every layer
    model = tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 320, (4, 16), generator=gen)
    report = compress_model(model, cfg, calib_ids=calib, progress=False)
    assert len(report["layers"]) == 14
    tokens = torch.randint(0, 320, (2, 12), generator=gen)
    with torch.inference_mode():
        expected = model(tokens).logits
    out = tmp_path / name
    if cfg.sparsity.pattern == "group":
        gqsa.save(model, tiny_tokenizer(), out, compression=cfg.to_dict())
    else:
        assert not packed_layers(model)
        save_pruned(model, tiny_tokenizer(), out, compression=cfg.to_dict())
    loaded, _ = load_model(out)
    assert len(packed_layers(loaded)) == (14 if cfg.sparsity.pattern == "group" else 0)
    with torch.inference_mode():
        got = loaded(tokens).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Row allocation rounds per row: within half a group of the ratio in the narrowest rows (128 inputs here: 8
    # groups of 16, 2 groups of 64).
    groups = 128 // (cfg.quant.group_size if cfg.quant is not None else 8)
    assert report["summary"]["sparsity"] == pytest.approx(cfg.sparsity.ratio, abs=max(1 / 16, 0.5 / groups))


@pytest.mark.parametrize("overrides,words", [
    ({"target_bpw": 0}, "must be a positive number of bits per weight"),
    ({"target_bpw": -1.0}, "must be a positive number of bits per weight"),
    ({"search_bits": (2, 3)}, "search_bits (--search-bits) choose(s) the formats"),
    ({"search_per_layer": False}, "search_per_layer (--search-uniform) choose(s) the formats"),
])
def test_search_settings_without_a_budget_are_refused_not_ignored(overrides, words):
    from gqsa.presets import resolve_config

    with pytest.raises(ValueError) as info:
        resolve_config("w4s50", False, **overrides)
    assert words in str(info.value)
    assert resolve_config("w4s50", False, target_bpw=3.2, search_bits=(2, 3)).search.bits == (2, 3)
