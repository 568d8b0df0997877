"""What bf16 training costs in dev-set quality: mtpeft's defaults against the same run in fp32.

Each pair trains the task's built-in adapter recipe twice with one seed (same initialisation,
same batches), once in bf16 and once in fp32, so a pair's difference is the precision's alone
plus the run-to-run noise that a different arithmetic order causes. One seed cannot tell the
two apart (SST-2's dev set has 872 sentences: one sentence is 0.11 points), so the benchmark
runs several seeds and reports the mean paired difference with its spread.

SST-2 trains on a fixed subset (the first N training sentences) to keep a pair short; STS-B
on its full training set. Every finished run is written at once, and a re-run with the same
settings skips the runs already in the JSON, so an interrupted benchmark resumes.

    .venv/bin/python benchmarks/precision_quality.py --seeds 1,2,3   # -> results/precision_quality.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from speedkit import DATA, RESULTS, write_result

from mtpeft import MultiTaskModel
from mtpeft.config import TrainConfig
from mtpeft.sources import load_task_data
from mtpeft.tasks.presets import get_preset
from mtpeft.train import train_task

FOLDERS = {"sst2": "glue/SST-2", "stsb": "glue/STS-B"}
METRICS = {"sst2": "accuracy", "stsb": "spearman"}
PRECISIONS = {"bf16": True, "fp32": False}


def train_once(task: str, subset: int | None, seed: int, bf16: bool) -> dict:
    preset = get_preset(task)
    data = load_task_data(preset.spec, DATA / FOLDERS[task], layout=preset.layout)
    train = data.train[:subset] if subset else data.train
    config = TrainConfig(**{**preset.adapter_recipe(), "checkpoint_every": -1, "bf16": bf16, "seed": seed})
    model = MultiTaskModel.from_backbone()
    model.add_task(preset.spec, config.lora)
    result = train_task(model, task, train, data.eval, config, progress=False)
    return {"metric": result.metrics[METRICS[task]], "metrics": result.metrics, "train_seconds": result.train_seconds,
            "train_examples": len(train), "epochs": config.epochs, "lr": config.lr}


def summarise(runs: dict[str, dict]) -> dict:
    """Per task: mean bf16 and fp32 scores, and the paired (same-seed) differences."""
    summary = {}
    for task, by_seed in runs.items():
        pairs = {seed: r for seed, r in by_seed.items() if "bf16" in r and "fp32" in r}
        if not pairs:
            continue
        diffs = [r["bf16"]["metric"] - r["fp32"]["metric"] for r in pairs.values()]
        summary[task] = {
            "metric": METRICS[task], "seeds": sorted(int(s) for s in pairs),
            "bf16_mean": round(statistics.mean(r["bf16"]["metric"] for r in pairs.values()), 2),
            "fp32_mean": round(statistics.mean(r["fp32"]["metric"] for r in pairs.values()), 2),
            "paired_differences": [round(d, 2) for d in diffs],
            "mean_difference": round(statistics.mean(diffs), 2),
            "std_difference": round(statistics.stdev(diffs), 2) if len(diffs) > 1 else None,
            "bf16_seconds_median": round(statistics.median(r["bf16"]["train_seconds"] for r in pairs.values()), 1),
            "fp32_seconds_median": round(statistics.median(r["fp32"]["train_seconds"] for r in pairs.values()), 1),
            "train_examples": next(iter(pairs.values()))["bf16"]["train_examples"],
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="sst2,stsb")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--sst2-subset", type=int, default=20000)
    parser.add_argument("--out", default=str(RESULTS / "precision_quality.json"))
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark trains on the GLUE files described in its README (MTPEFT_DATA_ROOT names their folder)")
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    settings = {"sst2_subset": args.sst2_subset}
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    runs = previous.get("runs", {}) if previous.get("settings") == settings else {}
    for seed in seeds:  # seed-major: a stopped run still leaves whole pairs for every task
        for task in tasks:
            for name, bf16 in PRECISIONS.items():
                done = runs.setdefault(task, {}).setdefault(str(seed), {})
                if name in done:
                    continue
                print(f"{task} seed {seed} {name}", flush=True)
                done[name] = train_once(task, args.sst2_subset if task == "sst2" else None, seed, bf16)
                write_result("precision_quality", {"settings": settings, "runs": runs, "summary": summarise(runs),
                                                   "target_points": 0.3}, str(out))


if __name__ == "__main__":
    main()
