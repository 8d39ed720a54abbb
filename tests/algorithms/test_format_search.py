"""--target-bpw: per-layer formats (LayerFormat), their exact storage, the Fisher signal, the budgeted choice, and
the whole run through compress_model, gqsa.compress.run and the CLI."""

import itertools
import json
import math

import pytest
import torch
from tiny import tiny_model

from gqsa.algorithms.format_search import (
    choose_per_layer,
    fisher_diagonal,
    packed_bits,
    rounded_weight,
    search_formats,
    split_windows,
)
from gqsa.config import CalibSpec, CompressConfig, FormatSearchSpec, LayerFormat, QuantSpec, SparsitySpec
from gqsa.format.packed import quantize_to_packed
from gqsa.models.adapter import compressible_linears
from gqsa.quant.masks import select_groups


def _ids(n=8, length=32, seed=0):
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def _config(target=3.5, allocation="row", **search):
    search = {"group_sizes": (16, 32, 64), "ratios": (0.0, 0.25), **search}
    return CompressConfig(quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(ratio=0.0, allocation=allocation),
                          calib=CalibSpec(samples=8, seq_len=32), search=FormatSearchSpec(target_bpw=target, **search))


@pytest.mark.parametrize("bits,group_size,ratio,allocation,symmetric", [
    (2, 16, 0.0, "row", False), (3, 32, 0.3, "row", False), (4, 8, 0.5, "matrix", True), (8, 64, 0.1, "matrix", False),
    (3, 16, 0.77, "row", True), (2, 64, 0.25, "row", False),
])
def test_packed_bits_is_what_packing_stores(bits, group_size, ratio, allocation, symmetric):
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    w = torch.randn(37, 192, generator=gen)
    mask = select_groups(torch.rand(37, 192 // group_size, generator=gen), ratio, allocation)
    packed = quantize_to_packed(w, mask, bits, group_size, symmetric)
    fmt = LayerFormat(bits=bits, group_size=group_size, ratio=ratio)
    assert packed_bits(37, 192, fmt, allocation, symmetric) == 8 * packed.nbytes()


def _brute_force(costs, budget):
    names = list(costs)
    best = None
    for pick in itertools.product(*(range(len(costs[n])) for n in names)):
        bits = sum(costs[n][i][1] for n, i in zip(names, pick))
        cost = sum(costs[n][i][0] for n, i in zip(names, pick))
        if bits <= budget and (best is None or cost < best[0] - 1e-12):
            best = (cost, dict(zip(names, pick)))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_the_budgeted_choice_is_close_to_the_best_one_and_never_over_budget(seed):
    gen = torch.Generator().manual_seed(seed)
    costs = {}
    for layer in range(4):
        bits = sorted(int(b) for b in torch.randint(100, 1000, (4,), generator=gen))
        errs = sorted((float(e) for e in torch.rand(4, generator=gen) * 10 ** float(torch.rand(1, generator=gen) * 3)),
                      reverse=True)  # more bits, less error
        costs[f"l{layer}"] = list(zip(errs, bits))
    smallest = sum(o[0][1] for o in costs.values())
    largest = sum(o[-1][1] for o in costs.values())
    for budget in (smallest, (smallest + largest) / 2, smallest + 0.2 * (largest - smallest), largest + 10):
        pick = choose_per_layer(costs, budget)
        bits = sum(costs[n][i][1] for n, i in pick.items())
        cost = sum(costs[n][i][0] for n, i in pick.items())
        best_cost, _ = _brute_force(costs, budget)
        assert bits <= budget
        # A Lagrangian choice plus greedy filling: optimal on the convex hull, within one layer's step off it.
        step = max(max(c for c, _ in o) - min(c for c, _ in o) for o in costs.values())
        assert cost <= best_cost + step + 1e-9
        if budget >= largest:
            assert pick == {n: len(o) - 1 for n, o in costs.items()}  # everything fits: the least error everywhere


def test_the_choice_gives_bits_to_the_layer_where_they_save_most():
    costs = {"robust": [(1.0, 200), (0.9, 400)], "fragile": [(100.0, 200), (1.0, 400)]}
    assert choose_per_layer(costs, 600) == {"robust": 0, "fragile": 1}
    with pytest.raises(ValueError, match="smallest candidate formats need 400 bits"):
        choose_per_layer(costs, 399)


def test_fisher_predicts_the_kl_of_a_random_perturbation():
    """For i.i.d. perturbations the diagonal's quadratic form is unbiased for the full Fisher's: 0.5 * sum(F * d**2)
    must match the measured KL divergence from the dense model to within a factor of 2."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = _ids(32, 48)
    name = "model.layers.1.mlp.down_proj"
    layer = compressible_linears(model)[name]
    fisher = fisher_diagonal(model, ids, [name])[name]
    assert fisher.shape == layer.weight.shape and (fisher >= 0).all() and fisher.sum() > 0
    with torch.no_grad():
        dense = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        delta = torch.randn_like(layer.weight) * layer.weight.std() * 0.3
        layer.weight += delta
        pert = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        layer.weight -= delta
    kl = float((dense.exp() * (dense - pert)).sum(-1).mean())
    estimate = 0.5 * float((fisher * delta.square()).sum())
    assert 0.5 < estimate / kl < 2.0


def test_rounded_weight_prunes_the_groups_of_least_fisher_energy():
    w = torch.ones(2, 32)
    fisher = torch.ones(2, 32)
    fisher[:, :16] = 1e-6  # the first group of each row barely matters
    out = rounded_weight(w, fisher, LayerFormat(bits=4, group_size=16, ratio=0.5), _config())
    assert torch.equal(out[:, :16], torch.zeros(2, 16)) and torch.allclose(out[:, 16:], torch.ones(2, 16), atol=0.01)


def test_split_windows_holds_out_the_last_quarter():
    ids = _ids(10)
    fit, held = split_windows(ids, 5)
    assert torch.equal(fit, ids[:5]) and torch.equal(held, ids[8:])
    fit, held = split_windows(ids[:1], 8)
    assert torch.equal(fit, ids[:1]) and torch.equal(held, ids[:1])


@pytest.mark.parametrize("per_layer", [True, False])
def test_compress_model_meets_the_budget_with_the_formats_it_chose(per_layer):
    from gqsa.compress import compress_model
    from gqsa.models.surgery import packed_layers

    model = tiny_model("llama")
    weights = sum(m.weight.numel() for m in compressible_linears(model).values())
    report = compress_model(model, _config(3.4, per_layer=per_layer), calib_ids=_ids(), progress=False)
    search, summary = report["format_search"], report["summary"]
    assert summary["bits_per_weight"] <= 3.4
    assert summary["bits_per_weight"] == pytest.approx(search["bits_per_weight"])
    chosen = CompressConfig.from_dict(report["config"]).layer_formats
    packed = packed_layers(model)
    assert set(chosen) == set(packed)
    for name, p in packed.items():
        f = chosen[name]
        assert (p.bits, p.group_size) == (f.bits, f.group_size)
    assert sum(8 * p.packed_weight().nbytes() for p in packed.values()) / weights == pytest.approx(
        summary["bits_per_weight"])
    labels = [c["label"] for c in search["measured"]]
    assert ("per-layer" in labels) == per_layer
    if not per_layer:
        assert len({(f.bits, f.group_size, f.ratio) for f in chosen.values()}) == 1
    best = min(search["measured"], key=lambda c: c["heldout_loss"])
    assert search["choice"] == best["label"]  # the lowest measured held-out loss wins
    assert all(c["bits_per_weight"] <= 3.4 for c in search["measured"])


def test_given_layer_formats_are_used_as_given_by_the_calibrated_method():
    from gqsa.compress import compress_model
    from gqsa.models.surgery import packed_layers

    model = tiny_model("llama")
    names = list(compressible_linears(model))
    formats = {names[0]: LayerFormat(bits=2, group_size=32, ratio=0.5), names[3]: LayerFormat(bits=8, group_size=8)}
    cfg = _config(0.0).replace(layer_formats=formats)
    assert CompressConfig.from_json(cfg.to_json()) == cfg
    compress_model(model, cfg, calib_ids=_ids(), progress=False)
    packed = packed_layers(model)
    assert (packed[names[0]].bits, packed[names[0]].group_size) == (2, 32)
    assert packed[names[0]].packed_weight().sparsity == pytest.approx(0.5)
    assert (packed[names[3]].bits, packed[names[3]].group_size) == (8, 8)
    assert (packed[names[1]].bits, packed[names[1]].group_size) == (4, 16)  # the config's own format


def test_magnitude_takes_layer_formats_too():
    from gqsa.compress import compress_model
    from gqsa.models.surgery import packed_layers

    model = tiny_model("llama")
    name = list(compressible_linears(model))[2]
    cfg = _config(0.0).replace(method="magnitude", layer_formats={name: LayerFormat(bits=3, group_size=64)})
    compress_model(model, cfg, progress=False)
    assert (packed_layers(model)[name].bits, packed_layers(model)[name].group_size) == (3, 64)


@pytest.mark.parametrize("change,message", [
    ({"sparsity": SparsitySpec(ratio=0.5, allocation="model")}, "allocation 'model' does not apply"),
    ({"method": "sparsegpt", "quant": None, "sparsity": SparsitySpec(ratio=0.5, pattern="2:4")}, "chooses packed"),
])
def test_settings_the_search_cannot_serve_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        _config().replace(**change)


def test_bad_layer_formats_are_named():
    from gqsa.compress import compress_model

    with pytest.raises(ValueError, match="LayerFormat.bits must be one of"):
        LayerFormat(bits=5)
    with pytest.raises(ValueError, match="a non-empty list of code widths"):
        FormatSearchSpec(bits=())
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="layer_formats names 1 layer"):
        compress_model(model, _config(0.0).replace(layer_formats={"model.nope": LayerFormat()}), calib_ids=_ids(),
                       progress=False)
    name = list(compressible_linears(model))[0]
    with pytest.raises(ValueError, match="group_size 256 does not divide in_features 64"):
        compress_model(model, _config(0.0).replace(layer_formats={name: LayerFormat(group_size=256)}),
                       calib_ids=_ids(), progress=False)
    with pytest.raises(ValueError, match="smallest candidate formats need"):
        compress_model(model, _config(0.5), calib_ids=_ids(), progress=False)


def test_cli_target_bpw_writes_the_choice_and_info_shows_the_mix(dense_dir, text_file, tmp_path, capsys):
    from gqsa.cli import main

    out = tmp_path / "tbpw"
    rc = main(["compress", str(dense_dir), "--out", str(out), "--target-bpw", "3.6", "--search-group-sizes", "16,32,64",
               "--search-ratios", "0,0.25", "--calib-dataset", str(text_file), "--calib-samples", "8", "--seq-len", "32",
               "--bqpo-epochs", "0", "--e2e-epochs", "0"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "formats chosen for 3.6 bits per weight" in printed
    assert "bits per weight (all metadata counted)" in printed and "W4 group 16" not in printed  # not the preset's
    report = json.loads((out / "report.json").read_text())
    saved = CompressConfig.load(out / "compress_config.json")
    assert saved.search.target_bpw == 3.6 and saved.layer_formats  # the resolved choice is saved
    assert report["summary"]["bits_per_weight"] <= 3.6 and math.isfinite(report["format_search"]["time_s"]["total"])
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "per-layer formats chosen for 3.6 bits per weight" in info
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(dense_dir), "--out", str(tmp_path / "bad"), "--target-bpw", "3", "--search-bits", "2,x"])
    assert exit_.value.code == 2
    assert "expected comma-separated integers, got '2,x'" in capsys.readouterr().err
