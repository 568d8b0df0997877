"""An FAQ: the file a user provides, and an embedding index over its entries.

Each entry is a question and the paragraph that answers it (``context``, or ``answer``).
The index holds bare-backbone embeddings, so a new FAQ needs no training: retrieval is
cosine similarity, and the similarity task re-ranks the top hits by their questions.

An entry is scored by two cosines, averaged: with its question followed by its context
(one text), and with the closest single sentence of its context. Customers ask about
details that only the context names ("what does it cost to have a couch collected?"
belongs under "How do I return an item?"), and one sentence that names the detail stands
out less once averaged into a whole paragraph. Measured by ``benchmarks/faq_retrieval.py``
(``results/faq_retrieval.json``): on the packaged data the right entry comes first for
80 % of the 240 QA questions (71 % with the whole text alone, 58 % with the question
alone) and within the top 5 for 98 %; on SQuAD dev paragraphs (600 questions against the
421 paragraphs of the last 10 articles) first for 78 % against 68 %.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mtpeft.data import DataError, is_blank, read_records
from mtpeft.embeddings import embed_texts
from mtpeft.tasks.presets import support_data_dir

if TYPE_CHECKING:
    from mtpeft.model import MultiTaskModel

CONTEXT_COLUMNS = ("context", "answer")  # either names the paragraph that answers the question
INDEX_TOKENS = 256  # question + a 40-90 word context fit; longer contexts keep their start
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class FaqEntry:
    id: str
    question: str
    context: str


def packaged_faq_path() -> Path:
    """The demo shop's FAQ (40 entries) that ships with the package."""
    return support_data_dir() / "faq.jsonl"


def load_faq(path: str | os.PathLike) -> list[FaqEntry]:
    """Read an FAQ from .jsonl, .json (a list of objects), .csv or .tsv.

    Every row needs ``question`` and ``context`` (or ``answer``) text; ``id`` is optional.
    A bad row raises ``DataError`` naming the file, the line and the field.
    """
    if not str(path).strip():  # Path("") is ".", which would read as a missing file named "."
        raise FileNotFoundError("the FAQ path is empty; name a .jsonl, .json, .csv or .tsv file")
    try:
        entries = faq_entries(read_records(path))
    except (KeyError, IndexError, TypeError) as err:  # a {"data": ...} JSON read as SQuAD, without its layout
        found = f"no key {err}" if isinstance(err, KeyError) else str(err)
        raise DataError(str(path), None, "expected a list of FAQ objects or a SQuAD file ({'data': [{'paragraphs': "
                                         f"[{{'context', 'qas': [{{'id', 'question'}}]}}]}}]}}); found {found}") from None
    if not entries:
        raise DataError(str(path), None, "no FAQ entries; expected rows with 'question' and 'context' (or 'answer')")
    return entries


def faq_entries(records: Iterable[tuple[str, dict]] | Sequence[dict | FaqEntry]) -> list[FaqEntry]:
    """Validated entries from ``(where, row)`` records, or from plain dict rows (``FaqEntry`` passes through).

    A row without an id is numbered ``faq-N`` by its place, skipping ids that other rows give.
    """
    rows = [record if isinstance(record, tuple) else (f"FAQ row {i}", record) for i, record in enumerate(records)]
    parsed = [(where, _entry(where, row)) for where, row in rows]
    taken = {entry.id for _, entry in parsed if entry.id}
    entries, seen = [], set()
    for number, (where, entry) in enumerate(parsed, start=1):
        if not entry.id:
            while f"faq-{number}" in taken:
                number += 1
            entry = replace(entry, id=f"faq-{number}")
            taken.add(entry.id)
        if entry.id in seen:
            raise DataError(where, "id", f"duplicate FAQ id {entry.id!r}")
        seen.add(entry.id)
        entries.append(entry)
    return entries


def _entry(where: str, row: dict | FaqEntry) -> FaqEntry:
    """One row as an entry; its id is empty when the row gives none (an id of 0 is an id)."""
    if isinstance(row, FaqEntry):
        return row
    if not isinstance(row, dict):
        raise DataError(where, None, f"expected an object with 'question' and 'context', found {type(row).__name__}")
    question = _text(where, row, ("question",))
    context = _text(where, row, CONTEXT_COLUMNS)
    given = row.get("id")
    return FaqEntry("" if given is None else str(given), question.strip(), context)


def _text(where: str, row: dict, columns: tuple[str, ...]) -> str:
    column = next((c for c in columns if c in row), None)
    if column is None:
        wanted = " or ".join(repr(c) for c in columns)
        raise DataError(where, columns[0], f"missing; an FAQ row needs {wanted}; the row has {sorted(row)}")
    value = row[column]
    if not isinstance(value, str) or is_blank(value):
        raise DataError(where, column, f"expected non-empty text, found {value!r}")
    if not is_unicode(value):  # loaded from a JSON escape, it failed in the tokenizer with a bare TypeError
        raise DataError(where, column, "not valid Unicode text: it holds a lone surrogate (a JSON escape such as "
                                       "\\ud83d without the other half of its pair)")
    return value


def is_unicode(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8: a lone surrogate (half an escaped pair in JSON, bytes that are
    not UTF-8 on a command line) does not, and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sentences(text: str) -> list[str]:
    """``text`` cut after each '.', '!' or '?' followed by a space, and at line breaks."""
    return [part.strip() for part in _SENTENCE_END.split(text) if part.strip()]


class FaqIndex:
    """Cosine search over the FAQ entries: (N, H) unit vectors of the entries' whole texts, and
    optionally (S, H) unit vectors of their context sentences with the entry each belongs to (S,)."""

    def __init__(self, entries: list[FaqEntry], vectors: torch.Tensor, sentence_vectors: torch.Tensor | None = None,
                 sentence_entries: torch.Tensor | None = None) -> None:
        if len(entries) != len(vectors):
            raise ValueError(f"{len(entries)} FAQ entries but {len(vectors)} vectors")
        if (sentence_vectors is None) != (sentence_entries is None) or (
                sentence_vectors is not None and len(sentence_vectors) != len(sentence_entries)):
            raise ValueError("sentence_vectors and sentence_entries go together, one entry index per sentence")
        self.entries, self.vectors = entries, vectors
        self.sentence_vectors, self.sentence_entries = sentence_vectors, sentence_entries

    @classmethod
    def build(cls, model: MultiTaskModel, entries: list[FaqEntry], with_context: bool = True,
              embed: Callable[..., torch.Tensor] | None = None) -> FaqIndex:
        """Embed each entry's question and (``with_context``) its context, as one text, and
        (``with_context``) each sentence of its context on its own.

        ``embed(texts, max_length=...)`` reaches the backbone (default ``embed_texts`` on ``model``;
        the server passes one that runs on its model thread).
        """
        texts = [f"{e.question} {e.context}" if with_context else e.question for e in entries]
        embed = embed or (lambda texts, **options: embed_texts(model, texts, **options))
        vectors = embed(texts, max_length=INDEX_TOKENS)
        if not with_context:
            return cls(entries, vectors)
        cut = [(i, sentence) for i, entry in enumerate(entries) for sentence in sentences(entry.context)]
        owners = torch.tensor([i for i, _ in cut], dtype=torch.long)
        return cls(entries, vectors, embed([sentence for _, sentence in cut], max_length=INDEX_TOKENS), owners)

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """(N,) each entry's score for the (H,) unit ``query``: the mean of its whole text's cosine and
        its closest sentence's (an entry without sentences keeps its whole text's)."""
        whole = self.vectors @ query
        if self.sentence_vectors is None or not len(self.sentence_vectors):
            return whole
        closest = whole.clone().scatter_reduce_(0, self.sentence_entries, self.sentence_vectors @ query, "amax",
                                                include_self=False)
        return (whole + closest) / 2

    def search(self, query: torch.Tensor, k: int) -> list[tuple[FaqEntry, float]]:
        """The ``k`` entries closest to the (H,) unit ``query``, best first; equal scores in FAQ order
        (``topk`` orders ties arbitrarily, so the answer's entry could change with ``k``)."""
        top = torch.sort(self.scores(query), descending=True, stable=True)
        return [(self.entries[i], float(s)) for s, i in zip(top.values[:k].tolist(), top.indices[:k].tolist())]
