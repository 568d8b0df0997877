"""RESULTS.md tables and plots from the run JSONs that ``mtpeft compare`` writes.

    mtpeft report --results results/compare --out RESULTS.md --plots results/plots

Only the text between ``<!-- quality:start -->`` and ``<!-- quality:end -->`` in the
output file is replaced (the markers are appended when missing), so other sections of
RESULTS.md stay as their authors wrote them. A table of where each task stands on the quality
targets (``targets_table``); per task: a table of every method (trainable
parameters, ratio to the backbone, metrics as mean ± sample std over seeds), and a plot of
the task's metric against trainable parameters (log x); one plot of training time per
method. Plots are matplotlib PNGs (the ``plots`` extra).
"""

from __future__ import annotations

import io
import math
import os
import statistics
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from mtpeft.compare import read_run
from mtpeft.methods import method_names
from mtpeft.storage import atomic_write

START, END = "<!-- quality:start -->", "<!-- quality:end -->"
# Metrics shown per built-in task (others: the task's primary metric), in points.
SHOWN_METRICS = {"sst2": ["accuracy"], "stsb": ["pearson", "spearman"], "stsb-bi": ["pearson", "spearman"],
                 "mrpc": ["f1", "accuracy"],
                 "qqp": ["f1", "accuracy"], "imdb": ["accuracy"], "squad": ["exact_match", "f1"]}
METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1", "pearson": "Pearson", "spearman": "Spearman",
                "exact_match": "EM"}


# The quality targets the grid is held to (gaps in points of the task's primary metric, means
# over seeds): LoRA r=8 within 1.0 of full fine-tuning at <= 0.5 % of the backbone's parameters;
# `tiny` (>= 2000x fewer parameters) within 2.0; and, on the packaged MiniLM only, these
# absolute scores: task -> (metric, at least).
LORA_MAX_GAP, LORA_MAX_PERCENT = 1.0, 0.5
TINY_MAX_GAP, TINY_MIN_RATIO = 2.0, 2000
ABSOLUTE_TARGETS = {"sst2": ("accuracy", 90.5), "stsb": ("spearman", 87.0), "stsb-bi": ("spearman", 87.0),
                    "mrpc": ("f1", 88.0), "imdb": ("accuracy", 90.0)}


class ReportError(ValueError):
    """Result files that cannot be reported (none found, or not mtpeft compare runs)."""


def load_runs(folder: str | Path) -> list[dict]:
    """Every run JSON under ``folder`` (``<task>/<method>-seed<k>.json``)."""
    folder = Path(folder)
    runs = []
    for path in sorted(folder.glob("*/*.json")):
        try:
            runs.append(read_run(path))
        except ValueError as err:
            raise ReportError(str(err)) from None
    if not runs:
        raise ReportError(f"no run results under {folder} (expected {folder}/<task>/<method>-seed<k>.json)")
    return runs


@dataclass
class Row:
    """One method on one task, over its seeds."""

    method: str
    description: str
    trainable: int
    backbone: int
    adapter_bytes: int
    seeds: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    train_seconds: list[float] = field(default_factory=list)
    gpu_seeds: int = 0  # seeds trained on a GPU: their times are left out of the CPU's
    train_examples: int | None = None
    epochs: float | None = None
    rates: str = "–"  # "adapter (or backbone) lr / head lr"

    @property
    def ratio(self) -> float | None:
        return self.backbone / self.trainable if self.trainable else None

    def mean(self, metric: str) -> float | None:
        values = self.metrics.get(metric)
        return statistics.fmean(values) if values else None

    def std(self, metric: str) -> float | None:
        values = self.metrics.get(metric, [])
        return statistics.stdev(values) if len(values) >= 2 else None


def shown_metrics(task: str, runs: list[dict]) -> list[str]:
    return SHOWN_METRICS.get(task) or [runs[0]["primary_metric"]]


def _on_gpu(run: dict) -> bool:
    return str(run.get("device", "cpu")).startswith("cuda")


def summarise(runs: list[dict]) -> dict[str, list[Row]]:
    """Rows per task, methods in registry order (others after, by name)."""
    order = {name: i for i, name in enumerate(method_names())}
    by_task: dict[str, dict[str, Row]] = {}
    for run in runs:
        rows = by_task.setdefault(run["task"], {})
        row = rows.get(run["method"])
        if row is None:
            hyper = run.get("hyperparameters") or {}
            epochs = (hyper.get("task_epochs") or {}).get(run["task"], hyper.get("epochs"))
            row = rows[run["method"]] = Row(
                method=run["method"], description=run["method_settings"].get("description", ""),
                trainable=run["parameters"]["trainable"], backbone=run["parameters"]["backbone"],
                adapter_bytes=run["adapter_bytes"], train_examples=run["data"].get("train_examples"), epochs=epochs,
                rates=learning_rates(hyper, run["method_settings"].get("kind")))
        row.seeds.append(run["seed"])
        on_gpu = _on_gpu(run)
        row.gpu_seeds += on_gpu
        for metric, value in run["metrics"].items():
            if metric != "examples" and isinstance(value, (int, float)):
                row.metrics.setdefault(metric, []).append(float(value))
        if run.get("train") and not on_gpu:
            row.train_seconds.append(run["train"]["seconds"])
    return {task: sorted(rows.values(), key=lambda r: (order.get(r.method, len(order)), r.method))
            for task, rows in sorted(by_task.items())}


def learning_rates(hyper: dict, kind: str | None) -> str:
    """The learning rates a run trained with: what adapts (adapter, prompt or backbone) / the head."""
    lr, head_lr = hyper.get("lr"), hyper.get("head_lr")
    if lr is None:
        return "–"
    head = f"{head_lr if head_lr is not None else lr:g}"
    return f"– / {head}" if kind == "head-only" else f"{lr:g} / {head}"


def _metric_cell(row: Row, metric: str) -> str:
    mean, std = row.mean(metric), row.std(metric)
    if mean is None:
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _size(nbytes: int) -> str:
    if not nbytes:
        return "–"
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 1024:,.0f} KiB"


def _seeds_cell(row: Row) -> str:
    return f"{len(row.seeds)} ({row.gpu_seeds} on a GPU)" if row.gpu_seeds else str(len(row.seeds))


def task_table(task: str, rows: list[Row], metrics: list[str]) -> str:
    header = ["method", "trainable params", "x fewer than backbone",
              *[METRIC_NAMES.get(m, m) for m in metrics], "seeds", "train examples", "epochs", "lr / head lr", "train time",
              "size on disk"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for row in rows:
        seconds = statistics.fmean(row.train_seconds) if row.train_seconds else None
        cells = [row.method, f"{row.trainable:,}", f"{row.ratio:,.0f}" if row.ratio else "–",
                 *[_metric_cell(row, m) for m in metrics], _seeds_cell(row),
                 f"{row.train_examples:,}" if row.train_examples and row.trainable else "–",
                 f"{row.epochs:g}" if row.epochs and row.trainable else "–", row.rates if row.trainable else "–",
                 f"{seconds:,.0f} s" if seconds is not None else "–", _size(row.adapter_bytes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Means of float scores miss an exact bound by rounding error: 84.9 (mean of 85.4, 84.9, 84.4)
# - 85.9 is -1.0000000000000142, which read "(-1.00): **missed**" against a 1.0 gap.
TOLERANCE = 1e-9


def _verdict(value: float, bound: float) -> str:
    """Whether ``value`` reaches ``bound`` (both in points)."""
    return "met" if value >= bound - TOLERANCE else "**missed**"


def _gap_cell(row: Row, full: Row, metric: str, max_gap: float) -> str:
    mean, gap = row.mean(metric), row.mean(metric) - full.mean(metric)
    return f"{mean:.2f} ({gap:+.2f}): {_verdict(gap, -max_gap)}"


def _percent(row: Row) -> float:
    return 100 * row.trainable / row.backbone


def _scored(row: Row, metric: str) -> bool:
    """Whether the row can be the best one: a NaN mean (a diverged seed) won ``max`` whenever it came first."""
    mean = row.mean(metric)
    return mean is not None and not math.isnan(mean)


def targets_table(summary: dict[str, list[Row]], primary: dict[str, str], absolute: bool | Collection[str]) -> str | None:
    """Where each task stands on the quality targets; None when no task has a full fine-tuning row
    to measure against. ``absolute`` adds the packaged MiniLM's absolute targets: True for every
    task, or the tasks whose runs all used that backbone."""
    header = ["task", "metric", "full", f"lora-r8 (≤ {LORA_MAX_GAP:.1f} behind)",
              f"best LoRA at ≤ {LORA_MAX_PERCENT:g} % (≤ {LORA_MAX_GAP:.1f} behind)",
              f"tiny (≤ {TINY_MAX_GAP:.1f} behind)", "absolute (best row)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, rows in summary.items():
        by_method = {row.method: row for row in rows}
        metric, full = primary[task], by_method.get("full")
        if full is None or full.mean(metric) is None:
            continue
        lora = by_method.get("lora-r8")
        lora_cell = "–"
        if lora is not None and lora.mean(metric) is not None:
            lora_cell = _gap_cell(lora, full, metric, LORA_MAX_GAP)
            if _percent(lora) > LORA_MAX_PERCENT:
                lora_cell += f" at {_percent(lora):.2f} %: over the budget"
        budget = [row for row in rows if row.method.startswith("lora-") and _percent(row) <= LORA_MAX_PERCENT
                  and _scored(row, metric)]
        best = max(budget, key=lambda row: row.mean(metric), default=None)
        best_cell = f"`{best.method}` {_gap_cell(best, full, metric, LORA_MAX_GAP)}" if best else "–"
        tiny = by_method.get("tiny")
        tiny_cell = "–"
        if tiny is not None and tiny.mean(metric) is not None:
            tiny_cell = _gap_cell(tiny, full, metric, TINY_MAX_GAP)
            if not tiny.ratio or tiny.ratio < TINY_MIN_RATIO:
                tiny_cell += f"; only {tiny.ratio or 0:,.0f}x fewer parameters"
        absolute_cell = "–"
        if (absolute is True or absolute and task in absolute) and task in ABSOLUTE_TARGETS:
            name, floor = ABSOLUTE_TARGETS[task]
            scored = [row for row in rows if _scored(row, name)]
            if scored:
                top = max(scored, key=lambda row: row.mean(name))
                absolute_cell = (f"{METRIC_NAMES.get(name, name)} {top.mean(name):.2f} (`{top.method}`) "
                                 f"against {floor:g}: {_verdict(top.mean(name), floor)}")
        cells = [task, METRIC_NAMES.get(metric, metric), _metric_cell(full, metric), lora_cell, best_cell, tiny_cell,
                 absolute_cell]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else None


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("plots need matplotlib: pip install 'mtpeft[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    """Write the PNG whole or not at all: a report stopped mid-save left a truncated plot behind."""
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write(path, png.getvalue())
    return path


def plot_task(task: str, rows: list[Row], metric: str, path: Path) -> Path:
    """The task's metric (mean ± std over seeds) against trainable parameters, log x."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    trained = [r for r in rows if r.trainable and r.mean(metric) is not None]
    for row in trained:
        ax.errorbar(row.trainable, row.mean(metric), yerr=row.std(metric) or 0.0, fmt="o", capsize=3)
        ax.annotate(row.method, (row.trainable, row.mean(metric)), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    for row in rows:
        if not row.trainable and row.mean(metric) is not None:
            ax.axhline(row.mean(metric), linestyle="--", color="grey", linewidth=1)
            ax.annotate(f"{row.method} (no training)", (0.01, row.mean(metric)), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 3), fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)} (points)")
    ax.set_title(f"{task}: {METRIC_NAMES.get(metric, metric)} vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    return _save(plt, fig, path)


def plot_times(summary: dict[str, list[Row]], path: Path) -> Path:
    """Mean training time of every method, one bar per task, log x."""
    plt = _pyplot()
    methods = []
    for rows in summary.values():
        methods.extend(r.method for r in rows if r.train_seconds and r.method not in methods)
    tasks = list(summary)
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * max(4, len(methods) * max(1, len(tasks)) / 2) + 1.5))
    height = 0.8 / max(1, len(tasks))
    for t, task in enumerate(tasks):
        times = {r.method: statistics.fmean(r.train_seconds) for r in summary[task] if r.train_seconds}
        ys = [i + t * height for i, m in enumerate(methods) if m in times]
        ax.barh(ys, [times[m] for m in methods if m in times], height=height, label=task)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(methods))], methods, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("training time, seconds (log scale; mean over seeds)")
    ax.set_title("Training time per method")
    ax.legend(fontsize=8)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    return _save(plt, fig, path)


def environments(runs: list[dict]) -> str:
    """Each machine and library set the runs used, with its number of runs: train times are
    comparable only within one of them (the tables' times leave out runs on a GPU). A CPU
    without fast bf16 trains in fp32, slower, under the same model name: that is named too."""
    def place(run: dict) -> str:
        machine = run["machine"]
        if _on_gpu(run):
            return f"{machine.get('gpu', 'a CUDA GPU')} (host {machine['cpu']}"
        fp32 = ", fp32" if (run.get("train") or {}).get("bf16") is False else ""
        return f"{machine['cpu']} ({machine['torch_threads']} threads{fp32}"

    counts = Counter(f"{place(run)}; torch {run['versions'].get('torch')}, "
                     f"transformers {run['versions'].get('transformers')}, peft {run['versions'].get('peft')})"
                     for run in runs)
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{count} run{'s' * (count != 1)} on {name}" for name, count in counts.items())


def backbones(runs: list[dict]) -> str:
    """The backbone the runs used, or each backbone with its tasks (the header named the first run's
    for every task)."""
    tasks: dict[str, list[str]] = {}
    for run in runs:
        b = run["backbone"]
        named = tasks.setdefault(f"`{b['name']}` ({b['model_type']}), {b['parameters']:,} parameters", [])
        if run["task"] not in named:
            named.append(run["task"])
    if len(tasks) == 1:
        return f"Backbone {next(iter(tasks))}."
    return "Backbones: " + "; ".join(f"{name} for {', '.join(sorted(t))}" for name, t in tasks.items()) + "."


def render_section(runs: list[dict], out: Path, plots: Path, results: Path) -> str:
    """The quality section's markdown; writes the plots under ``plots``."""
    summary = summarise(runs)

    def link(path: Path) -> str:  # links relative to the report file
        return Path(os.path.relpath(path, out.parent)).as_posix()

    # Tasks may come from runs on different backbones (one task's runs may not: compare refuses
    # that); the absolute targets are the packaged MiniLM's, so they hold only for its tasks.
    on_default = {task for task in summary if all(r["backbone"]["name"] == "default" for r in runs if r["task"] == task)}
    dates = sorted(r["date"][:10] for r in runs)
    parts = [
        START,
        "## Quality: adapters against full fine-tuning",
        "",
        (f"Generated by `mtpeft report` from {len(runs)} run files under `{link(results)}/` "
         "(written by `mtpeft compare`; each holds its exact command); do not edit this section by hand."),
        f"{backbones(runs)} Runs dated {dates[0]} to {dates[-1]}; {environments(runs)}.",
        ("Metrics are in points on each task's evaluation split; with several seeds, mean ± sample std. "
         "\"train examples\" below the full training set means a fixed random subset (see each run's `data`)."),
    ]
    primary = {task: next(r["primary_metric"] for r in runs if r["task"] == task) for task in summary}
    targets = targets_table(summary, primary, absolute=on_default)
    if targets:
        parts += ["", "### Targets", "",
                  (f"Means over each row's seeds (the task tables say how many), in points of the task's primary "
                   f"metric; the gap to full fine-tuning in brackets. LoRA: within {LORA_MAX_GAP:.1f} of full "
                   f"fine-tuning at ≤ {LORA_MAX_PERCENT:g} % of the backbone's parameters; `tiny` "
                   f"(≥ {TINY_MIN_RATIO:,}x fewer): within {TINY_MAX_GAP:.1f}"
                   + ("; absolute: the packaged MiniLM's targets, the best row of any method"
                      + ("" if on_default == set(summary) else f" (tasks run on it: {', '.join(sorted(on_default))})")
                      + "." if on_default else ".")),
                  "", targets]
    described: dict[str, str] = {}
    for task, rows in summary.items():
        task_runs = [r for r in runs if r["task"] == task]
        metrics = shown_metrics(task, task_runs)
        parts += ["", f"### {task}", "", task_table(task, rows, metrics), ""]
        plot = plot_task(task, rows, task_runs[0]["primary_metric"], plots / f"quality_{task}.png")
        parts.append(f"![{task}: metric vs trainable parameters]({link(plot)})")
        described.update({r.method: r.description for r in rows})
    if any(r.train_seconds for rows in summary.values() for r in rows):
        plot = plot_times(summary, plots / "quality_train_time.png")
        parts += ["", "### Training time", "", f"![training time per method]({link(plot)})"]
    parts += ["", "### Methods", ""]
    parts += [f"- `{name}`: {text}" for name, text in described.items()]
    parts.append(END)
    return "\n".join(parts)


def replace_section(text: str, section: str) -> str:
    """``text`` with its quality section replaced by ``section`` (appended when it has none)."""
    start, end = text.find(START), text.find(END)
    if start == -1 and end == -1:
        return (text.rstrip("\n") + "\n\n" if text.strip() else "# Results\n\n") + section + "\n"
    if start == -1 or end < start:
        raise ReportError(f"the file has a broken quality section: expected {START} before {END}")
    return text[:start] + section + text[end + len(END):]


def write_report(results: str | Path = "results/compare", out: str | Path = "RESULTS.md",
                 plots: str | Path = "results/plots") -> Path:
    """Rewrite the quality section of ``out`` from the runs under ``results``."""
    results, out, plots = Path(results), Path(out), Path(plots)
    section = render_section(load_runs(results), out, plots, results)
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    atomic_write(out, replace_section(text, section).encode("utf-8"))
    return out
