"""The protocol every task type implements, so one training loop serves them all.

A task type turns examples into token features, builds its head, computes its loss,
turns head outputs into predictions and scores them. Features are plain dicts:
``input_ids`` (and ``token_type_ids`` where the tokenizer makes them), ``example``
(index of the source example) and the type's targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from mtpeft.examples import Example
from mtpeft.heads import CosineHead, PooledHead
from mtpeft.predictions import Prediction
from mtpeft.tasks.spec import TaskSpec


class TaskType(Protocol):
    # Keys of a feature that ``collate`` turns into target tensors, with their dtype.
    targets: dict[str, torch.dtype]

    def build_head(self, spec: TaskSpec, hidden_size: int) -> nn.Module: ...

    def encode(self, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> list[dict]: ...

    def loss(self, spec: TaskSpec, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def summarize(self, spec: TaskSpec, outputs: torch.Tensor, features: Sequence[dict]) -> list[Any]:
        """Per-feature results of one batch, small and padding-free (computed while the batch is at hand)."""

    def predict(self, spec: TaskSpec, summaries: Sequence[Any], features: Sequence[dict],
                examples: Sequence[Example]) -> list[Prediction]:
        """One prediction per example from all of its features' summaries."""

    def score(self, spec: TaskSpec, predictions: Sequence[Prediction], examples: Sequence[Example]) -> dict[str, float]: ...


# Task types whose inference features are exactly ``encode_sequences``' (one per example).
SEQUENCE_TYPES = ("classification", "pair-classification", "regression")


def sequence_encoding_key(spec: TaskSpec) -> tuple | None:
    """What ``encode_sequences`` reads of ``spec``: tasks with equal keys tokenise alike
    (``None``: the type has its own features, e.g. QA windows)."""
    if spec.type not in SEQUENCE_TYPES:
        return None
    return (spec.max_length, spec.truncation, spec.head_tokens, spec.is_pair, spec.is_bi_encoder)


def encode_sequences(spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> list[dict]:
    """Tokenise single texts or pairs, truncated to ``spec.max_length``, without padding.

    Bi-encoded pairs get each text tokenised on its own (``input_ids`` and ``input_ids_b``).
    """
    texts = [ex.text for ex in examples]
    if spec.truncation == "head+tail" and not spec.is_pair:
        texts = [_head_and_tail(tokenizer, t, spec.max_length, spec.head_tokens) for t in texts]
    pairs = [ex.text_pair or "" for ex in examples] if spec.is_pair else None
    if spec.is_bi_encoder:
        first = tokenizer(texts, truncation=True, max_length=spec.max_length)
        second = tokenizer(pairs, truncation=True, max_length=spec.max_length)
        features = []
        for i in range(len(examples)):
            feature = {"input_ids": first["input_ids"][i], "input_ids_b": second["input_ids"][i], "example": i}
            if "token_type_ids" in first:
                feature["token_type_ids"] = first["token_type_ids"][i]
                feature["token_type_ids_b"] = second["token_type_ids"][i]
            features.append(feature)
        return features
    encoded = tokenizer(texts, pairs, truncation=True, max_length=spec.max_length, padding=False)
    features = []
    for i in range(len(examples)):
        feature = {"input_ids": encoded["input_ids"][i], "example": i}
        if "token_type_ids" in encoded:
            feature["token_type_ids"] = encoded["token_type_ids"][i]
        features.append(feature)
    return features


def _head_and_tail(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int, head_tokens: int) -> str:
    """Cut a long text to its first ``head_tokens`` and last tokens, at token boundaries.

    Works on character offsets so it fits any fast tokenizer: the kept pieces are joined
    and tokenised again with the usual special tokens.
    """
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    # The whole review is tokenised only to find the cut points: no "longer than the maximum" warning.
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    if len(offsets) <= budget:
        return text
    head = min(head_tokens, budget)
    tail = budget - head
    head_end = offsets[head - 1][1] if head else 0
    while True:
        tail_start = offsets[len(offsets) - tail][0] if tail else len(text)
        cut = text[:head_end] + " " + text[tail_start:]
        # A tail that starts inside a word can re-tokenise into more tokens; the tokenizer's
        # truncation would then drop the text's last tokens, which head+tail exists to keep.
        over = len(tokenizer(cut, add_special_tokens=False, verbose=False)["input_ids"]) - budget
        if over <= 0 or tail == 0:
            return cut
        tail = max(0, tail - over)


def pooled_head(spec: TaskSpec, hidden_size: int, num_outputs: int) -> nn.Module:
    """A cosine head for bi-encoded pairs, else pool + linear."""
    if spec.is_bi_encoder:
        return CosineHead(num_outputs, spec.pooling)
    return PooledHead(hidden_size, num_outputs, spec.pooling, spec.head_dropout)
