"""The README's default-recipe table: what ``mtpeft train --task T`` gives on each real dataset.

The quality grid's ``lora-r8`` rows are the built-in recipe (LoRA r=8, alpha=16 on
query/value, each task's preset epochs and rates), so the table is read from them rather
than from separate runs: one set of trainings, the same seeds, the figures agree with
RESULTS.md. Writes ``results/default_recipe.json`` and prints the table.

Usage: python benchmarks/default_recipe_report.py [results/compare] [--out results/default_recipe.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

from mtpeft.report import METRIC_NAMES, SHOWN_METRICS, load_runs, summarise
from mtpeft.storage import atomic_write

ROOT = Path(__file__).resolve().parents[1]
METHOD = "lora-r8"


def _machines(runs: list[dict]) -> list[str]:
    return sorted({f"{r['machine']['cpu']}, {r['machine']['torch_threads']} threads" for r in runs})


def main(folder: str, out: Path) -> None:
    runs = [r for r in load_runs(folder) if r["method"] == METHOD]
    summary = summarise(runs)
    rows = []
    for task, (row,) in summary.items():
        task_runs = [r for r in runs if r["task"] == task]
        hyper = task_runs[0]["hyperparameters"]
        rows.append({
            "task": task,
            "recipe": {k: hyper[k] for k in ("epochs", "lr", "batch_size")},
            "seeds": sorted(row.seeds),
            "metrics": {m: {"mean": row.mean(m), "std": row.std(m), "values": row.metrics[m]}
                        for m in SHOWN_METRICS.get(task, []) if m in row.metrics},
            "train_examples": row.train_examples,
            "train_seconds_median": statistics.median(row.train_seconds) if row.train_seconds else None,
            "trainable_parameters": row.trainable,
            "backbone_parameters": row.backbone,
            "adapter_and_head_bytes": row.adapter_bytes,
            "machines": _machines(task_runs),
            "dates": sorted({r["date"][:10] for r in task_runs}),
            "commands": sorted({r["command"] for r in task_runs}),
        })
    source = Path(folder).resolve()
    shown = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source  # no machine paths in the record
    report = {"date": date.today().isoformat(), "source": str(shown), "method": METHOD, "rows": rows}
    atomic_write(out, (json.dumps(report, indent=2) + "\n").encode())

    print("| task | recipe | dev metric (mean ± std over seeds) | seeds | trainable params | x fewer than backbone "
          "| adapter + head on disk |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        recipe = row["recipe"]
        shown = ", ".join(f"{METRIC_NAMES.get(m, m)} {v['mean']:.2f}" + (f" ± {v['std']:.2f}" if v["std"] else "")
                          for m, v in row["metrics"].items())
        print(f"| {row['task']} | {recipe['epochs']:g} epochs, lr {recipe['lr']:g}, batch {recipe['batch_size']} "
              f"| {shown} | {len(row['seeds'])} | {row['trainable_parameters']:,} "
              f"| {row['backbone_parameters'] / row['trainable_parameters']:,.0f} "
              f"| {row['adapter_and_head_bytes'] / 1024:,.0f} KiB |")
    print(f"\nmachines: {'; '.join(sorted({m for r in rows for m in r['machines']}))}; "
          f"dates: {', '.join(sorted({d for r in rows for d in r['dates']}))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default=str(ROOT / "results" / "compare"),
                        help="the grid's run JSONs (default: results/compare)")
    parser.add_argument("--out", default=str(ROOT / "results" / "default_recipe.json"))
    args = parser.parse_args()  # --help was read as the folder
    main(args.folder, Path(args.out))
