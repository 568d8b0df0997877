"""The customer-support pipeline: one message in, sentiment + similar FAQ questions + answer out.

1. Sentiment of the message (a text classification task).
2. The ``top_k`` FAQ entries nearest to the message by bare-backbone cosine (``FaqIndex``:
   question + context as one text, and the context's closest sentence), re-ranked by the
   similarity task's score for each
   ``(message, FAQ question)`` pair. The sentiment row and the pair rows go through one
   mixed-task ``run`` call.
3. The answer span by the QA task from the context of the entry retrieval ranks first;
   ``no_answer`` when its probability is below ``answer_threshold`` (a wrong span stated
   confidently is worse than "see the FAQ entry").

Why the answer does not come from the re-ranked list's first entry: the similarity task
compares the message with FAQ *questions* (paraphrase detection), while customers often
ask about a detail that only an entry's context names. On the 40 answerable QA questions
the demo holds out, the retrieval's first entry is the right one for 67.5 %, the re-ranked
list's first for 42.5 % (``benchmarks/support_eval.py``, ``results/support_eval.json``).

``answer(model, message)`` is the one-call Python entry point (``model.support`` in spirit);
the HTTP server passes its own ``run``/``embed`` so these rows share micro-batches.
"""

from __future__ import annotations

import logging
import numbers
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from mtpeft.data import is_blank
from mtpeft.embeddings import embed_texts
from mtpeft.examples import Example
from mtpeft.faq import FaqEntry, FaqIndex, faq_entries, is_unicode, load_faq, packaged_faq_path
from mtpeft.predictions import AnswerPrediction, LabelPrediction, Prediction, ScorePrediction
from mtpeft.tasks import TaskSpec
from mtpeft.tasks.spec import UnknownTaskError

if TYPE_CHECKING:
    from mtpeft.model import MultiTaskModel

Run = Callable[[Sequence[tuple[str, Example]]], list[Prediction]]
Embed = Callable[..., torch.Tensor]  # embed(texts, **embed_texts options) -> (N, H)

log = logging.getLogger("mtpeft.support")
REINDEX_RETRY_S = 60  # seconds between tries to re-index an edited FAQ whose embedding failed


@dataclass
class SimilarQuestion:
    """An FAQ question close to the message: ``score`` from the similarity task, ``retrieval_score`` the
    index's (``FaqIndex.scores``: the mean of two cosines)."""

    id: str
    question: str
    score: float
    retrieval_score: float


@dataclass
class SupportAnswer:
    """The answer span ``context[start:end]`` from the best FAQ entry; ``no_answer`` below the threshold,
    or when the QA task found no answer there (``text`` empty, ``score`` the probability of that)."""

    text: str
    score: float
    start: int
    end: int
    no_answer: bool
    faq_id: str
    question: str
    context: str


@dataclass
class SupportReply:
    message: str
    sentiment: LabelPrediction
    similar: list[SimilarQuestion]
    answer: SupportAnswer

    def to_dict(self) -> dict:
        return {"message": self.message, "sentiment": self.sentiment.to_dict(),
                "similar": [asdict(s) for s in self.similar], "answer": asdict(self.answer)}


def match_score(prediction: Prediction, spec: TaskSpec) -> float:
    """How much a pair prediction says "same question", in [0, 1].

    Pair classification: the probability of the last label (by convention the positive
    class, e.g. ``duplicate``; a bi-encoder head grows it with the cosine). Regression:
    the score scaled by the task's ``label_range``.
    """
    if isinstance(prediction, LabelPrediction):
        return prediction.probabilities[spec.labels[-1]]
    if isinstance(prediction, ScorePrediction):
        low, high = spec.label_range or (0.0, 1.0)
        return min(max((prediction.score - low) / (high - low), 0.0), 1.0)
    raise ValueError(f"task {spec.name!r} gives {type(prediction).__name__}; a similarity task must score pairs")


def _check_task(model: MultiTaskModel, name: str, role: str, types: tuple[str, ...], pair: bool | None) -> TaskSpec:
    if name not in model.specs:  # a bundle without the three skills (a joint model, one task)
        raise UnknownTaskError(f"the support pipeline needs a {role} task named {name!r}, which this model does not "
                               f"hold (its tasks: {sorted(model.specs) or 'none'}); `mtpeft demo` trains all three "
                               f"skills, or pass {role.lower()}_task= the name of yours (Python)")
    spec = model.spec(name)
    if spec.type not in types or (pair is not None and spec.is_pair != pair):
        fitting = sorted(n for n, s in model.specs.items() if s.type in types and (pair is None or s.is_pair == pair))
        raise ValueError(f"{role} task {name!r} is a {spec.type} task; it must be {' or '.join(types)}"
                         f"{' on pairs' if pair else ''}; tasks that fit: {fitting or 'none'}")
    return spec


def _check_top_k(top_k) -> None:
    """0 would leave no entry to answer from; 2.0 (a number read from JSON) failed deep in the search."""
    if not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"top_k must be >= 1 (a whole number), got {top_k!r}")


class SupportPipeline:
    """Sentiment, FAQ retrieval re-ranked by a similarity task, and extractive answers, on one model.

    ``faq`` is a file (see ``load_faq``), a list of ``FaqEntry`` or of dict rows with
    ``question`` and ``context`` (or ``answer``), or ``None`` for the packaged demo FAQ.

    A file is watched: when its size or modification time changes, the next ``answer``
    reads it again and rebuilds the index, so an edited FAQ needs no restart. An edit that
    does not load (a malformed row, an empty file) is logged and the last good FAQ stays in
    use; it is tried again when the file changes again. A re-index that fails on the model's
    side (a timeout) also keeps the last good FAQ, and is tried again a minute later.
    """

    def __init__(self, model: MultiTaskModel, faq: Sequence[FaqEntry | dict] | str | os.PathLike | None = None,
                 sentiment_task: str = "sentiment", similarity_task: str = "similar-questions",
                 qa_task: str = "faq-answer", top_k: int = 5, answer_threshold: float = 0.3) -> None:
        _check_top_k(top_k)
        if not 0.0 <= answer_threshold <= 1.0:  # a probability: 30 (meant as %) would refuse every answer
            raise ValueError(f"answer_threshold must be a probability in [0, 1], got {answer_threshold}")
        self.model = model
        self.sentiment_task, self.similarity_task, self.qa_task = sentiment_task, similarity_task, qa_task
        _check_task(model, sentiment_task, "sentiment", ("classification",), pair=False)
        self.similarity_spec = _check_task(model, similarity_task, "similarity",
                                           ("pair-classification", "regression"), pair=True)
        _check_task(model, qa_task, "QA", ("extractive-qa",), pair=None)
        self.top_k, self.answer_threshold = top_k, answer_threshold
        self._refresh_lock = threading.Lock()
        self._retry_at = 0.0  # monotonic time before which a failed re-index is not tried again
        if faq is None or isinstance(faq, (str, os.PathLike)):
            # only None means the demo FAQ: an empty path (an unset variable) must not serve it to customers
            self.faq_path: str | None = os.fspath(packaged_faq_path() if faq is None else faq)
            self._stamp = _file_stamp(self.faq_path)
            entries = load_faq(self.faq_path)
        else:
            self.faq_path, self._stamp = None, None
            entries = faq_entries(faq)
        self.index = _build_index(model, entries)

    @property
    def entries(self) -> list[FaqEntry]:
        return self.index.entries

    def answer(self, message: str, *, run: Run | None = None, embed: Embed | None = None,
               top_k: int | None = None) -> SupportReply:
        """Sentiment, similar FAQ questions and the answer for one customer message.

        ``run``/``embed`` reach the model (default: ``model.run`` and bare-backbone
        ``embed_texts``); a server passes its micro-batcher and its model thread.
        """
        if not isinstance(message, str) or is_blank(message):
            raise ValueError("the message is empty; pass the customer's text")
        if not is_unicode(message):
            raise ValueError("the message is not valid Unicode text: it holds a lone surrogate")
        top_k = self.top_k if top_k is None else top_k
        _check_top_k(top_k)
        run = run or self.model.run
        embed = embed or (lambda texts, **options: embed_texts(self.model, texts, **options))
        self.refresh(embed)
        hits = self.index.search(embed([message])[0], top_k)
        items = [(self.sentiment_task, Example(text=message))]
        items += [(self.similarity_task, Example(text=message, text_pair=entry.question)) for entry, _ in hits]
        sentiment, *matches = run(items)
        similar = sorted((SimilarQuestion(entry.id, entry.question, match_score(p, self.similarity_spec), cosine)
                          for (entry, cosine), p in zip(hits, matches)),
                         key=lambda s: (-s.score, -s.retrieval_score))
        best = hits[0][0]  # see the module docstring: retrieval picks the answer's entry
        span: AnswerPrediction = run([(self.qa_task, Example(text=message, text_pair=best.context))])[0]
        no_answer = span.score < self.answer_threshold or not span.answer.strip()
        answer = SupportAnswer(span.answer, span.score, span.start, span.end, no_answer, best.id, best.question,
                               best.context)
        return SupportReply(message, sentiment, similar, answer)

    def refresh(self, embed: Embed | None = None) -> bool:
        """Reload the FAQ file and rebuild the index if the file changed since it was read; True if it did.

        A stat per call (microseconds); the rebuild embeds every entry once. Callers in other
        threads wait for a rebuild in progress rather than answer from a half-swapped index.
        """
        if self.faq_path is None or _file_stamp(self.faq_path) == self._stamp or time.monotonic() < self._retry_at:
            return False
        with self._refresh_lock:
            stamp = _file_stamp(self.faq_path)
            if stamp == self._stamp or time.monotonic() < self._retry_at:  # another thread got here first
                return False
            try:
                entries = load_faq(self.faq_path)
                if not entries:
                    raise ValueError("the file holds no entries")
            except Exception as err:  # whatever a bad edit raises (JSON nested too deep: RecursionError), not a 500 per request
                self._stamp = stamp  # a bad edit is reported once, not on every request
                log.warning("FAQ %s changed but does not load, still answering from the last good one: %s",
                            self.faq_path, err)
                return False
            try:
                index = _build_index(self.model, entries, embed)
            except Exception as err:  # the model's side (a server's model thread timing out): the FAQ may be fine
                # Not on every request: each try embeds the whole FAQ again, in the way of other work.
                self._retry_at = time.monotonic() + REINDEX_RETRY_S
                log.warning("FAQ %s changed but could not be re-indexed (%s: %s); still answering from the last "
                            "good one, trying again in %d s", self.faq_path, type(err).__name__, err, REINDEX_RETRY_S)
                return False
            self._stamp = stamp
            self.index = index
            log.info("FAQ %s reloaded: %d entries", self.faq_path, len(index.entries))
            return True


def _file_stamp(path: str) -> tuple[int, ...] | None:
    """What changes when the file is edited or replaced; None while it is missing (mid-replace).

    Not only mtime and size: a same-size file copied in with its mtime kept (``cp -p``,
    ``rsync -t``, stores that fix every mtime) changes neither, but its inode or ctime.
    """
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size


def _build_index(model: MultiTaskModel, entries: list[FaqEntry], embed: Embed | None = None) -> FaqIndex:
    if not entries:
        raise ValueError("the FAQ is empty; pass entries with a question and a context")
    return FaqIndex.build(model, entries, embed=embed)


def _pipelines(model: MultiTaskModel) -> dict:
    """The model's cached pipelines, kept on the model: a global map from models to pipelines
    (which hold their model) would keep every model alive for the life of the process."""
    return vars(model).setdefault("_support_pipelines", {})


def answer(model: MultiTaskModel, message: str, faq: str | os.PathLike | None = None, top_k: int | None = None,
           **settings) -> SupportReply:
    """One call from a loaded bundle to a support reply; the FAQ index is built once per model and FAQ file.

    ``settings`` go to ``SupportPipeline`` (task names, ``answer_threshold``). ``top_k`` goes to each
    call (default the pipeline's 5): as a cache key, every new value embedded the FAQ again.
    """
    key = (str(packaged_faq_path() if faq is None else faq), tuple(sorted(settings.items())))
    cache = _pipelines(model)
    if key not in cache:
        cache[key] = SupportPipeline(model, faq, **settings)
    return cache[key].answer(message, top_k=top_k)
