"""What the benchmark scripts share (benchmarks/bench/kernel_common.py): the git revision with and without the
uncommitted suffix, the results JSON, and the splicing of a generated block between its markers in a markdown
document."""

import json
import shutil
import subprocess

import pytest

from benchmarks.bench.kernel_common import (
    block_markers,
    git_revision,
    load_results,
    replace_block,
    save_results,
    write_doc_blocks,
)


def test_replace_block_replaces_between_markers_and_keeps_the_rest():
    assert block_markers("t") == ("<!-- t:begin -->", "<!-- t:end -->")
    text = "# R\n\nintro\n<!-- t:begin -->\nold\nlines\n<!-- t:end -->\nafter\n<!-- u:begin -->\nu\n<!-- u:end -->\n"
    assert replace_block(text, "t", "new") == ("# R\n\nintro\n<!-- t:begin -->\nnew\n<!-- t:end -->\nafter\n"
                                               "<!-- u:begin -->\nu\n<!-- u:end -->\n")
    assert replace_block(replace_block(text, "t", "new"), "t", "new") == replace_block(text, "t", "new")


def test_replace_block_appends_a_missing_block_after_a_blank_line():
    appended = "# R\n\nintro\n\n<!-- t:begin -->\nbody\n<!-- t:end -->\n"
    assert replace_block("# R\n\nintro\n\n\n", "t", "body") == appended
    only_begin = "x\n<!-- t:begin -->\n"  # without its end marker the block is appended, the text left as it is
    assert replace_block(only_begin, "t", "b") == only_begin.rstrip("\n") + "\n\n<!-- t:begin -->\nb\n<!-- t:end -->\n"


def test_write_doc_blocks_creates_the_document_and_splices_every_block(tmp_path):
    doc = tmp_path / "RESULTS.md"
    write_doc_blocks(doc, {"a": "A", "b": "B"})
    a_block = "<!-- a:begin -->\nA\n<!-- a:end -->"
    assert doc.read_text() == f"# Results\n\n{a_block}\n\n<!-- b:begin -->\nB\n<!-- b:end -->\n"
    write_doc_blocks(doc, {"b": "B2"})
    assert doc.read_text() == f"# Results\n\n{a_block}\n\n<!-- b:begin -->\nB2\n<!-- b:end -->\n"


def test_results_json_round_trip_sorted(tmp_path):
    path = tmp_path / "r.json"
    assert load_results(path, {"rows": {}}) == {"rows": {}}
    save_results(path, {"rows": {"b": 1, "a": 2.5}, "git_revision": "abc"})
    assert path.read_text() == json.dumps({"git_revision": "abc", "rows": {"a": 2.5, "b": 1}}, indent=1) + "\n"
    assert load_results(path, {"rows": {}}) == {"rows": {"b": 1, "a": 2.5}, "git_revision": "abc"}


@pytest.mark.skipif(shutil.which("git") is None, reason="git missing")
def test_git_revision_marks_uncommitted_tracked_changes_only(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    assert git_revision(cwd=tmp_path) == "unknown"  # not a checkout
    git("init", "-q")
    (tmp_path / "f.txt").write_text("1\n")
    git("add", "f.txt")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "--short", "HEAD")
    (tmp_path / "untracked.txt").write_text("not counted\n")
    assert git_revision(cwd=tmp_path) == git_revision(uncommitted=True, cwd=tmp_path) == head
    (tmp_path / "f.txt").write_text("2\n")
    assert git_revision(cwd=tmp_path) == head
    assert git_revision(uncommitted=True, cwd=tmp_path) == head + "+uncommitted"
