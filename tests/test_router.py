"""The router: shapes as hard constraints, thresholds, no-task, precedence, saving, training data."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_bert
from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.backbone import BackboneMismatchError
from mtpeft.cli import main
from mtpeft.router import (NO_TASK, ROUTER_DIR, ROUTER_FORMAT, LearnedRouter, RouteDecision, ShapeRouter, decide,
                           input_shape, lexical_features, load_router)
from mtpeft.router_data import packaged_phrasings_dir, read_phrasings, router_examples, spread
from tiny_bundle import QA, ROUTER_EXAMPLES as EXAMPLES, path_backbone, saved_backbone, support_model


@pytest.fixture(scope="module")
def model(tokenizer):
    return support_model(tiny_bert(tokenizer))


@pytest.fixture(scope="module")
def router(model):
    return LearnedRouter.fit(model, EXAMPLES)


def test_input_shapes_and_a_clear_error_for_others():
    assert [input_shape(v) for v in ("hi", ("a", "b"), ["a", "b"], {"text": "a", "text_pair": "b"}, QA, {"text": "x"})] \
        == ["text", "pair", "pair", "pair", "qa", "text"]
    with pytest.raises(ValueError, match="pass a string, a pair"):
        input_shape(42)


def test_learned_router_fits_its_examples_and_answers_no_task_for_off_topic(router):
    assert router.info["train_accuracy"] == 1.0 and set(router.classes) == {NO_TASK, "sentiment", "faq-answer",
                                                                               "similar-questions"}
    decisions = router.route(["I love it, great service", "what does the FAQ say about returns", "tell me a joke"])
    assert [d.task for d in decisions] == ["sentiment", "faq-answer", None]
    assert decisions[2].reason.startswith("the input looks like none")
    assert all(NO_TASK not in [c for c, _ in d.candidates] for d in decisions)


def test_shape_is_a_hard_constraint(router):
    # A QA dict whose question reads like sentiment still goes to the QA task; a pair to the pair task.
    qa, pair = router.route([{"question": "I love it, great service", "context": "x"}, ("awful, broken", "thanks")])
    assert (qa.task, qa.confidence, [c for c, _ in qa.candidates]) == ("faq-answer", 1.0, ["faq-answer"])
    assert (pair.task, pair.confidence) == ("similar-questions", 1.0)


def test_below_threshold_no_task_with_candidates(model):
    classes = ["faq-answer", "sentiment", "similar-questions"]
    width = model.identity.hidden_size + 1024 + 3
    undecided = LearnedRouter(model, classes, {}, torch.zeros(3, width), torch.zeros(3), threshold=0.5)
    decision = undecided.route(["anything at all"])[0]  # every task at p = 1/3
    assert decision.task is None and "< threshold 0.5" in decision.reason
    assert sorted(c for c, _ in decision.candidates) == classes
    assert decision.confidence == pytest.approx(1 / 3, abs=1e-4)


def test_an_input_only_tasks_the_router_never_learned_take_names_them(model, tokenizer):
    # A router trained before the pair task was added said "no task takes a pair input; tasks: [..., 'similar-questions']".
    width = model.identity.hidden_size + 1024 + 3
    older = LearnedRouter(model, [NO_TASK, "sentiment"], {}, torch.zeros(2, width), torch.zeros(2))
    pair, qa = older.route([("where is my order", "has my parcel shipped"), QA])
    assert pair.task is None and pair.reason == ("the router was not trained on the tasks that take a pair input "
                                                 "(['similar-questions']); retrain it (`mtpeft train-router`) or name the task")
    assert "(['faq-answer'])" in qa.reason
    alone = MultiTaskModel(tiny_bert(tokenizer))
    alone.add_task(TaskSpec(name="mood", type="classification", labels=["bad", "good"]))
    unrelated = LearnedRouter(alone, ["mood"], {}, torch.zeros(1, width), torch.zeros(1))
    assert unrelated.route([("a", "b")])[0].reason == "no task takes a pair input; tasks: ['mood']"

def test_an_input_for_a_task_removed_since_training_is_not_handed_to_another(tokenizer):
    # The removed task's probability was shared out among the tasks left: a clear FAQ request
    # (p=0.94) went to sentiment at p=0.73, above the threshold, once faq-answer was unloaded.
    from tiny_bundle import SPECS

    model = MultiTaskModel(tiny_bert(tokenizer))
    for spec in SPECS:
        model.add_task(spec)
    width = model.identity.hidden_size + 1024 + 3
    classes = [NO_TASK, "faq-answer", "sentiment"]
    shapes = {NO_TASK: "text", "faq-answer": "qa", "sentiment": "text"}
    router = LearnedRouter(model, classes, shapes, torch.zeros(3, width), torch.tensor([0.0, 4.0, 1.0]))
    assert router.route(["how long do refunds take"])[0].task == "faq-answer"
    model.remove_task("faq-answer")
    text, qa = router.route(["how long do refunds take", QA])
    assert text.task is None and text.confidence == pytest.approx(0.936, abs=1e-3)
    assert text.reason.startswith("the input looks most like task 'faq-answer' (p=0.94), which the model does not hold")
    assert [c for c, _ in text.candidates] == ["sentiment"]  # only tasks that can be named
    assert qa.task is None and qa.candidates == [] and "'faq-answer'" in qa.reason


def test_fit_refuses_a_bad_threshold_or_c_before_embedding_the_examples(model, monkeypatch):
    def embedded(*args, **kwargs):
        raise AssertionError("the examples were embedded before the threshold was checked")

    monkeypatch.setattr(LearnedRouter, "features", staticmethod(embedded))
    with pytest.raises(ValueError, match="router threshold must be in"):
        LearnedRouter.fit(model, EXAMPLES, threshold=1.5)
    with pytest.raises(ValueError, match="C must be > 0, got 0"):
        LearnedRouter.fit(model, EXAMPLES, c=0)


def test_explicit_task_wins_and_none_entries_are_routed(router):
    decisions = decide(["tell me a joke", "I love it, great service"], ["faq-answer", None], router)
    assert [(d.task, d.source) for d in decisions] == [("faq-answer", "explicit"), ("sentiment", "router")]
    assert [d.source for d in decide(["a", "b"], "sentiment", router)] == ["explicit", "explicit"]
    with pytest.raises(ValueError, match="2 task names for 1 inputs"):
        decide(["a"], ["sentiment", None], router)


def test_shape_router_is_the_fallback_rule(model):
    decisions = ShapeRouter(model.specs).route(["hello", ("a", "b"), QA])
    assert [(d.task, d.source) for d in decisions] == [("sentiment", "shape"), ("similar-questions", "shape"),
                                                        ("faq-answer", "shape")]
    two_text_tasks = {**model.specs, "topic": model.specs["sentiment"]}
    undecided = ShapeRouter(two_text_tasks).route(["hello"])[0]
    assert undecided.task is None and "2 tasks take a text input" in undecided.reason
    assert {c for c, _ in undecided.candidates} == {"sentiment", "topic"}


def test_save_load_round_trip_without_pickles(model, router, tokenizer, tmp_path):
    router.save(tmp_path / ROUTER_DIR)
    assert sorted(p.name for p in (tmp_path / ROUTER_DIR).iterdir()) == ["router.json", "router.safetensors"]
    loaded = load_router(tmp_path, model)
    assert isinstance(loaded, LearnedRouter) and loaded.classes == router.classes
    inputs = ["I love it", ("a", "b"), "tell me a joke"]
    torch.testing.assert_close(loaded.probabilities(inputs), router.probabilities(inputs))
    record = json.loads((tmp_path / ROUTER_DIR / "router.json").read_text())
    assert record["format"] == "mtpeft-router/1" and record["backbone"]["name"] == "tiny-bert"
    with pytest.raises(BackboneMismatchError, match="the router in"):
        LearnedRouter.load(tmp_path, support_model(tiny_bert(tokenizer, seed=9)))
    assert isinstance(load_router(tmp_path / "elsewhere", model), ShapeRouter)


def test_lexical_features_are_stable_across_processes():
    # crc32, not hash(): the same text sets the same columns in any process.
    columns = torch.nonzero(lexical_features(["FAQ refund"], dims=64)[0]).flatten().tolist()
    assert columns == sorted(columns) and len(columns) == 3
    assert columns == torch.nonzero(lexical_features(["faq  REFUND!"], dims=64)[0]).flatten().tolist()


def test_decision_to_dict():
    d = RouteDecision("a", 0.9, [("a", 0.9), ("b", 0.1)]).to_dict()
    assert d["candidates"] == [{"task": "a", "probability": 0.9}, {"task": "b", "probability": 0.1}]


def test_packaged_phrasings_cover_the_demo_skills_and_no_task():
    rows = read_phrasings(packaged_phrasings_dir())
    counts = {task: sum(1 for t, _ in rows if t == task) for task in ("sentiment", "similar-questions", "faq-answer", None)}
    assert all(n >= 70 for n in counts.values()), counts
    assert len({text for _, text in rows}) == len(rows)  # no duplicates


def test_bad_phrasing_rows_name_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"task": "a", "text": "ok"}\n{"task": 3, "text": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: 'task' must be a task name or null"):
        read_phrasings(path)
    path.write_text('{"task": "a"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: expected"):
        read_phrasings(path)
    # A row without "task" (say, "label" in its place) trained the router that its text asks for no task.
    path.write_text('{"task": "a", "text": "ok"}\n{"label": "a", "text": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: no 'task' \(null for a request of no task\)"):
        read_phrasings(path)
    path.write_text('{"task": "a", "text": "\\u200b\\u0000"}\n')  # blank to the tokenizer too
    with pytest.raises(ValueError, match=r"p.jsonl:1: expected .*non-empty text"):
        read_phrasings(path)


def test_phrasings_files_may_start_with_a_bom_and_bad_bytes_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"task": "sentiment", "text": "so happy"}\r\n{"task": null, "text": "caf\xc3\xa9"}\r\n')
    assert read_phrasings(path) == [("sentiment", "so happy"), (None, "caf\u00e9")]
    path.write_bytes(b'{"task": null, "text": "ok"}\n{"task": null, "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: .*not UTF-8"):
        read_phrasings(path)


def test_router_examples_skip_phrasings_of_absent_tasks(model, tmp_path):
    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"task": "sentiment", "text": "so happy"}\n{"task": "translate", "text": "in French"}\n')
    examples, summary = router_examples(model, phrasings=[extra], packaged=False)
    assert examples == [("sentiment", "so happy")] and summary["skipped_phrasings"] == 1
    with pytest.raises(ValueError, match="tasks the model does not hold: \\['translate'\\]"):
        LearnedRouter.fit(model, [("translate", "x"), ("sentiment", "y")])


def test_train_router_cli_writes_router_into_the_bundle(tokenizer, tmp_path, capsys):
    backbone_dir = saved_backbone(tmp_path / "backbone", tokenizer)
    support_model(path_backbone(backbone_dir)).save(tmp_path / "bundle")
    data = tmp_path / "sentiment.csv"
    data.write_text("text,label\nlovely sofa,positive\nbroken lamp,negative\nwhen do you open,neutral\n")
    assert main(["train-router", str(tmp_path / "bundle"), "--data", f"sentiment={data}",
                 "--data", str(tmp_path / "nowhere")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["train-router", str(tmp_path / "bundle"), "--data", f"sentiment={data}", "--threshold", "0.4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"]["sentiment"]["examples"] == 3 and out["phrasings"]["faq-answer"] > 50
    record = json.loads((tmp_path / "bundle" / "router" / "router.json").read_text())
    assert record["threshold"] == 0.4 and NO_TASK in record["classes"]
    manifest = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert {"router/router.json", "router/router.safetensors"} <= set(manifest["files"])

    # A router changed since the bundle recorded it (a train-router stopped midway) is refused where it
    # is read, but the tasks still load, so that train-router can replace it.
    from mtpeft import MultiTaskModel
    from mtpeft.storage import BundleIntegrityError

    (tmp_path / "bundle" / "router" / "router.json").write_text(json.dumps({**record, "threshold": 0.9}))
    with pytest.raises(BundleIntegrityError, match="router.json: changed since the bundle was saved"):
        MultiTaskModel.load(tmp_path / "bundle")
    assert MultiTaskModel.load(tmp_path / "bundle", router=False).router is None
    assert main(["train-router", str(tmp_path / "bundle"), "--data", f"sentiment={data}"]) == 0
    assert isinstance(MultiTaskModel.load(tmp_path / "bundle").router, LearnedRouter)


def test_spread_takes_items_evenly_and_refuses_no_room():
    assert spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert spread([1, 2], 5) == [1, 2]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        spread([1, 2], 0)


@pytest.mark.parametrize("bias, message", [(torch.zeros(1), r"bias shape \(1,\), expected \(4,\)"),
                                           (torch.zeros(5), r"bias shape \(5,\), expected \(4,\)"),
                                           (None, "no 'bias' tensor")])
def test_load_refuses_a_bias_of_the_wrong_shape_naming_the_file(model, router, tmp_path, bias, message):
    # A 1-long bias broadcast over every class (silently dropping the learned bias); a longer one failed mid-request.
    from mtpeft.storage import read_safetensors, write_safetensors

    router.save(tmp_path)
    tensors = read_safetensors(tmp_path / "router.safetensors")
    if bias is None:
        del tensors["bias"]
    else:
        tensors["bias"] = bias
    write_safetensors(tmp_path / "router.safetensors", tensors)
    with pytest.raises(ValueError, match=f"router.safetensors: {message}"):
        LearnedRouter.load(tmp_path, model)


@pytest.mark.parametrize("content, message", [("{oops", r"router.json:1: invalid JSON"),
                                              ("[]", r"router.json: not an mtpeft router"),
                                              ('{"format": "FORMAT"}', r"router.json: missing classes, shapes, threshold")])
def test_a_malformed_router_json_is_a_value_error_naming_the_file(model, router, tmp_path, content, message):
    router.save(tmp_path)
    (tmp_path / "router.json").write_text(content.replace("FORMAT", ROUTER_FORMAT))
    with pytest.raises(ValueError, match=message):
        LearnedRouter.load(tmp_path, model)


def test_a_router_changed_since_its_bundle_recorded_it_is_refused(model, router, tmp_path):
    # The manifest's sha256 list covers router/ too, but loading never checked it: a train-router
    # stopped between writing the weights and updating the list loaded a mix of two routers.
    from mtpeft.storage import BundleIntegrityError, read_safetensors, write_safetensors

    model.save(tmp_path / "bundle")
    router.save(tmp_path / "bundle" / ROUTER_DIR)
    assert LearnedRouter.load(tmp_path / "bundle", model).classes == router.classes
    weights = tmp_path / "bundle" / ROUTER_DIR / "router.safetensors"
    tensors = read_safetensors(weights)
    write_safetensors(weights, {"weight": tensors["weight"] * 2, "bias": tensors["bias"]})  # same shapes
    with pytest.raises(BundleIntegrityError, match="router.safetensors: changed since the bundle was saved"):
        load_router(tmp_path / "bundle", model)


def test_a_data_folder_with_an_equals_sign_in_its_name_is_a_folder(model, tmp_path):
    # "runs/lr=1e-3" was split at '=' and refused as the unknown task "runs/lr".
    from mtpeft.cli import _router_data
    from mtpeft.tasks.presets import get_preset

    folder = tmp_path / "lr=1e-3"
    folder.mkdir()
    (folder / get_preset("sentiment").layout.train_file).write_text('{"text": "lovely", "label": "positive"}\n')
    assert _router_data(model, [str(folder)]) == {"sentiment": str(folder)}
    with pytest.raises(ValueError, match="unknown task 'translate'"):
        _router_data(model, [f"translate={folder}"])


def test_an_empty_data_path_is_an_error_not_the_current_folder(model, tmp_path, monkeypatch):
    # "--data sentiment=$UNSET" read ./sentiment.jsonl, whatever the current folder held.
    from mtpeft.router_data import task_inputs
    from mtpeft.tasks.presets import get_preset

    (tmp_path / get_preset("sentiment").layout.train_file).write_text('{"text": "lovely", "label": "positive"}\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="task 'sentiment': the data path is empty"):
        task_inputs(model, "sentiment", "")


def test_router_data_of_a_task_of_ones_own_named_as_a_built_in_one_is_its_own(tokenizer, tmp_path):
    # A task called "sentiment" with other labels was read in the built-in's layout by its name: its
    # own sentiment.jsonl lost the built-in's every 5th row, and a folder holding one was taken as its data.
    from mtpeft import MultiTaskModel, TaskSpec
    from mtpeft.cli import _router_data
    from mtpeft.router_data import task_inputs

    model = MultiTaskModel(tiny_bert(tokenizer))
    model.add_task(TaskSpec(name="sentiment", type="classification", labels=["bad", "good"]))
    (tmp_path / "sentiment.jsonl").write_text("".join(
        json.dumps({"text": f"message {i}", "label": ["bad", "good"][i % 2]}) + "\n" for i in range(20)))
    assert len(task_inputs(model, "sentiment", tmp_path / "sentiment.jsonl")) == 18  # every 10th held out, as any file
    with pytest.raises(ValueError, match="no training file of the bundle's built-in tasks"):
        _router_data(model, [str(tmp_path)])


def test_predict_without_a_task_routes_by_shape_until_a_router_is_set(model, router):
    from mtpeft.predictions import AnswerPrediction, LabelPrediction, NoTaskPrediction

    model.router = None
    predictions = model.predict(["hello", ("a", "b"), QA])
    assert [p.task for p in predictions] == ["sentiment", "similar-questions", "faq-answer"]
    assert isinstance(predictions[2], AnswerPrediction)
    model.router = router
    try:
        joke, happy, duplicate_request, pair = model.predict(
            ["tell me a joke", "I love it, great service", "are these two questions duplicates", ("a", "b")])
        assert isinstance(joke, NoTaskPrediction) and joke.reason.startswith("the input looks like none")
        assert joke.to_dict()["type"] == "no-task" and joke.to_dict()["candidates"]
        assert isinstance(happy, LabelPrediction) and happy.task == "sentiment"
        # a request in words routed to a task that needs a pair: no guess, the reason and the candidates
        assert isinstance(duplicate_request, NoTaskPrediction)
        assert duplicate_request.reason.startswith("routed to 'similar-questions'") and "pass a pair" in duplicate_request.reason
        assert pair.task == "similar-questions"
        assert [p.task for p in model.predict(["tell me a joke", "hi"], task=["sentiment", None])] == ["sentiment", None]
        assert [d.task for d in model.route("I love it, great service")] == ["sentiment"]  # one input, not its letters
        with pytest.raises(ValueError, match="compares two texts"):  # an explicit task stays the caller's to get right
            model.predict("just text", task="similar-questions")
    finally:
        model.router = None


def test_a_loaded_bundle_routes_with_its_trained_router(model, router, tokenizer, tmp_path, capsys):
    from mtpeft import MultiTaskModel

    folder = saved_backbone(tmp_path / "backbone", tokenizer)
    bundle = tmp_path / "bundle"
    saved = support_model(path_backbone(folder))
    saved.save(bundle)
    assert MultiTaskModel.load(bundle).router is None
    LearnedRouter.fit(saved, EXAMPLES).save(bundle / ROUTER_DIR)
    loaded = MultiTaskModel.load(bundle)
    assert isinstance(loaded.router, LearnedRouter)
    assert [p.task for p in loaded.predict(["tell me a joke", "I love it, great service"])] == [None, "sentiment"]
    capsys.readouterr()
    assert main(["predict", str(bundle), "tell me a joke", "I love it, great service", '["a", "b"]']) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["type"], p["task"]) for p in printed] == [("no-task", None), ("label", "sentiment"),
                                                         ("label", "similar-questions")]
    loaded.save(tmp_path / "again")  # saving every task saves the router with them
    assert isinstance(MultiTaskModel.load(tmp_path / "again").router, LearnedRouter)
    loaded.save(tmp_path / "part", tasks=["sentiment"])  # the router would name tasks left out
    assert not (tmp_path / "part" / ROUTER_DIR).exists()


def test_router_data_folders_are_data_roots_or_one_tasks_files_never_guessed(tokenizer, tmp_path):
    """A bundle of stsb-bi and mrpc: MRPC's folder was handed to STS-B too (both read train.tsv),
    and a data root found nothing without a word."""
    from mtpeft import MultiTaskModel
    from mtpeft.cli import _router_data
    from mtpeft.tasks.presets import get_preset

    model = MultiTaskModel(tiny_bert(tokenizer))
    for name in ("stsb-bi", "mrpc"):
        model.add_task(get_preset(name).spec)
    for sub in ("glue/MRPC", "glue/STS-B"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "train.tsv").write_text("x\n")
    assert _router_data(model, [str(tmp_path)]) == {"stsb-bi": str(tmp_path / "glue/STS-B"),
                                                     "mrpc": str(tmp_path / "glue/MRPC")}
    with pytest.raises(ValueError, match=r"its train.tsv could be the data of \['mrpc', 'stsb-bi'\]; name the task"):
        _router_data(model, [str(tmp_path / "glue/MRPC")])
    assert _router_data(model, [f"mrpc={tmp_path / 'glue/MRPC'}"]) == {"mrpc": str(tmp_path / "glue/MRPC")}
    with pytest.raises(ValueError, match="no training file of the bundle's built-in tasks"):
        _router_data(model, [str(tmp_path / "glue")])


def test_a_damaged_router_safetensors_is_a_value_error_naming_the_file(model, router, tmp_path):
    # safetensors' own error named neither the file nor that it is the router's, and was no ValueError
    # (the command line printed a traceback).
    router.save(tmp_path)
    (tmp_path / "router.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"router.safetensors: not a readable safetensors file"):
        LearnedRouter.load(tmp_path, model)


def test_a_router_saved_to_a_bundle_folder_goes_into_its_router_folder(model, router, tmp_path):
    # load() finds a bundle's router/ inside, but save() wrote beside bundle.json, where loading the
    # bundle never looks: the bundle kept routing with its old router (or the shape rule), silently.
    model.save(tmp_path / "bundle")
    assert router.save(tmp_path / "bundle") == tmp_path / "bundle" / ROUTER_DIR
    assert not (tmp_path / "bundle" / "router.json").exists()
    assert isinstance(load_router(tmp_path / "bundle", model), LearnedRouter)
