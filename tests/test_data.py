"""Data readers: formats, validation errors that name file, line and field, skipping."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import require_shared_data
from mtpeft.data import DataError, labels_in, load_examples, read_records
from mtpeft.sources import load_task_data
from mtpeft.tasks import TaskSpec
from mtpeft.tasks.presets import get_preset

SENTIMENT = TaskSpec(name="s", type="classification", labels=["negative", "positive"], text_column="sentence")
QA = TaskSpec(name="qa", type="extractive-qa", text_column="question", text_pair_column="context",
              label_column="answers", max_length=128, doc_stride=32)
STS = TaskSpec(name="sts", type="regression", text_column="a", text_pair_column="b", label_column="score",
               label_range=[0, 5])


def test_task_spec_defaults_fit_the_task_type():
    qa = TaskSpec(name="faq", type="extractive-qa", text_pair_column="context")  # valid with its defaults
    assert (qa.max_length, qa.doc_stride) == (384, 128)
    assert SENTIMENT.max_length == 128
    assert TaskSpec.from_dict(qa.to_dict()) == qa
    short = TaskSpec(name="faq", type="extractive-qa", text_pair_column="context", max_length=96, max_question_length=64)
    assert short.doc_stride == 28  # a third would be 32; the window leaves 29 tokens of context beside the question
    # Below 128 tokens a question may take half the window by default: 64 left a 64-token window none.
    small = TaskSpec(name="faq", type="extractive-qa", text_pair_column="context", max_length=64)
    assert (small.max_question_length, small.doc_stride) == (32, 21)
    assert qa.max_question_length == 64 and TaskSpec.from_dict(small.to_dict()) == small
    with pytest.raises(ValueError, match="doc_stride=64 must be smaller"):
        TaskSpec(name="faq", type="extractive-qa", text_pair_column="context", max_length=128, doc_stride=64)


@pytest.mark.parametrize("kind", [dict(type="pair-classification", labels=["a", "b"], text_pair_column="b"),
                                  dict(type="extractive-qa", text_pair_column="context")])
def test_head_and_tail_truncation_is_refused_where_it_would_be_ignored(kind):
    # Pairs are cut longest-first and QA contexts split into windows: the setting did nothing.
    with pytest.raises(ValueError, match="truncation='head\\+tail' is for single texts"):
        TaskSpec(name="t", truncation="head+tail", **kind)


@pytest.mark.parametrize("bad", [dict(head_tokens=-3), dict(max_question_length=0), dict(max_answer_length=0),
                                 dict(doc_stride=-5), dict(head_dropout=1.5)])
def test_task_spec_refuses_negative_counts_naming_the_field(bad):
    # head_tokens=-3 cut a head+tail text at its end, max_question_length=0 kept whole questions,
    # a negative doc_stride failed in the tokenizer with an OverflowError.
    with pytest.raises(ValueError, match=next(iter(bad))):
        TaskSpec(name="qa", type="extractive-qa", text_pair_column="context", max_length=128,
                 **{"doc_stride": 32, "max_question_length": 32, **bad})


def test_tsv_is_read_without_quote_handling(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\nhe said " hello \t1\n"quoted" start \t0\n', encoding="utf-8")
    examples = load_examples(path, SENTIMENT).examples
    assert [e.text for e in examples] == ['he said " hello ', '"quoted" start ']
    assert [e.label for e in examples] == [1, 0]
    assert examples[0].source == f"{path}:2"


def test_a_tsv_written_by_a_csv_writer_reads_its_quoted_texts_back(tmp_path):
    # pandas' to_csv(sep="\t") and csv.writer quote a text holding a quote ("say ""hi""");
    # read without quote handling, the text trained on kept the quoting.
    import csv

    texts = ['she said "great" twice', '"quoted" start', 'plain', '"whole quote"', 'a lone " mark']
    path = tmp_path / "train.tsv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["sentence", "label"])
        writer.writerows([text, i % 2] for i, text in enumerate(texts))
    assert '"she said ""great"" twice"' in path.read_text()
    assert [e.text for e in load_examples(path, SENTIMENT).examples] == texts


def test_tsv_wrong_field_count_names_the_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\nfine\t1\nbroken row without tab\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.tsv:3: expected 2 tab-separated fields"):
        load_examples(path, SENTIMENT)


@pytest.mark.parametrize("name, content", [
    ("d.csv", "sentence,label,label\ngood,1,0\n"),
    ("d.tsv", "sentence\tlabel\tlabel\ngood\t1\t0\n"),
])
def test_a_column_named_twice_in_the_header_is_refused(tmp_path, name, content):
    # Read into a dict, the row's label silently came from the last "label" column.
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"{name}:1: field 'label': this column is named twice in the header"):
        load_examples(path, SENTIMENT)


def test_blank_column_names_may_repeat(tmp_path):
    path = tmp_path / "d.csv"  # a spreadsheet's export with two empty columns after the data
    path.write_text("sentence,label,,\ngood,1,,\n", encoding="utf-8")
    assert [e.label for e in load_examples(path, SENTIMENT).examples] == [1]


def test_label_out_of_range_names_file_line_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"sentence": "ok", "label": 1}\n{"sentence": "bad", "label": 7}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_examples(path, SENTIMENT)
    assert str(err.value).startswith(f"{path}:2: field 'label': label 7 is not one of ['negative', 'positive']")


def test_labels_found_sort_numbers_by_value_then_names(tmp_path):
    # "²" passed str.isdigit and crashed float(); "10" sorted before "2" as text would.
    path = tmp_path / "mixed.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{v}\n" for i, v in enumerate(["10", "2", "²", "-1", "b", "0.5"])),
                    encoding="utf-8")
    assert labels_in(path, "label", "--label-column", "pass --labels") == ["-1", "0.5", "2", "10", "b", "²"]


def test_json_number_labels_are_class_names_as_in_a_tsv(tmp_path):
    # JSON 1, 2, 3 with the labels found in the file (["1", "2", "3"]) were read as indices:
    # 1 became class "2", 2 became "3" and 3 was refused as "not one of ['1', '2', '3']".
    path = tmp_path / "stars.jsonl"
    path.write_text("".join(json.dumps({"text": f"r{i}", "label": s}) + "\n" for i, s in enumerate([1, 2, 3, 2])))
    labels = labels_in(path, "label", "--label-column", "pass --labels")
    assert labels == ["1", "2", "3"]
    spec = TaskSpec(name="stars", type="classification", labels=labels)
    assert [labels[e.label] for e in load_examples(path, spec).examples] == ["1", "2", "3", "2"]
    path.write_text(json.dumps({"text": "r", "label": 2.0}) + "\n")  # pandas writes whole numbers so
    assert [labels[e.label] for e in load_examples(path, spec).examples] == ["2"]
    tsv = tmp_path / "stars.tsv"
    tsv.write_text("text\tlabel\nr0\t1\nr1\t3\n", encoding="utf-8")
    assert [labels[e.label] for e in load_examples(tsv, spec).examples] == ["1", "3"]


def test_json_boolean_labels_found_in_the_data_are_accepted(tmp_path):
    # labels_in found ["False", "True"], then every row was refused: "label True is not one of ['False', 'True']".
    path = tmp_path / "spam.jsonl"
    path.write_text("".join(json.dumps({"text": f"m{i}", "spam": i % 3 == 0}) + "\n" for i in range(4)))
    labels = labels_in(path, "spam", "--label-column", "pass --labels")
    spec = TaskSpec(name="spam", type="classification", labels=labels, label_column="spam")
    assert [labels[e.label] for e in load_examples(path, spec).examples] == ["True", "False", "False", "True"]


@pytest.mark.parametrize("row, field, message", [
    ({"label": 1}, "sentence", "missing"),
    ({"sentence": "   ", "label": 1}, "sentence", "empty text"),
    ({"sentence": "\u200b \u200c", "label": 1}, "sentence", "empty text"),  # the tokenizer drops them all
    ({"sentence": "\ufeff\u0000", "label": 1}, "sentence", "empty text"),
    ({"sentence": "x", "label": "maybe"}, "label", "is not one of"),
    ({"sentence": "x", "label": True}, "label", "is not one of"),
    ({"sentence": 5, "label": 1}, "sentence", "expected text"),
])
def test_bad_classification_rows(tmp_path, row, field, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        load_examples(path, SENTIMENT)
    assert err.value.field == field and err.value.where == f"{path}:1"


def test_a_json_boolean_is_not_a_regression_score(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"a": "x", "b": "y", "score": True}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'score': expected a number, found True"):
        load_examples(path, STS)


def test_regression_scores_are_checked(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('a,b,score\n"x, with comma",y,4.5\nx,y,seven\nx,y,6\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.csv:3: field 'score': expected a number"):
        load_examples(path, STS)
    report = load_examples(path, STS, skip_bad_rows=True)
    assert [e.label for e in report.examples] == [4.5]
    assert len(report.skipped) == 2 and "outside label_range" in str(report.skipped[1])


def test_csv_line_numbers_count_multiline_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('sentence,label\n"two\nlines",1\nnext,2\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.csv:4: field 'label'"):
        load_examples(path, SENTIMENT)


@pytest.mark.parametrize("name, content", [
    ("d.csv", 'sentence,label\ngood,1\n,\n\n" ",\nbad,0\n,,\n'),  # rows of empty cells, as spreadsheets export
    ("d.tsv", "sentence\tlabel\ngood\t1\n\t\n\n \t\nbad\t0\n\t\t\n"),  # the same blank lines in a TSV
])
def test_rows_of_empty_cells_are_skipped_as_blank_lines(tmp_path, name, content):
    # ",," was read as a row: a field-count error, or "empty text", where a blank line is skipped.
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert [where for where, _ in read_records(path)] == [f"{path}:2", f"{path}:6"]
    assert [e.text for e in load_examples(path, SENTIMENT).examples] == ["good", "bad"]


def test_qa_answer_must_match_the_context(tmp_path):
    path = tmp_path / "qa.jsonl"
    good = {"question": "Who?", "context": "Alice met Bob.", "answers": [{"text": "Bob", "answer_start": 10}]}
    bad = {**good, "answers": [{"text": "Bob", "answer_start": 3}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"qa.jsonl:2: field 'answers': answer 'Bob' does not appear in the context at offset 3"):
        load_examples(path, QA)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"sentence": "a", "label": 0}\n{"sentence": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        list(read_records(path))


@pytest.mark.parametrize("name, content, where", [
    ("e.tsv", b"sentence\tlabel\nok\t1\n\xff\xfe bad\t0\n", "e.tsv:3: bytes that are not UTF-8"),
    # With a BOM the error counted bytes from after it: a bad byte starting line 2 was named
    # on line 1 at byte 11; lines ended by \r alone were all line 1.
    ("bom.csv", b"\xef\xbb\xbftext,label\n\xd6konomie,1\n", "bom.csv:2: bytes that are not UTF-8 at byte 14;"),
    ("cr.tsv", b"sentence\tlabel\rok\t1\r\xff bad\t0\r", "cr.tsv:3: bytes that are not UTF-8"),
])
def test_undecodable_bytes_name_their_line(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=where):
        list(read_records(path))


def test_squad_json_and_article_split(tmp_path):
    data = {"data": [{"title": f"T{a}", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": f"{a}-{q}", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]}
        for q in range(2)]}]} for a in range(5)]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    head = load_examples(path, QA, articles=slice(0, 3)).examples
    tail = load_examples(path, QA, articles=slice(3, None)).examples
    assert [e.id for e in head] == ["0-0", "0-1", "1-0", "1-1", "2-0", "2-1"]
    assert [e.id for e in tail] == ["3-0", "3-1", "4-0", "4-1"]
    assert "article 4 'T3'" in tail[0].source


def _squad_file(path, articles):
    data = {"data": [{"title": f"T{a}", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": f"{a}", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]}]}]}
        for a in range(articles)]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_an_own_squad_eval_file_is_read_whole_not_cut_to_the_presets_articles(tmp_path):
    # The preset's 38/10 article split describes its dev file; an evaluation file of three
    # articles came out empty, and separate train and eval files lost all but 38 training articles.
    preset = get_preset("squad")
    folder = tmp_path / "squad"
    folder.mkdir()
    _squad_file(folder / preset.layout.train_file, 48)
    own_eval = _squad_file(tmp_path / "mine.json", 3)
    data = load_task_data(preset.spec, folder, own_eval, layout=preset.layout)
    assert (len(data.train), len(data.eval)) == (38, 3)
    train = _squad_file(tmp_path / "train.json", 60)
    data = load_task_data(preset.spec, train, own_eval, layout=preset.layout)
    assert (len(data.train), len(data.eval)) == (60, 3)
    alone = load_task_data(preset.spec, folder, layout=preset.layout)
    assert (len(alone.train), len(alone.eval)) == (38, 10)
    by_name = load_task_data(preset.spec, folder / preset.layout.train_file, layout=preset.layout)
    assert (len(by_name.train), len(by_name.eval)) == (38, 10)  # not rows held out of the 38 training articles
    own = load_task_data(preset.spec, train, layout=preset.layout)
    assert len(own.train) + len(own.eval) == 60 and "held out" in own.description["eval"]


def test_an_evaluation_file_is_read_as_training_read_it(tmp_path):
    # mtpeft evaluate cut any .json file to the preset's articles 39 on (an own three-article
    # file scored nothing) and read the built-in's own holdout file whole, training rows too.
    from mtpeft.sources import load_eval_examples

    squad = get_preset("squad")
    own_eval = _squad_file(tmp_path / "mine.json", 3)
    assert len(load_eval_examples(squad.spec, own_eval, squad.layout)) == 3
    assert len(load_task_data(squad.spec, _squad_file(tmp_path / "t.json", 5), own_eval, squad.layout).eval) == 3
    (tmp_path / "squad").mkdir()
    dev = _squad_file(tmp_path / "squad" / squad.layout.eval_file, 48)
    assert [e.id for e in load_eval_examples(squad.spec, dev, squad.layout)] == [str(a) for a in range(38, 48)]
    sentiment = get_preset("sentiment")
    (tmp_path / "support").mkdir()
    rows = tmp_path / "support" / sentiment.layout.train_file
    rows.write_text("".join(json.dumps({"text": f"row {i}", "label": "neutral"}) + "\n" for i in range(10)))
    held = load_task_data(sentiment.spec, rows.parent, layout=sentiment.layout).eval
    assert [e.text for e in load_eval_examples(sentiment.spec, rows, sentiment.layout)] == [e.text for e in held]
    assert [e.text for e in held] == ["row 4", "row 9"]


def test_real_squad_split_is_38_10():
    folder = require_shared_data("squad")
    preset = get_preset("squad")
    data = load_task_data(preset.spec, folder, layout=preset.layout)
    assert len(data.train) == 8582 and len(data.eval) == 1988


def test_real_glue_files_load():
    for task, counts in {"sst2": (67349, 872), "stsb": (5749, 1500), "mrpc": (3668, 408)}.items():
        folder = require_shared_data("glue", {"sst2": "SST-2", "stsb": "STS-B", "mrpc": "MRPC"}[task])
        preset = get_preset(task)
        data = load_task_data(preset.spec, folder, layout=preset.layout)
        assert (len(data.train), len(data.eval)) == counts


def test_real_imdb_loads():
    folder = require_shared_data("imdb")
    preset = get_preset("imdb")
    data = load_task_data(preset.spec, folder, layout=preset.layout)
    assert (len(data.train), len(data.eval)) == (25000, 25000)
    assert {e.label for e in data.eval} == {0, 1}


def test_datasets_object_is_validated_like_a_file():
    import datasets

    from mtpeft.sources import examples_from_dataset

    rows = datasets.Dataset.from_list([{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0},
                                       {"sentence": "", "label": 0}])
    report = examples_from_dataset(rows, SENTIMENT, skip_bad_rows=True, name="my-dataset")
    assert [e.label for e in report.examples] == [1, 0]
    assert str(report.skipped[0]) == "my-dataset row 2: field 'sentence': empty text"


def _dataset_folder(root):
    """A dataset folder as it sits in a hub repository: data files, and a README naming a second config."""
    (root / "small").mkdir(parents=True)
    rows = [{"sentence": "good", "label": "positive"}, {"sentence": "bad", "label": "negative"}]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3), encoding="utf-8")
    (root / "test.jsonl").write_text(json.dumps(rows[1]) + "\n", encoding="utf-8")
    (root / "small" / "train.jsonl").write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                    "  - {split: train, path: train.jsonl}\n  - {split: test, path: test.jsonl}\n"
                                    "- config_name: small\n  data_files:\n  - {split: train, path: small/train.jsonl}\n---\n",
                                    encoding="utf-8")
    return root


def test_hub_dataset_by_name_loads_through_datasets(tmp_path, monkeypatch):
    """``load_hub_dataset`` is ``datasets.load_dataset`` by name: a local repository folder stands in for the hub."""
    import datasets

    from mtpeft.data import load_hub_dataset
    from mtpeft.sources import examples_from_dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = str(_dataset_folder(tmp_path / "reviews"))
    train = load_hub_dataset(folder, "train")
    assert len(train) == 6 and train.column_names == ["sentence", "label"]
    assert [e.label for e in examples_from_dataset(train, SENTIMENT).examples] == [1, 0] * 3
    assert len(load_hub_dataset(folder, "test")) == 1 and len(load_hub_dataset(folder, "train[:2]")) == 2
    assert load_hub_dataset(folder, "train", config="small")["sentence"] == ["good"]
    with pytest.raises(ValueError, match="Unknown split"):
        load_hub_dataset(folder, "validation")


def test_hub_dataset_without_a_hub_fails_naming_it(monkeypatch, tmp_path):
    import datasets

    from mtpeft.data import load_hub_dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="someone/not-a-dataset"):
        load_hub_dataset("someone/not-a-dataset", "train")


def test_unicode_line_separators_inside_texts_do_not_split_rows(tmp_path):
    """Only \\n, \\r\\n and \\r end a row: U+2028, U+0085, form feeds... are text (json.dumps with
    ensure_ascii=False writes U+2028 and U+0085 raw, and scraped sentences hold them)."""
    texts = ["first\u2028line", "next\x85line", "page\x0cbreak", "group\x1dsep"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"sentence": t, "label": 1}, ensure_ascii=False) + "\n" for t in texts),
                     encoding="utf-8")
    examples = load_examples(jsonl, SENTIMENT).examples
    assert [e.text for e in examples] == texts
    assert examples[-1].source == f"{jsonl}:4"
    tsv = tmp_path / "d.tsv"
    tsv.write_text("sentence\tlabel\r\n" + "".join(f"{t}\t0\r\n" for t in texts), encoding="utf-8")
    examples = load_examples(tsv, SENTIMENT).examples
    assert [e.text for e in examples] == texts
    assert examples[-1].source == f"{tsv}:5"


@pytest.mark.parametrize("rows", [[1], [None], [["a", 1]], ["a text"]])
def test_json_list_rows_that_are_not_objects_name_the_row(tmp_path, rows):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"sentence": "fine", "label": 1}, *rows]), encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json\[1\]: expected a JSON object") as err:
        load_examples(path, SENTIMENT)
    assert err.value.where == f"{path}[1]"


@pytest.mark.parametrize("answers", [
    {"text": "Bob", "answer_start": 3},  # one answer, not in a list: checked like any other
    {"text": ["Bob"]},  # the `datasets` layout without answer_start
    {"text": ["Bob", "Bob"], "answer_start": [10]},  # lists of different lengths
    {"text": "Bob", "answer_start": [10]},
])
def test_malformed_answer_dicts_are_data_errors(tmp_path, answers):
    path = tmp_path / "qa.jsonl"
    rows = [{"question": "Who?", "context": "Alice met Bob.", "answers": answers},
            {"question": "Who?", "context": "Alice met Bob.", "answers": [{"text": "Bob", "answer_start": 10}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_examples(path, QA)
    assert err.value.where == f"{path}:1" and err.value.field == "answers"
    report = load_examples(path, QA, skip_bad_rows=True)
    assert len(report.examples) == 1 and len(report.skipped) == 1


def test_single_answer_dict_is_one_answer(tmp_path):
    path = tmp_path / "qa.jsonl"
    row = {"question": "Who?", "context": "Alice met Bob.", "answers": {"text": "Bob", "answer_start": 10}}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert load_examples(path, QA).examples[0].answers == [{"text": "Bob", "answer_start": 10}]


def test_head_and_tail_keeps_the_end_of_the_text_when_the_tail_starts_mid_word(tokenizer):
    """The tail's first token, cut from the middle of a word, can re-tokenise into more tokens;
    the kept text must still fit, or truncation drops the text's last tokens (its verdict)."""
    from mtpeft.examples import Example
    from mtpeft.tasks.base import encode_sequences

    spec = TaskSpec(name="r", type="classification", labels=["neg", "pos"], max_length=16, truncation="head+tail",
                    head_tokens=4)
    text = "the WOW!!! film's WOW!!! the qwertyuiop film's xyzzyplugh xyzzyplugh qwertyuiop film's didn't"
    ids = encode_sequences(spec, tokenizer, [Example(text)])[0]["input_ids"]
    assert len(ids) <= 16
    assert tokenizer.convert_ids_to_tokens(ids)[-4:] == ["didn", "'", "t", "[SEP]"]
    assert tokenizer.convert_ids_to_tokens(ids)[1:3] == ["the", "wow"]


@pytest.mark.parametrize("answers", [[], {"text": [], "answer_start": []}, [{"text": "", "answer_start": -1}]])
def test_unanswerable_rows_load_only_for_a_task_that_allows_them(tmp_path, answers):
    """SQuAD v2.0 writes "no answer" as [], as `datasets`' empty lists, or as an empty text at -1."""
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Who?", "context": "Alice met Bob.", "answers": answers}) + "\n")
    with pytest.raises(DataError, match="non-empty list of answers .*allow_no_answer"):
        load_examples(path, QA)
    v2 = dataclasses.replace(QA, allow_no_answer=True)
    assert load_examples(path, v2).examples[0].answers == []


def test_squad_v2_json_with_unanswerable_questions(tmp_path):
    data = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Alice met Bob.", "qas": [
        {"id": "a", "question": "Who did Alice meet?", "answers": [{"text": "Bob", "answer_start": 10}]},
        {"id": "b", "question": "Who did Bob call?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "Alice", "answer_start": 0}]}]}]}]}
    path = tmp_path / "train-v2.0.json"
    path.write_text(json.dumps(data))
    examples = load_examples(path, dataclasses.replace(QA, allow_no_answer=True)).examples
    assert [e.answers for e in examples] == [[{"text": "Bob", "answer_start": 10}], []]


def test_allow_no_answer_is_for_qa_tasks_only():
    with pytest.raises(ValueError, match="allow_no_answer is for extractive-qa tasks"):
        TaskSpec(name="s", type="classification", labels=["a", "b"], allow_no_answer=True)


@pytest.mark.parametrize("start", [-4, True])
def test_qa_answer_offset_must_be_a_non_negative_integer(tmp_path, start):
    """Python slicing finds "Bob" at offset -4 (counted from the end): no file means that."""
    path = tmp_path / "qa.jsonl"
    context = "Alice met Bob." if start == -4 else "Bob met Alice."
    text = "Bob" if start == -4 else "ob"
    row = {"question": "Who?", "context": context, "answers": [{"text": text, "answer_start": start}]}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="does not appear in the context at offset"):
        load_examples(path, QA)


def test_rows_that_cannot_be_read_are_skipped_with_skip_bad_rows(tmp_path):
    """GLUE's QQP train.tsv has questions cut in two by a line break: two lines of too few fields.
    Such rows stopped loading even with skip_bad_rows, as did invalid JSON lines."""
    qqp = get_preset("qqp")
    (tmp_path / "qqp").mkdir()
    tsv = tmp_path / "qqp" / "train.tsv"
    tsv.write_text("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                   "1\t1\t2\tHow are you?\tHow do you do?\t1\n"
                   "2\t3\t4\tWhat is\nthis?\tWhat is that?\t0\n"
                   "3\t5\t6\tWhy?\tWhy not?\t0\n", encoding="utf-8")
    (tmp_path / "qqp" / "dev.tsv").write_text(tsv.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(DataError, match=r"train.tsv:3: expected 6 tab-separated fields"):
        load_task_data(qqp.spec, tsv.parent, layout=qqp.layout)
    data = load_task_data(qqp.spec, tsv.parent, layout=qqp.layout, skip_bad_rows=True)
    assert [e.text for e in data.train] == ["How are you?", "Why?"] and len(data.eval) == 2
    assert [e.where for e in data.skipped] == [f"{tsv.parent / name}:{n}" for name in ("train.tsv", "dev.tsv")
                                               for n in (3, 4)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"sentence": "good", "label": 1}\n{"sentence": \n7\n{"sentence": "", "label": 0}\n'
                     '{"sentence": "bad", "label": 0}\n', encoding="utf-8")
    report = load_examples(jsonl, SENTIMENT, skip_bad_rows=True)
    assert [e.text for e in report.examples] == ["good", "bad"]
    assert [e.where for e in report.skipped] == [f"{jsonl}:{n}" for n in (2, 3, 4)]  # in file order
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,label\ngood,1\ntoo,many,fields\nbad,0\n", encoding="utf-8")
    assert [e.text for e in load_examples(csv_path, SENTIMENT, skip_bad_rows=True).examples] == ["good", "bad"]
    # A task given no labels finds them in the rows that can be read; loading then skips the others.
    assert labels_in(tsv, "is_duplicate", "--label-column", "pass --labels") == ["0", "1"]


def _squad(paragraphs):
    return {"data": [{"title": "T", "paragraphs": paragraphs}]}


QUESTION = {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]}
CONTEXT = "Paris is in France."


@pytest.mark.parametrize("data, where, field, problem", [
    # A field a question or paragraph lacks is that question's field, as for any other row.
    (_squad([{"context": CONTEXT, "qas": [{k: v for k, v in QUESTION.items() if k != "answers"}]}]),
     "question q1", "answers", "missing"),
    (_squad([{"qas": [QUESTION]}]), "question q1", "context", "missing"),
    (_squad([{"context": CONTEXT, "qas": [{k: v for k, v in QUESTION.items() if k != "id"}]}]),
     "paragraph 1, question 1", "answers", None),  # no id: named by its place, and it loads
    # The file's own structure.
    (_squad([{"context": CONTEXT, "qas": None}]), "paragraph 1", None, "'qas'"),
    ({"data": [{"title": "T"}]}, "article 1 'T'", None, "'paragraphs'"),
    ({"data": {"title": "T"}}, "", None, "'data'"),
])
def test_squad_files_missing_a_field_name_the_question(tmp_path, data, where, field, problem):
    # These raised KeyError ('id', 'answers', 0...) or TypeError with no file, article or question.
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    for articles in (None, slice(0, 38)):  # a file of one's own, and the built-in task's article split
        if problem is None:
            assert load_examples(path, QA, articles=articles).examples[0].answers == QUESTION["answers"]
            assert where in load_examples(path, QA, articles=articles).examples[0].source
            continue
        with pytest.raises(DataError, match=problem) as err:
            load_examples(path, QA, articles=articles)
        assert str(path) in err.value.where and where in err.value.where and err.value.field == field


def test_a_truncated_squad_file_names_itself(tmp_path):
    preset = get_preset("squad")
    path = tmp_path / preset.layout.train_file
    path.write_text(json.dumps(_squad([{"context": CONTEXT, "qas": [QUESTION]}]))[:-20], encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path.name}:1: invalid JSON"):
        load_task_data(preset.spec, tmp_path, layout=preset.layout)


@pytest.mark.parametrize("name, content", [
    ("d.csv", "text,label\ngreat,pos\nawful,neg\nunsure, \nfine,pos\n"),
    ("d.jsonl", "".join(json.dumps({"text": t, "label": v}) + "\n"
                        for t, v in [("great", "pos"), ("awful", "neg"), ("unsure", None), ("fine", "pos")])),
])
def test_a_row_without_a_label_is_no_class_of_its_own(tmp_path, name, content):
    # A blank cell became a third class '' that its rows trained on; JSON null a class 'None'.
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    labels = labels_in(path, "label", "--label-column", "pass --labels")
    assert labels == ["neg", "pos"]
    spec = TaskSpec(name="t", type="classification", labels=labels)
    with pytest.raises(DataError, match=r"field 'label': no label") as err:
        load_examples(path, spec)
    assert err.value.where.endswith(f"{name}:4" if name == "d.csv" else f"{name}:3")
    assert [e.text for e in load_examples(path, spec, skip_bad_rows=True).examples] == ["great", "awful", "fine"]


@pytest.mark.parametrize("labels, name, content, expected", [
    # Stars found as "1.0".."3.0" in a CSV pandas wrote (a column with a gap is float): JSON 1 was
    # read as index 1, class "2.0", and 3 refused; the same "1" from a TSV too.
    (["1.0", "2.0", "3.0"], "d.jsonl", '{"text": "x", "label": 1}\n{"text": "y", "label": 3}\n', ["1.0", "3.0"]),
    (["1.0", "2.0", "3.0"], "d.tsv", "text\tlabel\nx\t1\ny\t3\n", ["1.0", "3.0"]),
    (["1", "2", "3"], "d.tsv", "text\tlabel\nx\t2.0\ny\t3\n", ["2", "3"]),
    (["negative", "positive"], "d.csv", "text,label\nx,1.0\ny,0.0\n", ["positive", "negative"]),
])
def test_a_number_label_names_its_class_however_it_is_written(tmp_path, labels, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    spec = TaskSpec(name="t", type="classification", labels=labels)
    assert [labels[e.label] for e in load_examples(path, spec).examples] == expected


@pytest.mark.parametrize("value", ["1.5", "3", "-1", "1e0"])
def test_a_number_label_that_names_no_class_is_refused(tmp_path, value):
    path = tmp_path / "d.tsv"
    path.write_text(f"text\tlabel\nx\t{value}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.tsv:2: field 'label': label .* is not one of"):
        load_examples(path, dataclasses.replace(SENTIMENT, text_column="text"))


@pytest.mark.parametrize("content, message", [
    # Spreadsheets save "Unicode Text" as UTF-16, and CSV in the system's code page.
    ("text\tlabel\nCafé\t1\n".encode("utf-16"), r"d.tsv:1: the file is UTF-16 .*; save it as UTF-8"),
    ("text\tlabel\nCafé\t1\n".encode("cp1252"), r"d.tsv:2: bytes that are not UTF-8 at byte 14; save the file as UTF-8"),
])
def test_a_file_in_another_encoding_says_to_save_it_as_utf8(tmp_path, content, message):
    path = tmp_path / "d.tsv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(read_records(path))


def test_a_tsv_row_split_by_a_line_break_says_why_and_what_to_do(tmp_path):
    # pandas' to_csv(sep="\t") quotes a text with a line break; TSV is read without quotes, as GLUE's.
    path = tmp_path / "d.tsv"
    path.write_text('text\tlabel\n"two\nlines"\t1\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.tsv:2: expected 2 tab-separated fields \(text, label\), found 1: a tab or "
                                        r"line break inside a text splits its row, .*--skip-bad-rows.*\.csv or \.jsonl"):
        list(read_records(path))


def test_json_lines_in_a_json_file_are_read_as_json_lines(tmp_path):
    # `datasets`' Dataset.to_json and pandas' to_json(lines=True) write JSON Lines to a .json path:
    # it was refused as "invalid JSON: Extra data".
    import datasets

    path = tmp_path / "train.json"
    datasets.Dataset.from_list([{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}]).to_json(path)
    examples = load_examples(path, SENTIMENT).examples
    assert [(e.text, e.label, e.source) for e in examples] == [("good", 1, f"{path}:1"), ("bad", 0, f"{path}:2")]
    path.write_text('{"sentence": "good",\n "label": 1}\n{"sentence": "bad", "label": 0}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train.json:3: invalid JSON: Extra data"):  # one object, then another
        load_examples(path, SENTIMENT)


@pytest.mark.parametrize("name, content", [("dev.csv", "sentence,label\n"), ("dev.jsonl", "\n"), ("dev.json", "[]")])
def test_a_file_without_rows_names_itself(tmp_path, name, content):
    # It said "input: no usable rows", so of a training and an evaluation file neither was named.
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}: no usable rows for task 's'"):
        load_examples(path, SENTIMENT)
    path.write_text(content + ("" if name == "dev.json" else "\n"), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}: no usable rows"):
        load_examples(path, SENTIMENT, skip_bad_rows=True)


def _qa_spans(spec, tokenizer, example):
    """Each window's labelled answer, read back from the context through its offsets (None: "not here")."""
    from mtpeft.tasks import task_type

    features = task_type(spec).encode(spec, tokenizer, [example])
    return [None if (f["start_position"], f["end_position"]) == (0, 0)
            else example.text_pair[f["offsets"][f["start_position"]][0]:f["offsets"][f["end_position"]][1]]
            for f in features]


def test_a_qa_answer_keeps_the_combining_accent_the_uncased_tokenizer_drops(tokenizer):
    """Decomposed text ("Cafe" + U+0301): the tokenizer strips the accent from its offsets, which
    put an answer ending in it outside the window that holds it and cut it off predicted spans."""
    from mtpeft.examples import Example

    context = "We met at Cafe\u0301"
    example = Example("Where?", context, answers=[{"text": "Cafe\u0301", "answer_start": 10}])
    assert _qa_spans(QA, tokenizer, example) == ["Cafe\u0301"]


def test_a_qa_answer_with_spaces_at_its_edges_is_found_in_its_window(tokenizer):
    from mtpeft.examples import Example

    example = Example("Who?", "Alice met Bob ", answers=[{"text": " Bob ", "answer_start": 9}])
    assert _qa_spans(QA, tokenizer, example) == ["Bob"]


def test_qa_windows_fit_a_tokenizer_with_four_special_tokens_in_a_pair(tokenizer):
    """RoBERTa joins a pair as <s> A </s></s> B </s>: one token more than the spec's bound on
    doc_stride counts, which made the tokenizer panic on a question of max_question_length."""
    import copy

    from tokenizers import processors

    from mtpeft.examples import Example

    roberta_like = copy.deepcopy(tokenizer)
    roberta_like._tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tokenizer.cls_token_id), ("[SEP]", tokenizer.sep_token_id)])
    spec = TaskSpec(name="qa", type="extractive-qa", text_pair_column="context", max_length=32,
                    max_question_length=6, doc_stride=22)  # the most the spec allows: 32 - 6 - 3 - 1
    context = "Alice met Bob in the park. " * 8 + "Then Carol met Dan."
    example = Example("who did carol meet in the park today?", context,
                      answers=[{"text": "Dan", "answer_start": context.index("Dan")}])
    assert "Dan" in _qa_spans(spec, roberta_like, example)
