"""Turning features into padded tensors, and features into length-bucketed batches.

Padding every example to a fixed length wastes most of the compute on short inputs
(SST-2 sentences average 13 tokens). Batches are padded only to their longest member, and
training batches are drawn from buckets of similar length so that little padding is left.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch


def sequences(features: Sequence[dict]) -> list[dict]:
    """The token sequences of a batch of one task's features.

    A bi-encoded pair feature holds two sequences (``input_ids`` and ``input_ids_b``); its
    batch lists every first text, then every second text, which is the layout a
    ``CosineHead`` splits in halves.
    """
    if "input_ids_b" not in features[0]:
        return list(features)
    firsts = [{"input_ids": f["input_ids"], "token_type_ids": f.get("token_type_ids")} for f in features]
    seconds = [{"input_ids": f["input_ids_b"], "token_type_ids": f.get("token_type_ids_b")} for f in features]
    return firsts + seconds


def padded_length(longest: int, pad_to_multiple_of: int) -> int:
    """``longest`` rounded up to a multiple of ``pad_to_multiple_of``: a batch's padded length."""
    return -(-longest // pad_to_multiple_of) * pad_to_multiple_of


# Inference pads each batch to a multiple of this many tokens; the padding takes positions too.
INFERENCE_PAD_MULTIPLE = 8


def pad_sequences(rows: Sequence[dict], pad_token_id: int,
                  pad_to_multiple_of: int = INFERENCE_PAD_MULTIPLE) -> dict[str, torch.Tensor]:
    """Right-pad token sequences to the longest (rounded up to ``pad_to_multiple_of``)."""
    longest = max(len(r["input_ids"]) for r in rows)
    length = padded_length(longest, pad_to_multiple_of)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    has_types = rows[0].get("token_type_ids") is not None
    token_type_ids = torch.zeros((len(rows), length), dtype=torch.long) if has_types else None
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        attention_mask[i, :n] = 1
        if has_types:
            token_type_ids[i, :n] = torch.tensor(row["token_type_ids"])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if has_types:
        batch["token_type_ids"] = token_type_ids
    return batch


def collate(features: Sequence[dict], pad_token_id: int, targets: Mapping[str, torch.dtype] | None = None,
            pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """A padded batch of one task's features, with their targets as tensors."""
    batch = pad_sequences(sequences(features), pad_token_id, pad_to_multiple_of)
    for key, dtype in (targets or {}).items():
        if key in features[0]:
            batch[key] = torch.tensor([f[key] for f in features], dtype=dtype)
    return batch


def bucketed_batches(lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0,
                     bucket_batches: int = 50) -> list[list[int]]:
    """Index batches with little padding.

    With ``shuffle``, indices are shuffled, cut into buckets of ``bucket_batches`` batches,
    sorted by length inside each bucket, batched, and the batches shuffled: random enough
    for SGD, and most batches hold inputs of similar length. Without ``shuffle``, all
    indices are sorted by length (evaluation and inference).
    """
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: lengths[i])
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    span = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), span):
        bucket = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches.extend(bucket[i:i + batch_size] for i in range(0, len(bucket), batch_size))
    rng.shuffle(batches)
    return batches
