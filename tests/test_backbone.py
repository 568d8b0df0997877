"""Backbones: default LoRA targets per architecture, local-path loading, identity."""

from __future__ import annotations

import pytest
import torch
from transformers import DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

from conftest import tiny_bert
from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.backbone import from_model, load_backbone
from mtpeft.config import LoraSettings

SPEC = TaskSpec(name="t", type="classification", labels=["a", "b"])


def _leaf_names(model):
    return sorted({path.rsplit(".", 1)[-1] for path in model.lora_layers("t")})


@pytest.mark.parametrize("build, expected", [
    (lambda v: DistilBertModel(DistilBertConfig(vocab_size=v, dim=32, n_layers=2, n_heads=2, hidden_dim=64)),
     ["q_lin", "v_lin"]),
    (lambda v: RobertaModel(RobertaConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64)), ["query", "value"]),
])
def test_default_targets_per_architecture(tokenizer, build, expected):
    torch.manual_seed(0)
    model = MultiTaskModel(from_model(build(tokenizer.vocab_size), tokenizer, name="tiny"))
    model.add_task(SPEC)
    assert _leaf_names(model) == expected
    assert len(model.lora_layers("t")) == 2 * 2  # two layers x two targets


def test_all_linear_targets(backbone):
    model = MultiTaskModel(backbone)
    model.add_task(SPEC, LoraSettings(target_modules=["all-linear"]))
    assert _leaf_names(model) == ["dense", "key", "query", "value"]
    assert not any("pooler" in path for path in model.lora_layers("t"))


def test_local_path_backbone_has_a_stable_identity(tokenizer, tmp_path):
    tiny = tiny_bert(tokenizer)
    tiny.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(tmp_path)
    assert loaded.identity.name == str(tmp_path)
    assert loaded.identity.fingerprint == tiny.identity.fingerprint
    assert loaded.identity.hidden_size == 32 and loaded.identity.model_type == "bert"
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.config._attn_implementation == "sdpa"  # PyTorch's fused kernels where there are some


def test_a_local_mpnet_backbone_loads_and_takes_adapters(tokenizer, tmp_path):
    # Attention was asked for as sdpa by name, which transformers refuses for MPNet (all-mpnet-base-v2's
    # architecture, whose LoRA and IA3 targets mtpeft lists): loading failed with a ValueError.
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    MPNetModel(MPNetConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = MultiTaskModel(load_backbone(tmp_path))
    model.bf16 = False
    model.add_task(SPEC)
    assert _leaf_names(model) == ["q", "v"]
    assert len(model.predict(["a b", "c d e f"], task="t")) == 2


def test_a_local_backbone_whose_weights_are_a_pickle_is_refused_unread(tokenizer, tmp_path, monkeypatch):
    # transformers falls back to pytorch_model.bin where a folder has no safetensors; that is a pickle.
    tiny = tiny_bert(tokenizer)
    tiny.model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(tiny.model.state_dict(), tmp_path / "pytorch_model.bin")
    unpickled = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a) or real_load(*a, **k))
    with pytest.raises(OSError, match="model.safetensors"):
        load_backbone(tmp_path)
    assert unpickled == []


def test_another_checkpoint_of_the_same_base_is_told_apart(tokenizer):
    # Fine-tuning leaves the first (special, unused) embedding rows alone, so `fingerprint` agrees.
    from mtpeft.backbone import BackboneMismatchError

    base = tiny_bert(tokenizer, seed=0)
    tuned = tiny_bert(tokenizer, seed=0)
    with torch.no_grad():
        tuned.model.encoder.layer[1].output.LayerNorm.weight.add_(0.01)
    tuned = from_model(tuned.model, tokenizer, "tuned")
    assert tuned.identity.fingerprint == base.identity.fingerprint
    with pytest.raises(BackboneMismatchError, match="norms"):
        tuned.identity.check_matches(base.identity.to_dict(), "task 't'")
    older_record = {k: v for k, v in base.identity.to_dict().items() if k != "norms"}  # saved before norms were kept
    tuned.identity.check_matches(older_record, "task 't'")
    base.identity.check_matches(base.identity.to_dict(), "task 't'")


def test_a_backbone_saved_in_bf16_loads_with_fp32_weights(tokenizer, tmp_path):
    # transformers loads a checkpoint in its saved dtype: a bf16-saved backbone then computed the
    # fp32 path in bf16 and fully fine-tuned bf16 weights. Upcast, its identity is the same.
    saved = tiny_bert(tokenizer).model.to(torch.bfloat16)
    saved.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    backbone = load_backbone(tmp_path)
    assert {p.dtype for p in backbone.model.parameters()} == {torch.float32}
    as_saved = from_model(saved, tokenizer, str(tmp_path))
    assert backbone.identity.to_dict() == as_saved.identity.to_dict()
    assert all(torch.equal(p.to(torch.float32), q) for p, q in zip(saved.parameters(), backbone.model.parameters()))


def test_default_backbone_is_the_packaged_minilm():
    backbone = load_backbone("default")
    assert backbone.identity.model_type == "bert"
    assert (backbone.identity.hidden_size, backbone.identity.num_layers) == (384, 6)
    assert sum(p.numel() for p in backbone.model.parameters()) == 22_713_216


def test_hub_name_without_hub_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError):
        load_backbone("some-org/not-a-local-model")
