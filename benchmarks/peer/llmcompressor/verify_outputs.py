"""Verify each output dir loads with plain transformers (run with /work/main/.venv/bin/python)."""
import json, sys, os, torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

DENSE = "/root/.cache/gqsa/gguf/b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
res = {}
dense = AutoModelForCausalLM.from_pretrained(DENSE, dtype=torch.float32).state_dict()
for name in sys.argv[1:]:
    d = f"/work/peer/out/{name}"
    cfg = json.load(open(os.path.join(d, "config.json")))
    m = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    sd = m.state_dict()
    tot = z = 0
    nz4 = 0
    distinct = {}
    for k, v in sd.items():
        if ".layers." in k and k.endswith("_proj.weight"):
            tot += v.numel(); z += (v == 0).sum().item()
            nz4 = max(nz4, (v.view(v.shape[0], -1, 4) != 0).sum(-1).max().item())
    others_same = all(torch.equal(sd[k], dense[k]) for k in sd if not (".layers." in k and k.endswith("_proj.weight")))
    r = dict(loads=True, dtype=str(m.dtype), quantization_config_in_config="quantization_config" in cfg,
             sparsity=z / tot, max_nonzeros_per_4=nz4, non_linear_params_equal_dense=others_same,
             tied=m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr())
    for g in (64, 128):
        if f"g{g}" in name:
            bits = 4 if "w4" in name else 2
            mx = 0
            for k, v in sd.items():
                if ".layers." in k and k.endswith("_proj.weight"):
                    grp = v.view(v.shape[0], -1, g)
                    s = grp.sort(-1).values
                    nd = 1 + (s[..., 1:] != s[..., :-1]).sum(-1)
                    mx = max(mx, nd.max().item())
            r[f"max_distinct_values_per_group(all groups, g={g})"] = mx
            r["limit_2^bits"] = 2 ** bits
    with torch.no_grad():
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        r["logits_finite"] = bool(torch.isfinite(m(ids).logits).all())
    res[name] = r
    print(name, json.dumps(r))
json.dump(res, open("/work/peer/logs/verify.json", "w"), indent=1)
print("transformers", transformers.__version__, "torch", torch.__version__)
