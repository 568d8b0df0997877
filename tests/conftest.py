"""Shared fixtures: tiny random backbones (with the packaged tokenizer) and data paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from mtpeft.backbone import Backbone, default_backbone_path, from_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_backbone_path())


def tiny_bert(tokenizer, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                        attn_implementation="sdpa")
    return from_model(BertModel(config), tokenizer, name="tiny-bert")


@pytest.fixture
def backbone(tokenizer) -> Backbone:
    return tiny_bert(tokenizer)


def require_shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real dataset not available: {path} is missing (the datasets live in ../shared/data)")
    return path
