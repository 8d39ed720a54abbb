"""Checkpoints from strangers: every load path (gqsa.load, transformers' from_pretrained, gqsa info) refuses a
corrupted or crafted checkpoint with a message naming the file and the tensor, and never crashes.

"Crafted" cases rewrite the tensors *and* their SHA-256 records, as an attacker would: only the format's own
rules (PackedWeight.validate, the finiteness check, the header checks) can catch them.
"""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_tokenizer

import gqsa
from gqsa.compress import compress_model
from gqsa.config import CompressConfig, QuantSpec, SparsitySpec
from gqsa.format.checkpoint import GQSA_CONFIG_NAME, WEIGHTS_NAME, CheckpointError, tensor_sha256

LAYER = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tiny import tiny_model

    model = tiny_model("llama")
    cfg = CompressConfig(method="magnitude", quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(ratio=0.5))
    compress_model(model, cfg, progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "w4s50"
    gqsa.save(model, tiny_tokenizer(), path, compression=cfg.to_dict())
    return path


def _copy(saved, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(saved, dst)
    return dst


def _craft(path, mutate):
    """Apply ``mutate(tensors)`` to the weights and record the new tensors' SHA-256, shapes and dtypes."""
    tensors = load_file(path / WEIGHTS_NAME)
    mutate(tensors)
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    cfg = json.loads((path / GQSA_CONFIG_NAME).read_text())
    cfg["weights"]["tensors"] = {
        name: {"sha256": tensor_sha256(t), "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for name, t in tensors.items()
    }
    (path / GQSA_CONFIG_NAME).write_text(json.dumps(cfg))


def _set(name, index, value):
    def mutate(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[index] = value
    return mutate


def _flip_byte(path):
    data = bytearray((path / WEIGHTS_NAME).read_bytes())
    data[-7] ^= 0x5A
    (path / WEIGHTS_NAME).write_bytes(bytes(data))


def _truncate(path):
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) - 100])


def _drop_tensor(path):
    def mutate(tensors):
        del tensors[f"{LAYER}.scale"]
    _craft(path, mutate)


def _edit_hf_layers(path):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["layers"][LAYER]["nnz"] += 1
    (path / "config.json").write_text(json.dumps(config))


def _edit_nnz_everywhere(path):
    for name in ("config.json", GQSA_CONFIG_NAME):
        cfg = json.loads((path / name).read_text())
        layers = cfg["quantization_config"]["layers"] if name == "config.json" else cfg["layers"]
        layers[LAYER]["nnz"] -= 1
        (path / name).write_text(json.dumps(cfg))


def _bad_metadata(path):
    for name in ("config.json", GQSA_CONFIG_NAME):
        cfg = json.loads((path / name).read_text())
        layers = cfg["quantization_config"]["layers"] if name == "config.json" else cfg["layers"]
        layers[LAYER]["group_size"] = 0
        (path / name).write_text(json.dumps(cfg))


def _reversed_row(tensors):
    crow, col = tensors[f"{LAYER}.crow_indices"], tensors[f"{LAYER}.col_indices"].clone()
    a, b = int(crow[0]), int(crow[1])
    col[a:b] = col[a:b].flip(0)
    tensors[f"{LAYER}.col_indices"] = col


# (case, corrupt(path), words the error must contain)
CASES = [
    ("column index past the row", lambda p: _craft(p, _set(f"{LAYER}.col_indices", 3, 30000)), "col_indices"),
    ("negative column index", lambda p: _craft(p, _set(f"{LAYER}.col_indices", 0, -5)), "col_indices"),
    ("columns not increasing in a row", lambda p: _craft(p, _reversed_row), "strictly increase"),
    ("row pointer past nnz", lambda p: _craft(p, _set(f"{LAYER}.crow_indices", 5, 10**6)), "crow_indices"),
    ("decreasing row pointers", lambda p: _craft(p, _set(f"{LAYER}.crow_indices", 2, 1)), "crow_indices"),
    ("NaN scale", lambda p: _craft(p, _set(f"{LAYER}.scale", 2, float("nan"))), "scale"),
    ("Inf in a dense tensor", lambda p: _craft(p, _set("model.norm.weight", 4, float("inf"))), "non-finite"),
    ("flipped byte", _flip_byte, "corrupted"),
    ("truncated weights", _truncate, "truncated"),
    ("tensor removed", _drop_tensor, "scale"),
    ("config.json disagrees with gqsa_config.json", _edit_hf_layers, "disagrees"),
    ("shapes edited", _edit_nnz_everywhere, "shape"),
    ("malformed layer metadata", _bad_metadata, "group_size"),
    ("gqsa_config.json missing", lambda p: (p / GQSA_CONFIG_NAME).unlink(), GQSA_CONFIG_NAME),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case,corrupt,words", CASES, ids=IDS)
def test_from_pretrained_refuses_it(saved, tmp_path, case, corrupt, words):
    from transformers import AutoModelForCausalLM

    path = _copy(saved, tmp_path)
    corrupt(path)
    with pytest.raises(ValueError, match=words):
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("case,corrupt,words", [c for c in CASES if c[0] != "config.json disagrees with gqsa_config.json"],
                         ids=[i for i in IDS if i != "config.json disagrees with gqsa_config.json"])
def test_gqsa_load_refuses_it(saved, tmp_path, case, corrupt, words):
    path = _copy(saved, tmp_path)
    corrupt(path)
    with pytest.raises((CheckpointError, FileNotFoundError), match=words):
        gqsa.load(path)


def test_from_pretrained_of_a_good_checkpoint_still_loads_in_any_dtype(saved):
    from transformers import AutoModelForCausalLM

    reference, _ = gqsa.load(saved)
    for dtype in (None, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(saved, **({} if dtype is None else {"dtype": dtype}))
        layer = model.get_submodule(LAYER)
        assert torch.equal(layer.col_indices, reference.get_submodule(LAYER).col_indices)


def test_a_cast_tensor_that_differs_from_the_file_is_caught(saved, tmp_path, monkeypatch):
    """Tensors transformers casts (dtype=...) are compared with the file's bytes, not skipped."""
    from transformers import AutoModelForCausalLM

    from gqsa.models import checkpoints

    original = checkpoints.verify_tensors

    def tampered(path, cfg, tensors, verify):
        tensors["model.norm.weight"].add_(1.0)  # as if the loader had read other bytes than the file holds
        return original(path, cfg, tensors, verify)

    monkeypatch.setattr(checkpoints, "verify_tensors", tampered)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)


def test_checksums_can_be_skipped_but_not_the_format_rules(saved, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = _copy(saved, tmp_path)
    _flip_byte(path)  # a code byte: still a valid weight
    monkeypatch.setenv("GQSA_VERIFY_CHECKSUMS", "0")
    AutoModelForCausalLM.from_pretrained(path)
    _craft(path, _set(f"{LAYER}.col_indices", 3, 30000))
    with pytest.raises(CheckpointError, match="col_indices"):
        AutoModelForCausalLM.from_pretrained(path)


GENERATE = textwrap.dedent('''
    import sys
    import torch
    import gqsa
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    except ValueError as exc:
        print("refused:", exc)
        sys.exit(0)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    print("generated", out.tolist())
''')


def test_generate_after_from_pretrained_of_a_crafted_checkpoint_never_crashes(saved, tmp_path):
    """The reported exploit, end to end in a child process: crafted indices, valid checksums, generate()."""
    path = _copy(saved, tmp_path)
    _craft(path, _set(f"{LAYER}.col_indices", 3, 30000))
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "refused:" in proc.stdout and "col_indices" in proc.stdout, proc.stdout


INFO_CASES = [c for c in CASES if c[0] not in ("config.json disagrees with gqsa_config.json",)] + [
    ("config.json missing", lambda p: (p / "config.json").unlink(), "config.json"),
]


@pytest.mark.parametrize("case,corrupt,words", INFO_CASES, ids=[c[0] for c in INFO_CASES])
def test_info_says_what_is_wrong(saved, tmp_path, capsys, case, corrupt, words):
    from gqsa.cli import main

    path = _copy(saved, tmp_path)
    corrupt(path)
    code = main(["info", str(path)])
    out, err = capsys.readouterr()
    assert code == 2 and not out
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_info_skip_checksums_still_checks_the_format(saved, tmp_path, capsys):
    from gqsa.cli import main

    path = _copy(saved, tmp_path)
    _flip_byte(path)  # a code byte: only the hash sees it
    assert main(["info", str(path)]) == 2
    assert "corrupted" in capsys.readouterr().err
    assert main(["info", str(path), "--skip-checksums"]) == 0
    capsys.readouterr()
    _craft(path, _set(f"{LAYER}.col_indices", 3, 30000))
    assert main(["info", str(path), "--skip-checksums"]) == 2
    assert "col_indices" in capsys.readouterr().err


def test_info_of_a_good_checkpoint(saved, capsys):
    from gqsa.cli import main

    assert main(["info", str(saved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] == 14
