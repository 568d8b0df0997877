"""Integrity checks for the bundled Northwind Home customer-support dataset.

Uses only the standard library so it runs before the heavy dependencies are installed.
"""

import json
from collections import Counter
from pathlib import Path

import pytest

FILES = ("sentiment.jsonl", "faq.jsonl", "qa.jsonl", "question_pairs.jsonl")

# Nominal row counts; a file may be at most 5% smaller.
EXPECTED_ROWS = {
    "sentiment.jsonl": 300,
    "faq.jsonl": 40,
    "qa.jsonl": 320,
    "question_pairs.jsonl": 300,
}

SENTIMENT_LABELS = {"negative", "neutral", "positive"}


def _support_dir():
    """Return the data folder: the installed package's copy, else the source tree's."""
    try:
        from importlib.resources import files

        folder = files("mtpeft") / "resources" / "support"
        if all((folder / name).is_file() for name in FILES):
            return folder
    except Exception:  # mtpeft not importable (or its dependencies are missing)
        pass
    return Path(__file__).resolve().parent.parent / "src" / "mtpeft" / "resources" / "support"


SUPPORT = _support_dir()


def _load(name):
    text = (SUPPORT / name).read_text(encoding="utf-8")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        assert line.strip(), f"{name}:{lineno} is blank"
        row = json.loads(line)
        assert isinstance(row, dict), f"{name}:{lineno} is not a JSON object"
        rows.append(row)
    return rows


def _norm(text):
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def data():
    return {name: _load(name) for name in FILES}


@pytest.mark.parametrize("name", FILES)
def test_file_parses_and_has_enough_rows(data, name):
    minimum = int(EXPECTED_ROWS[name] * 0.95)
    assert len(data[name]) >= minimum, f"{name}: {len(data[name])} rows < {minimum}"


def test_readme_present():
    assert (SUPPORT / "README.md").is_file()


def test_sentiment_rows(data):
    rows = data["sentiment.jsonl"]
    for row in rows:
        assert set(row) == {"text", "label"}, row
        assert isinstance(row["text"], str) and row["text"].strip(), row
        assert row["label"] in SENTIMENT_LABELS, row
    counts = Counter(row["label"] for row in rows)
    assert set(counts) == SENTIMENT_LABELS
    # Roughly balanced: every label holds at least a quarter of the rows.
    assert min(counts.values()) >= len(rows) // 4, counts


def test_sentiment_no_duplicate_texts(data):
    texts = Counter(_norm(row["text"]) for row in data["sentiment.jsonl"])
    dupes = [text for text, n in texts.items() if n > 1]
    assert not dupes, dupes


def test_faq_rows(data):
    rows = data["faq.jsonl"]
    for row in rows:
        assert set(row) == {"id", "question", "context"}, row
        assert row["question"].strip() and row["context"].strip(), row
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "duplicate faq ids"
    contexts = [row["context"] for row in rows]
    assert len(contexts) == len(set(contexts)), "duplicate faq contexts"


def test_qa_ids_unique(data):
    ids = [row["id"] for row in data["qa.jsonl"]]
    assert len(ids) == len(set(ids)), "duplicate qa ids"


def test_qa_context_matches_faq(data):
    faq = {row["id"]: row["context"] for row in data["faq.jsonl"]}
    for row in data["qa.jsonl"]:
        assert row["faq_id"] in faq, row["id"]
        assert row["context"] == faq[row["faq_id"]], row["id"]


def test_qa_answer_spans(data):
    for row in data["qa.jsonl"]:
        assert row["question"].strip(), row["id"]
        answers = row["answers"]
        assert isinstance(answers, list) and (answers or "question_of" in row), row["id"]
        for ans in answers:
            text, start = ans["text"], ans["answer_start"]
            assert isinstance(start, int) and not isinstance(start, bool), row["id"]
            assert text and 0 <= start <= len(row["context"]) - len(text), row["id"]
            assert row["context"][start:start + len(text)] == text, (row["id"], text, start)


def test_qa_covers_every_faq(data):
    per_faq = Counter(row["faq_id"] for row in data["qa.jsonl"])
    assert set(per_faq) == {row["id"] for row in data["faq.jsonl"]}
    spans = {}
    for row in data["qa.jsonl"]:
        if row["answers"]:
            spans.setdefault(row["faq_id"], set()).add(row["answers"][0]["text"])
    assert all(len(s) >= 3 for s in spans.values()), spans


def test_unanswerable_questions_come_from_another_entry(data):
    """80 rows pair a question written for one entry with another entry's context: no answer there."""
    by_id = {row["id"]: row for row in data["qa.jsonl"]}
    unanswerable = [row for row in data["qa.jsonl"] if not row["answers"]]
    assert len(unanswerable) == 80
    answerable = {(row["question"], row["faq_id"]) for row in by_id.values() if row["answers"]}
    for row in unanswerable:
        assert row["question_of"] != row["faq_id"] and (row["question"], row["question_of"]) in answerable, row["id"]


def test_question_pairs_rows(data):
    rows = data["question_pairs.jsonl"]
    for row in rows:
        assert set(row) == {"question1", "question2", "label"}, row
        assert row["question1"].strip() and row["question2"].strip(), row
        assert row["label"] in (0, 1) and not isinstance(row["label"], bool), row
        assert _norm(row["question1"]) != _norm(row["question2"]), row
    counts = Counter(row["label"] for row in rows)
    assert min(counts[0], counts[1]) >= 0.4 * len(rows), counts


def test_question_pairs_no_duplicates(data):
    keys = Counter(
        frozenset((_norm(row["question1"]), _norm(row["question2"])))
        for row in data["question_pairs.jsonl"]
    )
    dupes = [tuple(key) for key, n in keys.items() if n > 1]
    assert not dupes, dupes
