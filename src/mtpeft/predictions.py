"""Typed results of ``MultiTaskModel.predict``: small, printable, JSON-ready."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LabelPrediction:
    """A classification: the best label, its probability and every label's probability."""

    task: str
    label: str
    score: float
    probabilities: dict[str, float]

    def to_dict(self) -> dict:
        return {"type": "label", **asdict(self)}


@dataclass
class ScorePrediction:
    """A regression output, such as a 0-5 similarity score."""

    task: str
    score: float

    def to_dict(self) -> dict:
        return {"type": "score", **asdict(self)}


@dataclass
class AnswerPrediction:
    """An extractive answer: its text and ``context[start:end]`` character span.

    ``score`` is the softmax probability of the chosen span among the candidate spans.
    """

    task: str
    answer: str
    start: int
    end: int
    score: float

    def to_dict(self) -> dict:
        return {"type": "answer", **asdict(self)}


Prediction = LabelPrediction | ScorePrediction | AnswerPrediction
