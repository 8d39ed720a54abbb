"""Collect logs/<name>.json (+ logs/verify.json) into /work/peer/RESULTS.json."""
import json, os
ORDER = ["llmc-gptq-w4g128", "llmc-gptq-w4g128-bypass", "llmc-gptq-w4g64", "llmc-gptq-w2g64", "llmc-sparsegpt-2of4",
         "llmc-sparsegpt-s50", "llmc-wanda-s50", "llmc-wanda-2of4", "llmc-gptq-w4g64-actstatic"]
NOTES = {
 "llmc-gptq-w4g128": "NOT RUN TO COMPLETION: llm-compressor refuses group_size 128 because hidden_size 576 is not divisible by 128 "
                     "(q/k/v/o/gate/up have 576 input columns; only down_proj (1536) would be divisible). No output dir.",
 "llmc-gptq-w4g128-bypass": "Same recipe with bypass_divisibility_checks=True: fails in compressed-tensors group fake-quant "
                            "(unflatten to groups of 128 on 576 columns). No output dir.",
 "llmc-gptq-w4g64": "SUBSTITUTE for the asked W4 g128 run: group_size 64 (largest power of two dividing 576 and 1536). "
                    "actorder=None (off). Exact zeros (~13%) are quantization levels, not pruning.",
 "llmc-gptq-w4g64-actstatic": "As llmc-gptq-w4g64 but actorder='static' (llm-compressor's default).",
 "llmc-gptq-w2g64": "actorder=None (off). ~57% of weights are exactly 0 because 0 is always one of the 4 levels (min/max range forced to include 0) - quantization, not pruning.",
 "llmc-sparsegpt-2of4": "SparseGPT, no quantization; mask '2:4' = prune 2 of every 4 consecutive input columns.",
 "llmc-sparsegpt-s50": "SparseGPT, no quantization; unstructured 50% (mask chosen per 128-column block, as in SparseGPT).",
 "llmc-wanda-s50": "WandaPruningModifier, unstructured 50% per output row.",
 "llmc-wanda-2of4": "WandaPruningModifier, 2:4.",
}
COMMON = ("Common: model loaded with AutoModelForCausalLM.from_pretrained(dense, dtype=float32) on CPU; calibration = the 64x512 "
          "windows of calib_ids_wiki_64x512.pt as a datasets.Dataset(input_ids, attention_mask=1), oneshot(num_calibration_samples=64, "
          "max_seq_length=512, batch_size=1, shuffle_calibration_samples=False); default 'independent' pipeline, which infers the "
          "SequentialPipeline (one LlamaDecoderLayer per subgraph, propagate_error=True: inputs of layer i+1 come from the compressed layer i). "
          "targets=['Linear'], ignore=['lm_head'] (lm_head is tied to embed_tokens and left dense). Weight observer: llm-compressor default. "
          "Output = fresh dense model whose decoder Linear weights are replaced by the float (dequantized / pruned) weights "
          "from llm-compressor's in-memory model (for GPTQ: fake_quantize(weight, weight_scale, weight_zero_point), identical to the "
          "in-memory weight, max diff 0.0); no quantization_config; tokenizer files copied. wall_time_s = oneshot() call only "
          "(2 CPU cores shared with another process, so timings are noisy). "
          "GPTQ specifics of llm-compressor 0.14: weight observer = memoryless_minmax (asymmetric min/max per group, range forced to "
          "include 0, zero_point int8 rounded); scales/zero-points are computed ONCE from the original (pre-GPTQ) weights of each layer "
          "before the GPTQ column sweep (not re-fitted on the error-updated weights at each group start as in the reference GPTQ code); "
          "dampening 0.01*mean(diag H); block_size 128; Hessian from the 64x512 calibration tokens.")
verify = json.load(open("/work/peer/logs/verify.json")) if os.path.exists("/work/peer/logs/verify.json") else {}
runs = []
for n in ORDER:
    p = f"/work/peer/logs/{n}.json"
    if not os.path.exists(p):
        runs.append(dict(name=n, status="not run (yet)", notes=NOTES.get(n, ""))); continue
    d = json.load(open(p))
    r = dict(name=n, status=d.get("status"), llmcompressor_version=d["versions"]["llmcompressor"],
             compressed_tensors_version=d["versions"]["compressed_tensors"],
             transformers_version=d["versions"]["transformers"], torch_version=d["versions"]["torch"],
             recipe=dict(modifier=d["modifier"], kwargs=d["modifier_kwargs"], repr=d["recipe"]),
             oneshot_kwargs=d["oneshot_kwargs"], wall_time_s=round(d.get("wall_time_s", 0), 1),
             output_dir=d.get("output_dir"), achieved_sparsity_decoder_linear=d.get("achieved_sparsity_decoder_linear"),
             max_distinct_values_per_group=d.get("max_distinct_per_group_all"),
             per_layer_checks_layer0=d.get("per_layer_checks_sample"),
             verify_plain_transformers=verify.get(n), notes=NOTES.get(n, ""))
    if d.get("status") == "failed":
        r["error"] = d["error"][:2000]
    runs.append(r)
json.dump(dict(common_notes=COMMON, scripts=["/work/peer/scripts/run_llmc.py", "/work/peer/scripts/run_all.sh",
               "/work/peer/scripts/verify_outputs.py", "/work/peer/scripts/make_results.py"], runs=runs),
          open("/work/peer/RESULTS.json", "w"), indent=1)
print("wrote", [(r["name"], r["status"], r.get("wall_time_s")) for r in runs])
