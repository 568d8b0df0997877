"""A GPT-2-style decoder through the classification recipe: last-token pooling, padding, Conv1D LoRA."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import GPT2Config, GPT2Model

from mtpeft.backbone import from_model
from mtpeft.config import LoraSettings, TrainConfig
from mtpeft.examples import Example
from mtpeft.heads import pool
from mtpeft.methods import get_method
from mtpeft.model import MultiTaskModel
from mtpeft.tasks import TaskSpec
from mtpeft.train import train_task

SPEC = TaskSpec(name="mood", type="classification", labels=["neg", "pos"], pooling="last", max_length=32)


def tiny_gpt2(tokenizer, seed: int = 0):
    """A random 2-layer GPT-2 with a tokenizer that, like GPT-2's, has an end-of-text token and no pad token."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.eos_token = "[SEP]"
    tokenizer.pad_token = None
    torch.manual_seed(seed)
    model = GPT2Model(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    return from_model(model, tokenizer, name="tiny-gpt2")


def test_last_token_pooling_with_left_and_right_padding():
    hidden = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)  # value = row * 5 + position
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [2.0, 9.0]
    assert pool(hidden, left, "last").flatten().tolist() == [4.0, 9.0]
    assert pool(hidden, torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]]), "last").flatten().tolist() == [0.0, 9.0]


def test_decoder_gets_a_pad_token_and_padding_does_not_change_predictions(tokenizer):
    backbone = tiny_gpt2(tokenizer)
    assert backbone.tokenizer.pad_token == "[SEP]" and backbone.model.config.pad_token_id == backbone.tokenizer.pad_token_id
    model = MultiTaskModel(backbone)
    model.bf16 = False
    model.add_task(SPEC, LoraSettings(r=4, alpha=8))
    assert set(model.lora_layers("mood")) == {"h.0.attn.c_attn", "h.1.attn.c_attn"}  # GPT-2's Conv1D
    for layer in model.lora_layers("mood").values():
        torch.nn.init.normal_(layer.lora_B["mood"].weight, std=0.3)
    texts = ["short", "a much longer input text with many more words than the first one"]
    together = model.predict(texts, task="mood", batch_size=8)
    for text, prediction in zip(texts, together):  # each row alone: no padding at all
        alone = model.predict(text, task="mood")
        assert abs(alone.probabilities["pos"] - prediction.probabilities["pos"]) < 1e-5


def _sentiment(seed: int, n: int) -> list[Example]:
    rng = random.Random(seed)
    good, bad = ["great", "lovely", "superb", "happy"], ["awful", "broken", "poor", "angry"]
    rows = []
    for i in range(n):
        words = [rng.choice(good if i % 2 else bad)] + rng.sample(["the", "item", "really"], rng.randint(0, 2))
        rows.append(Example(text=" ".join(words), label=i % 2))
    return rows


def test_decoder_classification_trains_lora_and_head_only(tokenizer):
    backbone = tiny_gpt2(tokenizer)
    model = get_method("lora-r8").build(backbone, SPEC, seed=0)
    model.bf16 = False
    trainable = {id(p) for p in model.task_parameters("mood").values()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(epochs=6, batch_size=16, lr=1e-2, bf16=False, seed=0, lora=None)
    result = train_task(model, "mood", _sentiment(0, 96), _sentiment(1, 40), config, progress=False)
    assert result.metrics["accuracy"] >= 85, result.metrics
    model.unmerge_adapters()  # evaluation may fold the adapter into the weights
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(id(dict(model.named_parameters())[n]) in trainable for n in changed)


def test_houlsby_adapters_fit_gpt2_conv1d(tokenizer):
    model = get_method("houlsby").build(tiny_gpt2(tokenizer), SPEC)
    model.bf16 = False
    sites = [n for n in model.task_parameters("mood") if n.endswith("bottleneck.down.weight")]
    assert sorted(sites) == ["h.0.attn.c_proj.bottleneck.down.weight", "h.0.mlp.c_proj.bottleneck.down.weight",
                             "h.1.attn.c_proj.bottleneck.down.weight", "h.1.mlp.c_proj.bottleneck.down.weight"]
    batch = dict(model.tokenizer(["one two three"], return_tensors="pt"))
    bare = MultiTaskModel(tiny_gpt2(tokenizer))
    bare.bf16 = False
    with torch.no_grad():
        torch.testing.assert_close(model.encode(batch, "mood"), bare.encode(batch, None))  # zero-init: the base model


def test_peft_loads_a_gpt2_adapter_as_conv1d_without_guessing(tokenizer, tmp_path):
    # GPT-2's Conv1D stores its weight as (in, out); peft needs fan_in_fan_out=True in the adapter's
    # config for such layers, and without it warned and flipped the flag itself.
    import json
    import warnings

    from peft import PeftModel

    model = MultiTaskModel(tiny_gpt2(tokenizer))
    model.bf16 = False
    model.add_task(SPEC, LoraSettings(r=4, alpha=8))
    for layer in model.lora_layers("mood").values():
        torch.nn.init.normal_(layer.lora_B["mood"].weight, std=0.3)
    model.save(tmp_path)
    assert json.loads((tmp_path / "mood" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    batch = dict(model.tokenizer(["one two three", "four"], return_tensors="pt", padding=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(tiny_gpt2(tokenizer).model, tmp_path / "mood")
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # peft had to correct the config
    with torch.no_grad():
        theirs = peft_model(**batch).last_hidden_state
        ours = model.encode(batch, "mood")
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dora", "vera", "ia3"])
def test_peft_methods_on_gpt2_tell_peft_its_layers_are_conv1d(name, tokenizer):
    # Without fan_in_fan_out=True peft warned on every build and flipped the flag itself.
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_method(name).build(tiny_gpt2(tokenizer), SPEC)
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    model.bf16 = False
    batch = dict(model.tokenizer(["one two three"], return_tensors="pt"))
    with torch.no_grad():
        assert torch.isfinite(model.encode(batch, "mood")).all()
