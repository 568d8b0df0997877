"""The unit of data every task type consumes, whatever file it was read from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    """One input with its gold target.

    ``text`` is the sentence, the first sentence of a pair, or a QA question;
    ``text_pair`` is the second sentence or the QA context. ``label`` is a class index
    or a float; ``answers`` holds QA gold spans as ``{"text", "answer_start"}``.
    ``source`` ("file:line") lets errors found later still name where the row came from.
    """

    text: str
    text_pair: str | None = None
    label: int | float | None = None
    answers: list[dict] = field(default_factory=list)
    id: str = ""
    source: str = ""
