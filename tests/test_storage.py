"""The on-disk format: PEFT layout, round trips, no backbone weights, safe loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_bert
from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.backbone import BackboneMismatchError
from mtpeft.batching import collate
from mtpeft.config import LoraSettings
from mtpeft.storage import BUNDLE_FILE, write_json


def _model(backbone) -> MultiTaskModel:
    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="sentiment", type="classification", labels=["neg", "pos"]))
    model.add_task(TaskSpec(name="similarity", type="regression", text_pair_column="b", label_range=[0, 5]),
                   LoraSettings(r=4, alpha=8, target_modules=["query", "key", "value"]))
    model.add_task(TaskSpec(name="faq", type="extractive-qa", text_pair_column="context", max_length=64,
                            doc_stride=16, max_question_length=16))
    torch.manual_seed(3)
    for layer in model.lora_layers().values():
        for task in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B[task].weight, std=0.3)
    model.bf16 = False
    return model


INPUTS = [("great product", "sentiment"), (("a cat", "a dog"), "similarity"),
          ({"question": "when?", "context": "We open at nine every day except Sunday."}, "faq")]


def _predict(model):
    return [p.to_dict() for p in model.predict([x for x, _ in INPUTS], task=[t for _, t in INPUTS])]


def test_save_load_round_trip_gives_identical_outputs(backbone, tokenizer, tmp_path):
    model = _model(backbone)
    before = _predict(model)
    model.save(tmp_path / "bundle")
    loaded = MultiTaskModel.load(tmp_path / "bundle", backbone=tiny_bert(tokenizer))
    loaded.bf16 = False
    assert loaded.task_names == ["sentiment", "similarity", "faq"]
    assert _predict(loaded) == before
    single = MultiTaskModel.load(tmp_path / "bundle" / "similarity", backbone=tiny_bert(tokenizer))
    assert single.task_names == ["similarity"]


def test_task_folder_holds_peft_layout_and_no_backbone_weights(backbone, tmp_path):
    model = _model(backbone)
    model.save(tmp_path)
    folder = tmp_path / "similarity"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "head.safetensors", "task.json"]
    adapter = load_file(folder / "adapter_model.safetensors")
    assert adapter and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in adapter)
    assert all(k.startswith("base_model.model.encoder.layer.") for k in adapter)
    backbone_names = {n for n, _ in backbone.model.named_parameters() if ".lora_" not in n}
    assert not any(k.removeprefix("base_model.model.") in backbone_names for k in adapter)
    assert set(load_file(folder / "head.safetensors")) == {"out.weight", "out.bias"}
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total < 100_000  # the tiny backbone alone is ~4 MB
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted({m.rsplit(".", 1)[-1] for m in config["target_modules"]}) == ["key", "query", "value"]
    assert len(config["target_modules"]) == 2 * 3  # two layers x three targets
    record = json.loads((folder / "task.json").read_text())
    assert record["spec"]["type"] == "regression" and record["backbone"]["name"] == "tiny-bert"


def test_a_head_only_task_saved_over_an_adapter_leaves_no_stale_adapter(backbone, tmp_path):
    model = _model(backbone)
    model.save(tmp_path)
    model.remove_task("sentiment")
    model.add_task(TaskSpec(name="sentiment", type="classification", labels=["neg", "pos"]), head_only=True)
    model.save(tmp_path, tasks=["sentiment"])
    assert sorted(p.name for p in (tmp_path / "sentiment").iterdir()) == ["README.md", "head.safetensors", "task.json"]
    manifest = json.loads((tmp_path / BUNDLE_FILE).read_text())
    assert not [f for f in manifest["files"] if f.startswith("sentiment/adapter")]
    assert MultiTaskModel.load(tmp_path / "sentiment", backbone=backbone).adapters["sentiment"] is None


def test_peft_loads_our_adapter_with_the_same_hidden_states(backbone, tokenizer, tmp_path):
    from peft import PeftModel

    model = _model(backbone)
    model.save(tmp_path)
    encoded = tokenizer(["a first text", "and a second, longer one"], truncation=True)
    batch = collate([{"input_ids": i, "token_type_ids": t} for i, t in zip(encoded["input_ids"], encoded["token_type_ids"])],
                    tokenizer.pad_token_id)
    with torch.no_grad():
        ours = model.encode(batch, "similarity")
        peft_model = PeftModel.from_pretrained(tiny_bert(tokenizer).model, tmp_path / "similarity")
        theirs = peft_model(**batch).last_hidden_state
        base = tiny_bert(tokenizer).model(**batch).last_hidden_state
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3


def test_peft_loads_an_all_linear_adapter_exactly(backbone, tokenizer, tmp_path):
    from peft import PeftModel

    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="t", type="classification", labels=["a", "b"]), LoraSettings(target_modules=["all-linear"]))
    model.save(tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_bert(tokenizer).model, tmp_path / "t")
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(model.lora_layers("t"))


def test_peft_saving_our_adapter_again_writes_the_same_config_and_weights(backbone, tokenizer, tmp_path, monkeypatch):
    # Ours said auto_mapping: null where PEFT writes the backbone's class (an adapter without a task type).
    from peft import PeftModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # peft's save looks "tiny-bert" up on the hub otherwise
    model = _model(backbone)
    model.save(tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(tiny_bert(tokenizer).model, tmp_path / "ours" / "similarity")
    peft_model.save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / "similarity" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    theirs["target_modules"] = sorted(theirs["target_modules"])  # a set to PEFT
    assert ours == theirs
    assert ours["auto_mapping"] == {"base_model_class": "BertModel",
                                    "parent_library": "transformers.models.bert.modeling_bert"}
    ours_weights = load_file(tmp_path / "ours" / "similarity" / "adapter_model.safetensors")
    theirs_weights = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_weights.keys() == theirs_weights.keys()
    assert all(torch.equal(ours_weights[k], theirs_weights[k]) for k in ours_weights)


def _task_saved_on_a_local_backbone(tokenizer, folder, monkeypatch):
    """Task ``t`` (non-zero adapter, fp32) on a tiny backbone saved in ``folder/backbone``,
    saved to ``folder/bundle``; and a batch for it."""
    from mtpeft.backbone import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # peft looks for a tokenizer on the hub otherwise
    tiny_bert(tokenizer).model.save_pretrained(folder / "backbone")
    tokenizer.save_pretrained(folder / "backbone")
    model = MultiTaskModel(load_backbone(folder / "backbone"))
    model.bf16 = False
    model.add_task(TaskSpec(name="t", type="classification", labels=["a", "b"]), LoraSettings(r=2, alpha=4))
    for layer in model.lora_layers("t").values():
        torch.nn.init.normal_(layer.lora_B["t"].weight, std=0.3)
    model.save(folder / "bundle")
    return model, dict(tokenizer(["a first text", "and a second, longer one"], padding=True, return_tensors="pt"))


def test_auto_peft_model_loads_an_adapter_saved_on_a_local_backbone(tokenizer, tmp_path, monkeypatch):
    # AutoPeftModel builds the base model from adapter_config.json alone: its class from auto_mapping,
    # its weights from base_model_name_or_path (here a local folder). It refused ours.
    from peft import AutoPeftModel

    model, batch = _task_saved_on_a_local_backbone(tokenizer, tmp_path, monkeypatch)
    peft_model = AutoPeftModel.from_pretrained(tmp_path / "bundle" / "t").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).last_hidden_state, model.encode(batch, "t"),
                                   rtol=1e-5, atol=1e-5)


def test_transformers_loads_a_saved_task_as_an_adapter_both_ways(tokenizer, tmp_path, monkeypatch):
    # transformers' own PEFT integration: `model.load_adapter(task_folder)` onto the backbone, and
    # `AutoModel.from_pretrained(task_folder)`, which builds the base from adapter_config.json.
    from transformers import AutoModel

    model, batch = _task_saved_on_a_local_backbone(tokenizer, tmp_path, monkeypatch)
    ours = model.encode(batch, "t")
    onto_backbone = AutoModel.from_pretrained(tmp_path / "backbone").eval()
    onto_backbone.load_adapter(str(tmp_path / "bundle" / "t"), adapter_name="t")
    from_folder = AutoModel.from_pretrained(tmp_path / "bundle" / "t").eval()
    with torch.no_grad():
        for theirs in (onto_backbone, from_folder):
            torch.testing.assert_close(theirs(**batch).last_hidden_state, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, model.encode(batch, None))  # the adapter changes the output


def test_transformers_loads_a_trained_task_folder_as_an_adapter(tokenizer, tmp_path, monkeypatch):
    # A folder written by train_task (mtpeft train --out) held the run's settings as config.json,
    # which transformers took for a model's: AutoModel.from_pretrained(folder) asked for `model_type`.
    from transformers import AutoModel

    from mtpeft.config import TrainConfig
    from mtpeft.examples import Example
    from mtpeft.train import train_task

    model, batch = _task_saved_on_a_local_backbone(tokenizer, tmp_path, monkeypatch)
    rows = [Example(text=f"text {i}", label=i % 2) for i in range(8)]
    train_task(model, "t", rows, None, TrainConfig(epochs=1, batch_size=8, bf16=False, checkpoint_every=-1),
               out_dir=tmp_path / "run", progress=False, report_to=())
    assert not (tmp_path / "run" / "config.json").exists()
    from_folder = AutoModel.from_pretrained(tmp_path / "run").eval()
    with torch.no_grad():
        torch.testing.assert_close(from_folder(**batch).last_hidden_state, model.encode(batch, "t"),
                                   rtol=1e-5, atol=1e-5)


def test_loading_onto_another_backbone_names_the_expected_one(backbone, tokenizer, tmp_path):
    _model(backbone).save(tmp_path)
    other = tiny_bert(tokenizer, seed=7)  # same shapes, different weights
    with pytest.raises(BackboneMismatchError, match="trained on backbone 'tiny-bert'"):
        MultiTaskModel.load(tmp_path, backbone=other)


def test_bundle_manifest_cannot_point_outside_the_bundle(backbone, tmp_path):
    _model(backbone).save(tmp_path / "bundle")
    write_json(tmp_path / "bundle" / BUNDLE_FILE, {"format": "mtpeft-bundle/1", "tasks": {"x": "../../etc"}})
    with pytest.raises(ValueError, match="'../../etc' points outside the bundle"):
        MultiTaskModel.load(tmp_path / "bundle", backbone=backbone)


def test_saving_an_unknown_task_into_a_bundle_leaves_the_bundle_loadable(backbone, tmp_path):
    # The tasks before the unknown one were rewritten, the manifest not: the bundle then failed
    # its sha256 check on every load.
    model = _model(backbone)
    model.save(tmp_path / "bundle")
    with torch.no_grad():
        model.heads["sentiment"].out.bias.add_(1.0)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        model.save(tmp_path / "bundle", tasks=["sentiment", "nope"])
    assert sorted(MultiTaskModel.load(tmp_path / "bundle", backbone=tiny_bert(model.tokenizer)).task_names) == \
        ["faq", "sentiment", "similarity"]


def test_a_bundle_of_no_tasks_names_its_backbone(backbone, tmp_path):
    from mtpeft.storage import read_backbone_name

    MultiTaskModel(backbone).save(tmp_path / "empty")
    assert read_backbone_name(tmp_path / "empty") == "tiny-bert"
    assert MultiTaskModel.load(tmp_path / "empty", backbone=backbone).task_names == []


def test_missing_task_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no task.json"):
        MultiTaskModel.load(tmp_path)


def test_unknown_task_lists_known_ones(backbone):
    model = _model(backbone)
    with pytest.raises(KeyError, match="known tasks: \\['faq', 'sentiment', 'similarity'\\]"):
        model.predict("x", task="nope")


def test_model_card_is_readable_by_huggingface_hub(backbone, tmp_path):
    from huggingface_hub import ModelCard

    model = _model(backbone)
    model.task_metrics["sentiment"] = {"accuracy": 91.5, "examples": 10}
    model.save(tmp_path)
    card = ModelCard.load(tmp_path / "sentiment" / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "tiny-bert"
    assert "lora" in card.data.tags
    assert "| accuracy | 91.50 |" in card.text and "trainable parameters" in card.text


def test_a_head_only_tasks_model_card_does_not_say_peft_loads_its_adapter(backbone, tmp_path):
    # The card told every task's reader that PeftModel.from_pretrained loads its adapter, also
    # a head-only task's, whose folder holds no adapter_config.json for PEFT to read.
    model = _model(backbone)
    model.add_task(TaskSpec(name="probe", type="classification", labels=["x", "y"]), head_only=True)
    model.save(tmp_path)
    assert "PeftModel.from_pretrained" not in (tmp_path / "probe" / "README.md").read_text()
    assert "PeftModel.from_pretrained" in (tmp_path / "sentiment" / "README.md").read_text()


@pytest.mark.parametrize("base", ["runs/models: mini #2", "@team/mini", "C:\\models\\mini"])
def test_model_card_names_a_base_model_that_yaml_would_misread(backbone, tmp_path, base):
    # Written unquoted, "a: b" and " #" broke the front matter, "@..." is reserved in YAML.
    from huggingface_hub import ModelCard

    from mtpeft.model_card import render_model_card

    model = _model(backbone)
    model.save(tmp_path)
    record = json.loads((tmp_path / "sentiment" / "task.json").read_text(encoding="utf-8"))
    assert ModelCard(render_model_card(record, base)).data.base_model == base


def test_model_card_front_matter_names_the_metrics(backbone, tmp_path):
    from huggingface_hub import ModelCard

    model = _model(backbone)
    model.task_metrics["sentiment"] = {"accuracy": 91.5, "f1": 90.1, "examples": 10}
    model.save(tmp_path)
    assert ModelCard.load(tmp_path / "sentiment" / "README.md").data.metrics == ["accuracy", "f1"]
    assert ModelCard.load(tmp_path / "faq" / "README.md").data.metrics is None  # not evaluated
    # A no-answer QA task's metrics hold counts of answerable and unanswerable questions too: not metrics.
    model.task_metrics["faq"] = {"exact_match": 50.0, "f1": 60.0, "has_answer_f1": 70.0, "has_answer_examples": 3,
                                 "no_answer_f1": 40.0, "no_answer_examples": 2, "examples": 5}
    model.save(tmp_path)
    assert ModelCard.load(tmp_path / "faq" / "README.md").data.metrics == ["exact_match", "f1", "has_answer_f1",
                                                                           "no_answer_f1"]


def test_bundle_files_are_verified_against_their_sha256(backbone, tmp_path):
    from mtpeft.storage import BundleIntegrityError

    _model(backbone).save(tmp_path)
    manifest = json.loads((tmp_path / "bundle.json").read_text())
    assert "similarity/adapter_model.safetensors" in manifest["files"]
    head = tmp_path / "sentiment" / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 1
    head.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="sentiment/head.safetensors: missing or changed"):
        MultiTaskModel.load(tmp_path, backbone=backbone)


def test_saved_files_get_the_permissions_of_the_umask_not_owner_only(backbone, tmp_path):
    # mkstemp makes its file 0600; renamed into place, a bundle saved by one user could not be
    # read by a server running as another.
    import os

    umask = os.umask(0o022)
    try:
        _model(backbone).save(tmp_path / "bundle")
    finally:
        os.umask(umask)
    files = [p for p in (tmp_path / "bundle").rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files)


class _Killed(BaseException):
    """Stands for a SIGKILL at a fault point: nothing after it runs."""


def _kill_at(monkeypatch, point: str, nth: int = 1) -> None:
    import mtpeft.storage

    seen = []

    def fault(kind, at):
        if f"{kind}:{at}" == point:
            seen.append(at)
            if len(seen) == nth:
                raise _Killed

    monkeypatch.setattr(mtpeft.storage, "fault_point", fault)


@pytest.mark.parametrize("killed_at", ["adapter_config.json", "head.safetensors", "task.json"])
def test_a_task_folder_saved_over_and_killed_midway_never_loads_torn(backbone, tokenizer, tmp_path, monkeypatch,
                                                                    killed_at):
    # A task folder (train --out) has no bundle manifest: killed after the new adapter replaced
    # the old one but before head and task.json did, it loaded the new adapter with the old head.
    from mtpeft.storage import BundleIntegrityError, save_task

    model = _model(backbone)
    save_task(model, "sentiment", tmp_path)
    with torch.no_grad():
        for param in model.task_parameters("sentiment").values():
            param.add_(0.5)
    with monkeypatch.context() as patch:
        _kill_at(patch, f"save:{killed_at}")
        with pytest.raises(_Killed):
            save_task(model, "sentiment", tmp_path)
    with pytest.raises(BundleIntegrityError, match="adapter_model.safetensors: not the file its task.json was saved"):
        MultiTaskModel.load(tmp_path, backbone=tiny_bert(tokenizer))
    save_task(model, "sentiment", tmp_path)  # saved again whole, it loads
    assert MultiTaskModel.load(tmp_path, backbone=tiny_bert(tokenizer)).task_names == ["sentiment"]


def test_a_new_bundle_whose_first_save_was_killed_midway_does_not_load_as_fewer_tasks(backbone, tokenizer, tmp_path,
                                                                                      monkeypatch):
    # With no bundle.json yet, the task folders holding a task.json were the bundle: killed
    # while saving its second task, it loaded as a bundle of the first task alone.
    from mtpeft.storage import BundleIntegrityError

    model = _model(backbone)
    with monkeypatch.context() as patch:
        _kill_at(patch, "save:task.json", nth=2)
        with pytest.raises(_Killed):
            model.save(tmp_path)
    assert (tmp_path / "sentiment" / "task.json").is_file() and not (tmp_path / "similarity" / "task.json").exists()
    with pytest.raises(BundleIntegrityError, match="first save did not finish"):
        MultiTaskModel.load(tmp_path, backbone=tiny_bert(tokenizer))
    model.save(tmp_path, tasks=["sentiment"])  # saved again, and finished: only what this save names
    assert MultiTaskModel.load(tmp_path, backbone=tiny_bert(tokenizer)).task_names == ["sentiment"]
    model.save(tmp_path)
    assert MultiTaskModel.load(tmp_path, backbone=tiny_bert(tokenizer)).task_names == ["sentiment", "similarity", "faq"]


def test_a_save_pretrained_killed_midway_leaves_each_file_whole_and_its_staging_removable(tmp_path, monkeypatch):
    # A tokenizer's or peft's save_pretrained writes its files in place: killed midway over an
    # earlier save, it left a half-written tokenizer.json. Staged, each file is old or new, whole.
    from mtpeft.storage import remove_stale_temporaries, save_pretrained_atomically

    def save(version):
        def write(folder):
            (folder / "a.json").write_text(f'{{"version": {version}}}')
            (folder / "sub").mkdir()
            (folder / "sub" / "b.bin").write_bytes(bytes([version]) * 1000)
        return write

    assert save_pretrained_atomically(save(1), tmp_path) == [Path("a.json"), Path("sub/b.bin")]
    with monkeypatch.context() as patch:
        _kill_at(patch, "save:b.bin")
        patch.setattr("shutil.rmtree", lambda *args, **kwargs: None)  # a SIGKILL cleans nothing up
        with pytest.raises(_Killed):
            save_pretrained_atomically(save(2), tmp_path)
    assert json.loads((tmp_path / "a.json").read_text()) == {"version": 2}
    assert (tmp_path / "sub" / "b.bin").read_bytes() == bytes([1]) * 1000
    assert [p.name for p in tmp_path.glob(".*.tmp")]  # the staging folder the kill left
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "sub"]
