"""The CLI end to end on a tiny backbone saved to a local folder (the local-path route)."""

from __future__ import annotations

import json
import random
import shlex

import pytest

from conftest import tiny_bert
from mtpeft.cli import main, parse_input_line


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-backbone")
    backbone = tiny_bert(tokenizer)
    backbone.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _write_sentiment(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("text,label\n")
        for _ in range(n):
            good = rng.random() < 0.5
            word = rng.choice(["great", "superb", "lovely"] if good else ["awful", "broken", "terrible"])
            f.write(f"the {word} order {rng.choice(['arrived', 'came', 'was here'])},{'pos' if good else 'neg'}\n")


def test_train_evaluate_predict(backbone_dir, tmp_path, capsys):
    _write_sentiment(tmp_path / "train.csv", 200, 0)
    _write_sentiment(tmp_path / "dev.csv", 40, 1)
    run = tmp_path / "run"
    code = main(["train", "--task", "mood", "--task-type", "classification", "--data", str(tmp_path / "train.csv"),
                 "--eval-data", str(tmp_path / "dev.csv"), "--out", str(run), "--backbone", str(backbone_dir),
                 "--epochs", "6", "--lr", "5e-3", "--batch-size", "16", "--no-progress", "--fp32",
                 "--pad-to-multiple-of", "8"])
    assert code == 0
    record = json.loads((run / "task.json").read_text())
    assert record["spec"]["labels"] == ["neg", "pos"]  # found in the data
    assert record["backbone"]["name"] == str(backbone_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metrics"]["accuracy"] >= 85
    config = json.loads((run / "training.json").read_text())
    assert config["train"]["epochs"] == 6 and config["command"].startswith("mtpeft ")
    assert config["train"]["pad_to_multiple_of"] == 8
    assert "Loading weights" not in capsys.readouterr().err  # --no-progress quiets transformers' bars too ...
    from transformers.utils.logging import is_progress_bar_enabled
    assert is_progress_bar_enabled()  # ... for that command only

    assert main(["evaluate", str(run), "--data", str(tmp_path / "dev.csv")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["task"] == "mood" and printed["accuracy"] >= 85
    assert json.loads((run / "eval-metrics.json").read_text())["metrics"]["examples"] == 40

    assert main(["predict", str(run), "the superb order arrived"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert out["type"] == "label" and out["label"] == "pos" and set(out["probabilities"]) == {"neg", "pos"}
    assert main(["predict", str(run), "--task", "mood", "the superb order arrived"]) == 0  # the text after options
    assert json.loads(capsys.readouterr().out.strip()) == out
    texts = ["the superb order arrived", "the awful order came"]  # several inputs, one per argument
    assert main(["predict", str(run), *texts]) == 0
    several = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [p["label"] for p in several] == ["pos", "neg"]
    assert several[0]["probabilities"]["pos"] == pytest.approx(out["probabilities"]["pos"], abs=1e-5)  # padded now
    for argv in (["--task", "mood", *texts], [texts[0], "--task", "mood", texts[1]]):  # before, after, around
        assert main(["predict", str(run), *argv]) == 0
        assert [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()] == several
    assert main(["predict", str(run), "a", "--file", "inputs.txt"]) == 2
    assert "not both" in capsys.readouterr().err

    inputs = tmp_path / "inputs.txt"
    inputs.write_text("the awful order came\nthe lovely order was here\n", encoding="utf-8")
    assert main(["predict", str(run), "--file", str(inputs)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["label"] for line in lines] == ["neg", "pos"]
    # a bad input names where it is and what a pair looks like
    assert main(["predict", str(run), "fine", '["a", "b"']) == 2
    assert capsys.readouterr().err.startswith(  # before the model loads
        """mtpeft: error: argument 2: '["a", "b"' starts like JSON but is not valid JSON (Expecting ',' delimiter""")
    inputs.write_text('fine\n\n{"question": "q",\n', encoding="utf-8")
    assert main(["predict", str(run), "--file", str(inputs)]) == 2
    assert f"mtpeft: error: {inputs}:3: " in capsys.readouterr().err


def test_custom_qa_task_takes_its_window_from_the_command_line(backbone_dir, tmp_path):
    rows = [{"question": f"who met {name}?", "context": f"{other} met {name} at the station on day {i}.",
             "answers": [{"text": other, "answer_start": 0}]}
            for i, (name, other) in enumerate([("Bob", "Alice"), ("Dan", "Carol"), ("Fay", "Eve")] * 4)]
    data = tmp_path / "faq.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    run = tmp_path / "run"
    code = main(["train", "--task", "faq", "--task-type", "extractive-qa", "--data", str(data), "--out", str(run),
                 "--backbone", str(backbone_dir), "--max-length", "96", "--doc-stride", "20", "--epochs", "1",
                 "--no-progress", "--fp32"])
    assert code == 0
    spec = json.loads((run / "task.json").read_text())["spec"]
    assert (spec["max_length"], spec["doc_stride"], spec["text_pair_column"]) == (96, 20, "context")


def test_a_custom_qa_task_with_unanswerable_rows_needs_allow_no_answer(backbone_dir, tmp_path, capsys):
    rows = [{"question": f"who met {name}?", "context": f"{other} met {name} on day {i}.",
             "answers": [{"text": other, "answer_start": 0}] if i % 3 else []}
            for i, (name, other) in enumerate([("Bob", "Alice"), ("Dan", "Carol"), ("Fay", "Eve")] * 4)]
    data = tmp_path / "faq.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    args = ["train", "--task", "faq", "--task-type", "extractive-qa", "--data", str(data), "--out", str(tmp_path / "run"),
            "--backbone", str(backbone_dir), "--max-length", "96", "--doc-stride", "20", "--epochs", "1", "--no-progress", "--fp32"]
    assert main(args) == 2
    assert "faq.jsonl:1: field 'answers': expected a non-empty list of answers" in capsys.readouterr().err
    assert main(args + ["--allow-no-answer"]) == 0
    assert json.loads((tmp_path / "run" / "task.json").read_text())["spec"]["allow_no_answer"] is True


def test_a_zero_window_flag_is_not_ignored(backbone_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine", "label": "a"}\n{"text": "bad", "label": "b"}\n', encoding="utf-8")
    code = main(["train", "--task", "t", "--task-type", "classification", "--labels", "a,b", "--data", str(data),
                 "--out", str(tmp_path / "run"), "--backbone", str(backbone_dir), "--max-length", "0", "--no-progress"])
    assert code == 2
    assert "max_length=0 is too small" in capsys.readouterr().err


def test_bad_data_fails_with_file_and_line(backbone_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine", "label": "a"}\n{"text": "", "label": "b"}\n', encoding="utf-8")
    code = main(["train", "--task", "t", "--task-type", "classification", "--labels", "a,b", "--data", str(data),
                 "--out", str(tmp_path / "run"), "--backbone", str(backbone_dir), "--no-progress"])
    assert code == 2
    assert f"{data}:2: field 'text': empty text" in capsys.readouterr().err


def test_a_misnamed_label_column_is_named_with_the_columns_there(tmp_path, capsys):
    """It said 'found 0 distinct labels; pass --labels', advice that only led to the next error."""
    data = tmp_path / "train.csv"
    data.write_text("message,topic\nhello,billing\nbye,other\n", encoding="utf-8")
    assert main(["train", "--task", "t", "--task-type", "classification", "--data", str(data), "--text-column",
                 "message", "--label-column", "label", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (f"mtpeft: error: --label-column 'label': no such column in {data}; "
                                               "its columns are ['message', 'topic']")


def test_unknown_builtin_task_lists_the_known_ones(tmp_path, capsys):
    code = main(["train", "--task", "nope", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "sst2" in capsys.readouterr().err


def test_input_lines_parse_to_texts_pairs_and_questions():
    assert parse_input_line("plain text\n") == "plain text"
    assert parse_input_line("first\tsecond") == ("first", "second")
    assert parse_input_line('["a", "b"]') == ("a", "b")
    assert parse_input_line('{"question": "q", "context": "c"}') == {"question": "q", "context": "c"}


def test_a_lora_flag_changes_only_its_own_setting_of_the_presets_adapter(backbone_dir, tmp_path):
    # faq-answer's recipe has LoRA r=8, alpha 16 on every linear layer; --alpha used to drop it
    # for query/value, and --lora-dropout alone was ignored. (--init-from none: its warm start is
    # an adapter of the default backbone with alpha 16.)
    from mtpeft.tasks.presets import support_data_dir

    run = tmp_path / "run"
    code = main(["train", "--task", "faq-answer", "--data", str(support_data_dir()), "--out", str(run),
                 "--backbone", str(backbone_dir), "--alpha", "64", "--lora-dropout", "0.1", "--epochs", "1",
                 "--max-train-examples", "4", "--max-eval-examples", "2", "--batch-size", "4",
                 "--no-progress", "--fp32", "--no-tensorboard", "--init-from", "none"])
    assert code == 0
    adapter = json.loads((run / "task.json").read_text())["adapter"]
    assert (adapter["r"], adapter["alpha"], adapter["dropout"]) == (8, 64, 0.1)
    assert {"query", "value", "key", "dense"} <= set(adapter["target_modules"])  # still every linear layer


def test_train_starts_from_the_task_folder_init_from_names_or_fresh(backbone_dir, tmp_path, capsys):
    # faq-answer's recipe starts from the packaged SQuAD adapter, which is for the default backbone.
    from mtpeft.tasks.presets import support_data_dir

    base = ["train", "--task", "faq-answer", "--data", str(support_data_dir()), "--backbone", str(backbone_dir),
            "--epochs", "1", "--max-train-examples", "4", "--max-eval-examples", "2", "--batch-size", "4",
            "--no-progress", "--fp32", "--no-tensorboard"]
    assert main(base + ["--out", str(tmp_path / "warm")]) == 2
    err = capsys.readouterr().err
    assert "was trained on backbone 'default'" in err and "--init-from none" in err
    assert main(base + ["--out", str(tmp_path / "fresh"), "--init-from", "none"]) == 0
    assert main(base + ["--out", str(tmp_path / "head"), "--head-only"]) == 0  # the preset's warm start is of its adapter
    assert main(base + ["--out", str(tmp_path / "again"), "--init-from", str(tmp_path / "fresh")]) == 0
    assert "starting from the adapter and head from" in capsys.readouterr().err
    config = json.loads((tmp_path / "again" / "training.json").read_text())["train"]
    assert config["init_from"] == str(tmp_path / "fresh")
    assert json.loads((tmp_path / "fresh" / "training.json").read_text())["train"]["init_from"] is None


def test_a_built_in_task_takes_the_task_flags_that_apply_and_refuses_the_data_flags(backbone_dir, tmp_path, capsys):
    # --head-dropout, --text-column, --labels, --allow-no-answer ... were dropped without a word for a built-in task.
    from mtpeft.tasks.presets import support_data_dir

    base = ["train", "--task", "sentiment", "--data", str(support_data_dir()), "--out", str(tmp_path / "run"),
            "--backbone", str(backbone_dir), "--epochs", "1", "--max-train-examples", "4", "--max-eval-examples", "2",
            "--no-progress", "--fp32", "--no-tensorboard"]
    assert main(base + ["--text-column", "message", "--labels", "a,b"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mtpeft: error: --text-column, --labels: for your own task; built-in task 'sentiment' reads its data as its "
        "preset says (add --task-type to read the data as your own task of that name)")
    assert main(base + ["--allow-no-answer"]) == 2
    assert "--allow-no-answer is for extractive-qa tasks, not 'sentiment' (classification)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(base + ["--head-dropout", "0.3"]) == 0
    assert json.loads((tmp_path / "run" / "task.json").read_text())["spec"]["head_dropout"] == 0.3


@pytest.mark.parametrize("argv", [["train-joint", "--tasks", "sst2,mrpc", "--max-train", "0"],
                                  ["compare", "--tasks", "sst2", "--max-eval", "-3"]])
def test_an_example_count_below_one_is_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "must be >= 1, got" in capsys.readouterr().err


def test_train_joint_takes_a_zero_lora_flag_at_its_word(tokenizer, tmp_path, monkeypatch, capsys):
    # `args.r or 8`: --r 0 trained a rank-8 adapter instead of being refused, and --alpha 0 became 2*r.
    from test_compare import write_task_files
    from tiny_bundle import saved_backbone

    monkeypatch.chdir(tmp_path)
    saved_backbone(tmp_path / "tiny", tokenizer)
    files = write_task_files(tmp_path)
    argv = ["train-joint", "--tasks", "mood,same", "--task-file", files[0], "--task-file", files[1], "--backbone", "tiny",
            "--out", "joint", "--epochs", "1", "--max-train", "8", "--no-progress", "--fp32", "--checkpoint-every", "-1"]
    assert main(argv + ["--r", "0"]) == 2
    assert "lora r must be >= 1, got 0" in capsys.readouterr().err
    assert main(argv + ["--r", "2", "--alpha", "0"]) == 2  # not 2*r: refused, as an adapter that never learns
    assert "lora alpha must be > 0, got 0" in capsys.readouterr().err
    assert main(argv + ["--r", "2", "--alpha", "3"]) == 0
    adapter = json.loads((tmp_path / "joint" / "mood" / "task.json").read_text())["adapter"]
    assert (adapter["r"], adapter["alpha"]) == (2, 3)


def test_train_records_the_command_it_was_given(backbone_dir, tmp_path):
    # main(argv) from a script or notebook recorded the host process's argv (here: pytest's).
    _write_sentiment(tmp_path / "train.csv", 8, 0)
    argv = ["train", "--task", "mood", "--task-type", "classification", "--data", str(tmp_path / "train.csv"),
            "--eval-data", str(tmp_path / "train.csv"), "--out", str(tmp_path / "run"), "--backbone", str(backbone_dir),
            "--epochs", "1", "--no-progress", "--fp32", "--report-to", "", "--checkpoint-every", "-1"]
    assert main(argv) == 0
    config = json.loads((tmp_path / "run" / "training.json").read_text())
    assert config["command"] == "mtpeft " + shlex.join(argv)


@pytest.mark.parametrize("command", [["evaluate", "--data", "dev.csv"], ["export", "--out", "exported"]])
def test_a_bundle_command_without_task_names_the_flag_and_the_tasks(tmp_path, tokenizer, capsys, command):
    from tiny_bundle import path_backbone, saved_backbone, support_model

    bundle = tmp_path / "bundle"
    support_model(path_backbone(saved_backbone(tmp_path / "backbone", tokenizer))).save(bundle)
    assert main([command[0], str(bundle), *command[1:]]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "holds several tasks; pass --task, one of ['faq-answer', 'sentiment', 'similar-questions']")


def test_predict_says_how_the_command_line_writes_a_pair_and_names_the_task_flag(tmp_path, tokenizer, capsys):
    # A text for a pair task was told "pass a pair (text_a, text_b)", a Python tuple, and a text that
    # several tasks take "pass task=": on the command line they are a JSON list and --task.
    from mtpeft import TaskSpec
    from tiny_bundle import path_backbone, saved_backbone, support_model

    model = support_model(path_backbone(saved_backbone(tmp_path / "backbone", tokenizer)))
    model.save(tmp_path / "bundle")
    model.save(tmp_path / "pair", tasks=["similar-questions"])
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "bundle"), "--task", "similar-questions", '["a", "b"]', "just text"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "mtpeft: error: argument 2: task 'similar-questions' compares two texts: on the command line a pair is a "
        """JSON list, e.g. '["first text", "second text"]'""")
    assert main(["predict", str(tmp_path / "pair"), "just text"]) == 2  # the folder's only task
    assert "argument 1: task 'similar-questions' compares two texts: on the command line" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "bundle"), "--task", "faq-answer", "just text"]) == 2
    assert """a question is a JSON object, e.g. '{"question": "...", "context": "..."}'""" in capsys.readouterr().err
    # A JSON object with a null part has the right shape: the message names the part, not the shape.
    assert main(["predict", str(tmp_path / "bundle"), "--task", "faq-answer", '{"question": "q", "context": null}']) == 2
    err = capsys.readouterr().err
    assert "argument 1: task 'faq-answer': the input's context is None, not a text" in err
    assert "a question is a JSON object" not in err
    assert main(["predict", str(tmp_path / "bundle"), "--task", "similar-questions", '["a", null]']) == 2
    err = capsys.readouterr().err
    assert "argument 1: task 'similar-questions': the input's second text is None" in err and "JSON list" not in err

    model.add_task(TaskSpec(name="mood", type="classification", labels=["bad", "good"], max_length=32))
    model.save(tmp_path / "two-text-tasks")
    assert model.predict("just text").reason.endswith("no router is trained; pass task=")  # the Python API's terms
    assert main(["predict", str(tmp_path / "two-text-tasks"), "just text"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["type"] == "no-task" and printed["reason"].endswith("no router is trained; pass --task")


def test_evaluate_on_a_built_in_tasks_folder_reads_its_dev_file_only(backbone_dir, tmp_path, capsys):
    rng = random.Random(0)
    rows = [(f"the {rng.choice(['great', 'awful'])} film {i}", i % 2) for i in range(24)]
    (tmp_path / "sst").mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "sst" / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows))
    assert main(["train", "--task", "sst2", "--data", str(tmp_path / "sst"), "--out", str(tmp_path / "run"),
                 "--backbone", str(backbone_dir), "--epochs", "1", "--no-progress", "--no-tensorboard"]) == 0
    (tmp_path / "dev-only").mkdir()
    (tmp_path / "dev-only" / "dev.tsv").write_text((tmp_path / "sst" / "dev.tsv").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(tmp_path / "dev-only")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["examples"] == 24


def test_evaluate_on_a_built_in_tasks_own_file_scores_its_held_out_rows(backbone_dir, tmp_path, capsys):
    # The file was read whole, scoring the rows the task trained on with the held-out ones.
    folder = tmp_path / "support"
    folder.mkdir()
    moods = ["negative", "neutral", "positive"]
    (folder / "sentiment.jsonl").write_text("".join(
        json.dumps({"text": f"message {i}", "label": moods[i % 3]}) + "\n" for i in range(20)))
    assert main(["train", "--task", "sentiment", "--data", str(folder), "--out", str(tmp_path / "run"),
                 "--backbone", str(backbone_dir), "--epochs", "1", "--no-progress", "--no-tensorboard"]) == 0
    for data in (folder, folder / "sentiment.jsonl"):
        capsys.readouterr()
        assert main(["evaluate", str(tmp_path / "run"), "--data", str(data)]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["examples"] == 4  # every 5th of 20


def test_evaluate_reads_a_task_of_ones_own_named_as_a_built_in_one_as_its_own(tmp_path, tokenizer, capsys):
    # A task called "sentiment" with other labels was read in the built-in's layout by its name: its
    # own sentiment.jsonl scored only the built-in's held-out every 5th row, and a folder was taken.
    from mtpeft import MultiTaskModel, TaskSpec
    from mtpeft.tasks.presets import get_preset
    from tiny_bundle import path_backbone, saved_backbone

    backbone = path_backbone(saved_backbone(tmp_path / "backbone", tokenizer))
    own, built_in = MultiTaskModel(backbone), MultiTaskModel(backbone)
    own.add_task(TaskSpec(name="sentiment", type="classification", labels=["bad", "good"], max_length=32))
    own.save(tmp_path / "own")
    # the built-in task with a flag that applies to it (a shorter window) still reads its preset's files
    built_in.add_task(TaskSpec.from_dict({**get_preset("sentiment").spec.to_dict(), "max_length": 32}))
    built_in.save(tmp_path / "built-in")
    rows = [{"text": f"message {i}", "label": ["bad", "good"][i % 2]} for i in range(20)]
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "data").mkdir()
    moods = ["negative", "neutral", "positive"]
    (tmp_path / "data" / "sentiment.jsonl").write_text("".join(  # the built-in task's file name
        json.dumps({"text": f"message {i}", "label": moods[i % 3]}) + "\n" for i in range(20)))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "built-in"), "--data", str(tmp_path / "data" / "sentiment.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["examples"] == 4  # every 5th of 20

    (tmp_path / "data" / "sentiment.jsonl").write_text((tmp_path / "own.jsonl").read_text())
    assert main(["evaluate", str(tmp_path / "own"), "--data", str(tmp_path / "data" / "sentiment.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["examples"] == 20  # the whole file
    assert main(["evaluate", str(tmp_path / "own"), "--data", str(tmp_path / "data")]) == 2
    assert "is a folder; pass a data file for task 'sentiment'" in capsys.readouterr().err


def test_serve_flags_reach_the_servers_settings(monkeypatch):
    import mtpeft.serve

    seen = {}
    monkeypatch.setattr(mtpeft.serve, "serve", lambda bundle, **kwargs: seen.update(kwargs))
    assert main(["serve", "runs/x", "--max-queued", "7", "--request-timeout", "2.5", "--drain-timeout", "1"]) == 0
    settings = seen["settings"]
    assert (settings.max_queued, settings.request_timeout_s, settings.drain_timeout_s) == (7, 2.5, 1.0)


def test_train_says_how_many_examples_it_uses_and_when_none_is_left_to_score(backbone_dir, tmp_path, capsys):
    _write_sentiment(tmp_path / "train.csv", 6, 0)  # too few for a held-out tenth
    assert main(["train", "--task", "mood", "--task-type", "classification", "--labels", "neg,pos", "--data",
                 str(tmp_path / "train.csv"), "--out", str(tmp_path / "run"), "--backbone", str(backbone_dir),
                 "--epochs", "1", "--max-train-examples", "4", "--no-progress", "--no-tensorboard"]) == 0
    err = capsys.readouterr().err
    assert "task mood: 4 (of 6) training and 0 evaluation examples" in err
    assert "warning: no evaluation examples: the run will not be scored" in err


def test_a_mistyped_run_folder_is_named_as_missing(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "runs" / "dmeo"), "hello"]) == 2
    assert capsys.readouterr().err.strip() == f"mtpeft: error: {tmp_path / 'runs' / 'dmeo'}: no such folder"


def test_predict_refuses_an_empty_text_by_its_place_before_loading_the_model(tmp_path, capsys):
    # "" or a zero-width space got a confident label, as the HTTP API's 422 already refused.
    missing = str(tmp_path / "no-bundle-needed")
    assert main(["predict", missing, "fine text", "\u200b"]) == 2
    assert capsys.readouterr().err.strip().endswith("argument 2: empty text")
    lines = tmp_path / "inputs.txt"
    lines.write_text('fine text\n["a question", " "]\n{"question": "q", "context": "\\u00a0"}\n', encoding="utf-8")
    assert main(["predict", missing, "--file", str(lines)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{lines}:2: empty text")
    lines.write_text('{"question": "q", "context": "\\u00a0"}\n', encoding="utf-8")
    assert main(["predict", missing, "--file", str(lines)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{lines}:1: empty text")


def test_a_zero_seed_or_checkpoint_interval_is_kept(backbone_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine", "label": "a"}\n{"text": "bad", "label": "b"}\n', encoding="utf-8")
    code = main(["train", "--task", "t", "--task-type", "classification", "--labels", "a,b", "--data", str(data),
                 "--out", str(tmp_path / "run"), "--backbone", str(backbone_dir), "--epochs", "1", "--no-progress",
                 "--fp32", "--seed", "0", "--checkpoint-every", "0"])
    assert code == 0
    config = json.loads((tmp_path / "run" / "training.json").read_text())["train"]
    assert config["seed"] == 0 and config["checkpoint_every"] == 0


def test_a_checkpoint_interval_below_minus_one_is_refused(backbone_dir, tmp_path, capsys):
    # -5 ran as "no checkpoints", which only -1 means.
    _write_sentiment(tmp_path / "train.csv", 8, 0)
    code = main(["train", "--task", "mood", "--task-type", "classification", "--data", str(tmp_path / "train.csv"),
                 "--out", str(tmp_path / "run"), "--backbone", str(backbone_dir), "--epochs", "1", "--no-progress",
                 "--fp32", "--no-tensorboard", "--checkpoint-every", "-5"])
    assert code == 2
    assert "checkpoint_every must be >= 1 steps, 0 (epoch ends only) or -1 (none), got -5" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("head_lr", ["0", "-0.001"])
def test_a_head_lr_below_or_at_zero_is_refused(backbone_dir, tmp_path, capsys, head_lr):
    # `head_lr or lr`: --head-lr 0 trained the head at --lr (training.json said 0.0), and a
    # negative rate (AdamW checks only its default rate) trained the head uphill.
    _write_sentiment(tmp_path / "train.csv", 8, 0)
    code = main(["train", "--task", "mood", "--task-type", "classification", "--data", str(tmp_path / "train.csv"),
                 "--out", str(tmp_path / "run"), "--backbone", str(backbone_dir), "--epochs", "1", "--no-progress",
                 "--fp32", "--no-tensorboard", "--head-lr", head_lr])
    assert code == 2
    assert f"head_lr must be > 0 (or None: the lr), got {float(head_lr)}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_device_this_machine_lacks_is_named_not_a_traceback(tmp_path, tokenizer, capsys, monkeypatch):
    # torch's RuntimeError ("Expected one of cpu, cuda, ...") or AssertionError ("Torch not compiled
    # with CUDA enabled") came out as a traceback, after the model had loaded.
    import torch

    from tiny_bundle import path_backbone, saved_backbone, support_model

    bundle = tmp_path / "bundle"
    support_model(path_backbone(saved_backbone(tmp_path / "backbone", tokenizer))).save(bundle, tasks=["sentiment"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    for device, problem in (("gpu", "not a device"), ("cuda:x", "not a device"), ("cuda", "no CUDA GPU is available")):
        assert main(["export", str(bundle), "--out", str(tmp_path / "exported"), "--device", device]) == 2
        assert capsys.readouterr().err.strip().startswith(f"mtpeft: error: --device {device!r}: {problem}")  # before loading
    assert main(["compare", "--tasks", "sst2", "--methods", "lora-r8", "--device", "gpu"]) == 2  # before any cell runs
    assert "--device 'gpu': not a device" in capsys.readouterr().err
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("flag, value, problem", [("--epochs", "0", "> 0, got 0.0"), ("--lr", "-1", "> 0, got -1.0"),
                                                  ("--head-lr", "0", "> 0, got 0.0"), ("--batch-size", "0", ">= 1, got 0")])
def test_compare_refuses_a_bad_recipe_override_before_any_cell_runs(tmp_path, monkeypatch, capsys, flag, value, problem):
    # Every cell of the grid failed on it in turn, each with TrainConfig's traceback.
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--tasks", "sst2,mrpc", "--methods", "lora-r8,full", flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"mtpeft: error: {flag} must be {problem}"


def test_a_task_a_bundle_or_an_export_is_not_written_over_another_of_them(tmp_path, tokenizer, capsys, monkeypatch):
    # train --out BUNDLE wrote a task.json into the bundle's root, so the bundle loaded as that one
    # task; train-joint --out TASK_FOLDER hid its bundle behind the old task.json; export --out into
    # a task folder replaced its model card, and the bundle then failed its sha256 check.
    from mtpeft import MultiTaskModel
    from test_compare import write_task_files
    from tiny_bundle import path_backbone, saved_backbone, support_model

    monkeypatch.chdir(tmp_path)
    backbone = saved_backbone(tmp_path / "backbone", tokenizer)
    support_model(path_backbone(backbone)).save("bundle")
    _write_sentiment(tmp_path / "train.csv", 8, 0)
    files = write_task_files(tmp_path)
    capsys.readouterr()
    commands = {
        "train": ["train", "--task", "mood", "--task-type", "classification", "--data", "train.csv", "--out", "bundle",
                  "--backbone", str(backbone), "--epochs", "1", "--no-progress", "--fp32", "--no-tensorboard"],
        "train-joint": ["train-joint", "--tasks", "mood,same", "--task-file", files[0], "--task-file", files[1],
                        "--backbone", str(backbone), "--out", "bundle/sentiment", "--epochs", "1", "--no-progress"],
        "export into a task": ["export", "bundle", "--task", "sentiment", "--out", "bundle/sentiment"],
        "export into a bundle": ["export", "bundle", "--task", "sentiment", "--out", "bundle"],
        "export onto a file": ["export", "bundle", "--task", "sentiment", "--out", "train.csv"],
    }
    errors = {
        "train": "bundle is a bundle (bundle.json); a task saved there would hide the bundle's tasks",
        "train-joint": "bundle/sentiment holds a saved task (task.json), which a bundle saved there would hide",
        "export into a task": "bundle/sentiment is a saved task or bundle; export into a folder of its own",
        "export into a bundle": "bundle is a saved task or bundle; export into a folder of its own",
        "export onto a file": "train.csv is a file; export writes a folder",
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        assert errors[name] in capsys.readouterr().err, name
    assert sorted(MultiTaskModel.load("bundle").task_names) == ["faq-answer", "sentiment", "similar-questions"]
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == [
        "bundle.json", "faq-answer", "sentiment", "similar-questions"]


@pytest.mark.parametrize("flag, value, error", [
    ("--max-inputs", "0", "--max-inputs must be >= 1, got 0"), ("--max-queued", "0", "--max-queued must be >= 1, got 0"),
    ("--max-text-chars", "0", "--max-text-chars must be >= 1, got 0"),
    ("--max-wait-ms", "-1", "--max-wait-ms must be >= 0, got -1.0"),
    ("--request-timeout", "0", "--request-timeout must be > 0, got 0.0"),
    ("--drain-timeout", "-1", "--drain-timeout must be >= 0, got -1.0"),
    ("--port", "99999", "--port must be in 0..65535, got 99999")])
def test_serve_refuses_settings_that_would_refuse_every_request(monkeypatch, capsys, flag, value, error):
    # The server started and answered every request 422 or 503 (or claimed a port that does not exist).
    import mtpeft.serve

    monkeypatch.setattr(mtpeft.serve, "serve", lambda bundle, **kwargs: None)
    assert main(["serve", "runs/x", flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"mtpeft: error: {error}"


@pytest.mark.parametrize("flag, value, error", [
    ("--top-k", "0", "--top-k must be >= 1 (a whole number), got 0"),
    ("--answer-threshold", "30", "--answer-threshold must be a probability in [0, 1], got 30.0")])
def test_support_names_a_bad_setting_by_its_flag(monkeypatch, capsys, flag, value, error):
    # The error named the Python argument (top_k), which the command line has no way to type.
    from mtpeft.model import MultiTaskModel

    monkeypatch.setattr(MultiTaskModel, "load", lambda *args, **kwargs: None)
    assert main(["support", "runs/x", "my order is late", flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"mtpeft: error: {error}"


@pytest.mark.parametrize("argv, error", [
    (["compare", "--seeds", "1,x"], "argument --seeds: expected comma-separated whole numbers, got '1,x'"),
    (["compare", "--max-train", "ten"], "argument --max-train: expected a whole number, got 'ten'"),
    (["train", "--task", "t", "--data", "d", "--out", "o", "--label-range", "5"],
     "argument --label-range: expected LOW,HIGH (two numbers), got '5'")])
def test_a_malformed_flag_value_says_what_the_flag_takes(argv, error, capsys):
    # argparse named the parsing function instead: "invalid _int_list value: '1,x'".
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().endswith(f"error: {error}")


def test_a_path_the_system_refuses_is_one_line_not_a_traceback(tmp_path, tokenizer, capsys):
    # Only FileNotFoundError was caught: an --out under a file (FileExistsError, NotADirectoryError)
    # or a folder without write permission came out as a traceback.
    from tiny_bundle import path_backbone, saved_backbone, support_model

    support_model(path_backbone(saved_backbone(tmp_path / "backbone", tokenizer))).save(tmp_path / "bundle",
                                                                                       tasks=["sentiment"])
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "bundle"), "--out", str(tmp_path / "notes.txt" / "exported")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mtpeft: error: ") and str(tmp_path / "notes.txt") in err[-1]
    assert not any("Traceback" in line for line in err)


def test_a_data_file_without_rows_is_named(backbone_dir, tmp_path, capsys):
    # "input: no usable rows for task 'mood'" did not say which of --data and --eval-data it was.
    _write_sentiment(tmp_path / "train.csv", 8, 0)
    (tmp_path / "dev.csv").write_text("text,label\n", encoding="utf-8")
    assert main(["train", "--task", "mood", "--task-type", "classification", "--labels", "neg,pos", "--data",
                 str(tmp_path / "train.csv"), "--eval-data", str(tmp_path / "dev.csv"), "--out", str(tmp_path / "run"),
                 "--backbone", str(backbone_dir), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"mtpeft: error: {tmp_path / 'dev.csv'}: no usable rows for task 'mood'"


def test_train_joint_refuses_a_task_named_twice(tokenizer, tmp_path, monkeypatch, capsys):
    # It trained, printed the task's scores twice and recorded it twice in joint/training.json.
    from test_compare import write_task_files
    from tiny_bundle import saved_backbone

    monkeypatch.chdir(tmp_path)
    saved_backbone(tmp_path / "tiny", tokenizer)
    files = write_task_files(tmp_path)
    capsys.readouterr()
    assert main(["train-joint", "--tasks", "mood,same,mood", "--task-file", files[0], "--task-file", files[1],
                 "--backbone", "tiny", "--out", "joint", "--epochs", "1", "--max-train", "8", "--no-progress",
                 "--fp32", "--checkpoint-every", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "mtpeft: error: --tasks: 'mood' is named more than once"
    assert not (tmp_path / "joint").exists()


@pytest.mark.parametrize("flag, values, named", [("--tasks", "sst2,mrpc,sst2", "'sst2'"),
                                                 ("--methods", "lora-r8,full,lora-r8", "'lora-r8'")])
def test_compare_refuses_a_task_or_method_named_twice(tmp_path, monkeypatch, capsys, flag, values, named):
    # A joint cell trained "mood+same+mood" and wrote mood's result twice; a method named twice
    # was a second cell of the grid.
    monkeypatch.chdir(tmp_path)
    argv = {"--tasks": "sst2", "--methods": "lora-r8"}
    argv[flag] = values
    assert main(["compare", *[a for pair in argv.items() for a in pair]]) == 2
    assert capsys.readouterr().err.strip() == f"mtpeft: error: {flag}: {named} is named more than once"


def test_version_is_the_packages(capsys):
    import importlib.metadata

    import mtpeft

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mtpeft {mtpeft.__version__}"
    assert importlib.metadata.version("mtpeft") == mtpeft.__version__  # pyproject reads it from the package


@pytest.mark.parametrize("argv", [["compare", "--tasks", "sst2", "--methods", "full"],
                                  ["train-joint", "--tasks", "sst2,stsb", "--out", "joint"], ["report"]])
def test_commands_other_than_train_refuse_several_processes(argv, monkeypatch, capsys, tmp_path):
    # Under accelerate launch / torchrun each process would run the whole command and write the
    # same files (a compare grid raced on its work folders; full fine-tuning failed in DDP).
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"mtpeft: error: mtpeft {argv[0]} runs in one process" in err and "mtpeft train" in err
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


def test_a_backbone_given_by_a_relative_path_is_found_again_from_elsewhere(backbone_dir, tmp_path, monkeypatch,
                                                                           capsys):
    # Tasks record the backbone's name and load it again by it: a relative path was found only
    # from the folder it was typed in, and from anywhere else transformers tried the hub.
    import shutil

    shutil.copytree(backbone_dir, tmp_path / "models" / "tiny")
    _write_sentiment(tmp_path / "train.csv", 32, 0)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--task", "mood", "--task-type", "classification", "--data", "train.csv", "--out", "run",
                 "--backbone", "models/tiny", "--epochs", "1", "--no-progress", "--fp32"]) == 0
    record = json.loads((tmp_path / "run" / "task.json").read_text())
    assert record["backbone"]["name"] == str((tmp_path / "models" / "tiny").resolve())
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["predict", str(tmp_path / "run"), "the superb order arrived"]) == 0
    predicted = json.loads(capsys.readouterr().out.strip())
    # Moved since: the error names the recorded backbone and how to name another, which then loads.
    (tmp_path / "models" / "tiny").rename(tmp_path / "models" / "moved")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["predict", str(tmp_path / "run"), "the superb order arrived"]) == 2
    err = capsys.readouterr().err
    assert f"trained on backbone '{record['backbone']['name']}', which does not load here" in err
    assert "--backbone" in err
    assert main(["predict", str(tmp_path / "run"), "--backbone", str(tmp_path / "models" / "moved"),
                 "the superb order arrived"]) == 0
    assert json.loads(capsys.readouterr().out.strip()) == predicted
