"""Where a task's training and evaluation examples come from.

A user passes a folder (a built-in task's files are found in it by name), a file, or a
``datasets`` object. Without separate evaluation data, a fixed share of rows is held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtpeft.data import DataError, LoadReport, dataset_records, load_examples, to_examples
from mtpeft.examples import Example
from mtpeft.tasks.presets import DataLayout
from mtpeft.tasks.spec import TaskSpec

DEFAULT_HOLDOUT_EVERY = 10


@dataclass
class TaskData:
    train: list[Example]
    eval: list[Example]
    skipped: list[DataError]
    description: dict  # where each split came from, recorded in the run's training.json


def split_holdout(examples: list[Example], every: int) -> tuple[list[Example], list[Example]]:
    """Every ``every``-th example (the last of each group) is held out for evaluation."""
    train = [ex for i, ex in enumerate(examples) if i % every != every - 1]
    held = [ex for i, ex in enumerate(examples) if i % every == every - 1]
    return train, held


def load_task_data(spec: TaskSpec, data: str | Path, eval_data: str | Path | None = None,
                   layout: DataLayout | None = None, skip_bad_rows: bool = False) -> TaskData:
    """Training and evaluation examples for ``spec`` from a folder or files.

    A layout's article split describes its own file, given as its folder or by name: any
    other file (``eval_data`` too) is read whole.
    """
    data = Path(data)
    if layout and layout.train_articles and not eval_data and data.is_file() and data.name == layout.train_file:
        data = data.parent  # the built-in task's own file: split by article, as from its folder
    train_articles = layout.train_articles if layout else None
    eval_articles = None
    if data.is_dir():
        if layout is None:
            raise ValueError(f"{data} is a folder; pass a data file for task {spec.name!r} (a folder works for built-in tasks)")
        train_path = data / layout.train_file
        eval_path = Path(eval_data) if eval_data else None if layout.holdout_every else data / layout.eval_file
        if not eval_data:
            eval_articles = layout.eval_articles
    else:  # a file of the user's own is read whole
        train_path, eval_path, train_articles = data, Path(eval_data) if eval_data else None, None
    train = _load(train_path, spec, train_articles, skip_bad_rows)
    if eval_path is not None:
        evaluation = _load(eval_path, spec, eval_articles, skip_bad_rows)
        return TaskData(train.examples, evaluation.examples, train.skipped + evaluation.skipped,
                        {"train": train.description, "eval": evaluation.description})
    every = (layout.holdout_every if layout else None) or DEFAULT_HOLDOUT_EVERY
    train_examples, eval_examples = split_holdout(train.examples, every)
    return TaskData(train_examples, eval_examples, train.skipped,
                    {"train": train.description, "eval": f"every {every}th row of {train_path}, held out"})


def load_eval_examples(spec: TaskSpec, data: str | Path, layout: DataLayout | None,
                       skip_bad_rows: bool = False) -> list[Example]:
    """The evaluation examples of a built-in task's folder, reading its evaluation file only
    (a folder with just ``dev.tsv`` will do, and 67k training rows are not parsed to score 872);
    a layout that holds rows out of its training file reads that file.

    A file is read whole, as ``load_task_data`` reads an evaluation file, unless it is the
    built-in task's own evaluation file: that one gives the rows its folder would.
    """
    data = Path(data)
    if not data.is_dir():
        if layout is None or data.name != layout.eval_file:
            return load_examples(data, spec, skip_bad_rows=skip_bad_rows).examples
        data = data.parent
    if layout is None:
        raise ValueError(f"{data} is a folder; pass a data file for task {spec.name!r} (a folder works for built-in tasks)")
    if layout.holdout_every:
        return load_task_data(spec, data, None, layout, skip_bad_rows).eval
    return _load(data / layout.eval_file, spec, layout.eval_articles, skip_bad_rows).examples


@dataclass
class _Loaded:
    examples: list[Example]
    skipped: list[DataError]
    description: str


def _load(path: Path, spec: TaskSpec, articles: slice | None, skip_bad_rows: bool) -> _Loaded:
    """Load a file; ``articles`` applies to SQuAD JSON files only."""
    articles = articles if path.suffix == ".json" else None
    report = load_examples(path, spec, articles=articles, skip_bad_rows=skip_bad_rows)
    where = str(path) if articles is None else f"{path} articles[{articles.start or 0}:{articles.stop or ''}]"
    return _Loaded(report.examples, report.skipped, where)


def examples_from_dataset(dataset, spec: TaskSpec, skip_bad_rows: bool = False, name: str = "dataset") -> LoadReport:
    """Validated examples from a ``datasets.Dataset`` (or any sequence of dict rows)."""
    return to_examples(dataset_records(dataset, name), spec, skip_bad_rows, source=name)
