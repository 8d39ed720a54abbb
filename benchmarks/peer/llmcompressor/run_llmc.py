"""Run one llm-compressor oneshot baseline on SmolLM2-135M (fp32, CPU) and save float weights.

Usage: python run_llmc.py NAME
"""
import json, os, shutil, sys, time
import torch

torch.manual_seed(0)
from datasets import Dataset
from transformers import AutoModelForCausalLM
import llmcompressor, compressed_tensors, transformers
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

DENSE = "/root/.cache/gqsa/gguf/b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CALIB = "/work/peer/calib_ids_wiki_64x512.pt"
OUT = "/work/peer/out"
TARGETS = ["Linear"]
IGNORE = ["lm_head"]  # only decoder-block Linear layers (q,k,v,o,gate,up,down)


def gptq(bits, group, actorder=None, **extra):
    return dict(
        cls="GPTQModifier",
        kwargs=dict(
            config_groups={
                "group_0": {
                    "targets": TARGETS,
                    "weights": {
                        "num_bits": bits,
                        "type": "int",
                        "symmetric": False,
                        "strategy": "group",
                        "group_size": group,
                    },
                }
            },
            ignore=IGNORE,
            block_size=128,
            dampening_frac=0.01,
            actorder=actorder,
            **extra,
        ),
    )


def sgpt(mask):
    return dict(cls="SparseGPTModifier", kwargs=dict(sparsity=0.5, mask_structure=mask, targets=TARGETS,
                                                     ignore=IGNORE, block_size=128, dampening_frac=0.01))


def wanda(mask):
    return dict(cls="WandaPruningModifier", kwargs=dict(sparsity=0.5, mask_structure=mask, targets=TARGETS,
                                                        ignore=IGNORE))


RUNS = {
    "llmc-gptq-w4g128": gptq(4, 128),            # expected to fail: 576 % 128 != 0
    "llmc-gptq-w4g128-bypass": gptq(4, 128, bypass_divisibility_checks=True),  # expected to fail in forward
    "llmc-gptq-w4g64": gptq(4, 64),              # substitute for g128 (largest power of two dividing 576)
    "llmc-gptq-w4g64-actstatic": gptq(4, 64, "static"),  # llm-compressor default actorder
    "llmc-gptq-w2g64": gptq(2, 64),
    "llmc-sparsegpt-2of4": sgpt("2:4"),
    "llmc-sparsegpt-s50": sgpt("0:0"),
    "llmc-wanda-s50": wanda("0:0"),
    "llmc-wanda-2of4": wanda("2:4"),
}
CLS = dict(GPTQModifier=GPTQModifier, SparseGPTModifier=SparseGPTModifier, WandaPruningModifier=WandaPruningModifier)


def main(name):
    spec = RUNS[name]
    ids = torch.load(CALIB)
    assert ids.shape == (64, 512) and ids.dtype == torch.int64
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    model = AutoModelForCausalLM.from_pretrained(DENSE, dtype=torch.float32)
    dense_sd = {k: v.clone() for k, v in model.state_dict().items()}
    modifier = CLS[spec["cls"]](**spec["kwargs"])
    recipe_str = repr(modifier)
    info = dict(name=name, modifier=spec["cls"], modifier_kwargs=spec["kwargs"], recipe=recipe_str,
                versions=dict(llmcompressor=llmcompressor.__version__, compressed_tensors=compressed_tensors.__version__,
                              transformers=transformers.__version__, torch=torch.__version__),
                oneshot_kwargs=dict(num_calibration_samples=64, max_seq_length=512, batch_size=1,
                                    shuffle_calibration_samples=False, pipeline="default (independent -> sequential)"),
                torch_threads=torch.get_num_threads())
    t0 = time.time()
    try:
        oneshot(model=model, dataset=ds, recipe=[modifier], num_calibration_samples=64, max_seq_length=512,
                shuffle_calibration_samples=False, batch_size=1)
    except Exception as e:  # record and stop this run
        import traceback
        info.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                    wall_time_s=time.time() - t0)
        json.dump(info, open(f"/work/peer/logs/{name}.json", "w"), indent=1, default=str)
        print("FAILED", info["error"])
        return
    wall = time.time() - t0
    info["wall_time_s"] = wall
    print(f"oneshot wall time {wall:.1f}s")

    # ---- extract float weights, check them ----
    from compressed_tensors.quantization import fake_quantize
    new_sd = {}
    checks = {}
    tot = nz = 0
    for mname, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or mname == "lm_head":
            continue
        w = mod.weight.detach().clone().float()
        c = {}
        qs = getattr(mod, "quantization_scheme", None)
        if qs is not None and qs.weights is not None:
            a = qs.weights
            scale, zp = mod.weight_scale.detach(), mod.weight_zero_point.detach()
            fq = fake_quantize(w, scale, zp, a)
            c["max_abs_diff_weight_vs_fakequant(weight)"] = (fq - w).abs().max().item()
            w = fq  # dequantized weight from stored scale / zero_point
            # integer codes and distinct values per group
            g = a.group_size
            codes = torch.round(w.view(w.shape[0], -1, g) / scale.unsqueeze(-1) + zp.unsqueeze(-1).float())
            c["code_min"], c["code_max"] = codes.min().item(), codes.max().item()
            nd = torch.tensor([[torch.unique(w.view(w.shape[0], -1, g)[r, j]).numel() for j in range(w.shape[1] // g)]
                               for r in range(0, w.shape[0], max(1, w.shape[0] // 16))])
            c["max_distinct_per_group(sampled rows)"] = nd.max().item()
            c["mean_distinct_per_group(sampled rows)"] = nd.float().mean().item()
            c["scale_shape"], c["zp_dtype"] = list(scale.shape), str(zp.dtype)
        zeros = (w == 0).sum().item()
        c["sparsity"] = zeros / w.numel()
        if "2of4" in name:
            c["max_nonzeros_per_4"] = (w.view(w.shape[0], -1, 4) != 0).sum(-1).max().item()
        tot += w.numel(); nz += zeros
        new_sd[mname + ".weight"] = w
        checks[mname] = c
    info["achieved_sparsity_decoder_linear"] = nz / tot
    info["per_layer_checks_sample"] = {k: checks[k] for k in list(checks)[:7]}
    info["max_distinct_per_group_all"] = max((c.get("max_distinct_per_group(sampled rows)", 0) for c in checks.values()), default=None)
    print(json.dumps(info["per_layer_checks_sample"], indent=1))
    print("achieved sparsity", info["achieved_sparsity_decoder_linear"])

    # fresh dense model, replace decoder linear weights only, save as plain HF dir
    clean = AutoModelForCausalLM.from_pretrained(DENSE, dtype=torch.float32)
    sd = clean.state_dict()
    changed_other = [k for k, v in model.state_dict().items()
                     if k in dense_sd and k not in new_sd and not torch.equal(v.float(), dense_sd[k].float())]
    info["non_linear_params_changed_by_llmc"] = changed_other
    for k, v in new_sd.items():
        assert sd[k].shape == v.shape
        sd[k].copy_(v)
    if hasattr(clean.config, "quantization_config"):
        del clean.config.quantization_config
    out = os.path.join(OUT, name)
    shutil.rmtree(out, ignore_errors=True)
    clean.save_pretrained(out, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
        if os.path.exists(os.path.join(DENSE, f)):
            shutil.copy(os.path.join(DENSE, f), out)
    info["output_dir"] = out
    info["status"] = "ok"
    json.dump(info, open(f"/work/peer/logs/{name}.json", "w"), indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
