"""Typed results of ``MultiTaskModel.predict``: small, printable, JSON-ready.

``to_dict`` copies fields by hand rather than with ``dataclasses.asdict``, whose recursive
deep copy took ~65 us per served prediction in a profile of the server.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LabelPrediction:
    """A classification: the best label, its probability and every label's probability."""

    task: str
    label: str
    score: float
    probabilities: dict[str, float]

    def to_dict(self) -> dict:
        return {"type": "label", "task": self.task, "label": self.label, "score": self.score,
                "probabilities": dict(self.probabilities)}


@dataclass
class ScorePrediction:
    """A regression output, such as a 0-5 similarity score."""

    task: str
    score: float

    def to_dict(self) -> dict:
        return {"type": "score", "task": self.task, "score": self.score}


@dataclass
class AnswerPrediction:
    """An extractive answer: its text and ``context[start:end]`` character span.

    ``score`` is the softmax probability of the chosen span among the candidate spans and
    "no answer". An empty ``answer`` is "no answer": from a task with ``allow_no_answer``,
    whose ``score`` is then the probability of "no answer", or for a context with no tokens.
    """

    task: str
    answer: str
    start: int
    end: int
    score: float

    def to_dict(self) -> dict:
        return {"type": "answer", "task": self.task, "answer": self.answer, "start": self.start, "end": self.end,
                "score": self.score}


Prediction = LabelPrediction | ScorePrediction | AnswerPrediction


@dataclass
class NoTaskPrediction:
    """An input routed to no task: the router was not sure enough, or no task takes its shape.

    Nothing was predicted; ``candidates`` are ``(task, probability)`` best first, so a caller
    can ask again with an explicit task.
    """

    reason: str
    confidence: float
    candidates: list[tuple[str, float]]
    task: None = None

    def to_dict(self) -> dict:
        return {"type": "no-task", "task": None, "reason": self.reason, "confidence": self.confidence,
                "candidates": [{"task": t, "probability": p} for t, p in self.candidates]}
