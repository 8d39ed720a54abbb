"""gqsa's zero-shot scorer against lm-evaluation-harness 0.4.13 on the same items (examples/lm_eval_interop.py).

The model is a tiny gqsa-compressed checkpoint loaded by ``gqsa.models.loading.load_model`` and handed to lm-eval's
``HFLM``; lm-eval renders the requests from the documents itself and computes its own metrics. lm-eval is a test
dependency (the ``test`` extra): this test fails, it does not skip, when lm-eval is missing.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import gqsa
from gqsa.compress import compress_model
from gqsa.presets import preset
from gqsa.eval.tasks import TASKS, Document, TaskSpec, load_documents
from gqsa.eval.zeroshot import loglikelihoods, task_metrics
from gqsa.models.loading import load_model
from tiny import SAMPLE_TEXT, tiny_model, tiny_tokenizer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lm_eval_interop.py"
DOCS_PER_TASK = 4
BATCH_SIZE = 4


def _example():
    spec = importlib.util.spec_from_file_location("lm_eval_interop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny llama, logits sharpened, compressed data-free (magnitude, W4, 50% of groups) and saved."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    with torch.no_grad():  # logits far from uniform: a wrong token or position changes the numbers a lot
        model.get_output_embeddings().weight.mul_(30.0)
    config = preset("magnitude-w4s50")
    compress_model(model, config, progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-w4s50"
    gqsa.save(model, tokenizer, path, compression=config.to_dict())
    return path


@pytest.fixture(scope="module")
def compressed(checkpoint):
    return load_model(checkpoint)


HANDMADE = TaskSpec("handmade", "none", "multiple_choice")


def _handmade_documents(n: int = 40) -> list[Document]:
    """Short questions with 4 one-word answers of 1 to 12 characters: acc_norm's character count matters here."""
    words = sorted(set(SAMPLE_TEXT.replace(".", " ").replace(",", " ").replace(";", " ").split()))
    docs = []
    for i in range(n):
        context = " ".join(SAMPLE_TEXT.split()[i : i + 3 + i % 4])
        choices = tuple((context, " " + words[(i * 7 + 11 * k) % len(words)]) for k in range(4))
        docs.append(Document("handmade", i, choices, gold=i % 4))
    return docs


@pytest.fixture(scope="module")
def interop(compressed):
    from lm_eval.models.huggingface import HFLM  # a test dependency: ImportError here is a failure

    example = _example()
    model, tokenizer = compressed
    assert any(type(m).__name__ == "PackedLinear" for m in model.modules())
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH_SIZE)
    tasks = {name: (spec, load_documents(spec, DOCS_PER_TASK)) for name, spec in TASKS.items()}
    tasks["handmade"] = (HANDMADE, _handmade_documents())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISABLE_MULTIPROC", "1")  # lm-eval bootstraps the perplexity's stderr in-process
        output = example.run_lm_eval(lm, tasks, bootstrap_iters=10)
    return example, model, tokenizer, tasks, output


@pytest.mark.parametrize("task", sorted(TASKS))
def test_lm_eval_renders_the_same_requests(interop, task):
    example, _, _, tasks, output = interop
    _, docs = tasks[task]
    samples = sorted(output["samples"][f"gqsa_{task}"], key=lambda s: s["doc_id"])
    assert [tuple(s["arguments"]) for s in samples] == [d.requests for d in docs]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_loglikelihoods_and_greedy_match_lm_eval(interop, task):
    example, model, tokenizer, tasks, output = interop
    _, docs = tasks[task]
    ours = loglikelihoods(model, tokenizer, [p for d in docs for p in d.requests], batch_size=BATCH_SIZE,
                          progress=False)
    theirs = example.lm_eval_scores(output, task)
    assert len(ours) == len(theirs) == sum(len(d.requests) for d in docs)
    for (ll, greedy), (ref, ref_greedy) in zip(ours, theirs):
        # lm-eval sums the token log-probabilities in float32, gqsa in float64: 1e-7 of a -1700 sum is 2e-4.
        assert ll == pytest.approx(ref, abs=1e-4, rel=1e-6)
        assert greedy == ref_greedy
    assert min(ll for ll, _ in ours) < -50  # the sharpened model's logliks are far apart, not all near zero


@pytest.mark.parametrize("task", sorted(TASKS))
def test_metrics_match_lm_eval(interop, task):
    example, model, tokenizer, tasks, output = interop
    spec, docs = tasks[task]
    ours = task_metrics(spec, docs, loglikelihoods(model, tokenizer, [p for d in docs for p in d.requests],
                                                   batch_size=BATCH_SIZE, progress=False))
    theirs = output["results"][f"gqsa_{task}"]
    assert ours.n == theirs["sample_len"] == DOCS_PER_TASK
    assert ours.acc == theirs["acc,none"]
    assert ours.stderr == pytest.approx(theirs["acc_stderr,none"], abs=1e-12)
    if example.task_layout(spec, docs) == "multiple_choice":
        assert ours.acc_norm == theirs["acc_norm,none"]
        assert ours.acc_norm_stderr == pytest.approx(theirs["acc_norm_stderr,none"], abs=1e-12)
    if spec.kind == "greedy":
        assert ours.ppl == pytest.approx(theirs["perplexity,none"], rel=1e-5)
        assert math.isfinite(ours.ppl) and ours.ppl > 1


def test_acc_norm_decisions_match_lm_eval_document_by_document(interop):
    """acc and acc_norm of every multiple-choice document, from lm-eval's own log-likelihoods, against its decisions.

    The handmade task has answers of very different lengths, so that some documents are decided differently when
    the separating space is counted (a test that could not tell the two conventions apart would prove nothing).
    """
    example, model, tokenizer, tasks, output = interop
    compared, space_matters = 0, 0
    for task, (spec, docs) in tasks.items():
        if example.task_layout(spec, docs) != "multiple_choice":
            continue
        samples = sorted(output["samples"][f"gqsa_{task}"], key=lambda s: s["doc_id"])
        scores = example.lm_eval_scores(output, task)
        offset = 0
        for doc, sample in zip(docs, samples):
            lls = scores[offset : offset + len(doc.requests)]
            offset += len(doc.requests)
            one = task_metrics(spec, [doc], lls)
            assert (one.acc, one.acc_norm) == (sample["acc"], sample["acc_norm"]), (task, doc.doc_id)
            with_space = [ll / len(cont) for (ll, _), (_, cont) in zip(lls, doc.requests)]
            space_matters += (max(range(len(lls)), key=with_space.__getitem__) == doc.gold) != sample["acc_norm"]
            compared += 1
    # piqa, arc_easy, arc_challenge, hellaswag, boolq, csqa, openbookqa, sciq, socialiqa (not winogrande, lambada)
    assert compared == 9 * DOCS_PER_TASK + len(tasks["handmade"][1])
    assert space_matters > 0


def test_handmade_task_metrics_match_lm_eval(interop):
    example, model, tokenizer, tasks, output = interop
    spec, docs = tasks["handmade"]
    ours = task_metrics(spec, docs, loglikelihoods(model, tokenizer, [p for d in docs for p in d.requests],
                                                   batch_size=BATCH_SIZE, progress=False))
    theirs = output["results"]["gqsa_handmade"]
    assert (ours.acc, ours.acc_norm) == (theirs["acc,none"], theirs["acc_norm,none"])
    assert ours.acc != ours.acc_norm


def _bos_tokenizer():
    """The tiny tokenizer, made to put BOS in front of every encoding as Llama 3's and Gemma's tokenizers do."""
    from tokenizers import processors

    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)]
    )
    return tokenizer


EDGE_REQUESTS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("A journey of a thousand miles ", "begins with a single step."),  # trailing space
    ("", " Group quantization and sparsity"),  # empty context
    ("<|endoftext|>Wikipedia is a free", " online encyclopedia"),  # already starts with BOS
    ("The quick brown fox jumps over the lazy dog. " * 12, "A journey"),  # longer than the model: truncated
]


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos-tokenizer"])
def test_hflm_loglikelihood_matches_on_edge_cases(bos):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = tiny_model("llama", max_position_embeddings=64)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    tokenizer = _bos_tokenizer() if bos else tiny_tokenizer()
    assert (tokenizer.encode("The")[0] == tokenizer.bos_token_id) == bos
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(EDGE_REQUESTS)]
    theirs = lm.loglikelihood(requests, disable_tqdm=True)
    ours = loglikelihoods(model, tokenizer, EDGE_REQUESTS, batch_size=3, progress=False)
    for (ll, greedy), (ref, ref_greedy) in zip(ours, theirs):
        assert ll == pytest.approx(ref, abs=1e-4, rel=1e-6) and greedy == ref_greedy


def test_example_script_runs_on_a_checkpoint(capsys, checkpoint, monkeypatch):
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    code = _example().main([str(checkpoint), "--tasks", "winogrande,lambada", "--limit", "3", "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["task"] for r in rows] == ["winogrande", "lambada"]
    for row in rows:
        assert row["max_abs_loglik_diff"] < 1e-3 and row["greedy_agree"]
        assert row["lm_eval"]["acc"] == row["gqsa"]["acc"]
