"""Sentence vectors from the bare backbone (no adapter), for routing and FAQ retrieval.

The frozen backbone is shared by every task, so its embeddings describe an input without
favouring any task; sentence-embedding backbones (all-MiniLM) are trained for mean
pooling and cosine comparison, which is how both users of this module compare vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mtpeft.batching import pad_sequences
from mtpeft.heads import pool
from mtpeft.precision import autocast, resolve_bf16

if TYPE_CHECKING:
    from mtpeft.model import MultiTaskModel

MAX_TOKENS = 128  # routing and FAQ questions are short; longer inputs keep their start


@torch.inference_mode()
def embed_texts(model: MultiTaskModel, texts: Sequence[str], batch_size: int = 64,
                max_length: int = MAX_TOKENS) -> torch.Tensor:
    """L2-normalised mean-pooled backbone embeddings, (N, H) float32 on the CPU, in input order.

    Runs the backbone with routing ``None``: no task's adapter touches the vectors. ``max_length``
    is capped at the backbone's positions, so a backbone shorter than the FAQ index's 256 tokens
    still indexes long entries (by their start) instead of failing inside the embeddings.
    """
    if not texts:
        return torch.zeros(0, model.identity.hidden_size)
    positions = model.max_positions()
    if positions is not None:
        max_length = min(max_length, positions)
    encoded = model.tokenizer(list(texts), truncation=True, max_length=max_length)
    rows = [{"input_ids": ids, "token_type_ids": encoded["token_type_ids"][i] if "token_type_ids" in encoded else None}
            for i, ids in enumerate(encoded["input_ids"])]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # little padding per batch
    device = model.device
    use_bf16 = resolve_bf16(model.bf16, device)
    out = torch.zeros(len(rows), model.identity.hidden_size)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in pad_sequences([rows[i] for i in chunk], model.tokenizer.pad_token_id).items()}
            with autocast(device, use_bf16):
                hidden = model.encode(batch, None)  # (B, T, H), bare backbone
            vectors = pool(hidden.float(), batch["attention_mask"], "mean")  # (B, H)
            out[chunk] = F.normalize(vectors, dim=-1).cpu()
    finally:
        model.train(was_training)
    return out
