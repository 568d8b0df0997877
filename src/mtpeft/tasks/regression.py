"""Regression (e.g. STS-B similarity 0-5): pooled head, MSE on range-scaled targets, Pearson/Spearman."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtpeft.examples import Example
from mtpeft.metrics import regression_metrics
from mtpeft.predictions import ScorePrediction
from mtpeft.tasks.base import encode_sequences, pooled_head
from mtpeft.tasks.spec import TaskSpec


def target_scale(spec: TaskSpec) -> tuple[float, float]:
    """Targets are trained in [0, 1] when a range is known: the head's scale then fits any range."""
    low, high = spec.label_range or (0.0, 1.0)
    return low, high - low


class Regression:
    targets = {"label": torch.float32}

    def build_head(self, spec: TaskSpec, hidden_size: int) -> nn.Module:
        return pooled_head(spec, hidden_size, 1)

    def encode(self, spec: TaskSpec, tokenizer, examples: Sequence[Example]) -> list[dict]:
        low, width = target_scale(spec)
        features = encode_sequences(spec, tokenizer, examples)
        for feature in features:
            label = examples[feature["example"]].label
            if label is not None:
                feature["label"] = (float(label) - low) / width
        return features

    def loss(self, spec: TaskSpec, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(outputs.float().squeeze(-1), batch["label"])

    def summarize(self, spec: TaskSpec, outputs: torch.Tensor, features) -> list:
        low, width = target_scale(spec)
        return (outputs.float().squeeze(-1) * width + low).cpu().tolist()

    def predict(self, spec: TaskSpec, summaries, features, examples) -> list[ScorePrediction]:
        return [ScorePrediction(task=spec.name, score=float(s)) for s in summaries]

    def score(self, spec: TaskSpec, predictions, examples) -> dict[str, float]:
        return regression_metrics([p.score for p in predictions], [float(ex.label) for ex in examples])
