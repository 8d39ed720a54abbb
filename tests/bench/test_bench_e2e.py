"""The end-to-end benchmark on a tiny model: candidates in their own processes, JSON with the keys, sizes counted
once, and bad arguments named."""

import json

import pytest
import torch
from tiny import tiny_model

from benchmarks.bench import e2e

KEYS = {"candidate", "decode_tok_s", "prefill_tok_s", "ttft_ms", "peak_rss_mb", "base_rss_mb", "model_bytes",
        "decode_speedup_vs_fp32", "decode_gb_per_s", "bandwidth_pct", "backend", "loop", "step", "decode_ms",
        "decode_cpu_ms"}


def test_benchmark_runs_every_candidate_in_its_process_and_writes_json(dense_dir, tmp_path, capsys):
    out, md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    rc = e2e.main([str(dense_dir), "--candidates", "fp32-hf,gqsa-hfstep,gqsa-lm8-emb8", "--lm-head-bits", "8",
                   "--prompt-len",
                   "6", "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--profile", "2", "--json", str(out),
                   "--markdown", str(md)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = {r["candidate"]: r for r in report["rows"]}
    assert set(rows) == {"fp32-hf", "gqsa-hfstep", "gqsa-lm8-emb8", "gqsa-lm8"}
    assert all(KEYS <= set(r) for r in rows.values())
    assert all(r["decode_tok_s"] > 0 and r["decode_cpu_ms"] > 0 and r["prefill_tok_s"] > 0
               and r["peak_rss_mb"] >= r["base_rss_mb"] > 0 for r in rows.values())
    assert rows["fp32-hf"]["decode_speedup_vs_fp32"] == 1.0 and rows["gqsa-lm8"]["loop"] == "gqsa"
    assert [rows[n]["step"] for n in ("fp32-hf", "gqsa-hfstep", "gqsa-lm8")] == [
        "transformers generate", "model forward", "fused"]
    assert rows["gqsa-lm8"]["model_bytes"] < rows["fp32-hf"]["model_bytes"] / 3
    assert rows["gqsa-lm8-emb8"]["model_bytes"] < rows["gqsa-lm8"]["model_bytes"]  # the packed table is smaller
    assert rows["gqsa-lm8-emb8"]["step"] == "fused"
    fused, hfstep = report["profiles"]["gqsa-lm8"], report["profiles"]["gqsa-hfstep"]
    assert (fused["step"], hfstep["step"]) == ("fused", "model forward")
    assert {"linear layers", "lm head"} <= set(fused["components_ms"]) and fused["step_ms"] > 0
    assert {"linear layers", "lm head", "norms"} <= set(hfstep["components_ms"]) and hfstep["step_ms"] > 0
    assert {"torch", "git_revision", "dram_read_gb_per_s"} <= set(report["machine"])
    printed = capsys.readouterr().out
    assert "| candidate" in printed and "| candidate" in md.read_text() and "linear layers" in printed
    assert "gqsa-lm8 (fused step)" in printed and "gqsa-hfstep (model forward step)" in printed


def test_json_alone_goes_to_stdout(dense_dir, capsys):
    rc = e2e.main([str(dense_dir), "--candidates", "gqsa", "--prompt-len", "4", "--new-tokens", "2",
                   "--repeats", "1", "--threads", "1", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["candidate"] for r in report["rows"]] == ["gqsa"]
    assert report["rows"][0]["decode_speedup_vs_fp32"] is None  # no fp32 row to compare with


def test_model_bytes_count_tied_weights_once_and_int8_weights_as_bytes():
    model = tiny_model("gemma3_text")  # tied LM head
    total, streamed = e2e.model_bytes(model)
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # parameters() lists a tied one once
    assert total == sum(t.numel() * t.element_size() for t in tensors.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert streamed == total  # the embedding is the LM head: every decode step reads it
    untied = tiny_model("llama")
    total, streamed = e2e.model_bytes(untied)
    assert total - streamed == untied.model.embed_tokens.weight.numel() * 4
    from torch.ao.quantization import quantize_dynamic

    q = quantize_dynamic(tiny_model("llama"), {torch.nn.Linear}, dtype=torch.qint8)
    linear_weights = sum(m.weight.numel() for m in untied.modules() if isinstance(m, torch.nn.Linear))
    assert e2e.model_bytes(q)[0] == total - linear_weights * 3  # int8: 1 byte per weight instead of 4


def test_token_clock_times_tokens_after_the_prompt():
    clock = e2e.TokenClock()
    clock.put(torch.zeros(1, 5))
    for _ in range(3):
        clock.put(torch.zeros(1))
        sum(range(20000))  # some CPU time between tokens
    r = clock.result(prompt_len=5)
    assert r["new_tokens"] == 3 and r["ttft_s"] > 0 and r["decode_tok_s"] > 0 and r["decode_cpu_ms"] > 0
    with pytest.raises(RuntimeError, match="no token"):
        e2e.TokenClock().result(5)


@pytest.mark.parametrize("argv,message", [
    (["--candidates", "fp64-hf"], "unknown candidate"),
    (["--new-tokens", "0"], "positive"),
    (["--lm-head-bits", "3"], "invalid choice"),
])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        e2e.parse_args(argv)
    assert message in capsys.readouterr().err


def test_conflicting_models_are_named(dense_dir, tmp_path):
    with pytest.raises(ValueError, match="--shapes 7b builds its own model"):
        e2e.main([str(dense_dir), "--shapes", "7b"])
    with pytest.raises(FileNotFoundError, match="not a gqsa checkpoint"):
        e2e.main([str(dense_dir), "--checkpoint", str(tmp_path)])
    with pytest.raises(ValueError, match="--dense only applies"):
        e2e.main([str(dense_dir), "--dense", str(dense_dir)])


def test_a8_candidate_runs_the_int8_activation_kernel_and_llama_cpp_is_noted_when_missing(dense_dir, capsys,
                                                                                         monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed here: the note for its absence cannot be seen")
    rc = e2e.main([str(dense_dir), "--candidates", "gqsa,gqsa-a8,llama.cpp", "--prompt-len", "4", "--new-tokens",
                   "3", "--repeats", "1", "--threads", "1", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["candidate"]: r for r in report["rows"]}
    assert set(rows) == {"gqsa", "gqsa-a8"} and rows["gqsa-a8"]["backend"] == "cpu-a8"
    assert rows["gqsa"]["backend"] != "cpu-a8" and rows["gqsa-a8"]["decode_tok_s"] > 0
    assert any("llama.cpp skipped" in n and "pip install llama-cpp-python" in n for n in report["notes"])


def test_llama_cpp_candidate_generates_exactly_the_tokens_asked_with_the_threads_given(tmp_path, monkeypatch):
    """llama-cpp-python replaced by a stand-in: the candidate loads the GGUF path with the worker's threads, feeds
    the prompt's ids, stops after exactly ``new_tokens`` tokens (its generator never stops by itself) and
    timestamps each; a model that is not a GGUF file is refused."""
    import sys
    import types

    from benchmarks.bench.e2e_candidates import CandidateSpec, load_candidate, run_once

    seen = {}

    class FakeLlama:
        def __init__(self, model_path, **kw):
            seen.update(kw, model_path=model_path,
                        extra_bufts=sys.modules["llama_cpp.llama_cpp"].llama_model_default_params().use_extra_bufts)

        def generate(self, tokens, **kw):
            seen["tokens"], seen["sampling"] = tokens, kw
            while True:
                yield 7

    class Params:
        use_extra_bufts = True

    low_level = types.SimpleNamespace(llama_model_default_params=Params)
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama, llama_cpp=low_level))
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_cpp", low_level)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    spec = CandidateSpec("llama.cpp", str(gguf), None, threads=3)
    model, backend = load_candidate(spec)
    assert "llama.cpp" in backend and model.model_bytes() == (64, 64)
    result = run_once(model, spec, torch.tensor([[5, 6, 7, 8]]), 5)
    assert result["new_tokens"] == 5 and result["step"] == "llama.cpp eval" and result["decode_tok_s"] > 0
    assert seen["model_path"] == str(gguf) and seen["n_threads"] == seen["n_threads_batch"] == 3
    assert seen["tokens"] == [5, 6, 7, 8] and seen["sampling"]["temp"] == 0.0
    assert seen["extra_bufts"] is False and sys.modules["llama_cpp.llama_cpp"].llama_model_default_params is Params
    with pytest.raises(ValueError, match="llama.cpp runs a GGUF file"):
        load_candidate(CandidateSpec("llama.cpp", str(tmp_path), None, threads=1))
