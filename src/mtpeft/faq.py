"""An FAQ: the file a user provides, and an embedding index over its entries.

Each entry is a question and the paragraph that answers it (``context``, or ``answer``).
The index holds bare-backbone embeddings, so a new FAQ needs no training: retrieval is
cosine similarity, and the similarity task re-ranks the top hits by their questions.

An entry is embedded as its question followed by its context: customers ask about details
that only the context names ("what does it cost to have a couch collected?" belongs under
"How do I return an item?"). On the packaged data this finds the right entry among the
top 5 for 97 % of the 240 QA questions, against 83 % for the questions alone
(``benchmarks/faq_retrieval.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mtpeft.data import DataError, read_records
from mtpeft.embeddings import embed_texts
from mtpeft.tasks.presets import support_data_dir

if TYPE_CHECKING:
    from mtpeft.model import MultiTaskModel

CONTEXT_COLUMNS = ("context", "answer")  # either names the paragraph that answers the question
INDEX_TOKENS = 256  # question + a 40-90 word context fit; longer contexts keep their start


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
    entries = faq_entries(read_records(path))
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
    if not isinstance(value, str) or not value.strip():
        raise DataError(where, column, f"expected non-empty text, found {value!r}")
    return value


class FaqIndex:
    """Cosine search over the FAQ entries' embeddings, (N, H) unit vectors."""

    def __init__(self, entries: list[FaqEntry], vectors: torch.Tensor) -> None:
        if len(entries) != len(vectors):
            raise ValueError(f"{len(entries)} FAQ entries but {len(vectors)} vectors")
        self.entries, self.vectors = entries, vectors

    @classmethod
    def build(cls, model: MultiTaskModel, entries: list[FaqEntry], with_context: bool = True,
              embed: Callable[..., torch.Tensor] | None = None) -> FaqIndex:
        """Embed each entry's question and (``with_context``) its context, as one text.

        ``embed(texts, max_length=...)`` reaches the backbone (default ``embed_texts`` on ``model``;
        the server passes one that runs on its model thread).
        """
        texts = [f"{e.question} {e.context}" if with_context else e.question for e in entries]
        embed = embed or (lambda texts, **options: embed_texts(model, texts, **options))
        return cls(entries, embed(texts, max_length=INDEX_TOKENS))

    def search(self, query: torch.Tensor, k: int) -> list[tuple[FaqEntry, float]]:
        """The ``k`` entries closest to the (H,) unit ``query``, best first; equal scores in FAQ order
        (``topk`` orders ties arbitrarily, so the answer's entry could change with ``k``)."""
        scores = self.vectors @ query  # (N,)
        top = torch.sort(scores, descending=True, stable=True)
        return [(self.entries[i], float(s)) for s, i in zip(top.values[:k].tolist(), top.indices[:k].tolist())]
