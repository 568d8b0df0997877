"""Extractive question answering (SQuAD v1.1 style).

Long contexts are cut into overlapping windows of ``max_length`` tokens that share
``doc_stride`` tokens. Each window predicts start/end logits; a window's best span is the
highest start+end logit sum with start <= end, both inside the context and at most
``max_answer_length`` tokens long; an example's answer comes from its best window.
Training windows that do not contain the answer point at token 0 (the "no answer here"
position), as in the reference BERT recipe. A task with ``allow_no_answer`` (SQuAD v2.0)
also trains questions without an answer there, and answers "" when the "no answer" logit
sum of the example's windows (the lowest, as in the reference v2.0 recipe) beats its best span.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mtpeft.examples import Example
from mtpeft.heads import SpanHead
from mtpeft.metrics import squad_metrics
from mtpeft.predictions import AnswerPrediction
from mtpeft.tasks.spec import TaskSpec


def _question_limit(spec: TaskSpec, tokenizer) -> int:
    """Tokens a question may keep: ``max_question_length``, fewer where the tokenizer's special
    tokens (4 in a RoBERTa pair; the spec's bound on ``doc_stride`` counts BERT's 3) would leave
    the context no more than ``doc_stride`` tokens, which makes the tokenizer panic."""
    limit = min(spec.max_question_length,
                spec.max_length - tokenizer.num_special_tokens_to_add(pair=True) - spec.doc_stride - 1)
    if limit < 1:
        raise ValueError(f"task {spec.name!r}: max_length={spec.max_length} leaves no room for a question beside "
                         f"doc_stride={spec.doc_stride} and this tokenizer's special tokens; lower doc_stride")
    return limit


def _cut_questions(tokenizer, questions: list[str], max_tokens: int) -> list[str]:
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    cut = []
    for question, offsets in zip(questions, encoded["offset_mapping"]):
        cut.append(question if len(offsets) <= max_tokens else question[: offsets[max_tokens - 1][1]])
    return cut


class WindowAnswer(NamedTuple):
    """One window's best span (``logit``: its start+end logit sum; ``start``/``end``: characters of the
    context) and its "no answer" position, each with its probability among the window's choices."""

    logit: float
    start: int
    end: int
    probability: float
    null_logit: float
    null_probability: float


class ExtractiveQA:
    targets = {"start_position": torch.long, "end_position": torch.long}

    def build_head(self, spec: TaskSpec, hidden_size: int) -> nn.Module:
        return SpanHead(hidden_size)

    def encode(self, spec: TaskSpec, tokenizer, examples: Sequence[Example]) -> list[dict]:
        questions = _cut_questions(tokenizer, [ex.text.lstrip() for ex in examples], _question_limit(spec, tokenizer))
        contexts = [ex.text_pair or "" for ex in examples]
        marked = {c for c in set(contexts) if any(unicodedata.category(ch)[0] == "M" for ch in c)}
        encoded = tokenizer(questions, contexts, truncation="only_second", max_length=spec.max_length,
                            stride=spec.doc_stride, return_overflowing_tokens=True,
                            return_offsets_mapping=True, padding=False)
        features = []
        for i, input_ids in enumerate(encoded["input_ids"]):
            index = encoded["overflow_to_sample_mapping"][i]
            sequence_ids = encoded.sequence_ids(i)
            # Character span of each context token; None for question and special tokens.
            offsets = [tuple(o) if s == 1 else None for o, s in zip(encoded["offset_mapping"][i], sequence_ids)]
            if contexts[index] in marked:
                offsets = _with_marks(offsets, contexts[index])
            feature = {"input_ids": input_ids, "example": index, "offsets": offsets}
            if "token_type_ids" in encoded:
                feature["token_type_ids"] = encoded["token_type_ids"][i]
            answers = examples[index].answers
            if answers:
                feature["start_position"], feature["end_position"] = _token_span(offsets, answers[0])
            elif spec.allow_no_answer:  # unanswerable (or unlabelled, where the targets go unused)
                feature["start_position"] = feature["end_position"] = 0
            features.append(feature)
        return features

    def loss(self, spec: TaskSpec, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs.float()  # (B, T, 2)
        start = F.cross_entropy(logits[..., 0], batch["start_position"])
        end = F.cross_entropy(logits[..., 1], batch["end_position"])
        return (start + end) / 2

    def summarize(self, spec: TaskSpec, outputs: torch.Tensor, features) -> list:
        logits = outputs.float()
        batch, length = logits.shape[:2]
        # Which tokens belong to the context: one row per feature, padded with False.
        context = torch.tensor([[span is not None for span in f["offsets"]] + [False] * (length - len(f["offsets"]))
                                for f in features], dtype=torch.bool)
        start, end = logits[..., 0].cpu(), logits[..., 1].cpu()
        spans = start.unsqueeze(2) + end.unsqueeze(1)  # (B, T_start, T_end)
        allowed = torch.triu(torch.ones(length, length, dtype=torch.bool))
        allowed &= ~torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=spec.max_answer_length)
        allowed = allowed.unsqueeze(0) & context.unsqueeze(2) & context.unsqueeze(1)
        spans = spans.masked_fill(~allowed, float("-inf"))
        flat = spans.view(batch, -1)
        best_logit, best_index = flat.max(dim=1)
        null_logit = start[:, 0] + end[:, 0]
        # Probability of the best span against every allowed span and "no answer here".
        normaliser = torch.logsumexp(torch.cat([flat, null_logit.unsqueeze(1)], dim=1), dim=1)
        summaries = []
        for row, feature in enumerate(features):
            if not torch.isfinite(best_logit[row]):
                summaries.append(None)  # window without context tokens
                continue
            s, e = divmod(int(best_index[row]), length)
            summaries.append(WindowAnswer(float(best_logit[row]), feature["offsets"][s][0], feature["offsets"][e][1],
                                          float(torch.exp(best_logit[row] - normaliser[row])), float(null_logit[row]),
                                          float(torch.exp(null_logit[row] - normaliser[row]))))
        return summaries

    def predict(self, spec: TaskSpec, summaries: Sequence[WindowAnswer | None], features, examples) -> list[AnswerPrediction]:
        best: dict[int, WindowAnswer] = {}  # example -> its window with the best span
        null: dict[int, WindowAnswer] = {}  # example -> its window least sure there is no answer
        for summary, feature in zip(summaries, features):
            if summary is None:
                continue
            index = feature["example"]
            if index not in best or summary.logit > best[index].logit:
                best[index] = summary
            if index not in null or summary.null_logit < null[index].null_logit:
                null[index] = summary
        predictions = []
        for index, example in enumerate(examples):
            if index not in best:
                predictions.append(AnswerPrediction(spec.name, "", 0, 0, 0.0))
            elif spec.allow_no_answer and null[index].null_logit > best[index].logit:
                predictions.append(AnswerPrediction(spec.name, "", 0, 0, null[index].null_probability))
            else:
                span = best[index]
                predictions.append(AnswerPrediction(spec.name, (example.text_pair or "")[span.start:span.end],
                                                    span.start, span.end, span.probability))
        return predictions

    def score(self, spec: TaskSpec, predictions, examples) -> dict[str, float]:
        # Keyed by position: ids need not be unique (or present), and every example counts once.
        keys = [f"#{i} {ex.id}".rstrip() for i, ex in enumerate(examples)]
        return squad_metrics({k: p.answer for k, p in zip(keys, predictions)},
                             {k: [a["text"] for a in ex.answers] for k, ex in zip(keys, examples)},
                             allow_no_answer=spec.allow_no_answer)


def _with_marks(offsets: list, context: str) -> list:
    """Token spans that take in the combining marks after them that no token holds: an uncased
    tokenizer drops them (decomposed "Cafe" + U+0301 is "cafe"), which cut them off answers."""
    starts = {span[0] for span in offsets if span is not None}
    extended = []
    for span in offsets:
        if span is not None:
            end = span[1]
            while end < len(context) and end not in starts and unicodedata.category(context[end])[0] == "M":
                end += 1
            span = (span[0], end)
        extended.append(span)
    return extended


def _token_span(offsets: list, answer: dict) -> tuple[int, int]:
    """Token indices of ``answer`` in a window, or (0, 0) when the window does not hold it."""
    text = answer["text"]
    start_char = int(answer["answer_start"])
    if text.strip():  # no token holds a space: one at an answer's edge put it outside its window
        start_char += len(text) - len(text.lstrip())
        text = text.strip()
    end_char = start_char + len(text)
    context_tokens = [t for t, span in enumerate(offsets) if span is not None]
    if not context_tokens or offsets[context_tokens[0]][0] > start_char or offsets[context_tokens[-1]][1] < end_char:
        return 0, 0
    start = next(t for t in context_tokens if offsets[t][1] > start_char)
    end = next(t for t in reversed(context_tokens) if offsets[t][0] < end_char)
    return start, end
