"""The demo: three customer-support skills on one backbone, trained from the packaged data.

Trains a LoRA adapter per skill (sentiment, similar-question detection, FAQ answer
extraction), evaluates each on held-out rows, trains the router that tells which skill an
input is for, saves the bundle, loads it back and answers example customer messages with
the support pipeline, which uses all three.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from mtpeft.config import TrainConfig
from mtpeft.model import MultiTaskModel
from mtpeft.predictions import AnswerPrediction, NoTaskPrediction
from mtpeft.router import LearnedRouter
from mtpeft.router_data import router_examples
from mtpeft.sources import load_task_data
from mtpeft.tasks.presets import get_preset, support_data_dir
from mtpeft.train import format_metrics, train_task
from mtpeft.warm_start import same_backbone

SKILLS = ("sentiment", "similar-questions", "faq-answer")
EXAMPLE_MESSAGES = [
    "My order arrived broken and nobody answers my emails. This is ridiculous!",
    "How many days do I have to send something back?",
    "Thanks a lot, the replacement came quickly and works perfectly.",
    "Can I change the delivery address after I placed the order?",
    "I forgot my password and can't log into the app.",
]

ROUTED_INPUTS = [
    "The courier was rude and my parcel is two weeks late.",
    ("Where is my parcel?", "Has my order shipped yet?"),
    {"question": "How long do refunds take?", "context": "Refunds are issued within 3 business days of arrival."},
    "What is the weather in Paris tomorrow?",
]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 90 else text[:87] + "..."


def _outcome(prediction) -> str:
    if isinstance(prediction, NoTaskPrediction):
        return "nothing predicted"
    if isinstance(prediction, AnswerPrediction):
        return f"{prediction.answer!r} (score {prediction.score:.2f})"
    return f"{prediction.label} (score {prediction.score:.2f})"


def run_demo(out: str | Path = "runs/demo", backbone: str = "default", epochs_scale: float = 1.0) -> dict:
    if not epochs_scale > 0:  # NaN too; 0 or less would have trained a silent 0.1 epoch
        raise ValueError(f"--epochs-scale must be > 0, got {epochs_scale}")
    started = time.perf_counter()
    out = Path(out)
    data_dir = support_data_dir()
    print(f"mtpeft demo: backbone {backbone!r}, packaged customer-support data in {data_dir}")
    model = MultiTaskModel.from_backbone(backbone)
    print(f"backbone: {model.identity.model_type}, {model.backbone_parameter_count():,} parameters (frozen)\n")

    results = {}
    for skill in SKILLS:
        preset = get_preset(skill)
        data = load_task_data(preset.spec, data_dir, layout=preset.layout)
        recipe = preset.adapter_recipe()
        recipe["epochs"] = max(recipe.get("epochs", 3.0) * epochs_scale, 0.1)
        if recipe.get("init_from") and not same_backbone(model, recipe["init_from"]):
            print(f"[{skill}] {recipe.pop('init_from')} was trained on the default backbone: "
                  "training a fresh adapter instead")
        config = TrainConfig(**recipe)
        torch.manual_seed(config.seed)
        model.add_task(preset.spec, config.lora)
        print(f"[{skill}] {preset.spec.description} {len(data.train)} training / {len(data.eval)} held-out examples")
        result = train_task(model, skill, data.train, data.eval, config)
        results[skill] = result
        print(f"[{skill}] held-out {format_metrics(result.metrics)}; {result.trainable_parameters:,} trainable "
              f"parameters ({model.backbone_parameter_count() / result.trainable_parameters:,.0f}x fewer than the backbone); "
              f"{result.train_seconds:.0f} s\n")

    examples, _ = router_examples(model, {skill: data_dir for skill in SKILLS})
    model.router = LearnedRouter.fit(model, examples)
    print(f"[router] which skill an input is for: trained on {len(examples)} examples "
          f"(training texts and request phrasings), train accuracy {100 * model.router.info['train_accuracy']:.1f}\n")

    model.save(out)  # the tasks and the router
    reloaded = MultiTaskModel.load(out, backbone=backbone)  # a fresh backbone: only the files carry the tasks
    print(f"saved the bundle to {out} and loaded it back: tasks {reloaded.task_names}, "
          f"{type(reloaded.router).__name__}\n")

    print("inputs without a task, routed by the router and answered in one mixed batch:")
    for value, route, prediction in zip(ROUTED_INPUTS, reloaded.route(ROUTED_INPUTS), reloaded.predict(ROUTED_INPUTS)):
        print(f"  {_short(value)}\n    -> {route.task or 'no task'} (p {route.confidence:.2f}): {_outcome(prediction)}")
    print()

    for message in EXAMPLE_MESSAGES:
        reply = reloaded.support(message)  # the packaged FAQ
        best = reply.similar[0]
        answer = reply.answer
        print(f"message: {message}")
        print(f"  sentiment          -> {reply.sentiment.label} (score {reply.sentiment.score:.2f})")
        print(f"  similar-questions  -> {best.question!r} (score {best.score:.2f})")
        if not answer.text:  # the QA task's "not answered here", scored by its probability
            shown = f"no answer in {answer.faq_id} (p {answer.score:.2f})"
        else:
            shown = f"{'no confident answer' if answer.no_answer else repr(answer.text)} from {answer.faq_id} " \
                    f"(score {answer.score:.2f})"
        print(f"  faq-answer         -> {shown}")
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    return {skill: dataclasses.asdict(r) for skill, r in results.items()}
