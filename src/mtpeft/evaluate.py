"""Scoring a trained task on labelled examples with the task's own metrics."""

from __future__ import annotations

from collections.abc import Sequence

from mtpeft.examples import Example
from mtpeft.model import MultiTaskModel
from mtpeft.tasks import task_type


def evaluate_task(model: MultiTaskModel, task: str, examples: Sequence[Example], batch_size: int = 64) -> dict[str, float]:
    """The task's metrics (in points) on ``examples``, plus how many were scored."""
    spec = model.spec(task)
    predictions = model.run([(task, ex) for ex in examples], batch_size=batch_size)
    metrics = task_type(spec).score(spec, predictions, examples)
    return {**metrics, "examples": len(examples)}
