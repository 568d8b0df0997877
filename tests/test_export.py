"""An exported task runs in plain transformers (LoRA merged) with the same outputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer

from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.export import export_task


def _model(backbone):
    model = MultiTaskModel(backbone)
    model.bf16 = False  # compared with the exported model's fp32 outputs
    model.add_task(TaskSpec(name="cls", type="classification", labels=["neg", "pos", "mixed"]))
    model.add_task(TaskSpec(name="qa", type="extractive-qa", text_pair_column="context", max_length=64,
                            doc_stride=16, max_question_length=16))
    torch.manual_seed(5)
    for layer in model.lora_layers().values():
        for task in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B[task].weight, std=0.3)
    return model.eval()


def test_exported_classifier_matches(backbone, tmp_path):
    model = _model(backbone)
    export_task(model, "cls", tmp_path / "cls")
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls", trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "cls", trust_remote_code=True)
    texts = ["a short one", "and a somewhat longer text here"]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = exported(**encoded).logits
        ours = model(dict(encoded), "cls")
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert exported.config.id2label[1] == "pos"
    assert exported.config.architectures == [type(exported).__name__]
    assert not any("lora" in k for k in exported.state_dict())


def test_exported_tokenizer_truncates_at_the_tasks_length(backbone, tmp_path):
    # It kept the backbone's limit: truncation=True let a long text through at 512 tokens where
    # the task was trained and predicts on its first 128, so the exported model answered otherwise.
    model = _model(backbone)
    export_task(model, "cls", tmp_path / "cls")
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls", trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "cls", trust_remote_code=True)
    text = " ".join(["the parcel came late but the sofa is lovely"] * 40)  # ~400 tokens
    encoded = tokenizer([text], truncation=True, return_tensors="pt")
    assert encoded["input_ids"].shape[1] == model.spec("cls").max_length == 128
    with torch.no_grad():
        theirs = exported(**encoded).logits.softmax(-1)[0]
    ours = model.predict(text, task="cls").probabilities
    torch.testing.assert_close(theirs, torch.tensor([ours[label] for label in ["neg", "pos", "mixed"]]),
                               rtol=1e-4, atol=1e-4)


def test_an_exported_head_and_tail_task_says_how_its_long_inputs_were_cut(backbone, tmp_path):
    # The exported tokenizer keeps a long review's start only, where mtpeft kept start and end:
    # the README is where a user of the export learns to cut such texts the same way.
    model = _model(backbone)
    model.add_task(TaskSpec(name="reviews", type="classification", labels=["neg", "pos"], max_length=64,
                            truncation="head+tail", head_tokens=20))
    export_task(model, "reviews", tmp_path / "reviews")
    export_task(model, "cls", tmp_path / "cls")
    assert "first 20 and last 42 tokens (head+tail truncation)" in (tmp_path / "reviews" / "README.md").read_text()
    assert "head+tail" not in (tmp_path / "cls" / "README.md").read_text()


def test_exported_last_token_pooling_finds_the_last_real_token_on_either_padding_side(backbone, tmp_path):
    import sys

    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="last", type="classification", labels=["a", "b"], pooling="last"))
    export_task(model, "last", tmp_path / "last")
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "last", trust_remote_code=True)
    assert exported.config.pooling == "last"
    pool = sys.modules[type(exported).__module__]._pool
    hidden = torch.randn(3, 4, 5)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])  # right-padded, left-padded, full
    torch.testing.assert_close(pool(hidden, mask, "last"), hidden[[0, 1, 2], [1, 3, 3]])


def test_exported_qa_matches(backbone, tmp_path):
    model = _model(backbone)
    export_task(model, "qa", tmp_path / "qa")
    exported = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "qa", trust_remote_code=True).eval()
    encoded = model.tokenizer(["where?"], ["in the garden behind the house"], return_tensors="pt")
    with torch.no_grad():
        out = exported(**encoded)
        ours = model(dict(encoded), "qa")
    torch.testing.assert_close(out.start_logits, ours[..., 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.end_logits, ours[..., 1], rtol=1e-4, atol=1e-4)


def test_a_joint_task_exports_with_its_shared_adapter(backbone, tmp_path):
    from mtpeft.joint import build_joint_model

    model = build_joint_model(backbone, [TaskSpec(name="a", type="classification", labels=["x", "y"]),
                                         TaskSpec(name="b", type="classification", labels=["u", "v"])], seed=2)
    model.bf16 = False
    for layer in model.lora_layers().values():
        for name in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B[name].weight, std=0.3)
    model.eval()
    export_task(model, "b", tmp_path / "b")
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b", trust_remote_code=True).eval()
    encoded = AutoTokenizer.from_pretrained(tmp_path / "b", trust_remote_code=True)(
        ["one text", "and another one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**encoded).logits, model(dict(encoded), "b"), rtol=1e-4, atol=1e-4)


def test_an_exported_regression_task_outputs_scores_in_the_tasks_range(backbone, tmp_path):
    # The head is trained on targets scaled to [0, 1]; the export gave those, so an STS-B task
    # (0-5) answered 0.7 where mtpeft predicted 3.5.
    model = MultiTaskModel(backbone)
    model.bf16 = False
    model.add_task(TaskSpec(name="sts", type="regression", text_pair_column="b", label_range=[0, 5]))
    with torch.no_grad():
        model.heads["sts"].out.bias.fill_(0.6)
    export_task(model, "sts", tmp_path / "sts")
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "sts", trust_remote_code=True).eval()
    pairs = [("a cat sits", "a dog sits"), ("one", "two words here")]
    encoded = model.tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = exported(**encoded).logits.squeeze(-1).tolist()
    assert scores == pytest.approx([p.score for p in model.predict(pairs, task="sts")], abs=1e-4)
    assert min(scores) > 1.0


def test_an_exported_regression_task_scores_in_a_transformers_pipeline(backbone, tmp_path):
    # Its config had no labels (num_labels 0) and no problem type: the text-classification
    # pipeline failed with KeyError 0, and would have put the score through a sigmoid.
    from transformers import pipeline

    model = MultiTaskModel(backbone)
    model.bf16 = False
    model.add_task(TaskSpec(name="stars", type="regression", label_range=[1, 5]))
    with torch.no_grad():
        model.heads["stars"].out.bias.fill_(0.6)
    export_task(model, "stars", tmp_path / "stars")
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "stars", trust_remote_code=True).eval()
    assert exported.config.num_labels == 1 and exported.config.problem_type == "regression"
    scorer = pipeline("text-classification", model=exported, tokenizer=AutoTokenizer.from_pretrained(tmp_path / "stars"))
    texts = ["great sofa", "the parcel came late"]
    got = [row["score"] for row in scorer(texts)]
    assert got == pytest.approx([p.score for p in model.predict(texts, task="stars")], abs=1e-4)


def test_a_task_whose_backbone_holds_bottleneck_adapters_is_refused(backbone, tmp_path):
    # The export writes a plain transformers backbone: the wrapped layers' weights were written under
    # names it does not load (base_layer, bottleneck), so it came back silently with random layers.
    from mtpeft.bottleneck import add_bottleneck_adapter

    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]), head_only=True)
    model.extra_parameters["a"] = add_bottleneck_adapter(model.backbone, "bert", "a", "pfeiffer")
    with pytest.raises(ValueError, match="task 'a': .*BottleneckLayer"):
        export_task(model, "a", tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_task_on_a_quantized_backbone_is_refused_up_front(backbone, tmp_path):
    model = _model(backbone)
    model.backbone.config.quantization_config = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    try:
        with pytest.raises(ValueError, match=r"task 'cls': the backbone is quantized \(QLoRA\); save the model, load"):
            export_task(model, "cls", tmp_path / "out")
    finally:
        del model.backbone.config.quantization_config
    assert not (tmp_path / "out").exists()


class _Killed(BaseException):
    """Stands for a SIGKILL at a fault point: nothing after it runs."""


def test_an_export_over_another_stopped_midway_does_not_load(backbone, tmp_path, monkeypatch):
    # config.json was written after the weights: stopped between them, a folder that held another
    # task's export loaded that task's labels and pooling over the new task's weights.
    import mtpeft.storage

    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]))
    model.add_task(TaskSpec(name="b", type="classification", labels=["u", "v"], pooling="cls"))
    export_task(model, "a", tmp_path)

    def fault(kind, at):
        if f"{kind}:{at}" == "save:config.json":
            raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(mtpeft.storage, "fault_point", fault)
        with pytest.raises(_Killed):
            export_task(model, "b", tmp_path)
    with pytest.raises((OSError, ValueError), match="config.json"):  # no config: not a model folder
        AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True)
    export_task(model, "b", tmp_path)  # exported again whole, it loads
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True)
    assert exported.config.pooling == "cls" and exported.config.id2label[0] == "u"
