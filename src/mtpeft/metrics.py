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
    if not gold.size:  # np.ptp failed on it with a bare numpy message
        raise ValueError("no labelled scores to correlate with")
    constant = np.ptp(preds) == 0 or np.ptp(gold) == 0
    if np.ptp(gold) == 0:  # a collapsed model scores 0 fairly; equal gold scores measure nothing
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


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                  allow_no_answer: bool = False) -> dict[str, float]:
    """SQuAD exact match and F1 over every question in ``references``.

    A question without a prediction scores zero, as in the official v1.1 script. With
    ``allow_no_answer`` (SQuAD v2.0), a question whose gold list is empty scores 1 for an
    empty prediction and 0 for any other, and the scores are also given for the answerable
    (``has_answer_*``) and unanswerable (``no_answer_*``) questions apart, as the v2.0 script does.
    """
    if not references:
        raise ValueError("no reference answers to score against")
    scores = {}
    for qid, golds in references.items():
        if not golds and not allow_no_answer:
            raise ValueError(f"question {qid!r} has no gold answer")
        prediction = predictions.get(qid)
        if prediction is None:  # not scored as "", which matched "no answer" or a gold answer normalised to ""
            scores[qid] = (0.0, 0.0)
        elif not golds:
            found = float(not normalize_answer(prediction))
            scores[qid] = (found, found)
        else:
            scores[qid] = (max(_exact_match(prediction, g) for g in golds), max(_token_f1(prediction, g) for g in golds))
    result = _mean_scores(scores.values())
    unanswerable = [qid for qid, golds in references.items() if not golds]
    if allow_no_answer and unanswerable:
        for part, ids in (("has_answer", [q for q in references if references[q]]), ("no_answer", unanswerable)):
            if ids:
                result |= {f"{part}_{k}": v for k, v in _mean_scores([scores[q] for q in ids]).items()}
            result[f"{part}_examples"] = len(ids)
    return result


def _mean_scores(pairs) -> dict[str, float]:
    pairs = list(pairs)
    return {"exact_match": 100.0 * sum(e for e, _ in pairs) / len(pairs), "f1": 100.0 * sum(f for _, f in pairs) / len(pairs)}
