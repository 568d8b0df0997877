"""Reading task data from TSV, CSV, JSONL, SQuAD JSON or a ``datasets`` object.

Every row is checked before training: a bad one raises ``DataError`` naming the file,
the line (or SQuAD question) and the field, unless ``skip_bad_rows`` is set, in which
case it is skipped and counted. Nothing trains silently on garbage.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtpeft.examples import Example
from mtpeft.tasks.spec import TaskSpec

SUBSET_SEED = 0  # every quick run and grid cell of a task draws the same subset

csv.field_size_limit(1 << 24)  # IMDb reviews exceed the 128 KiB default on a few rows


class DataError(ValueError):
    """A row that cannot be used, with where it is and what is wrong."""

    def __init__(self, where: str, field_name: str | None, problem: str) -> None:
        self.where, self.field, self.problem = where, field_name, problem
        location = f"{where}: field {field_name!r}" if field_name else where
        super().__init__(f"{location}: {problem}")


@dataclass
class LoadReport:
    """What loading kept and skipped."""

    examples: list[Example]
    skipped: list[DataError] = field(default_factory=list)


def is_blank(text: str) -> bool:
    """Nothing left once whitespace, control (Cc) and format (Cf) characters are removed: the
    tokenizer drops those, so a text of only "\\u200b", "\\ufeff" or "\\x00" reaches the model empty."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


# ------------------------------------------------------------------ raw records


_LINE_END = re.compile(r"\r\n|\r|\n")
_BYTES_LINE_END = re.compile(rb"\r\n|\r|\n")


def decode_file(path: Path) -> str:
    """A text file's contents; a byte-order mark is dropped, bytes that are not UTF-8 name their line."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # spreadsheets save "Unicode Text" so
        raise DataError(f"{path}:1", None, "the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                                           "save it as UTF-8")
    # The BOM is cut here, not by "utf-8-sig": its errors count bytes from after the BOM, which
    # put a bad byte near a line start on the line before.
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # GLUE's MRPC header has one
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = bom + err.start
        line = len(_BYTES_LINE_END.findall(data, 0, at)) + 1  # lines end as split_lines ends them
        raise DataError(f"{path}:{line}", None, f"bytes that are not UTF-8 at byte {at}; save the file as UTF-8") from None


def split_lines(text: str) -> list[str]:
    """Lines ended by \\n, \\r\\n or \\r only: ``str.splitlines`` also ends them at U+2028, U+0085,
    form feeds and other characters that are text inside a TSV field or a JSON string."""
    lines = _LINE_END.split(text)
    return lines[:-1] if lines and not lines[-1] else lines


def _unreadable(error: DataError, skipped: list[DataError] | None) -> None:
    """A row that cannot be read raises, or is added to ``skipped`` so that reading goes on."""
    if skipped is None:
        raise error
    skipped.append(error)


def read_records(path: str | Path, skipped: list[DataError] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, row)`` for each row of a .tsv, .csv, .jsonl or .json (list of objects) file.

    TSV files are read without quote handling, as GLUE's are written: some sentences
    contain a lone ``"``. Only a field that a CSV writer quoted (pandas' ``to_csv(sep="\\t")``
    of a text with a quote in it) is unquoted. A row that cannot be read (wrong number of
    fields, invalid JSON) raises, or with ``skipped`` is added there: GLUE's QQP train.tsv has
    a few questions cut in two by a line break.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    text = decode_file(path)
    if suffix in (".tsv", ".tab"):
        lines = split_lines(text)
        if not lines:
            raise DataError(f"{path}:1", None, "empty file, expected a header line")
        header = _checked_header(path, lines[0].split("\t"))
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            values = line.split("\t")
            if len(values) != len(header):
                _unreadable(DataError(f"{path}:{number}", None,
                                      f"expected {len(header)} tab-separated fields ({', '.join(header)}), found "
                                      f"{len(values)}: a tab or line break inside a text splits its row, as TSV "
                                      "is read without quotes (--skip-bad-rows skips such rows; a .csv or .jsonl "
                                      "file keeps such texts whole)"), skipped)
                continue
            yield f"{path}:{number}", dict(zip(header, [_csv_unquoted(value) for value in values]))
    elif suffix == ".csv":
        yield from _csv_records(path, text, skipped)
    elif suffix == ".jsonl":
        yield from _json_lines(path, text, skipped)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg == "Extra data" and _first_line_is_json(text):
                # `datasets`' to_json and pandas' to_json(lines=True) write JSON Lines to .json files too.
                yield from _json_lines(path, text, skipped)
                return
            raise _invalid_json(f"{path}:{err.lineno}", err) from None
        if isinstance(data, dict) and "data" in data:
            yield from squad_records(path, data)
        elif isinstance(data, list):
            for i, row in enumerate(data):
                if not isinstance(row, dict):
                    _unreadable(DataError(f"{path}[{i}]", None, f"expected a JSON object, found {type(row).__name__}"),
                                skipped)
                    continue
                yield f"{path}[{i}]", row
        else:
            raise DataError(str(path), None, "expected a list of objects or a SQuAD file ({'data': [...]})")
    else:
        raise ValueError(f"{path}: unknown data format {suffix!r}; use .tsv, .csv, .jsonl or .json")


# A whole field in quotes whose own quotes are all doubled, with at least one: how pandas' and
# the csv module's TSV writers quote a text that holds a quote. GLUE's raw TSVs never double one.
_CSV_QUOTED = re.compile(r'"(?:[^"]|"")*""(?:[^"]|"")*"')


def _csv_unquoted(value: str) -> str:
    """A TSV field as its text: unquoted where a CSV writer quoted it (``"a ""b"" c"`` is
    ``a "b" c``), else as it stands, quotes and all (GLUE's ``"hello" he said``)."""
    return value[1:-1].replace('""', '"') if _CSV_QUOTED.fullmatch(value) else value


def _checked_header(path: Path, header: list[str]) -> list[str]:
    """A header that names each column once: with a name twice, a row's value would silently
    come from the last column of that name. Blank names (a spreadsheet's trailing empty
    columns) may repeat: no task reads them."""
    seen = set()
    for name in header:
        if name.strip() and name in seen:
            raise DataError(f"{path}:1", name, "this column is named twice in the header; rename one of them")
        seen.add(name)
    return header


def _json_lines(path: Path, text: str, skipped: list[DataError] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a JSON Lines file, one object a line."""
    for number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            _unreadable(_invalid_json(f"{path}:{number}", err), skipped)
            continue
        if not isinstance(row, dict):
            _unreadable(DataError(f"{path}:{number}", None, f"expected a JSON object, found {type(row).__name__}"),
                        skipped)
            continue
        yield f"{path}:{number}", row


def _invalid_json(where: str, err: json.JSONDecodeError) -> DataError:
    return DataError(where, None, f"invalid JSON: {err.msg} (column {err.colno})")


def _first_line_is_json(text: str) -> bool:
    """Whether a .json file that is not one JSON value is JSON Lines (else its error is the whole file's)."""
    try:
        json.loads(next((line for line in split_lines(text) if line.strip()), ""))
    except json.JSONDecodeError:
        return False
    return True


def _csv_records(path: Path, text: str, skipped: list[DataError] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a CSV file; strict, as a quote left open would otherwise swallow every later
    line into one field and the file would load with rows silently missing."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}:1", None, "empty file, expected a header line")
        header = _checked_header(path, header)
        start = reader.line_num + 1
        for values in reader:
            # A row of empty cells (",,", as spreadsheets export trailing blank rows) is a blank line,
            # skipped as a TSV line of tabs is.
            if any(value.strip() for value in values):
                if len(values) != len(header):
                    _unreadable(DataError(f"{path}:{start}", None,
                                          f"expected {len(header)} fields ({', '.join(header)}), found {len(values)}"),
                                skipped)
                else:
                    yield f"{path}:{start}", dict(zip(header, values))
            start = reader.line_num + 1
    except csv.Error as err:  # named by the line its row starts on
        problem = "a quoted field opened on this line is never closed" if "end of data" in str(err) else f"malformed CSV: {err}"
        raise DataError(f"{path}:{start}", None, problem) from None


def _parse_json(path: Path, text: str) -> Any:
    """A .json file's contents; invalid JSON names the file and line, as for .jsonl, not only a character offset."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _invalid_json(f"{path}:{err.lineno}", err) from None


SQUAD_LAYOUT = "{'data': [{'title', 'paragraphs': [{'context', 'qas': [{'id', 'question', 'answers'}]}]}]}"


def _squad_list(container: Any, key: str, where: str) -> list:
    """``container[key]``, a list, or a ``DataError`` saying where the file is not shaped as SQuAD's."""
    value = container.get(key) if isinstance(container, dict) else None
    if not isinstance(value, list):
        if not isinstance(container, dict):
            found = f"a {type(container).__name__}, not an object"
        else:
            found = f"{key!r} is {type(value).__name__}, not a list" if key in container else f"no {key!r}"
        raise DataError(where, None, f"expected a SQuAD file ({SQUAD_LAYOUT}); found {found}")
    return value


def squad_records(path: Path, data: dict, articles: slice | None = None) -> Iterator[tuple[str, dict]]:
    """Flatten SQuAD JSON to one record per question (``articles`` selects in file order).

    A question (or its paragraph) without a field gives a record without it, refused or
    skipped by that field as any row is; a question without an id is named by its place.
    """
    indices = range(len(_squad_list(data, "data", str(path))))
    for a in indices if articles is None else indices[articles]:
        article = data["data"][a]
        title = article.get("title", "") if isinstance(article, dict) else ""
        in_article = f"{path} (article {a + 1} {title!r}"
        for p, paragraph in enumerate(_squad_list(article, "paragraphs", in_article + ")"), start=1):
            for q, qa in enumerate(_squad_list(paragraph, "qas", f"{in_article}, paragraph {p})"), start=1):
                if not isinstance(qa, dict):
                    raise DataError(f"{in_article}, paragraph {p}, question {q})", None,
                                    f"expected a JSON object, found {type(qa).__name__}")
                row = {key: qa[key] for key in ("id", "question") if key in qa}
                if "context" in paragraph:
                    row["context"] = paragraph["context"]
                if "answers" in qa:
                    row["answers"] = qa["answers"]
                question = f"question {qa['id']}" if "id" in qa else f"paragraph {p}, question {q}"
                yield f"{in_article}, {question})", row


def read_squad(path: str | Path, articles: slice | None = None) -> Iterator[tuple[str, dict]]:
    path = Path(path)
    return squad_records(path, _parse_json(path, decode_file(path)), articles)


# ------------------------------------------------------------------ examples


def _text(where: str, row: dict, column: str) -> str:
    if column not in row:
        raise DataError(where, column, f"missing; the row has {sorted(row)}")
    value = row[column]
    if not isinstance(value, str):
        raise DataError(where, column, f"expected text, found {type(value).__name__} {value!r}")
    if is_blank(value):
        raise DataError(where, column, "empty text")
    return value


_NUMBER = re.compile(r"[-+]?\d+(\.\d*)?")


def _label_number(value: Any) -> float | None:
    """The number a label or class name is (1, 1.0, "1", "1.0"), else None; a boolean is none."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return None


def _class_index(where: str, spec: TaskSpec, value: Any) -> int:
    labels = spec.labels
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    if value is None or isinstance(value, str) and is_blank(value):
        raise DataError(where, spec.label_column, f"no label ({value!r}); give one of {labels}")
    if isinstance(value, bool) and str(value) in labels:  # labels_in finds JSON true as "True"
        return labels.index(str(value))
    # A number names the class of the same number however either is written: labels_in finds
    # JSON 3 as "3", and pandas writes a label column with a gap as "3.0". Only a number that
    # names no class is a class index.
    number = _label_number(value)
    if number is not None:
        for index, label in enumerate(labels):
            if _label_number(label) == number:
                return index
        if number.is_integer() and 0 <= number < len(labels):
            return int(number)
    raise DataError(where, spec.label_column, f"label {value!r} is not one of {labels} or 0..{len(labels) - 1}")


def _score(where: str, spec: TaskSpec, value: Any) -> float:
    try:
        if isinstance(value, bool):  # float(True) is 1.0: a yes/no column is not a score
            raise TypeError
        score = float(value)
    except (TypeError, ValueError):
        raise DataError(where, spec.label_column, f"expected a number, found {value!r}") from None
    if not math.isfinite(score):
        raise DataError(where, spec.label_column, f"score {value!r} is not finite")
    if spec.label_range and not spec.label_range[0] <= score <= spec.label_range[1]:
        raise DataError(where, spec.label_column, f"score {score} is outside label_range {spec.label_range}")
    return score


def _answers(where: str, spec: TaskSpec, value: Any, context: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(where, spec.label_column, "answers must be a list of {text, answer_start} (JSON)") from None
    if isinstance(value, dict) and "text" in value:
        texts, starts = value["text"], value.get("answer_start")
        if not isinstance(texts, list):  # one answer, not in a list
            value = [value]
        elif not isinstance(starts, list) or len(starts) != len(texts):  # the `datasets` SQuAD layout: lists in a dict
            raise DataError(where, spec.label_column, f"answers {value!r} need 'answer_start' as a list as long as "
                                                      "'text' (or a list of {text, answer_start})")
        else:
            value = [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]
    if not isinstance(value, list):
        raise DataError(where, spec.label_column, "expected a list of answers")
    answers = []
    for answer in value:
        if not isinstance(answer, dict) or "text" not in answer or "answer_start" not in answer:
            raise DataError(where, spec.label_column, f"answer {answer!r} needs 'text' and 'answer_start'")
        text, start = str(answer["text"]), answer["answer_start"]
        if not text:  # SQuAD v2.0 exports write "no answer" as an empty text at -1 too
            continue
        # Not bool (an int to Python) nor negative (slicing would count from the end of the context).
        if not isinstance(start, int) or isinstance(start, bool) or start < 0 \
                or context[start:start + len(text)] != text:
            raise DataError(where, spec.label_column,
                            f"answer {text!r} does not appear in the context at offset {start!r}")
        answers.append({"text": text, "answer_start": start})
    if not answers and not spec.allow_no_answer:
        raise DataError(where, spec.label_column, "expected a non-empty list of answers (a task with "
                                                  "allow_no_answer, --allow-no-answer, takes [] for a question its "
                                                  "context does not answer)")
    return answers


def to_example(where: str, row: dict, spec: TaskSpec) -> Example:
    """Validate one raw row against ``spec`` and build its ``Example``."""
    text = _text(where, row, spec.text_column)
    pair = _text(where, row, spec.text_pair_column) if spec.text_pair_column else None
    example = Example(text=text, text_pair=pair, id=str(row.get("id", "")), source=where)
    if spec.label_column not in row:
        raise DataError(where, spec.label_column, f"missing; the row has {sorted(row)}")
    value = row[spec.label_column]
    if spec.type == "extractive-qa":
        example.answers = _answers(where, spec, value, pair)
    elif spec.type == "regression":
        example.label = _score(where, spec, value)
    else:
        example.label = _class_index(where, spec, value)
    return example


def labels_in(path: str | Path, column: str, named: str, otherwise: str) -> list[str]:
    """Class names found in ``column`` of a data file, sorted (numbers numerically), for a task
    given no labels; ``named`` is how the user named the column, ``otherwise`` how to name the labels."""
    values, columns = set(), set()
    for _, row in read_records(path, skipped=[]):  # rows that cannot be read: loading reports them
        columns.update(row)
        value = row.get(column)
        # A row without a label (a blank cell, JSON null) is no class: loading refuses or skips it.
        if value is not None and not (isinstance(value, str) and is_blank(value)):
            values.add(str(value))
    if column not in columns:  # a misnamed column, not a lack of classes: naming labels would not help
        raise ValueError(f"{named} {column!r}: no such column in {path}; its columns are {sorted(columns)}")
    if len(values) < 2:
        raise ValueError(f"{named} {column!r}: found {len(values)} distinct labels in {path}; {otherwise}")
    return sorted(values, key=_numbers_first)


def _numbers_first(label: str) -> tuple:
    """Sort key: numbers by value ("2" before "10"), then names. Not ``str.isdigit``, which is
    true for "²" that ``float`` refuses; nor every ``float`` spelling ("nan", "inf" are names)."""
    if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", label.strip()):
        return 0, float(label), label
    return 1, 0.0, label


def to_examples(records: Iterable[tuple[str, dict]], spec: TaskSpec, skip_bad_rows: bool = False,
                skipped: list[DataError] | None = None, source: str = "input") -> LoadReport:
    """Validate every record; raise on the first bad one, or skip and count them.

    ``skipped`` is the list the records' reader adds the rows it could not read to: the
    report's, so that they count in file order with the rows refused here. ``source`` names
    the records where none is usable.
    """
    report = LoadReport(examples=[], skipped=skipped if skipped is not None else [])
    for where, row in records:
        try:
            report.examples.append(to_example(where, row, spec))
        except DataError as err:
            if not skip_bad_rows:
                raise
            report.skipped.append(err)
    if not report.examples:
        raise DataError(source, None, f"no usable rows for task {spec.name!r}"
                        + (f" ({len(report.skipped)} skipped; first: {report.skipped[0]})" if report.skipped else ""))
    return report


def load_examples(path: str | Path, spec: TaskSpec, *, articles: slice | None = None,
                  skip_bad_rows: bool = False) -> LoadReport:
    """Read and validate a data file for ``spec`` (``articles`` selects SQuAD articles)."""
    path = Path(path)
    skipped = [] if skip_bad_rows else None
    records = read_squad(path, articles) if articles is not None else read_records(path, skipped)
    return to_examples(records, spec, skip_bad_rows, skipped, str(path))


def dataset_records(dataset, name: str = "dataset") -> Iterator[tuple[str, dict]]:
    """Records of a ``datasets.Dataset`` (or any sequence of dicts), located by row number."""
    for i, row in enumerate(dataset):
        yield f"{name} row {i}", dict(row)


def load_hub_dataset(name: str, split: str, config: str | None = None):
    """A split of a hub dataset via ``datasets`` (needs a reachable hub or a local cache)."""
    import datasets

    return datasets.load_dataset(name, config, split=split)


def fixed_subset(examples: Sequence[Example], n: int | None, seed: int = SUBSET_SEED) -> tuple[list[Example], str]:
    """A seeded random ``n`` of ``examples`` in their original order, and a description of it.

    Not the first ``n``: some files are sorted by label (IMDb's first 12,500 training reviews
    are all negative), so a prefix can hold one class only.
    """
    if n is None or n >= len(examples):
        return list(examples), f"all {len(examples)}"
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep], f"random {n} of {len(examples)} (seed {seed}), file order"
