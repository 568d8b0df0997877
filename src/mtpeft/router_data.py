"""Where a router's training examples come from.

Two sources: the tasks' own training inputs (what clients send with a task named), and
request phrasings: plain-text ways of asking for a task ("are these two questions asking
the same thing?") plus off-topic requests labelled with no task. Phrasings are JSON Lines,
one ``{"task": NAME or null, "text": ...}`` per line; the packaged ones cover the demo's
customer-support skills.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from mtpeft.data import decode_file, is_blank, split_lines
from mtpeft.examples import Example
from mtpeft.tasks import TaskSpec

if TYPE_CHECKING:
    from mtpeft.model import ModelInput, MultiTaskModel

MAX_PER_TASK = 1000  # a linear router needs hundreds of examples per task, not a whole GLUE set


def packaged_phrasings_dir() -> Path:
    return Path(str(resources.files("mtpeft") / "resources" / "router"))


def read_phrasings(path: str | os.PathLike) -> list[tuple[str | None, str]]:
    """``(task or None, text)`` rows of a phrasings file or of every ``*.jsonl`` in a folder."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"{path}: no phrasings file (JSON Lines of {{'task': ..., 'text': ...}})")
    rows = []
    for file in files:
        # decoded as data files are: a BOM (Windows editors write one) is no JSON, bad bytes name their line
        for number, line in enumerate(split_lines(decode_file(file)), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{number}: invalid JSON: {err.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or is_blank(row["text"]):
                raise ValueError(f"{file}:{number}: expected {{'task': NAME or null, 'text': non-empty text}}")
            if "task" not in row:  # not taken as null: a misnamed key would teach the router "no task"
                raise ValueError(f"{file}:{number}: no 'task' (null for a request of no task); the row has {sorted(row)}")
            task = row["task"]
            if task is not None and not isinstance(task, str):
                raise ValueError(f"{file}:{number}: 'task' must be a task name or null, got {task!r}")
            rows.append((task, row["text"]))
    return rows


def example_input(example: Example, spec: TaskSpec) -> ModelInput:
    """An ``Example`` as a client would send it to ``spec``'s task."""
    if spec.type == "extractive-qa":
        return {"question": example.text, "context": example.text_pair or ""}
    if spec.is_pair:
        return (example.text, example.text_pair or "")
    return example.text


def spread(items: list, limit: int) -> list:
    """At most ``limit`` items, taken evenly across the list (files are often sorted by label)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1 item, got {limit}")
    if len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def task_inputs(model: MultiTaskModel, task: str, data: str | os.PathLike,
                limit: int = MAX_PER_TASK) -> list[tuple[str, ModelInput]]:
    """A task's training inputs from a data file, or from a folder holding a built-in task's files.

    For built-in tasks whose evaluation rows are held out of one file, only the training
    rows are used, so the router never sees the rows adapters are evaluated on.
    """
    from mtpeft.sources import load_task_data
    from mtpeft.tasks.presets import built_in_layout

    spec = model.spec(task)
    if not str(data).strip():  # Path("") is ".": an unset variable would read the current folder
        raise FileNotFoundError(f"task {task!r}: the data path is empty; name a data file or a folder")
    examples = load_task_data(spec, data, layout=built_in_layout(spec)).train
    return [(task, example_input(ex, spec)) for ex in spread(examples, limit)]


def router_examples(model: MultiTaskModel, data: dict[str, str | os.PathLike] | None = None,
                    phrasings: list[str | os.PathLike] | None = None, packaged: bool = True,
                    limit: int = MAX_PER_TASK) -> tuple[list[tuple[str | None, ModelInput]], dict]:
    """Training examples for a router over ``model``'s tasks, and a summary of where they came from.

    ``data`` maps task names to data files or folders; ``phrasings`` lists extra phrasing
    files; ``packaged`` adds the packaged phrasings. Phrasings of tasks the model does not
    hold are skipped (and counted).
    """
    examples: list[tuple[str | None, ModelInput]] = []
    summary: dict = {"tasks": {}, "phrasings": {}, "skipped_phrasings": 0}
    for task, source in (data or {}).items():
        rows = task_inputs(model, task, source, limit)
        examples.extend(rows)
        summary["tasks"][task] = {"source": _describe(source), "examples": len(rows)}
    sources = ([packaged_phrasings_dir()] if packaged else []) + list(phrasings or [])
    for source in sources:
        for task, text in read_phrasings(source):
            if task is not None and task not in model.specs:
                summary["skipped_phrasings"] += 1
                continue
            examples.append((task, text))
            key = task or "(none)"
            summary["phrasings"][key] = summary["phrasings"].get(key, 0) + 1
    return examples, summary


def _describe(source) -> str:
    """A data source for the record: packaged data by its place in the package, not this machine's path."""
    from pathlib import Path

    from mtpeft.tasks.presets import support_data_dir

    path = Path(str(source))
    return "mtpeft/resources/support (packaged)" if path.resolve() == support_data_dir().resolve() else str(source)
