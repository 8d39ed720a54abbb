"""Evaluate a gqsa model with lm-evaluation-harness (0.4.13) on the packaged zero-shot items, next to gqsa's scorer.

    pip install lm-eval==0.4.13
    python examples/lm_eval_interop.py [MODEL_OR_DIR] [--tasks piqa,winogrande,lambada] [--limit 50] [--json]

``MODEL_OR_DIR`` is anything :func:`gqsa.models.loading.load_model` takes: a gqsa compressed checkpoint, a Hugging
Face directory, a ``.gguf`` file, or nothing for the default model. Nothing is downloaded:

* lm-eval's ``HFLM`` wraps the model and tokenizer that gqsa loaded (``HFLM(pretrained=model, tokenizer=tokenizer)``);
  the packed GQSA layers run inside it as they do everywhere else;
* each task is an lm-eval ``ConfigurableTask`` whose documents are the local request files that ``gqsa eval
  zeroshot`` reads (:mod:`gqsa.eval.tasks`), handed to lm-eval in memory through the config's ``custom_dataset``.
  lm-eval renders them itself (``doc_to_text`` / ``doc_to_choice`` / ``target_delimiter``) back into exactly the
  (context, continuation) requests of the files, and computes its own metrics;
* :func:`lm_eval.evaluator.evaluate` runs the tasks. ``simple_evaluate`` would first build a ``TaskManager``,
  which indexes every task YAML bundled with lm-eval (about 30 s here) only to resolve names we do not use.

The tasks are rendered as lm-eval renders the same benchmarks: multiple choice with one question and several answers
(acc, acc_norm); winogrande as "multiple input" (the option goes into the context, the continuation is shared; acc
only, as lm-eval's own winogrande: its acc_norm would divide by the length of the contexts); lambada as a
``loglikelihood`` task (acc = greedy match, perplexity of the target word).

The script prints lm-eval's numbers, gqsa's numbers on the same documents, and the largest difference between the
two log-likelihoods of any request.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Any

from gqsa.eval.tasks import Document, TaskSpec, load_documents, parse_tasks

# lm-eval's metric names per task kind ("none" is the name of its default filter).
_METRICS = {"multiple_choice": ("acc", "acc_norm"), "multiple_input": ("acc",), "greedy": ("acc", "perplexity")}


def _answer(continuation: str) -> str:
    """The answer without its separating space: lm-eval adds it back as ``target_delimiter``."""
    if not continuation.startswith(" "):
        raise ValueError(f"continuation {continuation!r} does not start with the space lm-eval puts before answers")
    return continuation[1:]


def task_layout(spec: TaskSpec, documents: list[Document]) -> str:
    """How lm-eval renders the task: ``"greedy"``, ``"multiple_choice"`` or ``"multiple_input"`` (winogrande)."""
    if spec.kind == "greedy":
        return "greedy"
    if all(len({ctx for ctx, _ in d.requests}) == 1 for d in documents):
        return "multiple_choice"
    if all(len({cont for _, cont in d.requests}) == 1 for d in documents):
        return "multiple_input"
    raise ValueError(f"{spec.name}: documents vary both context and continuation; lm-eval cannot render that")


def lm_eval_task_config(spec: TaskSpec, documents: list[Document]) -> dict[str, Any]:
    """An lm-eval task config whose documents (in memory) render to exactly these documents' requests.

    Args:
        spec: the task.
        documents: its documents, from :func:`gqsa.eval.tasks.load_documents`.

    Returns:
        A dict for ``lm_eval.api.task.ConfigurableTask(config=...)``; the task is named ``gqsa_<task>``.
    """
    import datasets

    layout = task_layout(spec, documents)
    if layout == "greedy":  # lambada: the single continuation is the target, space included
        rows = [{"context": d.requests[0][0], "target": d.requests[0][1]} for d in documents]
        fields = {"output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "target",
                  "target_delimiter": ""}
    elif layout == "multiple_choice":  # one question, several answers
        rows = [{"context": d.requests[0][0], "choices": [_answer(c) for _, c in d.requests], "gold": d.gold}
                for d in documents]
        fields = {"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                  "doc_to_target": "gold", "target_delimiter": " "}
    else:  # winogrande: doc_to_text gives the gold index, the choices are the contexts, the continuation is shared
        rows = [{"contexts": [ctx for ctx, _ in d.requests], "target": _answer(d.requests[0][1]), "gold": d.gold}
                for d in documents]
        fields = {"output_type": "multiple_choice", "doc_to_text": "gold", "doc_to_choice": "contexts",
                  "doc_to_target": "target", "target_delimiter": " "}
    aggregation = {"perplexity": ("perplexity", False)}
    metrics = [{"metric": m, "aggregation": aggregation.get(m, ("mean", True))[0],
                "higher_is_better": aggregation.get(m, ("mean", True))[1]} for m in _METRICS[layout]]
    return {
        "task": f"gqsa_{spec.name}",
        "custom_dataset": lambda **kwargs: {"test": datasets.Dataset.from_list(rows)},
        "test_split": "test",
        "metric_list": metrics,
        **fields,
    }


def run_lm_eval(lm, tasks: dict[str, tuple[TaskSpec, list[Document]]], bootstrap_iters: int = 100) -> dict:
    """Evaluate an lm-eval model on gqsa's documents with lm-eval's own task machinery.

    Args:
        lm: an ``lm_eval.api.model.LM``, e.g. ``HFLM(pretrained=model, tokenizer=tokenizer)``.
        tasks: task name -> (spec, documents).
        bootstrap_iters: lm-eval's bootstrap iterations for the standard errors that have no closed form (the
            perplexity's); accuracies get the closed form whenever this is positive.

    Returns:
        What ``lm_eval.evaluator.evaluate`` returns: ``["results"]["gqsa_<task>"]`` holds the metrics
        (``"acc,none"``, ``"acc_stderr,none"``, ...) and ``["samples"]["gqsa_<task>"]`` the per-document requests
        (``"arguments"``) and responses (``"resps"``: ``[(loglikelihood, is_greedy)]`` per request).
    """
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.evaluator import evaluate

    task_objects = {f"gqsa_{name}": ConfigurableTask(config=lm_eval_task_config(spec, docs))
                    for name, (spec, docs) in tasks.items()}
    return evaluate(lm, {"tasks": task_objects}, log_samples=True, bootstrap_iters=bootstrap_iters)


def lm_eval_scores(output: dict, task: str) -> list[tuple[float, bool]]:
    """lm-eval's ``(loglikelihood, is_greedy)`` per request of one task, documents in order, choices in order."""
    samples = sorted(output["samples"][f"gqsa_{task}"], key=lambda s: s["doc_id"])
    return [tuple(resp[0]) for sample in samples for resp in sample["resps"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model dir, gqsa checkpoint or .gguf (default model)")
    parser.add_argument("--tasks", default="piqa,arc_easy,winogrande,boolq,lambada")
    parser.add_argument("--limit", type=int, default=50, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print one JSON object per task")
    args = parser.parse_args(argv)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it warns about every default it fills in

    from lm_eval.models.huggingface import HFLM

    from gqsa.eval.zeroshot import loglikelihoods, task_metrics
    from gqsa.models.loading import load_model

    model, tokenizer = load_model(args.model)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    tasks = {spec.name: (spec, load_documents(spec, args.limit)) for spec in parse_tasks(args.tasks)}
    with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints its bootstrap progress; stdout is for results
        output = run_lm_eval(lm, tasks)
    for name, (spec, docs) in tasks.items():
        ours = loglikelihoods(model, tokenizer, [pair for d in docs for pair in d.requests],
                              batch_size=args.batch_size, progress=False)
        theirs = lm_eval_scores(output, name)
        gqsa_result = task_metrics(spec, docs, ours).to_dict()
        lm_eval_result = {k.split(",")[0]: v for k, v in output["results"][f"gqsa_{name}"].items() if "," in k}
        row = {"task": name, "n": len(docs), "lm_eval": lm_eval_result, "gqsa": gqsa_result,
               "max_abs_loglik_diff": max(abs(a[0] - b[0]) for a, b in zip(ours, theirs)),
               "greedy_agree": all(a[1] == b[1] for a, b in zip(ours, theirs))}
        if args.json:
            print(json.dumps(row))
            continue
        print(f"{name} ({len(docs)} documents): lm-eval acc {lm_eval_result['acc']:.4f}, gqsa acc "
              f"{gqsa_result['acc']:.4f}", end="")
        if "acc_norm" in lm_eval_result:
            print(f"; acc_norm {lm_eval_result['acc_norm']:.4f} vs {gqsa_result['acc_norm']:.4f}", end="")
        if "perplexity" in lm_eval_result:
            print(f"; perplexity {lm_eval_result['perplexity']:.3f} vs {gqsa_result['ppl']:.3f}", end="")
        print(f"; largest |loglik difference| {row['max_abs_loglik_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
