"""TaskSpec: everything that defines a task apart from its weights; saved as task.json."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

TASK_TYPES = ("classification", "pair-classification", "regression", "extractive-qa")
PRIMARY_METRIC = {
    "classification": "accuracy",
    "pair-classification": "f1",
    "regression": "spearman",
    "extractive-qa": "f1",
}
TRUNCATIONS = ("head", "head+tail")
PAIR_ENCODINGS = ("cross", "bi")


class UnknownTaskError(KeyError):
    """A task name that is not known; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


# No '.': a task name is a key of torch module dicts and of PEFT-layout state-dict paths.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Folders a bundle keeps beside its task folders (a learned router, train-joint's run state):
# a task of that name would be overwritten by them.
RESERVED_NAMES = ("router", "joint")


@dataclass
class TaskSpec:
    """A task's type, inputs, labels and limits. One name = one adapter = one head.

    Attributes:
        name: the task's name; also its adapter's and head's name and its folder name.
        type: one of ``classification``, ``pair-classification``, ``regression``, ``extractive-qa``.
        labels: class names, index = class id (classification types).
        text_column: column of the text, first sentence, or QA question.
        text_pair_column: column of the second sentence or QA context.
        label_column: column of the label, score, or QA answers.
        max_length: tokens per input (per window for QA); by default 384 for extractive QA
            (SQuAD's usual window), 128 otherwise.
        truncation: ``head`` keeps the start of long texts; ``head+tail`` keeps
            ``head_tokens`` from the start and the rest from the end (long reviews put their
            verdict at the end).
        head_tokens: tokens kept from the start with ``head+tail``.
        doc_stride: QA: tokens of overlap between consecutive context windows; by default a
            third of ``max_length`` (128 at 384), kept below what a window leaves for context.
        max_answer_length: QA: longest answer span, in tokens.
        max_question_length: QA: questions are cut to this many tokens (fewer where a tokenizer's
            special tokens, 4 in a RoBERTa pair, would leave no more than ``doc_stride`` for context);
            by default 64, or half of ``max_length`` below 128 tokens.
        allow_no_answer: QA: a question may have no answer in its context (SQuAD v2.0 style:
            ``answers`` is ``[]``); such rows train the "no answer" position, and a prediction
            is "" when that outscores every span.
        label_range: regression: ``[low, high]`` of the gold scores, used to scale targets.
        pooling: ``mean``, ``cls`` or ``last`` (decoders) for pooled heads.
        head_dropout: dropout before a pooled head's linear layer, in training.
        pair_encoding: ``cross`` joins a pair into one input (a cross-encoder);
            ``bi`` encodes each text alone and compares their embeddings (cosine).
        metric: the primary metric that model selection and tables use.
        description: one line saying what the task does (model cards, routing).
    """

    name: str
    type: str
    labels: list[str] | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int | None = None
    truncation: str = "head"
    head_tokens: int = 128
    doc_stride: int | None = None
    max_answer_length: int = 30
    max_question_length: int | None = None
    allow_no_answer: bool = False
    label_range: list[float] | None = None
    pooling: str = "mean"
    head_dropout: float = 0.1
    pair_encoding: str = "cross"
    metric: str = ""
    description: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"task name {self.name!r}: use 1-64 letters, digits, '_', '-', starting with a letter or digit")
        if self.name in RESERVED_NAMES:
            raise ValueError(f"task name {self.name!r} is a folder every bundle may hold; choose another name")
        if self.type not in TASK_TYPES:
            raise ValueError(f"task {self.name!r}: unknown type {self.type!r}; choose one of {TASK_TYPES}")
        if self.type in ("classification", "pair-classification"):
            if not self.labels or len(self.labels) < 2:
                raise ValueError(f"task {self.name!r}: a {self.type} task needs at least two labels (labels=...)")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"task {self.name!r}: duplicate labels in {self.labels}")
        if self.type in ("pair-classification", "extractive-qa") and not self.text_pair_column:
            raise ValueError(f"task {self.name!r}: a {self.type} task needs text_pair_column")
        if self.allow_no_answer and self.type != "extractive-qa":
            raise ValueError(f"task {self.name!r}: allow_no_answer is for extractive-qa tasks, not {self.type}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"task {self.name!r}: truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")
        if self.pair_encoding not in PAIR_ENCODINGS:
            raise ValueError(f"task {self.name!r}: pair_encoding must be one of {PAIR_ENCODINGS}, got {self.pair_encoding!r}")
        if self.pair_encoding == "bi" and (self.type == "extractive-qa" or not self.text_pair_column):
            raise ValueError(f"task {self.name!r}: pair_encoding='bi' needs a pair task (text_pair_column) that is not QA")
        if self.max_length is None:
            self.max_length = 384 if self.type == "extractive-qa" else 128
        if self.max_length < 8:
            raise ValueError(f"task {self.name!r}: max_length={self.max_length} is too small (>= 8)")
        if self.max_question_length is None:
            # 64 left a window under 68 tokens no room for context: refused, with no flag to lower it.
            self.max_question_length = min(64, self.max_length // 2)
        if self.truncation == "head+tail" and self.is_pair:  # QA tasks are pairs too
            # Pairs are cut longest-first and QA contexts split into windows: it would be ignored.
            raise ValueError(f"task {self.name!r}: truncation='head+tail' is for single texts, not a {self.type} "
                             "task (pairs are cut longest first, QA contexts split into windows)")
        # Counts that would otherwise silently index from the end (head+tail cut points, question
        # cut) or fail deep inside the tokenizer (a negative stride).
        for field_name, least in (("head_tokens", 0), ("max_answer_length", 1), ("max_question_length", 1)):
            if getattr(self, field_name) < least:
                raise ValueError(f"task {self.name!r}: {field_name} must be >= {least}, got {getattr(self, field_name)}")
        if self.doc_stride is not None and self.doc_stride < 0:
            raise ValueError(f"task {self.name!r}: doc_stride must be >= 0, got {self.doc_stride}")
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"task {self.name!r}: head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.doc_stride is None:
            self.doc_stride = max(1, min(self.max_length // 3, self.max_length - self.max_question_length - 4))
        if self.type == "extractive-qa" and self.doc_stride >= self.max_length - self.max_question_length - 3:
            raise ValueError(
                f"task {self.name!r}: doc_stride={self.doc_stride} must be smaller than "
                f"max_length - max_question_length - 3 = {self.max_length - self.max_question_length - 3}")
        if self.label_range is not None and (len(self.label_range) != 2 or self.label_range[0] >= self.label_range[1]):
            raise ValueError(f"task {self.name!r}: label_range must be [low, high] with low < high, got {self.label_range}")
        if not self.metric:
            self.metric = PRIMARY_METRIC[self.type]

    @property
    def is_pair(self) -> bool:
        return self.text_pair_column is not None

    @property
    def is_bi_encoder(self) -> bool:
        return self.is_pair and self.pair_encoding == "bi"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TaskSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"task spec has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)
