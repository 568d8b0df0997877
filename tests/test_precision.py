"""bf16 compute on a frozen backbone: bf16 weights while computing, exact fp32 originals kept."""

from __future__ import annotations

import pytest
import torch

from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.batching import collate
from mtpeft.config import LoraSettings

TEXTS = ["the first sentence", "a second, longer sentence with more words", "three", "and the fourth one"]


def _batch(tokenizer):
    encoded = tokenizer(TEXTS, truncation=True, max_length=32)
    return collate([{"input_ids": i, "token_type_ids": t} for i, t in zip(encoded["input_ids"], encoded["token_type_ids"])],
                   tokenizer.pad_token_id)


def _model(backbone) -> MultiTaskModel:
    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]), LoraSettings(r=4))
    torch.manual_seed(3)
    for layer in model.lora_layers().values():
        torch.nn.init.normal_(layer.lora_B["a"].weight, std=0.5)
    return model


def test_bf16_round_trip_restores_the_exact_fp32_weights(backbone, tokenizer):
    model = _model(backbone)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    model.bf16 = True
    with torch.no_grad():
        hidden = model.encode(_batch(tokenizer), "a")
    assert hidden.dtype == torch.float32  # heads always see fp32
    frozen = [p for n, p in model.backbone.named_parameters() if ".lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for n, p in model.backbone.named_parameters() if ".lora_" in n)
    model.full_precision()
    for name, param in model.backbone.named_parameters():
        assert param.dtype == torch.float32
        assert torch.equal(param, before[name]), name


def test_an_adapter_added_while_the_backbone_is_in_bf16_keeps_the_fp32_originals(backbone, tokenizer):
    # Wrapping a layer for a new adapter renames its weight (query.weight -> query.base_layer.weight);
    # the fp32 originals were kept by the old names, so going back to fp32 raised KeyError.
    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]), head_only=True)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    model.bf16 = True
    with torch.no_grad():
        model.encode(_batch(tokenizer), "a")  # the backbone is now held in bf16
    model.add_task(TaskSpec(name="b", type="classification", labels=["x", "y"]),
                   LoraSettings(r=4, target_modules=["query", "value", "dense"]))
    model.full_precision()
    frozen = [p for n, p in model.backbone.named_parameters() if ".lora_" not in n]
    assert len(frozen) == len(before)
    for param, original in zip(frozen, before):
        assert param.dtype == torch.float32 and torch.equal(param, original)


def test_bf16_hidden_states_agree_with_fp32(backbone, tokenizer):
    model = _model(backbone)
    batch = _batch(tokenizer)
    with torch.no_grad():
        model.bf16 = False
        exact = model.encode(batch, "a")
        model.bf16 = True
        approx = model.encode(batch, "a")
    # bf16 keeps 8 bits of mantissa; two layers of unit-scale states stay within a few 1e-2.
    torch.testing.assert_close(approx, exact, rtol=0, atol=6e-2)


def test_merging_in_bf16_then_unmerging_restores_the_weights(backbone, tokenizer):
    model = _model(backbone)
    model.bf16 = True
    batch = _batch(tokenizer)
    with torch.no_grad():
        unmerged = model.encode(batch, "a")
        weights = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
        model.merge_adapter("a")
        merged = model.encode(batch, "a")
        model.unmerge_adapters()
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=6e-2)
    for name, param in model.backbone.named_parameters():
        assert torch.equal(param, weights[name]), name


def test_a_merged_adapter_never_leaks_into_other_rows(backbone, tokenizer):
    model = _model(backbone)
    model.add_task(TaskSpec(name="b", type="classification", labels=["x", "y"]), LoraSettings(r=4))
    model.bf16 = False
    batch = _batch(tokenizer)
    with torch.no_grad():
        alone_b = model.encode(batch, "b")
        bare = model.encode(batch, None)
        model.merge_adapter("a")
        assert torch.equal(model.encode(batch, "b"), alone_b)
        model.merge_adapter("a")
        assert torch.equal(model.encode(batch, None), bare)


def test_single_task_inference_merges_and_matches_the_unmerged_path(backbone):
    model = _model(backbone)
    model.bf16 = False
    texts = [f"sentence number {i} with some words" for i in range(12)]
    model.merge_min_rows = 0
    unmerged = model.predict(texts, task="a")
    model.merge_min_rows = 8
    merged = model.predict(texts, task="a")
    assert model._merged_task() == "a"
    for x, y in zip(merged, unmerged):
        assert x.label == y.label
        for label, probability in x.probabilities.items():
            assert abs(probability - y.probabilities[label]) < 1e-5


@pytest.mark.parametrize("edit", ["in place", "replaced", "rescaled"])
@pytest.mark.parametrize("rows", [12, 2], ids=["merging-batch", "small-batch"])
def test_a_merged_adapter_whose_weights_change_serves_the_new_delta(backbone, edit, rows):
    """Loading other weights into a task (or editing them) while it was merged kept the old delta;
    a batch below merge_min_rows, which does not merge again, ran on the stale merged weight too."""
    model = _model(backbone)
    model.bf16 = False
    texts = [f"sentence number {i} with some words" for i in range(12)]
    model.predict(texts, task="a")
    assert model._merged_task() == "a"
    with torch.no_grad():
        for layer in model.lora_layers().values():
            if edit == "in place":
                layer.lora_B["a"].weight.mul_(-3.0)
            elif edit == "replaced":
                layer.lora_B["a"].weight = torch.nn.Parameter(-3.0 * layer.lora_B["a"].weight)
            else:
                layer.scaling["a"] *= -3.0
    after = model.predict(texts[:rows], task="a")
    model.merge_min_rows = 0
    model.unmerge_adapters()
    unmerged = model.predict(texts[:rows], task="a")
    for x, y in zip(after, unmerged):
        assert x.probabilities["x"] == pytest.approx(y.probabilities["x"], abs=1e-5)


def test_moving_a_model_held_in_bf16_moves_its_fp32_originals_too(backbone, tokenizer):
    # The fp32 originals stayed where the model was: back in fp32 (export, training in fp32, a
    # device without fast bf16) the backbone's weights were on the old device again.
    model = _model(backbone)
    model.bf16 = True
    with torch.no_grad():
        model.encode(_batch(tokenizer), "a")  # the backbone is now held in bf16
    model.to("meta")
    model.full_precision()
    for name, param in model.backbone.named_parameters():
        assert param.device.type == "meta" and param.dtype == torch.float32, name


def test_the_frozen_weights_found_before_each_pass_follow_every_change_of_the_backbone(backbone, tokenizer):
    # The walk that finds them is kept between passes; a module or parameter put in place since
    # must still be found, or it would stay in fp32 (or in bf16 after full_precision).
    model = _model(backbone)
    model.bf16 = True
    batch = _batch(tokenizer)
    with torch.no_grad():
        model.encode(batch, "a")
    assert model._frozen_backbone_weights() is model._frozen_backbone_weights()  # kept while nothing changes
    layer = model.backbone.encoder.layer[0]
    layer.output.dense = torch.nn.Linear(layer.output.dense.in_features, layer.output.dense.out_features)
    layer.output.dense.requires_grad_(False)  # frozen, like the rest
    new_norm = torch.nn.Parameter(torch.ones_like(layer.output.LayerNorm.weight, dtype=torch.float32),
                                  requires_grad=False)
    layer.output.LayerNorm.load_state_dict({"weight": new_norm, "bias": layer.output.LayerNorm.bias.float()},
                                           assign=True)
    with torch.no_grad():
        model.encode(batch, "a")
    assert model._frozen_backbone_weights()["encoder.layer.0.output.dense.weight"] is layer.output.dense.weight
    assert layer.output.dense.weight.dtype == torch.bfloat16  # held in bf16 like the rest
    model.full_precision()
    frozen = [p for n, p in model.backbone.named_parameters() if ".lora_" not in n]
    assert all(p.dtype == torch.float32 for p in frozen)
    assert torch.equal(layer.output.LayerNorm.weight, torch.ones_like(layer.output.LayerNorm.weight))
    # Training the backbone is seen at once: requires_grad is read from the parameters each pass.
    for param in model.backbone.parameters():
        param.requires_grad_(True)
    with torch.no_grad():
        model.encode(batch, "a")
    assert all(p.dtype == torch.float32 for n, p in model.backbone.named_parameters() if ".lora_" not in n)


def test_a_gpu_that_only_emulates_bf16_is_not_picked_for_it(monkeypatch):
    # PyTorch counts bf16 emulated in fp32 (GPUs before Ampere) as supported unless told otherwise;
    # bf16=None picked it there, slower than fp32.
    from mtpeft.precision import resolve_bf16

    _two_gpus(monkeypatch, current=0)
    assert resolve_bf16(None, "cuda") is False
    assert resolve_bf16(True, "cuda") is True  # an explicit choice stands


def _two_gpus(monkeypatch, current: int) -> None:
    """GPU 0 a Volta (bf16 only emulated), GPU 1 an Ampere; ``current`` the one torch.cuda points at."""
    capability = {0: (7, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",  # torch's own check: the current GPU, whatever is asked
                        lambda including_emulation=True: capability[current][0] >= 8 or including_emulation)


@pytest.mark.parametrize("current", [0, 1])
def test_bf16_is_asked_of_the_gpu_named_not_the_current_one(monkeypatch, current):
    from mtpeft.precision import bf16_supported

    _two_gpus(monkeypatch, current)
    assert bf16_supported("cuda:0") is False and bf16_supported("cuda:1") is True
    assert bf16_supported("cuda") is (current == 1)


@pytest.mark.parametrize("model_bf16, config_bf16, trained_in_bf16", [
    (None, None, True),    # the hardware decides (made fast here)
    (False, None, False),  # the model's own "no" (a QLoRA model with fp32 compute) stands
    (False, True, True),   # an explicit training setting wins
])
def test_training_takes_the_models_bf16_setting_unless_the_config_names_one(backbone, monkeypatch, tmp_path,
                                                                            model_bf16, config_bf16, trained_in_bf16):
    from mtpeft import precision
    from mtpeft.config import TrainConfig
    from mtpeft.examples import Example
    from mtpeft.train import train_task

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    model = _model(backbone)
    model.bf16 = model_bf16
    examples = [Example(text=t, label=i % 2) for i, t in enumerate(TEXTS)]
    result = train_task(model, "a", examples, [], TrainConfig(epochs=1, batch_size=2, bf16=config_bf16,
                                                               checkpoint_every=-1), progress=False, report_to=())
    assert result.bf16 is trained_in_bf16


def test_a_model_that_first_predicted_in_bf16_can_then_train(backbone):
    """The backbone's bf16 copies were first made under predict's inference mode, so training
    the same model afterwards (score a warm start, then train it) failed: inference tensors
    cannot be saved for backward."""
    from mtpeft.config import TrainConfig
    from mtpeft.examples import Example
    from mtpeft.train import train_task

    model = _model(backbone)
    model.bf16 = True
    model.predict(TEXTS, task="a")  # the backbone is now held in bf16
    examples = [Example(text=t, label=i % 2) for i, t in enumerate(TEXTS)]
    train_task(model, "a", examples, [], TrainConfig(epochs=1, batch_size=2, bf16=True, checkpoint_every=-1),
               progress=False, report_to=())
    model.full_precision()
    assert all(p.dtype == torch.float32 for p in model.backbone.parameters())
