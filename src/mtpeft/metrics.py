"""Task metrics, all reported in points (0-100) so tables compare like with like.

Classification and regression metrics come from scikit-learn and scipy. The SQuAD v1.1
EM/F1 follow the official evaluation script: normalise case, punctuation, articles and
whitespace, then take the maximum over the gold answers.
"""

from __future__ import annotations

import collections
import logging
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score

log = logging.getLogger("mtpeft.metrics")


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and F1: binary F1 of class 1 for two labels, macro-F1 otherwise."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    average = "binary" if num_labels == 2 else "macro"
    return {
        "accuracy": 100.0 * accuracy_score(labels, predictions),
        "f1": 100.0 * f1_score(labels, predictions, average=average, zero_division=0),
    }


def regression_metrics(predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation (x100), plus mean squared error."""
    preds = np.asarray(predictions, dtype=np.float64)
    gold = np.asarray(labels, dtype=np.float64)
    if preds.shape != gold.shape:
        raise ValueError(f"{preds.size} predictions for {gold.size} labels")
    constant = np.ptp(preds) == 0 or np.ptp(gold) == 0
    if gold.size and np.ptp(gold) == 0:  # a collapsed model scores 0 fairly; equal gold scores measure nothing
        log.warning("the %d evaluation scores are all %g: their correlation with any prediction is undefined "
                    "(reported as 0); evaluate on rows with varied scores", gold.size, gold[0])
    return {
        # Correlation with a constant series is undefined; report 0 rather than NaN.
        "pearson": 0.0 if constant else 100.0 * float(stats.pearsonr(preds, gold).statistic),
        "spearman": 0.0 if constant else 100.0 * float(stats.spearmanr(preds, gold).statistic),
        "mse": float(np.mean((preds - gold) ** 2)),
    }


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 over every question in ``references``.

    A question without a prediction scores zero, as in the official script.
    """
    if not references:
        raise ValueError("no reference answers to score against")
    exact = f1 = 0.0
    for qid, golds in references.items():
        if not golds:
            raise ValueError(f"question {qid!r} has no gold answer")
        prediction = predictions.get(qid, "")
        exact += max(_exact_match(prediction, g) for g in golds)
        f1 += max(_token_f1(prediction, g) for g in golds)
    n = len(references)
    return {"exact_match": 100.0 * exact / n, "f1": 100.0 * f1 / n}
