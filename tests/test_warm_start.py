"""A run started from a saved task's adapter (init_from), and the packaged SQuAD adapter it uses."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import require_shared_data, tiny_bert
from test_train import FAST, _sentiment

from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.backbone import BackboneMismatchError
from mtpeft.config import LoraSettings, TrainConfig
from mtpeft.storage import save_task
from mtpeft.train import train_task
from mtpeft.tasks.presets import packaged_adapter
from mtpeft.warm_start import warm_start

SENT = TaskSpec(name="sent", type="classification", labels=["neg", "pos"])


def _trained(backbone, tmp_path, spec=SENT, **lora) -> tuple[MultiTaskModel, str]:
    model = MultiTaskModel(backbone)
    model.add_task(spec, LoraSettings(**lora))
    train_task(model, spec.name, _sentiment(0, 40), None, TrainConfig(**{**FAST, "epochs": 2}), progress=False,
               report_to=())
    save_task(model, spec.name, tmp_path / "saved")
    return model, str(tmp_path / "saved")


def _weights(model, task):
    return {k.replace(f".{task}.", "."): v.detach().clone() for k, v in model.task_parameters(task).items()}


def test_a_warm_start_copies_the_saved_adapter_and_a_head_of_the_same_outputs(tokenizer, tmp_path):
    saved_model, folder = _trained(tiny_bert(tokenizer), tmp_path)
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.add_task(TaskSpec(name="other", type="classification", labels=["neg", "pos"]), LoraSettings())
    assert "adapter and head" in warm_start(model, "other", folder)
    expected, got = _weights(saved_model, "sent"), _weights(model, "other")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    texts = ["the item was great", "awful and broken"]
    assert [p.label for p in model.predict(texts, task="other")] == [p.label for p in saved_model.predict(texts, task="sent")]


def test_a_head_with_other_outputs_starts_fresh_and_only_the_adapter_carries_over(tokenizer, tmp_path):
    saved_model, folder = _trained(tiny_bert(tokenizer), tmp_path)
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.add_task(TaskSpec(name="three", type="classification", labels=["neg", "neutral", "pos"]), LoraSettings())
    fresh_head = {k: v.clone() for k, v in model.heads["three"].state_dict().items()}
    assert "head freshly initialised" in warm_start(model, "three", folder)
    assert all(torch.equal(fresh_head[k], v) for k, v in model.heads["three"].state_dict().items())
    adapters = {k: v for k, v in _weights(model, "three").items() if "lora" in k}
    assert adapters and all(torch.equal(_weights(saved_model, "sent")[k], v) for k, v in adapters.items())


def test_training_from_a_saved_task_starts_at_its_weights_and_keeps_its_skill(tokenizer, tmp_path):
    saved_model, folder = _trained(tiny_bert(tokenizer), tmp_path)
    held_out = _sentiment(1, 20)
    config = dict(FAST, epochs=1, lr=1e-9)  # no learning: what the run scores is where it started
    warm, fresh = (MultiTaskModel(tiny_bert(tokenizer)) for _ in range(2))
    for model in (warm, fresh):
        model.add_task(SENT, LoraSettings())
    warm_result = train_task(warm, "sent", _sentiment(2, 8), held_out, TrainConfig(**config, init_from=folder),
                             progress=False, report_to=())
    fresh_result = train_task(fresh, "sent", _sentiment(2, 8), held_out, TrainConfig(**config), progress=False,
                              report_to=())
    from mtpeft.evaluate import evaluate_task
    assert warm_result.metrics == evaluate_task(saved_model, "sent", held_out)
    assert warm_result.metrics["accuracy"] > fresh_result.metrics["accuracy"]


@pytest.mark.parametrize("lora, message", [
    ({"r": 4}, r"r=8, alpha=16, .*r=4, alpha=16: .*--init-from none"),
    ({"alpha": 32.0}, r"r=8, alpha=16, .*r=8, alpha=32"),
    ({"target_modules": ["query", "key", "value"]}, r"adapts the layers query,value, .*query,key,value: "
                                                    r"train with --target-modules query,value, .*--init-from none"),
])
def test_an_adapter_of_another_shape_or_scale_is_refused(tokenizer, tmp_path, lora, message):
    _, folder = _trained(tiny_bert(tokenizer), tmp_path)
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.add_task(SENT, LoraSettings(**lora))
    with pytest.raises(ValueError, match=message):
        warm_start(model, "sent", folder)


def test_a_head_only_task_a_missing_folder_and_another_backbone_are_refused(tokenizer, tmp_path):
    _, folder = _trained(tiny_bert(tokenizer), tmp_path)
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.add_task(SENT, head_only=True)
    with pytest.raises(ValueError, match="has none"):
        warm_start(model, "sent", folder)
    with pytest.raises(FileNotFoundError, match="no such task folder"):
        warm_start(model, "sent", tmp_path / "nowhere")
    other = MultiTaskModel(tiny_bert(tokenizer, seed=1))
    other.add_task(SENT, LoraSettings())
    with pytest.raises(BackboneMismatchError):
        warm_start(other, "sent", folder)


def test_a_bundle_another_methods_folder_and_a_folder_of_no_task_are_refused_by_what_they_are(tokenizer, tmp_path):
    from mtpeft.joint import build_joint_model
    from mtpeft.methods import get_method

    joint = build_joint_model(tiny_bert(tokenizer), [SENT, TaskSpec(name="topic", type="classification",
                                                                    labels=["a", "b"])])
    joint.save(tmp_path / "bundle")
    method = get_method("pfeiffer")
    method.save(method.build(tiny_bert(tokenizer), SENT), "sent", tmp_path / "pfeiffer")
    (tmp_path / "empty").mkdir()
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.add_task(SENT, LoraSettings())
    # A bundle holds several tasks: none is picked for the user.
    with pytest.raises(FileNotFoundError, match=r"a bundle of tasks \(sent, topic\); name one task's folder"):
        warm_start(model, "sent", tmp_path / "bundle")
    with pytest.raises(FileNotFoundError, match=r"method 'pfeiffer' \(bottleneck\), which has no LoRA adapter"):
        warm_start(model, "sent", tmp_path / "pfeiffer")
    with pytest.raises(FileNotFoundError, match="not a saved task's folder"):
        warm_start(model, "sent", tmp_path / "empty")
    (tmp_path / "empty" / "checkpoint.safetensors").write_bytes(b"")  # an interrupted run's folder
    with pytest.raises(FileNotFoundError, match="a run that has not finished .*run it again to finish it"):
        warm_start(model, "sent", tmp_path / "empty")
    # One task of the joint model stands alone: its folder holds a copy of the shared adapter.
    assert "adapter and head" in warm_start(model, "sent", tmp_path / "bundle" / "sent")


def test_a_resumed_run_continues_from_its_checkpoint_not_from_the_warm_start(tokenizer, tmp_path, monkeypatch):
    _, folder = _trained(tiny_bert(tokenizer), tmp_path)
    config = TrainConfig(**{**FAST, "epochs": 1, "checkpoint_every": 1}, init_from=folder)

    def interrupt(where, step):
        if step == 2:
            raise KeyboardInterrupt

    def run():
        model = MultiTaskModel(tiny_bert(tokenizer))
        model.add_task(SENT, LoraSettings())
        return train_task(model, "sent", _sentiment(3, 20), None, config, out_dir=tmp_path / "run", progress=False,
                          report_to=())

    with monkeypatch.context() as patch:
        patch.setattr("mtpeft.train.fault_point", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run()
    monkeypatch.setattr("mtpeft.train.warm_start", lambda *a: pytest.fail("the checkpoint's weights were overwritten"))
    # The same folder spelled relative to the working directory is the same run.
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(**{**FAST, "epochs": 1, "checkpoint_every": 1}, init_from="saved")
    assert run().steps == 3
    # The resumed run started from the saved task all the same, and its task.json says so.
    recorded = json.loads((tmp_path / "run" / "task.json").read_text())["init_from"]
    assert os.path.samefile(recorded, folder)


def test_a_wrong_init_from_fails_before_the_training_data_is_tokenised(tokenizer, tmp_path, monkeypatch):
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.add_task(SENT, LoraSettings())
    from mtpeft.tasks import task_type

    monkeypatch.setattr(task_type(SENT), "encode", lambda *a: pytest.fail("tokenised first"))
    with pytest.raises(FileNotFoundError, match="no such task folder"):
        train_task(model, "sent", _sentiment(0, 8), None, TrainConfig(**FAST, init_from=str(tmp_path / "nowhere")),
                   progress=False, report_to=())


def test_a_warm_started_task_records_where_its_adapter_came_from_also_in_a_bundle(tokenizer, tmp_path):
    from mtpeft.storage import load_into, save_bundle

    _, folder = _trained(tiny_bert(tokenizer), tmp_path)
    assert "init_from" not in json.loads((tmp_path / "saved" / "task.json").read_text())  # a fresh start
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.add_task(SENT, LoraSettings())
    train_task(model, "sent", _sentiment(2, 8), None, TrainConfig(**FAST, init_from=folder), out_dir=tmp_path / "warm",
               progress=False, report_to=())
    assert json.loads((tmp_path / "warm" / "task.json").read_text())["init_from"] == folder
    assert f"started from the one saved in `{folder}`" in (tmp_path / "warm" / "README.md").read_text()
    # Loaded and saved again (the demo's bundle, say), it still says so: the squad-qa adapter's licence carries over.
    again = MultiTaskModel(tiny_bert(tokenizer))
    load_into(again, tmp_path / "warm")
    save_bundle(again, tmp_path / "bundle")
    assert json.loads((tmp_path / "bundle" / "sent" / "task.json").read_text())["init_from"] == folder


def test_the_packaged_squad_adapter_is_a_whole_task_folder_of_the_default_backbone():
    from mtpeft.storage import load_task
    from mtpeft.tasks.presets import get_preset

    model = MultiTaskModel.from_backbone("default")
    # Loading checks its files against the sha256s its task.json records, and its backbone's fingerprint.
    task = load_task(model, packaged_adapter("squad-qa"))
    assert model.spec(task).type == "extractive-qa" and (model.adapters[task].r, model.adapters[task].alpha) == (8, 16.0)
    assert get_preset("faq-answer").recipe["init_from"] == str(packaged_adapter("squad-qa"))


def test_the_packaged_squad_adapter_answers_held_out_squad_articles():
    from mtpeft.evaluate import evaluate_task
    from mtpeft.sources import load_eval_examples
    from mtpeft.storage import load_task
    from mtpeft.tasks.presets import get_preset

    squad = require_shared_data("squad")
    preset = get_preset("squad")
    model = MultiTaskModel.from_backbone("default")
    task = load_task(model, packaged_adapter("squad-qa"))
    examples = load_eval_examples(preset.spec, squad, preset.layout)[:300]  # from the held-out articles 39-48
    metrics = evaluate_task(model, task, examples)
    # 68.3 F1 over all 1,988 held-out questions when it was trained (its metrics.json); a fresh
    # adapter scores near 0.
    assert metrics["f1"] > 55, metrics
