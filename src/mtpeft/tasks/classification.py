"""Single-text and sentence-pair classification: pooled head, cross-entropy, accuracy/F1."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtpeft.examples import Example
from mtpeft.metrics import classification_metrics
from mtpeft.predictions import LabelPrediction
from mtpeft.tasks.base import encode_sequences, pooled_head
from mtpeft.tasks.spec import TaskSpec


class Classification:
    targets = {"label": torch.long}

    def build_head(self, spec: TaskSpec, hidden_size: int) -> nn.Module:
        return pooled_head(spec, hidden_size, len(spec.labels))

    def encode(self, spec: TaskSpec, tokenizer, examples: Sequence[Example]) -> list[dict]:
        features = encode_sequences(spec, tokenizer, examples)
        for feature in features:
            label = examples[feature["example"]].label
            if label is not None:
                feature["label"] = int(label)
        return features

    def loss(self, spec: TaskSpec, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), batch["label"])

    def summarize(self, spec: TaskSpec, outputs: torch.Tensor, features) -> list:
        return list(torch.softmax(outputs.float(), dim=-1).cpu().numpy())

    def predict(self, spec: TaskSpec, summaries, features, examples) -> list[LabelPrediction]:
        predictions = []
        for probs in summaries:  # one feature per example
            best = int(probs.argmax())
            predictions.append(LabelPrediction(
                task=spec.name, label=spec.labels[best], score=float(probs[best]),
                probabilities={label: float(p) for label, p in zip(spec.labels, probs)}))
        return predictions

    def score(self, spec: TaskSpec, predictions, examples) -> dict[str, float]:
        index = {label: i for i, label in enumerate(spec.labels)}
        return classification_metrics([index[p.label] for p in predictions],
                                      [int(ex.label) for ex in examples], len(spec.labels))
