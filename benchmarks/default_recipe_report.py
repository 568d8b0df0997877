"""Collect the default-recipe runs (``mtpeft train --task T --data … --out runs/T``) into
``results/default_recipe.json`` and print the README's table.

Usage: python benchmarks/default_recipe_report.py [runs/sst2 runs/stsb ...]
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
PRIMARY = {"sst2": ["accuracy"], "stsb": ["pearson", "spearman"], "mrpc": ["f1", "accuracy"],
           "squad": ["exact_match", "f1"], "imdb": ["accuracy"], "qqp": ["f1", "accuracy"]}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def collect(run: Path) -> dict:
    task = json.loads((run / "task.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    adapter_bytes = sum(f.stat().st_size for f in run.iterdir()
                        if f.name in ("adapter_model.safetensors", "head.safetensors"))
    return {
        "task": task["spec"]["name"],
        "command": config.get("command"),
        "data": config.get("data"),
        "metrics": metrics["metrics"],
        "train_seconds": metrics["train_seconds"],
        "train_examples": metrics["train_examples"],
        "trainable_parameters": metrics["trainable_parameters"],
        "adapter_and_head_bytes": adapter_bytes,
        "recipe": {k: config["train"][k] for k in ("epochs", "lr", "batch_size", "seed")},
        "lora": config["train"]["lora"],
    }


def main(paths: list[str]) -> None:
    runs = [Path(p) for p in paths] or sorted(p.parent for p in (ROOT / "runs").glob("*/metrics.json"))
    from mtpeft.backbone import load_backbone

    backbone = load_backbone()
    backbone_params = sum(p.numel() for p in backbone.model.parameters())
    backbone_bytes = (Path(backbone.model.config._name_or_path) / "model.safetensors").stat().st_size
    rows = [collect(r) for r in runs]
    report = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "backbone": {"name": "all-MiniLM-L6-v2 (packaged)", "parameters": backbone_params, "bytes": backbone_bytes},
        "runs": rows,
    }
    out = ROOT / "results" / "default_recipe.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| task | dev metric | trainable params | x fewer than backbone | adapter + head on disk |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        shown = ", ".join(f"{k} {row['metrics'][k]:.2f}" for k in PRIMARY.get(row["task"], []) if k in row["metrics"])
        print(f"| {row['task']} | {shown} | {row['trainable_parameters']:,} | "
              f"{backbone_params / row['trainable_parameters']:,.0f} | {row['adapter_and_head_bytes'] / 1024:,.0f} KiB |")
    print(f"\nbackbone: {backbone_params:,} parameters, {backbone_bytes / 2**20:.1f} MiB; {report['machine']}; {report['date']}")


if __name__ == "__main__":
    main(sys.argv[1:])
