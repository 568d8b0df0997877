"""Task heads: small modules that turn backbone hidden states into task outputs.

Heads are kept minimal (one linear layer on a pooled vector by default) so that a LoRA
adapter plus its head stays thousands of times smaller than the backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H) hidden states -> (B, H) vectors.

    ``mean`` averages real tokens (sentence-transformer backbones are trained for it);
    ``cls`` takes the first token (BERT's pre-training); ``last`` takes the last real
    token, the only one a causal decoder (GPT-2) lets see the whole input.
    """
    if how == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        # The highest position with mask 1: right or left padding alike.
        positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(1)  # (B,)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}; choose one of {POOLINGS}")


class PooledHead(nn.Module):
    """Pool, dropout, linear: logits for classification, one score for regression."""

    def __init__(self, hidden_size: int, num_outputs: int, pooling: str = "mean", dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_outputs)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = pool(hidden, attention_mask, self.pooling)
        return self.out(self.dropout(pooled))  # (B, num_outputs)


class CosineHead(nn.Module):
    """Bi-encoder (siamese) pair head: each text is encoded and pooled on its own, and the
    output is an affine function of their cosine similarity.

    Sentence-embedding backbones (all-MiniLM) are trained for exactly this comparison, so
    it works from few examples where a cross-encoder over the joined pair does not; the
    texts' embeddings can also be indexed for retrieval. The batch holds every first text,
    then every second text: (2B, T, H) -> (B, num_outputs).
    """

    def __init__(self, num_outputs: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.pooling = pooling
        self.out = nn.Linear(1, num_outputs)
        with torch.no_grad():
            # Start as "similarity = cosine": regression predicts the cosine; for classes the
            # last class (e.g. "duplicate") grows with the cosine and the first shrinks, with
            # the boundary at cosine 0.5, where sentence-embedding models put paraphrases apart.
            if num_outputs > 1:
                steps = torch.linspace(-1.0, 1.0, num_outputs)
                self.out.weight.copy_(10.0 * steps.unsqueeze(1))
                self.out.bias.copy_(-10.0 * steps * 0.5)
            else:
                self.out.weight.fill_(1.0)
                self.out.bias.zero_()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        first, second = pool(hidden, attention_mask, self.pooling).float().chunk(2)
        cosine = F.cosine_similarity(first, second, dim=-1).unsqueeze(-1)  # (B, 1)
        return self.out(cosine)


class SpanHead(nn.Module):
    """Start and end logits per token for extractive question answering."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.out = nn.Linear(hidden_size, 2)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.out(hidden)  # (B, T, 2)
        # Padding can never be an answer boundary.
        return logits.masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(logits.dtype).min)
