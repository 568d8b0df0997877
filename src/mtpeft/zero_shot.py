"""Zero-shot scores: what the bare backbone does with no trained parameter at all.

Sentence-embedding backbones (all-MiniLM) are trained so that the cosine of two
mean-pooled embeddings says how alike two texts are. So, with no gradient step:

- regression on pairs (STS-B): the score is the pair's cosine (scaled to the label range;
  Pearson/Spearman do not depend on the scale);
- classification of one text (SST-2, IMDb): the label whose description's embedding is
  nearest to the text's;
- classification of pairs (MRPC): "positive" (the last label) when the cosine is at least a
  threshold. Labels are needed for that one number: it is the threshold with the best
  accuracy on the training examples, and the result says so;
- extractive QA has no zero-shot form here (``MethodNotApplicable``).

Label descriptions come from ``spec.extra["label_descriptions"]`` (label -> text), else the
built-in ones below for the preset tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mtpeft.batching import bucketed_batches, pad_sequences
from mtpeft.examples import Example
from mtpeft.heads import pool
from mtpeft.methods import MethodNotApplicable
from mtpeft.metrics import classification_metrics, regression_metrics
from mtpeft.model import MultiTaskModel
from mtpeft.precision import autocast, resolve_bf16
from mtpeft.router_data import spread
from mtpeft.tasks import TaskSpec
from mtpeft.tasks.base import encode_sequences

_REVIEW = {"negative": "A negative review: the writer disliked the movie, it was bad, boring and disappointing.",
           "positive": "A positive review: the writer loved the movie, it was good, moving and enjoyable."}
LABEL_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "sst2": _REVIEW,
    "imdb": _REVIEW,
    "sentiment": {"negative": "An angry, unhappy customer complaining about a problem.",
                  "neutral": "A customer asking a plain question, neither happy nor unhappy.",
                  "positive": "A happy, grateful customer praising the service."},
}
THRESHOLD_FIT_EXAMPLES = 4000  # training pairs, taken evenly across the set, to fit the pair-classification threshold


def label_descriptions(spec: TaskSpec) -> list[str]:
    """One description per label of ``spec``, in label order."""
    table = spec.extra.get("label_descriptions") or LABEL_DESCRIPTIONS.get(spec.name)
    if not table:
        raise MethodNotApplicable(
            f"zero-shot classification of task {spec.name!r} needs a description per label: "
            f"set spec.extra['label_descriptions'] = {{label: text}} for labels {spec.labels}")
    missing = [label for label in spec.labels if label not in table]
    if missing:
        raise MethodNotApplicable(f"task {spec.name!r}: no zero-shot description for labels {missing}")
    return [table[label] for label in spec.labels]


@torch.inference_mode()
def embed(model: MultiTaskModel, spec: TaskSpec, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings of the bare backbone, (N, H) float32 on the CPU.

    Texts are tokenised as ``spec`` tokenises them (its ``max_length`` and truncation, e.g.
    IMDb's head+tail), one text per sequence.
    """
    single = TaskSpec(name="embed", type="regression", max_length=spec.max_length, truncation=spec.truncation,
                      head_tokens=spec.head_tokens)
    features = encode_sequences(single, model.tokenizer, [Example(text=t) for t in texts])
    device = model.device
    use_bf16 = resolve_bf16(model.bf16, device)
    out = torch.zeros(len(features), model.identity.hidden_size)
    model.eval()
    for indices in bucketed_batches([len(f["input_ids"]) for f in features], batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in pad_sequences([features[i] for i in indices],
                                                           model.tokenizer.pad_token_id).items()}
        with autocast(device, use_bf16):
            hidden = model.encode(batch, None)  # (B, T, H): no adapter
        out[indices] = F.normalize(pool(hidden.float(), batch["attention_mask"], "mean"), dim=-1).cpu()
    return out


def _pair_cosines(model: MultiTaskModel, spec: TaskSpec, examples: Sequence[Example], batch_size: int) -> torch.Tensor:
    first = embed(model, spec, [ex.text for ex in examples], batch_size)
    second = embed(model, spec, [ex.text_pair or "" for ex in examples], batch_size)
    return (first * second).sum(-1)  # (N,) cosines of unit vectors


def best_threshold(cosines: torch.Tensor, labels: Sequence[int]) -> float:
    """The cosine threshold (predict 1 at or above it) with the highest accuracy on these pairs."""
    order = torch.argsort(cosines)
    values = cosines[order].tolist()
    gold = torch.tensor([int(labels[i]) for i in order.tolist()])
    n, positives = len(values), int(gold.sum())
    # Threshold just above values[k-1]: the k lowest predict 0. Correct = zeros below + ones at/above.
    zeros_below = torch.cat([torch.zeros(1), torch.cumsum(1 - gold, 0).float()])  # (n + 1,)
    ones_below = torch.cat([torch.zeros(1), torch.cumsum(gold, 0).float()])
    correct = zeros_below + (positives - ones_below)
    # A cut between two equal cosines cannot be made by one threshold: tied pairs fall on one side.
    values_t = torch.tensor(values)
    correct[1:n][values_t[1:] == values_t[:-1]] = -1
    k = int(torch.argmax(correct))
    if k == 0:
        return values[0] - 1e-6
    if k == n:
        return values[-1] + 1e-6
    # Cosines are compared in their own dtype: a midpoint of two neighbouring float32 values
    # rounds to one of them, and rounded down it puts values[k - 1] on the positive side.
    middle = torch.tensor((values[k - 1] + values[k]) / 2, dtype=cosines.dtype).item()
    return middle if middle > values[k - 1] else values[k]


def check_applicable(spec: TaskSpec) -> None:
    """Raise ``MethodNotApplicable`` where ``spec`` has no zero-shot form. Decided from the spec
    alone, so that a grid says so before it reads data or starts a run's process."""
    if spec.type == "extractive-qa":
        raise MethodNotApplicable(f"task {spec.name!r}: extractive QA has no zero-shot form (it needs a span head)")
    if spec.type == "regression":
        if not spec.is_pair:
            raise MethodNotApplicable(f"task {spec.name!r}: zero-shot regression needs text pairs (a cosine)")
    elif spec.is_pair:
        if len(spec.labels) != 2:
            raise MethodNotApplicable(f"task {spec.name!r}: zero-shot pair classification needs two labels")
    else:
        label_descriptions(spec)


def zero_shot_scores(model: MultiTaskModel, spec: TaskSpec, eval_examples: Sequence[Example],
                     train_examples: Sequence[Example] = (), batch_size: int = 64) -> tuple[dict[str, float], dict]:
    """The task's metrics on ``eval_examples`` without training, and how they were made."""
    check_applicable(spec)
    if spec.type == "regression":
        low, high = spec.label_range or (0.0, 1.0)
        cosines = _pair_cosines(model, spec, eval_examples, batch_size)
        predictions = (low + (high - low) * cosines).tolist()
        return regression_metrics(predictions, [float(ex.label) for ex in eval_examples]), {
            "rule": "score = low + (high - low) * cosine(mean-pooled embeddings)"}
    gold = [int(ex.label) for ex in eval_examples]
    if spec.is_pair:
        train = list(train_examples)
        fit = spread(train, THRESHOLD_FIT_EXAMPLES) if train else []  # not the first ones: files are often sorted by label
        if not fit:
            raise MethodNotApplicable(f"task {spec.name!r}: the cosine threshold is fit on training pairs; none given")
        threshold = best_threshold(_pair_cosines(model, spec, fit, batch_size), [int(ex.label) for ex in fit])
        predicted = (_pair_cosines(model, spec, eval_examples, batch_size) >= threshold).long().tolist()
        return classification_metrics(predicted, gold, 2), {
            "rule": f"{spec.labels[1]!r} when cosine >= threshold", "threshold": round(threshold, 6),
            "threshold_fit_on": f"{len(fit)} of {len(train)} training pairs, taken evenly across them (uses their labels)"}
    descriptions = label_descriptions(spec)
    texts = embed(model, spec, [ex.text for ex in eval_examples], batch_size)
    labels = embed(model, spec, descriptions, batch_size)
    predicted = (texts @ labels.T).argmax(-1).tolist()  # (N,) nearest description
    return classification_metrics(predicted, gold, len(spec.labels)), {
        "rule": "nearest label-description embedding", "label_descriptions": dict(zip(spec.labels, descriptions))}
