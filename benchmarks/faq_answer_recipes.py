"""The demo's QA skill (faq-answer) trained from a fresh adapter against a warm start from the
packaged SQuAD adapter, on the packaged data, scored on the same held-out rows (every 6th of
``qa.jsonl``: 40 answerable questions, 13 paired with an entry that does not answer them).

Each recipe trains on one backbone in one process, from the same seed; "squad-qa, untrained"
is the packaged adapter as it comes (the head's no-answer position never trained).

    .venv/bin/python benchmarks/faq_answer_recipes.py   # -> results/faq_answer_recipes.json
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from speedkit import write_result

from mtpeft.config import LoraSettings, TrainConfig
from mtpeft.evaluate import evaluate_task
from mtpeft.model import MultiTaskModel
from mtpeft.sources import load_task_data
from mtpeft.tasks.presets import get_preset, packaged_adapter, support_data_dir
from mtpeft.train import train_task
from mtpeft.warm_start import warm_start

R8_ALL = {"r": 8, "alpha": 16.0, "target_modules": ["all-linear"]}
R16_ALL = {"r": 16, "alpha": 32.0, "target_modules": ["all-linear"]}
SQUAD = str(packaged_adapter("squad-qa"))
RECIPES = {
    "fresh r16, 15 epochs at 2e-3 (the recipe before the warm start)": {"epochs": 15, "lr": 2e-3, "lora": R16_ALL, "init_from": None},
    "squad-qa, 2 epochs at 1e-3": {"epochs": 2, "lr": 1e-3, "lora": R8_ALL, "init_from": SQUAD},
    "squad-qa, 3 epochs at 1e-3": {"epochs": 3, "lr": 1e-3, "lora": R8_ALL, "init_from": SQUAD},
    "squad-qa, 3 epochs at 5e-4 (the preset's recipe)": {"epochs": 3, "lr": 5e-4, "lora": R8_ALL, "init_from": SQUAD},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    preset = get_preset("faq-answer")
    data = load_task_data(preset.spec, support_data_dir(), layout=preset.layout)
    model = MultiTaskModel.from_backbone("default")
    runs = {}

    model.add_task(preset.spec, LoraSettings(**R8_ALL))
    warm_start(model, preset.spec.name, SQUAD)  # as packaged, scored as faq-answer
    runs["squad-qa, untrained"] = {"metrics": evaluate_task(model, preset.spec.name, data.eval)}
    model.remove_task(preset.spec.name)
    for name, recipe in RECIPES.items():
        recipe = dict(recipe, lora=LoraSettings(**recipe["lora"]))
        config = TrainConfig(**{**preset.adapter_recipe(), **recipe, "checkpoint_every": -1})
        torch.manual_seed(config.seed)
        model.add_task(preset.spec, config.lora)
        result = train_task(model, preset.spec.name, data.train, data.eval, config, progress=False, report_to=())
        recorded = config.to_dict()  # the packaged adapter's path relative to the repository, not this machine's
        if recorded["init_from"]:
            recorded["init_from"] = os.path.relpath(recorded["init_from"], Path(__file__).resolve().parents[1])
        runs[name] = {"metrics": result.metrics, "train_seconds": result.train_seconds, "config": recorded}
        print(name, result.metrics, f"{result.train_seconds:.0f} s", flush=True)
        model.remove_task(preset.spec.name)
    write_result("faq_answer_recipes", {"train_examples": len(data.train), "eval_examples": len(data.eval),
                                        "runs": runs}, args.out)


if __name__ == "__main__":
    main()
