"""Task types by name: the registry that turns ``TaskSpec.type`` into behaviour."""

from __future__ import annotations

from mtpeft.tasks.base import TaskType
from mtpeft.tasks.classification import Classification
from mtpeft.tasks.extractive_qa import ExtractiveQA
from mtpeft.tasks.regression import Regression
from mtpeft.tasks.spec import TASK_TYPES, TaskSpec

_TYPES: dict[str, TaskType] = {
    "classification": Classification(),
    "pair-classification": Classification(),
    "regression": Regression(),
    "extractive-qa": ExtractiveQA(),
}
assert set(_TYPES) == set(TASK_TYPES)


def task_type(spec: TaskSpec) -> TaskType:
    return _TYPES[spec.type]


__all__ = ["TaskSpec", "TaskType", "task_type"]
