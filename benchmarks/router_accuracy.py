"""Held-out accuracy and confusion matrix of the learned router on the customer-support skills.

The router is trained exactly as ``mtpeft train-router`` trains it (the skills' training
rows from the packaged data + the packaged phrasings) and scored on a mix it never saw:
the rows each skill holds out for evaluation, plus ``benchmarks/data/router_heldout_phrasings.jsonl``
(requests written separately from the packaged phrasings, including off-topic ones).
Routing needs the backbone and the task specs only, not trained adapters.

    .venv/bin/python benchmarks/router_accuracy.py  # -> results/router_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import sklearn
import torch

from mtpeft.model import MultiTaskModel
from mtpeft.router import NO_TASK, LearnedRouter, input_shape
from mtpeft.router_data import example_input, read_phrasings, router_examples
from mtpeft.sources import load_task_data
from mtpeft.tasks.presets import get_preset, support_data_dir

SKILLS = ("sentiment", "similar-questions", "faq-answer")
HERE = Path(__file__).resolve().parent


def held_out_mix() -> tuple[list[tuple[str, object]], int]:
    """``(gold task, input)`` pairs: first the skills' held-out rows (their count is returned), then the phrasings."""
    mix = []
    for skill in SKILLS:
        preset = get_preset(skill)
        data = load_task_data(preset.spec, support_data_dir(), layout=preset.layout)
        mix += [(skill, example_input(ex, preset.spec)) for ex in data.eval]
    task_rows = len(mix)
    mix += [(task or NO_TASK, text) for task, text in read_phrasings(HERE / "data" / "router_heldout_phrasings.jsonl")]
    return mix, task_rows


def _untresholded(router: LearnedRouter, decisions):
    """Decisions as if the threshold were 0: a task below the threshold gets its best candidate back."""
    for d in decisions:
        if d.task is None and d.candidates and "threshold" in d.reason:
            yield type(d)(d.candidates[0][0], d.confidence, d.candidates, d.source)
        else:
            yield d


def cross_validation(model: MultiTaskModel, examples, cs=(3.0, 10.0, 30.0, 100.0)) -> dict:
    """5-fold accuracy on the training examples for each C, with the router's shape mask."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    labels = [task or NO_TASK for task, _ in examples]
    classes = sorted(set(labels))
    y = np.array([classes.index(label) for label in labels])
    x = LearnedRouter.features(model, [value for _, value in examples]).numpy()
    probe = LearnedRouter(model, classes, {}, torch.zeros(len(classes), x.shape[1]), torch.zeros(len(classes)))
    allowed = np.array([probe.allowed(input_shape(value)) for _, value in examples])
    scores = {}
    for c in cs:
        correct = 0
        for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
            clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(x[train], y[train])
            logits = np.where(allowed[test], clf.decision_function(x[test]), -np.inf)
            correct += int((logits.argmax(1) == y[test]).sum())
        scores[str(c)] = correct / len(y)
    return scores


def confusion(gold: list[str], predicted: list[str], classes: list[str]) -> dict:
    matrix = {g: {p: 0 for p in classes} for g in classes}
    for g, p in zip(gold, predicted):
        matrix[g][p] += 1
    return matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--out", default=str(HERE.parent / "results" / "router_accuracy.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    model = MultiTaskModel.from_backbone(args.backbone)
    for skill in SKILLS:
        model.add_task(get_preset(skill).spec, head_only=True)  # routing never uses adapters
    started = time.perf_counter()
    examples, summary = router_examples(model, data={s: support_data_dir() for s in SKILLS})
    router = LearnedRouter.fit(model, examples, threshold=args.threshold)
    fit_seconds = time.perf_counter() - started

    cv = cross_validation(model, examples)
    mix, n_task_rows = held_out_mix()
    started = time.perf_counter()
    decisions = router.route([value for _, value in mix])
    route_ms = (time.perf_counter() - started) * 1000 / len(mix)
    gold = [task for task, _ in mix]
    predicted = [d.task or NO_TASK for d in decisions]
    classes = [*SKILLS, NO_TASK]
    shapes = [input_shape(value) for _, value in mix]

    def accuracy(keep) -> dict:
        pairs = [(g, p) for g, p, k in zip(gold, predicted, keep) if k]
        return {"n": len(pairs), "accuracy": sum(g == p for g, p in pairs) / max(len(pairs), 1)}

    # Decisions at another threshold follow from the confidences: below it, no task.
    by_threshold = {}
    for threshold in (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        routed = [NO_TASK if d.confidence < threshold or d.task is None else d.task
                  for d in _untresholded(router, decisions)]
        by_threshold[str(threshold)] = sum(g == p for g, p in zip(gold, routed)) / len(gold)
    errors = [{"gold": g, "predicted": p, "input": value if isinstance(value, str) else str(value)[:120],
               "confidence": round(d.confidence, 3), "reason": d.reason}
              for (g, value), p, d in zip(mix, predicted, decisions) if g != p]
    result = {
        "benchmark": "router_accuracy",
        "backbone": args.backbone,
        "threshold": args.threshold,
        "training": {**summary, "total": len(examples), "train_accuracy": router.info["train_accuracy"],
                     "fit_seconds": round(fit_seconds, 2)},
        "held_out": {
            "overall": accuracy([True] * len(gold)),
            "plain_text_inputs": accuracy([s == "text" for s in shapes]),
            "structured_inputs (pair/qa, shape-constrained)": accuracy([s != "text" for s in shapes]),
            "skills_held_out_rows": accuracy([i < n_task_rows for i in range(len(gold))]),
            "held_out_phrasings": accuracy([i >= n_task_rows for i in range(len(gold))]),
            "per_class": {c: accuracy([g == c for g in gold]) for c in classes},
            "confusion_matrix (rows: gold, columns: routed)": confusion(gold, predicted, classes),
            "accuracy_by_threshold": by_threshold,
            "errors": errors,
        },
        "cv_accuracy_by_c (5-fold on the training examples; picks the default c)": cv,
        "route_ms_per_input (batch of the whole mix, CPU)": round(route_ms, 3),
        "versions": {"torch": torch.__version__, "sklearn": sklearn.__version__, "python": platform.python_version()},
        "machine": {"cpu_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    held = result["held_out"]
    print(f"held-out accuracy {held['overall']['accuracy']:.4f} on {held['overall']['n']} inputs "
          f"(plain text {held['plain_text_inputs']['accuracy']:.4f} on {held['plain_text_inputs']['n']}); -> {out}")
    for g in classes:
        print(f"  {g:18} " + " ".join(f"{held['confusion_matrix (rows: gold, columns: routed)'][g][p]:4d}" for p in classes))
    for e in errors:
        print(f"  miss: {e['gold']} -> {e['predicted']} ({e['confidence']}): {e['input']}")


if __name__ == "__main__":
    main()
