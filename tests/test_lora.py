"""The LoRA layer's invariants: no-op at init, mixed batches equal single-task runs, merging."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2Model

from conftest import tiny_bert
from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.backbone import from_model
from mtpeft.batching import collate
from mtpeft.config import LoraSettings
from mtpeft import lora
from mtpeft.lora import MultiLoraLayer


def _batch(tokenizer, texts):
    encoded = tokenizer(texts, truncation=True, max_length=32)
    features = [{"input_ids": ids, "token_type_ids": types} for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"])]
    return collate(features, tokenizer.pad_token_id)


def _randomise_adapters(model: MultiTaskModel, seed: int = 1) -> None:
    torch.manual_seed(seed)
    for layer in model.lora_layers().values():
        for task in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B[task].weight, std=0.5)


TEXTS = ["the first sentence", "a second, longer sentence with more words", "three", "and the fourth one here",
         "five", "six is the last row of this batch"]


def test_zero_initialised_adapter_equals_base_model(backbone, tokenizer):
    batch = _batch(tokenizer, TEXTS)
    with torch.no_grad():
        base = backbone.model(**batch).last_hidden_state
    model = MultiTaskModel(backbone)
    model.bf16 = False  # the base model above ran in fp32
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]), LoraSettings(r=4))
    with torch.no_grad():
        adapted = model.encode(batch, "a")
    torch.testing.assert_close(adapted, base, rtol=0, atol=0)


def test_adapter_changes_output_once_trained(backbone, tokenizer):
    batch = _batch(tokenizer, TEXTS)
    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]))
    with torch.no_grad():
        base = model.encode(batch, None)
        _randomise_adapters(model)
        adapted = model.encode(batch, "a")
    assert (adapted - base).abs().max() > 1e-3


def test_mixed_batch_equals_single_task_runs(backbone, tokenizer):
    model = MultiTaskModel(backbone)
    for name, r in (("a", 4), ("b", 8), ("c", 2)):
        model.add_task(TaskSpec(name=name, type="classification", labels=["x", "y"]), LoraSettings(r=r, alpha=2 * r))
    model.add_task(TaskSpec(name="plain", type="classification", labels=["x", "y"]), head_only=True)
    _randomise_adapters(model)
    batch = _batch(tokenizer, TEXTS)
    row_tasks = ["b", "a", "plain", "c", "a", "b"]  # interleaved, with a row of a task without adapter
    with torch.no_grad():
        mixed = model.encode(batch, row_tasks)
        for row, task in enumerate(row_tasks):
            single = model.encode({k: v[row:row + 1] for k, v in batch.items()}, task)
            length = int(batch["attention_mask"][row].sum())
            torch.testing.assert_close(mixed[row, :length], single[0, :length], rtol=1e-5, atol=1e-5)
    # The tasks really differ, so the check above is not vacuous.
    with torch.no_grad():
        assert (model.encode(batch, "a") - model.encode(batch, "b")).abs().max() > 1e-3


def test_mixed_predictions_equal_single_task_predictions(backbone):
    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="cls", type="classification", labels=["x", "y", "z"]))
    model.add_task(TaskSpec(name="reg", type="regression", text_pair_column="b", label_range=[0, 5]))
    model.add_task(TaskSpec(name="qa", type="extractive-qa", text_pair_column="context", max_length=48,
                            doc_stride=8, max_question_length=16))
    model.add_task(TaskSpec(name="bi", type="pair-classification", labels=["no", "yes"], text_pair_column="b",
                            pair_encoding="bi"))
    _randomise_adapters(model)
    model.bf16 = False
    inputs = ["a text", ("one", "two"), {"question": "where?", "context": "in the house by the river " * 6},
              ("is it here", "is it there at all"), "another text", ("three", "four"), ("x", "y z")]
    tasks = ["cls", "reg", "qa", "bi", "cls", "reg", "bi"]
    mixed = model.predict(inputs, task=tasks)
    for x, task, prediction in zip(inputs, tasks, mixed):
        alone = model.predict(x, task=task)
        assert type(alone) is type(prediction)
        if task in ("cls", "bi"):
            assert alone.label == prediction.label
            assert alone.probabilities == pytest.approx(prediction.probabilities, abs=1e-5)
        elif task == "reg":
            assert alone.score == pytest.approx(prediction.score, abs=1e-5)
        else:
            assert (alone.answer, alone.start, alone.end) == (prediction.answer, prediction.start, prediction.end)


def test_merge_equals_unmerged_and_unmerge_restores(backbone, tokenizer):
    model = MultiTaskModel(backbone)
    model.bf16 = False  # exact fp32 comparison; tests/test_precision.py covers bf16
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]))
    _randomise_adapters(model)
    batch = _batch(tokenizer, TEXTS)
    with torch.no_grad():
        base = model.encode(batch, None)
        unmerged = model.encode(batch, "a")
        for layer in model.lora_layers().values():
            layer.merge("a")
        merged = model.encode(batch, "a")
        for layer in model.lora_layers().values():
            layer.unmerge()
        restored = model.encode(batch, None)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(restored, base, rtol=1e-5, atol=1e-5)


def test_full_precision_gives_the_backbones_own_weights_after_a_merge(backbone):
    # An fp32 backbone stayed merged: sharding it (FSDP, DeepSpeed) took the task's delta in as backbone.
    model = MultiTaskModel(backbone)
    model.bf16 = False
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]))
    _randomise_adapters(model)
    own = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if ".lora_" not in n}
    model.predict(["a text"] * model.merge_min_rows, task="a")
    assert model._merged_task() == "a"
    weights = {n: p for n, p in model.full_precision().backbone.named_parameters() if ".lora_" not in n}
    assert all(torch.equal(weights[n], own[n]) for n in own)


def test_gpt2_conv1d_layers_take_adapters(tokenizer):
    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    model = MultiTaskModel(from_model(gpt2, tokenizer, name="tiny-gpt2"))
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"], pooling="last",
                            max_length=64))
    layers = model.lora_layers("a")
    assert layers and all(isinstance(layer, MultiLoraLayer) for layer in layers.values())
    _randomise_adapters(model)
    encoded = tokenizer(["a b c", "d"], padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    with torch.no_grad():
        assert (model.encode(batch, "a") - model.encode(batch, None)).abs().max() > 1e-3


@pytest.mark.parametrize("kind, limit", [("bert", 64), ("gpt2", 64), ("roberta", 63)])
def test_a_task_longer_than_the_backbones_positions_is_refused_when_added(tokenizer, kind, limit):
    # It was accepted, and the first input longer than the backbone's position table failed deep
    # inside it: "The size of tensor a (104) must match the size of tensor b (64)".
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    small = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64)
    network = {"bert": lambda: BertModel(BertConfig(**small)),
               "roberta": lambda: RobertaModel(RobertaConfig(**small, pad_token_id=tokenizer.pad_token_id)),
               "gpt2": lambda: GPT2Model(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=1, n_head=2,
                                                    n_positions=64))}[kind]()
    model = MultiTaskModel(from_model(network, tokenizer, name=f"tiny-{kind}"))
    assert model.max_positions() == limit
    targets = ["c_attn"] if kind == "gpt2" else ["query", "value"]
    with pytest.raises(ValueError, match=f"max_length={limit + 1} is longer than the {limit} tokens backbone"):
        model.add_task(TaskSpec(name="long", type="classification", labels=["x", "y"], max_length=limit + 1),
                       LoraSettings(target_modules=targets))
    assert model.task_names == []
    model.add_task(TaskSpec(name="fits", type="classification", labels=["x", "y"], max_length=limit),
                   LoraSettings(target_modules=targets))
    assert model.predict("word " * 200, task="fits").label in ("x", "y")  # cut to the limit, which fits


def test_unknown_target_module_is_reported(backbone):
    model = MultiTaskModel(backbone)
    with pytest.raises(ValueError, match="no module of the backbone matches"):
        model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]),
                       LoraSettings(target_modules=["not_a_layer"]))


def test_mixed_batch_in_bf16_stays_within_tolerance(backbone, tokenizer):
    # bf16 rounds each row's matmuls differently once rows are regrouped, so rows agree to
    # bf16 precision (8 bits of mantissa) rather than exactly: 5e-2 on unit-scale states.
    model = MultiTaskModel(backbone)
    for name in ("a", "b"):
        model.add_task(TaskSpec(name=name, type="classification", labels=["x", "y"]))
    _randomise_adapters(model)
    batch = _batch(tokenizer, TEXTS)
    row_tasks = ["a", "b", "b", "a", "b", "a"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.encode(batch, row_tasks).float()
        for row, task in enumerate(row_tasks):
            single = model.encode({k: v[row:row + 1] for k, v in batch.items()}, task).float()
            length = int(batch["attention_mask"][row].sum())
            torch.testing.assert_close(mixed[row, :length], single[0, :length], rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("stacked_max_columns", [1024, 0], ids=["stacked", "gathered"])
def test_stacked_inference_path_equals_grouped_training_path(backbone, tokenizer, monkeypatch, stacked_max_columns):
    monkeypatch.setattr(lora, "STACKED_MAX_COLUMNS", stacked_max_columns)
    model = MultiTaskModel(backbone)
    model.bf16 = False
    for name, r in (("a", 4), ("b", 8), ("c", 2)):
        model.add_task(TaskSpec(name=name, type="classification", labels=["x", "y"]), LoraSettings(r=r))
    model.add_task(TaskSpec(name="plain", type="classification", labels=["x", "y"]), head_only=True)
    _randomise_adapters(model)
    batch = _batch(tokenizer, TEXTS)
    rows = ["a", "b", "plain", "c", "a", "b"]
    with torch.no_grad():
        stacked = model.encode(batch, rows)  # no grad: one stacked matmul pair per layer
    with torch.enable_grad():
        grouped = model.encode(batch, rows)  # grad: rows gathered per task
    torch.testing.assert_close(stacked, grouped.detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for layer in model.lora_layers().values():  # a changed adapter is never served from the cache
            layer.lora_B["b"].weight.mul_(2)
        changed = model.encode(batch, rows)
    assert (changed[1] - stacked[1]).abs().max() > 1e-4
    torch.testing.assert_close(changed[0], stacked[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for layer in model.lora_layers().values():  # nor one whose scaling changed
            layer.scaling["c"] *= 3
        rescaled = model.encode(batch, rows)
    with torch.enable_grad():
        torch.testing.assert_close(rescaled, model.encode(batch, rows).detach(), rtol=1e-5, atol=1e-5)
    assert (rescaled[3] - stacked[3]).abs().max() > 1e-4


def test_a_task_added_at_inference_is_not_in_training_mode(backbone):
    """New adapters and heads take the model's mode: run() no longer walks every module each call."""
    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]))
    model.predict("warm", task="a")  # leaves training mode
    model.add_task(TaskSpec(name="b", type="classification", labels=["x", "y"]), LoraSettings(r=4, dropout=0.5))
    _randomise_adapters(model)
    assert not any(m.training for m in model.heads["b"].modules())
    assert all(not layer.lora_dropout["b"].training for layer in model.lora_layers("b").values())
    first, second = (model.predict(["some text", "more text"], task="b") for _ in range(2))
    assert [p.probabilities for p in first] == [p.probabilities for p in second]  # no dropout at inference
    model.train()
    model.add_task(TaskSpec(name="c", type="classification", labels=["x", "y"]), LoraSettings(r=4, dropout=0.5))
    assert all(layer.lora_dropout["c"].training for layer in model.lora_layers("c").values())


def test_run_undoes_training_mode_set_by_hand_on_backbone_or_head(backbone):
    """A submodule switched to training by hand would add dropout noise to predictions."""
    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]), LoraSettings(r=4))
    _randomise_adapters(model)
    reference = model.predict(["some text", "more text"], task="a")
    model.backbone.train()  # backbone dropout on
    assert [p.probabilities for p in model.predict(["some text", "more text"], task="a")] == \
        [p.probabilities for p in reference]
    assert not model.backbone.training
    model.heads["a"].train()
    model.predict("some text", task="a")
    assert not model.heads["a"].training


@pytest.mark.parametrize("batch_size", [0, -1])
def test_a_batch_size_below_one_is_a_clear_error(backbone, batch_size):
    # 0 failed in range(), a negative size ran no batch and then raised a bare KeyError.
    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]), LoraSettings(r=4))
    with pytest.raises(ValueError, match=f"batch_size must be >= 1, got {batch_size}"):
        model.predict(["some text", "more text"], task="a", batch_size=batch_size)


@pytest.mark.parametrize("inputs", [123, None, 2.5])
def test_an_input_that_is_not_text_or_a_list_is_a_clear_error(backbone, inputs):
    # It failed with "'int' object is not iterable", naming neither the argument nor what it takes.
    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]), LoraSettings(r=4))
    with pytest.raises(TypeError, match=f"inputs must be a string, .* or a list of these; got {type(inputs).__name__}"):
        model.predict(inputs, task="a")


@pytest.mark.parametrize("value, task", [
    ({"question": "Where?", "context": None}, "qa"), ({"question": None, "context": "In Paris."}, "qa"),
    (("Where?", None), "qa"), (("one text", None), "pair"), ({"text": None, "text_pair": "two"}, "pair")])
def test_a_missing_part_of_an_input_is_refused_not_read_as_the_text_none(backbone, value, task):
    # str(None) made a null QA context the text "None", and the answer was "None".
    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="qa", type="extractive-qa", text_pair_column="context", max_length=48,
                            doc_stride=8, max_question_length=16))
    model.add_task(TaskSpec(name="pair", type="pair-classification", labels=["x", "y"], text_pair_column="b"))
    with pytest.raises(ValueError, match=f"task '{task}': the input's .* is None, not a text"):
        model.predict(value, task=task)


def test_uninitialised_adapter_is_filled_by_install(backbone, tokenizer, tmp_path):
    """install_task skips the random init and copies the saved weights in: outputs equal the saved model's."""
    from mtpeft.storage import load_task

    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]))
    _randomise_adapters(model)
    expected = [p.probabilities["x"] for p in model.predict(TEXTS, task="a")]
    model.save(tmp_path / "bundle")
    fresh = MultiTaskModel(tiny_bert(tokenizer))  # the same weights, no adapters yet
    load_task(fresh, tmp_path / "bundle" / "a")
    assert [p.probabilities["x"] for p in fresh.predict(TEXTS, task="a")] == pytest.approx(expected, abs=1e-5)


def test_layer_lookups_follow_module_replacement(backbone):
    """lora_layers_of / inject_lora_layers reuse what they found until a module is replaced."""
    model = backbone.model
    layers = lora.inject_lora_layers(model, ["query", "value"])
    assert lora.lora_layers_of(model) == layers and len(layers) == 4
    path, layer = next(iter(layers.items()))
    lora.replace_submodule(model, path, layer.base_layer)
    assert path not in lora.lora_layers_of(model) and len(lora.lora_layers_of(model)) == 3
    again = lora.inject_lora_layers(model, ["query", "value"])
    assert path in again and again[path] is not layer and lora.lora_layers_of(model) == again


@pytest.mark.parametrize("name", ["a.b", "-lead", "", "x" * 65, "space name"])
def test_task_names_that_cannot_be_module_keys_are_refused(name):
    with pytest.raises(ValueError, match="task name"):
        TaskSpec(name=name, type="classification", labels=["x", "y"])


@pytest.mark.parametrize("name", ["router", "joint"])
def test_task_names_of_a_bundles_own_folders_are_refused(name):
    """A bundle's learned router (router/) and train-joint's run state (joint/) would overwrite the task."""
    with pytest.raises(ValueError, match=f"task name '{name}' is a folder every bundle may hold"):
        TaskSpec(name=name, type="classification", labels=["x", "y"])


def test_an_install_after_a_removal_reuses_modules_with_the_new_weights(backbone, tokenizer, tmp_path):
    from mtpeft.storage import load_task

    source = MultiTaskModel(backbone)
    for name in ("a", "b"):
        source.add_task(TaskSpec(name=name, type="classification", labels=["x", "y"]))
    _randomise_adapters(source, seed=3)
    expected = [p.probabilities["x"] for p in source.predict(TEXTS, task="b")]
    source.save(tmp_path / "bundle")
    model = MultiTaskModel(tiny_bert(tokenizer))
    load_task(model, tmp_path / "bundle" / "a")
    old_weights = {path: layer.lora_A["a"].weight for path, layer in model.lora_layers("a").items()}
    model.remove_task("a")
    load_task(model, tmp_path / "bundle" / "b")
    assert all(layer.lora_A["b"].weight is old_weights[path] for path, layer in model.lora_layers("b").items())
    assert [p.probabilities["x"] for p in model.predict(TEXTS, task="b")] == pytest.approx(expected, abs=1e-5)


def test_an_install_after_the_model_moved_takes_no_module_left_on_the_old_device(backbone):
    # A removed adapter's modules are kept for reuse outside the module tree, so to() left them
    # where they were; the next install took them and the forward pass mixed devices.
    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]))
    model.remove_task("a")
    model.to("meta")
    model.add_task(TaskSpec(name="b", type="classification", labels=["x", "y"]), initialize=False)
    for layer in model.lora_layers("b").values():
        assert layer.lora_A["b"].weight.device.type == "meta" and layer.lora_B["b"].weight.device.type == "meta"


def test_tasks_that_tokenise_alike_share_one_tokenizer_call(backbone, monkeypatch):
    model = MultiTaskModel(backbone)
    for name, max_length in (("a", 32), ("b", 32), ("c", 16)):
        model.add_task(TaskSpec(name=name, type="classification", labels=["x", "y"], max_length=max_length))
    _randomise_adapters(model)
    items = [("a", "one text"), ("c", "a much longer text " * 5), ("b", "two"), ("a", "three")]
    alone = [model.predict(text, task=task).probabilities["x"] for task, text in items]
    calls = []
    tokenize = type(model.tokenizer).__call__
    monkeypatch.setattr(type(model.tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or tokenize(self, *a, **k))
    mixed = model.predict([text for _, text in items], task=[task for task, _ in items])
    assert len(calls) == 2  # a and b together, c (another max_length) on its own
    assert [p.probabilities["x"] for p in mixed] == pytest.approx(alone, abs=2e-2)  # bf16 mixed vs single
