"""Which task an input is for.

Precedence: an explicit task always wins; then a ``LearnedRouter``; the ``ShapeRouter``
(rules) is only the documented fallback for bundles without a trained router.

The learned router is a linear softmax classifier over frozen backbone embeddings (no
adapter, so no task is favoured), hashed words and word pairs (a mean-pooled embedding
dilutes cue words such as "FAQ" or "duplicate"; adding them took held-out accuracy from
98.8 % to 99.2 %, ``benchmarks/router_accuracy.py``) and the input's shape.

The shape is also a hard constraint: a ``{"question", "context"}`` dict can only go to QA
tasks and a pair only to pair tasks. A plain string may go to any task (a request such as
"are these two questions asking the same thing?" is text), or to "no task" when the
router was trained with off-topic examples. Below ``threshold`` it answers no task, with
the candidates, rather than guess.

Saved as ``router/`` in a bundle: ``router.safetensors`` (weight, bias) and
``router.json`` (classes, shapes, threshold, backbone identity). Never pickles.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from mtpeft.embeddings import embed_texts
from mtpeft.storage import BUNDLE_FILE, read_bundle_file, record_in_manifest, write_json, write_safetensors
from mtpeft.tasks import TaskSpec

if TYPE_CHECKING:
    from mtpeft.model import ModelInput, MultiTaskModel

NO_TASK = "(none)"  # the "matches no task" class; parentheses keep it from clashing with a task name
SHAPES = ("text", "pair", "qa")
ROUTER_DIR = "router"
ROUTER_FILE = "router.json"
ROUTER_KEYS = ("classes", "shapes", "threshold", "backbone")  # what load reads without a default
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_FORMAT = "mtpeft-router/1"
DEFAULT_THRESHOLD = 0.5
LEXICAL_DIMS = 1024  # hashed unigrams + bigrams; chosen with C by 5-fold CV on the training examples


def input_shape(value: ModelInput) -> str:
    """``text``, ``pair`` or ``qa``: what kind of task an input can go to."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return "pair"
    if isinstance(value, dict):
        if {"question", "context"} <= set(value):
            return "qa"
        if {"text", "text_pair"} <= set(value):
            return "pair"
        if "text" in value:
            return "text"
    raise ValueError(f"cannot route a {type(value).__name__}: pass a string, a pair [a, b] "
                     "or {'question': ..., 'context': ...}")


def task_shape(spec: TaskSpec) -> str:
    if spec.type == "extractive-qa":
        return "qa"
    return "pair" if spec.is_pair else "text"


def routing_texts(value: ModelInput) -> list[str]:
    """The texts whose embeddings describe an input: a QA context is shared by many
    questions and says little about the request, so only the question counts."""
    shape = input_shape(value)
    if shape == "qa":
        return [str(value["question"])]
    if shape == "pair":
        return [str(value["text"]), str(value["text_pair"])] if isinstance(value, dict) else [str(v) for v in value]
    return [value["text"] if isinstance(value, dict) else value]


def lexical_features(values: Sequence[ModelInput], dims: int = LEXICAL_DIMS) -> torch.Tensor:
    """(N, dims) L2-normalised presence of hashed lower-cased words and word pairs.

    crc32 rather than Python's ``hash``: the same word must land in the same column in
    every process, or a saved router would read garbage.
    """
    out = torch.zeros(len(values), dims)
    for i, value in enumerate(values):
        words = re.findall(r"\w+", " ".join(routing_texts(value)).lower())
        for gram in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
            out[i, zlib.crc32(gram.encode()) % dims] = 1.0
    return torch.nn.functional.normalize(out, dim=1)


@dataclass
class RouteDecision:
    """The task for one input (``None``: no task matched) and how sure the router is.

    ``candidates`` are ``(task, probability)`` best first; ``source`` is ``explicit``,
    ``router`` or ``shape`` (the rule-based fallback).
    """

    task: str | None
    confidence: float
    candidates: list[tuple[str, float]] = field(default_factory=list)
    source: str = "router"
    reason: str = ""

    def to_dict(self) -> dict:
        return {"task": self.task, "confidence": self.confidence, "source": self.source, "reason": self.reason,
                "candidates": [{"task": t, "probability": p} for t, p in self.candidates]}


class Router(Protocol):
    def route(self, inputs: Sequence[ModelInput]) -> list[RouteDecision]: ...


class ShapeRouter:
    """The fallback rule: an input goes to the one task that accepts its shape, else nowhere.

    ``name_a_task`` ends the reason given for an input that several tasks take: how the caller
    names its task (the Python API's ``task=``, the command line's ``--task``).
    """

    def __init__(self, specs: dict[str, TaskSpec], name_a_task: str = "pass task=") -> None:
        self.specs, self.name_a_task = specs, name_a_task

    def route(self, inputs: Sequence[ModelInput]) -> list[RouteDecision]:
        decisions = []
        for value in inputs:
            shape = input_shape(value)
            fits = [name for name, spec in self.specs.items() if task_shape(spec) == shape]
            share = 1.0 / len(fits) if fits else 0.0
            candidates = [(name, share) for name in fits]
            if len(fits) == 1:
                decisions.append(RouteDecision(fits[0], 1.0, candidates, "shape"))
            else:
                why = (f"{len(fits)} tasks take a {shape} input and no router is trained; {self.name_a_task}"
                       if fits else f"no task takes a {shape} input; tasks: {sorted(self.specs)}")
                decisions.append(RouteDecision(None, share, candidates, "shape", why))
        return decisions


def check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"router threshold must be in [0, 1], got {threshold}")


class LearnedRouter:
    """Softmax over ``[embedding, lexical, shape one-hot] @ weight.T + bias`` with shape masking."""

    def __init__(self, model: MultiTaskModel, classes: list[str], shapes: dict[str, str], weight: torch.Tensor,
                 bias: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, info: dict | None = None,
                 lexical_dims: int = LEXICAL_DIMS) -> None:
        check_threshold(threshold)
        self.model, self.classes, self.shapes = model, list(classes), dict(shapes)
        self.weight, self.bias = weight.float(), bias.float()  # (C, H + D + 3), (C,)
        self.threshold, self.lexical_dims = threshold, lexical_dims
        self.info = info or {}

    # ----------------------------------------------------------------- features

    @staticmethod
    def features(model: MultiTaskModel, inputs: Sequence[ModelInput], lexical_dims: int = LEXICAL_DIMS) -> torch.Tensor:
        """(N, H + D + 3): the mean of an input's text embeddings, its hashed words, its shape one-hot."""
        texts, owners = [], []
        for i, value in enumerate(inputs):
            for text in routing_texts(value):
                texts.append(text)
                owners.append(i)
        vectors = embed_texts(model, texts)  # (T, H)
        summed = torch.zeros(len(inputs), vectors.shape[1]).index_add_(0, torch.tensor(owners, dtype=torch.long), vectors)
        counts = torch.bincount(torch.tensor(owners, dtype=torch.long), minlength=len(inputs)).clamp(min=1)
        shapes = torch.zeros(len(inputs), len(SHAPES))
        for i, value in enumerate(inputs):
            shapes[i, SHAPES.index(input_shape(value))] = 1.0
        return torch.cat([summed / counts.unsqueeze(1), lexical_features(inputs, lexical_dims), shapes], dim=1)

    # ----------------------------------------------------------------- routing

    def allowed(self, shape: str) -> list[bool]:
        """Classes an input of ``shape`` may go to: tasks of that shape, and "no task" for plain
        text; a plain string may also go to a task of any shape.

        A task the router learned but the model no longer holds keeps its recorded shape: left
        out, its probability would be shared out among the tasks left and send its inputs to
        one of them, sure of itself; kept, such an input is answered no task (``route``).
        """
        specs = self.model.specs
        shapes = [task_shape(specs[c]) if c in specs else None if c == NO_TASK else self.shapes.get(c)
                  for c in self.classes]
        return [(c == NO_TASK and shape == "text") or (s is not None and shape in ("text", s))
                for c, s in zip(self.classes, shapes)]

    def probabilities(self, inputs: Sequence[ModelInput]) -> torch.Tensor:
        """(N, C) probabilities over ``classes``, renormalised over the allowed ones."""
        logits = self.features(self.model, inputs, self.lexical_dims) @ self.weight.T + self.bias  # (N, C)
        mask = torch.tensor([self.allowed(input_shape(v)) for v in inputs], dtype=torch.bool)
        logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=1)
        return torch.nan_to_num(probs, nan=0.0)  # a row with nothing allowed

    def route(self, inputs: Sequence[ModelInput]) -> list[RouteDecision]:
        if not inputs:
            return []
        decisions = []
        for value, row in zip(inputs, self.probabilities(inputs).tolist()):
            ranked = sorted(((c, p) for c, p in zip(self.classes, row) if p > 0), key=lambda cp: -cp[1])
            candidates = [(c, round(p, 4)) for c, p in ranked if c in self.model.specs][:5]
            if not ranked:
                decisions.append(RouteDecision(None, 0.0, [], "router", self._unrouted(input_shape(value))))
                continue
            best, confidence = ranked[0]
            if best == NO_TASK:
                decisions.append(RouteDecision(None, confidence, candidates, "router",
                                               f"the input looks like none of the tasks (p={confidence:.2f})"))
            elif best not in self.model.specs:
                decisions.append(RouteDecision(None, confidence, candidates, "router",
                                               f"the input looks most like task {best!r} (p={confidence:.2f}), which "
                                               "the model does not hold; name a task or retrain the router"))
            elif confidence < self.threshold:
                decisions.append(RouteDecision(None, confidence, candidates, "router",
                                               f"best task {best!r} has p={confidence:.2f} < threshold {self.threshold}"))
            else:
                decisions.append(RouteDecision(best, confidence, candidates, "router"))
        return decisions

    def _unrouted(self, shape: str) -> str:
        """Why an input of ``shape`` has no class to go to: a task added after the router was trained
        may well take it (the router cannot pick it), which "no task takes it" would deny."""
        specs = self.model.specs
        fits = sorted(name for name, spec in specs.items() if shape == "text" or task_shape(spec) == shape)
        if not fits:
            return f"no task takes a {shape} input; tasks: {sorted(specs)}"
        return (f"the router was not trained on the tasks that take a {shape} input ({fits}); "
                "retrain it (`mtpeft train-router`) or name the task")

    # ----------------------------------------------------------------- training

    @classmethod
    def fit(cls, model: MultiTaskModel, examples: Sequence[tuple[str | None, ModelInput]],
            threshold: float = DEFAULT_THRESHOLD, c: float = 30.0, seed: int = 0) -> LearnedRouter:
        """Train on ``(task, input)`` pairs; ``task=None`` (or ``NO_TASK``) marks off-topic inputs."""
        from sklearn.linear_model import LogisticRegression

        check_threshold(threshold)  # before embedding every example, not after
        if not c > 0:  # sklearn would say so too, but only after every example is embedded
            raise ValueError(f"router regularisation C must be > 0, got {c}")
        labels = [NO_TASK if t is None else t for t, _ in examples]
        unknown = sorted(set(labels) - set(model.specs) - {NO_TASK})
        if unknown:
            raise ValueError(f"router examples name tasks the model does not hold: {unknown}; tasks: {sorted(model.specs)}")
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ValueError(f"a router needs examples of at least two classes (tasks or no-task), got {classes}")
        x = cls.features(model, [v for _, v in examples]).numpy()
        y = np.array([classes.index(label) for label in labels])
        clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced", random_state=seed).fit(x, y)
        weight, bias = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
        if len(classes) == 2:  # sigmoid(w.x + b) == softmax([0, w.x + b])
            weight, bias = torch.cat([torch.zeros_like(weight), weight]), torch.cat([torch.zeros(1), bias])
        shapes = {name: ("text" if name == NO_TASK else task_shape(model.specs[name])) for name in classes}
        info = {"examples": {name: labels.count(name) for name in classes}, "c": c,
                "train_accuracy": float(clf.score(x, y))}
        return cls(model, classes, shapes, weight, bias, threshold, info, LEXICAL_DIMS)

    # ----------------------------------------------------------------- storage

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``router.json`` and ``router.safetensors`` into ``folder`` (a bundle's ``router/``);
        a bundle folder saves into its ``router/``, where loading the bundle looks, as ``load`` reads it."""
        folder = Path(folder)
        if (folder / BUNDLE_FILE).is_file():
            folder = folder / ROUTER_DIR
        write_safetensors(folder / ROUTER_WEIGHTS, {"weight": self.weight, "bias": self.bias}, metadata={"format": "pt"})
        write_json(folder / ROUTER_FILE, {"format": ROUTER_FORMAT, "classes": self.classes, "shapes": self.shapes,
                                          "threshold": self.threshold, "lexical_dims": self.lexical_dims,
                                          "features": "mean-pooled backbone embedding, crc32-hashed words and word pairs, "
                                          f"shape one-hot {list(SHAPES)}", "backbone": self.model.identity.to_dict(), "info": self.info})
        record_in_manifest(folder)  # in a bundle, its sha256 list covers the router too
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, model: MultiTaskModel, threshold: float | None = None) -> LearnedRouter:
        """Open a saved router for ``model``; a bundle folder finds its ``router/`` inside."""
        folder = Path(folder)
        if not (folder / ROUTER_FILE).is_file() and (folder / ROUTER_DIR / ROUTER_FILE).is_file():
            folder = folder / ROUTER_DIR
        if not (folder / ROUTER_FILE).is_file():
            raise FileNotFoundError(f"{folder}: no {ROUTER_FILE}; train one with `mtpeft train-router BUNDLE`")
        # Both files are checked against the bundle's sha256 list: a train-router stopped between
        # writing them and updating the list leaves a mix that must not load as one router.
        try:  # a damaged file names itself and its line, not just a character offset
            record = json.loads(read_bundle_file(folder / ROUTER_FILE))
        except json.JSONDecodeError as err:
            raise ValueError(f"{folder / ROUTER_FILE}:{err.lineno}: invalid JSON: {err.msg}") from None
        if not isinstance(record, dict) or record.get("format") != ROUTER_FORMAT:
            found = record.get("format") if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            raise ValueError(f"{folder / ROUTER_FILE}: not an mtpeft router (format {found!r})")
        missing = [key for key in ROUTER_KEYS if key not in record]
        if missing:
            raise ValueError(f"{folder / ROUTER_FILE}: missing {', '.join(missing)}; retrain with `mtpeft train-router`")
        model.identity.check_matches(record["backbone"], f"the router in {folder}")
        try:
            tensors = load_safetensors_bytes(read_bundle_file(folder / ROUTER_WEIGHTS))
        except SafetensorError as err:  # no ValueError: the command line would print a traceback
            raise ValueError(f"{folder / ROUTER_WEIGHTS}: not a readable safetensors file ({err}); "
                             "retrain with `mtpeft train-router`") from None
        dims = record.get("lexical_dims", LEXICAL_DIMS)
        classes = len(record["classes"])
        # the bias too: a 1-long one would broadcast over every class, silently dropping what was learned
        for name, expected in (("weight", (classes, model.identity.hidden_size + dims + len(SHAPES))),
                               ("bias", (classes,))):
            if name not in tensors:
                raise ValueError(f"{folder / ROUTER_WEIGHTS}: no {name!r} tensor; it holds {sorted(tensors)}")
            if tuple(tensors[name].shape) != expected:
                raise ValueError(f"{folder / ROUTER_WEIGHTS}: {name} shape {tuple(tensors[name].shape)}, expected {expected}")
        return cls(model, record["classes"], record["shapes"], tensors["weight"], tensors["bias"],
                   record["threshold"] if threshold is None else threshold, record.get("info"), dims)


def load_router(bundle: str | os.PathLike, model: MultiTaskModel) -> Router:
    """The bundle's learned router, else the shape rule (the documented fallback)."""
    if (Path(bundle) / ROUTER_DIR / ROUTER_FILE).is_file():
        return LearnedRouter.load(Path(bundle) / ROUTER_DIR, model)
    return ShapeRouter(model.specs)


def decide(inputs: Sequence[ModelInput], tasks: str | Sequence[str | None] | None, router: Router) -> list[RouteDecision]:
    """Explicit tasks win (one for all inputs or one per input, ``None`` entries routed); the rest go to ``router``."""
    if isinstance(tasks, str) or tasks is None:
        tasks = [tasks] * len(inputs)
    elif len(tasks) != len(inputs):
        raise ValueError(f"{len(tasks)} task names for {len(inputs)} inputs")
    decisions: list[RouteDecision | None] = [None if t is None else RouteDecision(t, 1.0, [(t, 1.0)], "explicit")
                                             for t in tasks]
    pending = [i for i, d in enumerate(decisions) if d is None]
    for i, decision in zip(pending, router.route([inputs[i] for i in pending]) if pending else []):
        decisions[i] = decision
    return decisions
