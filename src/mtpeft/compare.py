"""Method x task grids: train and score every cell, one JSON per run.

    mtpeft compare --tasks sst2,mrpc --methods lora-r8,tiny,full --seeds 1,2,3

writes ``results/compare/<task>/<method>-seed<k>.json`` for each run: task, method and its
settings, hyper-parameters, seed, trainable/total parameters and their ratio to the
backbone, size on disk, metrics, times, peak memory, library versions and the exact
command that reproduces the run. ``mtpeft report`` turns them into tables and plots.

Re-running a grid skips every run whose JSON exists; a run stopped mid-training continues
from its checkpoint in ``--work``. Each run gets its own child process (``--in-process``
turns that off), so its peak RSS is its own and its memory is returned afterwards.
Deterministic methods (zero-shot) run once, whatever the seeds. Joint methods train one
model on all ``--tasks`` per seed and write one JSON per task.

Training subsets (``--max-train``/``--max-eval``) are a fixed random sample
(``data.fixed_subset``: the same for every method and seed) in file order, since some
files are sorted by label (IMDb).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from mtpeft.data import fixed_subset
from mtpeft.examples import Example
from mtpeft.methods import Method, MethodNotApplicable, get_method, weights_bytes
from mtpeft.storage import write_json, write_safetensors
from mtpeft.tasks import TaskSpec

RESULT_FORMAT = "mtpeft-compare-run/1"
# Where each built-in task's files sit under --data-root (the layout of ../shared/data).
DATA_DIRS = {"sst2": "glue/SST-2", "stsb": "glue/STS-B", "stsb-bi": "glue/STS-B", "mrpc": "glue/MRPC", "qqp": "glue/QQP",
             "imdb": "imdb", "squad": "squad"}
_runs_in_this_process = 0


@dataclass
class GridSettings:
    """One ``mtpeft compare`` invocation: which cells, where the data is, what to override.

    Attributes:
        tasks: built-in task names, or names defined by ``task_files``.
        methods: method names (``mtpeft compare --list-methods``).
        seeds: seeds of the seeded methods.
        data_root: folder holding the built-in tasks' data in ``DATA_DIRS`` layout.
        data: task -> its data folder, instead of ``data_root``'s.
        task_files: JSON files defining your own tasks: ``{"spec": {TaskSpec fields},
            "data": train file, "eval_data": eval file (optional), "recipe": {TrainConfig fields}}``;
            relative paths are relative to the JSON file.
        results: where the run JSONs go (``<task>/<method>-seed<k>.json``).
        work: checkpoints and weights of runs in progress.
        max_train, max_eval: fixed random subsets of the training / evaluation examples.
        epochs, lr, head_lr, batch_size: override every method's recipe.
        backbone_dropout: True keeps the frozen backbone's dropout on while adapters train.
        joint_temperature: T of ``joint-temperature`` sampling.
        keep_weights: keep each finished run's weights under ``work`` (default: deleted).
        in_process: run cells in this process instead of one child process each.
    """

    tasks: list[str]
    methods: list[str]
    seeds: list[int] = field(default_factory=lambda: [1])
    data_root: str = "../shared/data"
    data: dict[str, str] = field(default_factory=dict)
    task_files: list[str] = field(default_factory=list)
    results: str = "results/compare"
    work: str = "runs/compare"
    backbone: str = "default"
    device: str = "auto"
    max_train: int | None = None
    max_eval: int | None = None
    epochs: float | None = None
    lr: float | None = None
    head_lr: float | None = None
    batch_size: int | None = None
    backbone_dropout: bool | None = None
    joint_temperature: float = 2.0
    keep_weights: bool = False
    in_process: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("--tasks: name at least one task")
        if not self.methods:
            raise ValueError("--methods: name at least one method")
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")
        for names, flag in ((self.tasks, "--tasks"), (self.methods, "--methods")):
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ValueError(f"{flag}: {', '.join(map(repr, twice))} {'is' if len(twice) == 1 else 'are'} "
                                 "named more than once")
        for name in self.methods:
            get_method(name)  # unknown names fail here, listing the known ones
        for value, flag in ((self.max_train, "--max-train"), (self.max_eval, "--max-eval")):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        # Checked here, once: TrainConfig refuses them too, but in every cell in turn, with a traceback.
        for value, flag in ((self.epochs, "--epochs"), (self.lr, "--lr"), (self.head_lr, "--head-lr")):
            if value is not None and not value > 0:  # NaN too
                raise ValueError(f"{flag} must be > 0, got {value}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.joint_temperature > 0:  # NaN too
            raise ValueError(f"--joint-temperature must be > 0, got {self.joint_temperature}")
        check_data_flags(self.data, self.tasks)

    def run_settings(self, method: Method) -> dict:
        """What a finished run must share with this grid to count as done (not the seed or the paths).

        Only what the method uses: a zero-shot run trains nothing and proportional sampling has no
        temperature, and counting those flags refused such runs as made "with other settings".
        """
        settings = {"backbone": self.backbone, "max_train": self.max_train, "max_eval": self.max_eval}
        if method.trains:
            settings.update(self.overrides())
        if method.kind == "joint":
            if method.settings["sampling"] == "temperature":
                settings["joint_temperature"] = self.joint_temperature
            settings["joint_tasks"] = list(self.tasks)
        return settings

    def overrides(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "head_lr": self.head_lr, "batch_size": self.batch_size,
                "backbone_dropout": self.backbone_dropout}

    def cell_argv(self, tasks: list[str], method: str, seed: int) -> list[str]:
        """``mtpeft`` arguments that run exactly this cell (recorded as the run's command)."""
        argv = ["compare", "--tasks", ",".join(tasks), "--methods", method, "--seeds", str(seed),
                "--data-root", self.data_root, "--results", self.results, "--work", self.work,
                "--backbone", self.backbone, "--device", self.device]
        for flag, value in (("--max-train", self.max_train), ("--max-eval", self.max_eval), ("--epochs", self.epochs),
                            ("--lr", self.lr), ("--head-lr", self.head_lr), ("--batch-size", self.batch_size)):
            if value is not None:
                argv += [flag, str(value)]
        if self.backbone_dropout:
            argv.append("--backbone-dropout")
        if get_method(method).kind == "joint":
            argv += ["--joint-temperature", str(self.joint_temperature)]
        for task in tasks:
            if task in self.data:
                argv += ["--data", f"{task}={self.data[task]}"]
        for path in self.task_files:
            argv += ["--task-file", path]
        if self.keep_weights:
            argv.append("--keep-weights")
        return argv


@dataclass
class Cell:
    tasks: tuple[str, ...]
    method: Method
    seed: int

    def result_paths(self, results: str | Path) -> list[Path]:
        return [Path(results) / task / f"{self.method.name}-seed{self.seed}.json" for task in self.tasks]

    def label(self) -> str:
        return f"{'+'.join(self.tasks)} / {self.method.name} / seed {self.seed}"


def grid_cells(settings: GridSettings) -> list[Cell]:
    """Every run of the grid: per task, each method and seed; joint methods once per seed for all tasks."""
    methods = [get_method(m) for m in settings.methods]
    cells = []
    for task in settings.tasks:
        for method in methods:
            if method.kind == "joint":
                continue
            for seed in settings.seeds if method.trains else [_seed_of_a_run_once(task, method, settings)]:
                cells.append(Cell((task,), method, seed))
    for method in methods:
        if method.kind == "joint":
            if len(settings.tasks) < 2:
                raise ValueError(f"method {method.name!r} trains several tasks together: pass two or more --tasks")
            cells.extend(Cell(tuple(settings.tasks), method, seed) for seed in settings.seeds)
    return cells


def _seed_of_a_run_once(task: str, method: Method, settings: GridSettings) -> int:
    """A method that trains nothing has one result whatever the seed: the seed it was written
    under, else the first. Under the first seed always, a grid re-run with its seeds in another
    order wrote it again, and the report counted two seeds of one run."""
    prefix = f"{method.name}-seed"
    for path in sorted(Path(settings.results, task).glob(f"{prefix}*.json")):
        try:
            return int(path.stem.removeprefix(prefix))
        except ValueError:
            continue
    return settings.seeds[0]


# ---------------------------------------------------------------------- data


@dataclass
class TaskSource:
    spec: TaskSpec
    data: Path
    eval_data: Path | None
    layout: object | None  # tasks.presets.DataLayout for built-in tasks
    recipe: dict


def resolve_task(name: str, data_root: str | Path, data: dict[str, str] | None = None,
                 task_files: Sequence[str] = ()) -> TaskSource:
    """The spec, data files and recipe of a built-in task (its data in ``data[name]``, else
    under ``data_root`` in ``DATA_DIRS`` layout) or of a task defined in one of ``task_files``."""
    from mtpeft.tasks.presets import get_preset, preset_names
    from mtpeft.tasks.spec import UnknownTaskError

    for file in task_files:
        record = _read_task_file(file)
        if record.get("spec", {}).get("name") != name:
            continue
        if name in (data or {}):  # it was ignored: the task file's own data trained
            raise ValueError(f"--data {name}={data[name]}: task {name!r} is defined by --task-file {file}, which "
                             "names its data; change the data there")
        missing = [k for k in ("spec", "data") if k not in record]
        if missing:
            raise ValueError(f"{file}: missing {missing}; a task file holds spec, data, eval_data (optional), recipe")
        here = Path(file).parent
        eval_data = here / record["eval_data"] if record.get("eval_data") else None
        spec = dict(record["spec"])
        if spec.get("type") in ("classification", "pair-classification") and not spec.get("labels"):
            # found in the data, as `mtpeft train --task-type` does
            from mtpeft.data import labels_in

            spec["labels"] = labels_in(here / record["data"], spec.get("label_column", "label"),
                                       f"{file}: spec.label_column", "name them in spec.labels")
        return TaskSource(TaskSpec.from_dict(spec), here / record["data"], eval_data, None,
                          dict(record.get("recipe", {})))
    if name not in preset_names():  # get_preset's advice, --task-type, is mtpeft train's
        named = [_read_task_file(f).get("spec", {}).get("name") for f in task_files]
        raise UnknownTaskError(f"unknown task {name!r}: not built in ({', '.join(preset_names())}) and not defined "
                               f"by a --task-file (they define {named})" if task_files else
                               f"unknown task {name!r}: not built in ({', '.join(preset_names())}); define your own "
                               "with --task-file FILE")
    preset = get_preset(name)
    folder = Path((data or {}).get(name) or Path(data_root) / DATA_DIRS.get(name, name))
    if not folder.exists():
        raise FileNotFoundError(f"task {name!r}: data folder {folder} does not exist "
                                f"(set --data-root, or --data {name}=FOLDER)")
    return TaskSource(preset.spec, folder, None, preset.layout, dict(preset.recipe))


def check_data_flags(data: dict[str, str], tasks: Sequence[str]) -> None:
    """``--data TASK=FOLDER`` for a task that is not run was ignored: a misspelt name trained the
    task on the data under ``--data-root`` instead."""
    for task, folder in data.items():
        if task not in tasks:
            raise ValueError(f"--data {task}={folder}: {task!r} is not one of --tasks {','.join(tasks)}")


def _read_task_file(file: str | Path) -> dict:
    """A ``--task-file``'s record. One that is not a JSON object ended in a bare JSON error that named
    no file, or in a traceback."""
    try:
        record = json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--task-file {file}: no such file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--task-file {file}: not valid JSON ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get("spec", {}), dict):
        raise ValueError(f"--task-file {file}: expected a JSON object "
                         '{"spec": {TaskSpec fields}, "data": FILE, "eval_data": FILE, "recipe": {...}}')
    return record


def load_cell_data(source: TaskSource, settings: GridSettings) -> tuple[list[Example], list[Example], dict]:
    from mtpeft.sources import load_task_data

    loaded = load_task_data(source.spec, source.data, source.eval_data, source.layout)
    train, train_subset = fixed_subset(loaded.train, settings.max_train)
    evaluation, eval_subset = fixed_subset(loaded.eval, settings.max_eval)
    info = {**loaded.description, "train_subset": train_subset, "eval_subset": eval_subset,
            "train_examples": len(train), "eval_examples": len(evaluation)}
    return train, evaluation, info


# ---------------------------------------------------------------------- records


# What ``mtpeft report`` reads from every run.
RUN_KEYS = ("task", "method", "seed", "method_settings", "parameters", "adapter_bytes", "data", "metrics",
            "primary_metric", "backbone", "machine", "versions", "date")


def read_run(path: str | Path) -> dict:
    """The run JSON at ``path``; any other file is an error naming it (a stray or broken file in the
    results stopped a grid with a bare JSON error or a traceback, and a report with a KeyError)."""
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    found = run.get("format") if isinstance(run, dict) else f"none: a JSON {type(run).__name__}"
    if found != RESULT_FORMAT:
        raise ValueError(f"{path}: not an mtpeft compare run (format {found!r})")
    missing = [k for k in RUN_KEYS if k not in run]
    if missing:
        raise ValueError(f"{path}: an mtpeft compare run without {missing}")
    return run


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("mtpeft", "torch", "transformers", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    found = {"cpu": cpu, "torch_threads": torch.get_num_threads(), "platform": platform.platform(terse=True)}
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


def peak_rss() -> tuple[int, str]:
    """This process's peak resident memory in bytes, and whether it covers this run alone."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak, "run" if _runs_in_this_process <= 1 else "process (several runs)"


def _parameter_counts(trainable: int, total: int, backbone: int) -> dict:
    return {"trainable": trainable, "total": total, "backbone": backbone,
            "backbone_to_trainable": round(backbone / trainable, 2) if trainable else None,
            "trainable_percent_of_backbone": round(100.0 * trainable / backbone, 5)}


# ---------------------------------------------------------------------- running


def _device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_cell(cell: Cell, settings: GridSettings, grid_command: str | None = None) -> list[Path]:
    """Train and score one cell in this process; write its JSON(s); return their paths."""
    from mtpeft.backbone import load_backbone

    global _runs_in_this_process
    _runs_in_this_process += 1
    started = time.perf_counter()
    sources = {task: resolve_task(task, settings.data_root, settings.data, settings.task_files) for task in cell.tasks}
    data = {task: load_cell_data(source, settings) for task, source in sources.items()}
    backbone = load_backbone(settings.backbone)
    backbone_count = sum(p.numel() for p in backbone.model.parameters())
    device = _device(settings.device)
    work = Path(settings.work) / "+".join(cell.tasks) / f"{cell.method.name}-seed{cell.seed}"
    if cell.method.kind == "joint":
        records = _run_joint(cell, settings, sources, data, backbone, device, work)
    else:
        records = [_run_single(cell, settings, sources[cell.tasks[0]], data[cell.tasks[0]], backbone, device, work)]
    command = "mtpeft " + shlex.join(settings.cell_argv(list(cell.tasks), cell.method.name, cell.seed))
    peak, scope = peak_rss()
    paths = []
    for task, record in zip(cell.tasks, records):
        record.update({
            "format": RESULT_FORMAT, "task": task, "method": cell.method.name, "seed": cell.seed,
            "backbone": {"name": settings.backbone, "parameters": backbone_count,
                         "model_type": backbone.identity.model_type},
            "wall_seconds": round(time.perf_counter() - started, 3),
            "peak_rss_bytes": peak, "peak_rss_scope": scope, "device": device,
            "versions": library_versions(), "machine": machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command, "grid_command": grid_command or command,
            "grid_settings": settings.run_settings(cell.method),
        })
        path = cell.result_paths(settings.results)[cell.tasks.index(task)]
        write_json(path, dict(sorted(record.items())))
        paths.append(path)
    if not settings.keep_weights and work.exists():
        shutil.rmtree(work)
    return paths


def _run_single(cell: Cell, settings: GridSettings, source: TaskSource, data: tuple, backbone, device: str,
                work: Path) -> dict:
    from mtpeft.evaluate import evaluate_task
    from mtpeft.model import MultiTaskModel
    from mtpeft.train import train_task

    train, evaluation, info = data
    spec, method = source.spec, cell.method
    backbone_count = sum(p.numel() for p in backbone.model.parameters())
    record = {"method_settings": method.to_dict(), "data": info, "primary_metric": spec.metric}
    if not method.trains:
        from mtpeft.zero_shot import zero_shot_scores

        model = MultiTaskModel(backbone).to(device)
        t0 = time.perf_counter()
        metrics, details = zero_shot_scores(model, spec, evaluation, train)
        metrics["examples"] = len(evaluation)  # as a trained cell's evaluation records it
        total = sum(p.numel() for p in model.parameters())
        record.update({"metrics": metrics, "hyperparameters": {"zero_shot": details},
                       "parameters": _parameter_counts(0, total, backbone_count), "adapter_bytes": 0,
                       "train": None, "eval_seconds": round(time.perf_counter() - t0, 3)})
        return record
    config = method.train_config(source.recipe, {**settings.overrides(), "seed": cell.seed})
    model = method.build(backbone, spec, cell.seed).to(device)
    result = train_task(model, spec.name, train, None, config, out_dir=work, progress=settings.progress, save=False,
                        run_info={"method": method.to_dict(), "data": info})
    t0 = time.perf_counter()
    metrics = evaluate_task(model, spec.name, evaluation, config.eval_batch_size)
    eval_seconds = time.perf_counter() - t0
    model.task_metrics[spec.name] = metrics
    method.save(model, spec.name, work / "weights")
    record.update({
        "metrics": metrics, "hyperparameters": config.to_dict(),
        "parameters": _parameter_counts(result.trainable_parameters, sum(p.numel() for p in model.parameters()),
                                        backbone_count),
        "adapter_bytes": weights_bytes(work / "weights"),
        "train": {"examples": result.train_examples, "steps": result.steps, "seconds": result.train_seconds,
                  "examples_per_second": result.examples_per_second, "final_loss": result.final_loss,
                  "bf16": result.bf16},
        "eval_seconds": round(eval_seconds, 3),
    })
    return record


def _run_joint(cell: Cell, settings: GridSettings, sources: dict, data: dict, backbone, device: str,
               work: Path) -> list[dict]:
    from mtpeft.joint import build_joint_model, shared_parameters, train_joint

    method = cell.method
    config = method.train_config({}, {**settings.overrides(), "seed": cell.seed})
    task_epochs = {t: settings.epochs or s.recipe.get("epochs", config.epochs) for t, s in sources.items()}
    backbone_count = sum(p.numel() for p in backbone.model.parameters())
    model = build_joint_model(backbone, [s.spec for s in sources.values()], method.lora_settings(), cell.seed).to(device)
    sampling = method.settings["sampling"]
    temperature = settings.joint_temperature if sampling == "temperature" else 1.0
    result = train_joint(model, {t: (d[0], d[1]) for t, d in data.items()}, config, sampling, temperature,
                         task_epochs=task_epochs, progress=settings.progress, out_dir=work)
    write_safetensors(work / "weights" / "shared_adapter.safetensors",
                      {n: p.detach() for n, p in shared_parameters(model).items()})
    shared_bytes = weights_bytes(work / "weights")
    total = sum(p.numel() for p in model.parameters())
    records = []
    for task in cell.tasks:
        write_safetensors(work / "weights" / task / "head.safetensors", dict(model.heads[task].state_dict()))
        share = result.steps[task] / result.total_steps
        records.append({
            "method_settings": method.to_dict(), "data": data[task][2], "primary_metric": sources[task].spec.metric,
            "metrics": result.metrics[task], "hyperparameters": {**config.to_dict(), "sampling": sampling,
                                                                 "temperature": temperature, "task_epochs": task_epochs},
            # A task's own share of the model: the shared adapter plus its head.
            "parameters": _parameter_counts(result.shared_parameters + result.head_parameters[task], total,
                                            backbone_count),
            "adapter_bytes": shared_bytes + weights_bytes(work / "weights" / task),
            "train": {"steps": result.steps[task], "seconds": round(result.train_seconds * share, 3),
                      "examples": data[task][2]["train_examples"], "bf16": result.bf16,
                      "final_loss": result.final_loss},
            "joint": {"tasks": list(cell.tasks), "probabilities": result.probabilities, "steps": result.steps,
                      "total_steps": result.total_steps, "train_seconds_total": result.train_seconds,
                      "shared_parameters": result.shared_parameters, "head_parameters": result.head_parameters,
                      "trainable_total": result.shared_parameters + sum(result.head_parameters.values()),
                      "examples_per_second": result.examples_per_second},
            "eval_seconds": None,
        })
    return records


@dataclass
class GridSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    not_applicable: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{len(self.done)} run, {len(self.skipped)} already done, "
                f"{len(self.not_applicable)} not applicable, {len(self.failed)} failed")


def not_applicable(cell: Cell, settings: GridSettings) -> str | None:
    """Why a cell cannot run (decided before any data is read), or None."""
    if cell.method.kind != "zero-shot":
        return None
    from mtpeft.zero_shot import check_applicable

    # Every reason the run itself would find: a child process's "not applicable" came back as a
    # failed run (it wrote no result), and the whole grid exited 1.
    try:
        check_applicable(resolve_task(cell.tasks[0], settings.data_root, settings.data, settings.task_files).spec)
    except MethodNotApplicable as err:
        return str(err)
    return None


# What makes two runs of a task comparable in one table: the same backbone and the same examples.
DATA_SETTINGS = ("backbone", "max_train", "max_eval")


# The recipe fields a finished run is checked against (method settings come with the method's name).
RECIPE_FIELDS = ("epochs", "lr", "head_lr", "batch_size", "backbone_dropout")


def _expected_recipe(cell: Cell, settings: GridSettings) -> dict | None:
    """What a run of ``cell`` trains with (task recipe, then method's, then the grid's flags), or
    None where the flags themselves are compared: zero-shot, joint cells, a task not resolvable here."""
    if cell.method.kind in ("zero-shot", "joint"):
        return None
    try:
        source = resolve_task(cell.tasks[0], settings.data_root, settings.data, settings.task_files)
    except (FileNotFoundError, KeyError, ValueError):
        return None
    config = cell.method.train_config(source.recipe, settings.overrides())
    return {k: getattr(config, k) for k in RECIPE_FIELDS}


def _conflict(cell: Cell, settings: GridSettings) -> str | None:
    """Why an existing result cannot stand for this grid's run (other subsets, epochs, ...), or None.

    Runs are compared by the recipe they trained with, not by the flags that set it: a run made
    with ``--epochs 3`` stands for a grid whose task recipe now says 3 epochs, and a run made
    before a task's recipe changed no longer counts as done.
    """
    wanted = settings.run_settings(cell.method)
    recipe = _expected_recipe(cell, settings)
    for path in cell.result_paths(settings.results):
        run = read_run(path)
        found = run.get("grid_settings", {})
        if recipe is None:
            differing = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
        else:
            hyper = run.get("hyperparameters", {})
            differing = {k: (found.get(k), wanted[k]) for k in DATA_SETTINGS if found.get(k) != wanted[k]}
            differing.update({k: (hyper.get(k), v) for k, v in recipe.items() if hyper.get(k) != v})
        if differing:
            detail = ", ".join(f"{k}={old!r} there, {new!r} here" for k, (old, new) in differing.items())
            return (f"{path} was made with other settings ({detail}); delete it or pass another --results")
    return None


def _other_data(cell: Cell, settings: GridSettings) -> str | None:
    """Why a new run would not be comparable with its task's runs already in ``results``
    (another backbone or training / evaluation subset), or None."""
    wanted = settings.run_settings(cell.method)
    for task in cell.tasks:
        for path in sorted((Path(settings.results) / task).glob("*.json")):
            found = read_run(path).get("grid_settings", {})
            differing = {k: (found.get(k), wanted[k]) for k in DATA_SETTINGS if found.get(k) != wanted[k]}
            if differing:
                detail = ", ".join(f"{k}={old!r} there, {new!r} here" for k, (old, new) in differing.items())
                return (f"{path} was made on other data ({detail}), and one table would mix them; "
                        "pass the same settings, or another --results")
    return None


def _check_tasks(cells: list[Cell], settings: GridSettings) -> None:
    """Find every task that a cell still to run needs; an unknown one, a bad ``--task-file`` or a
    missing data folder raises its message before anything trains. (Found in each run's process,
    each was a traceback and a failed run; done runs need no data, so their tasks are not looked up.)"""
    pending = [c for c in cells if not all(p.exists() for p in c.result_paths(settings.results))]
    for task in dict.fromkeys(task for cell in pending for task in cell.tasks):
        resolve_task(task, settings.data_root, settings.data, settings.task_files)


def run_grid(settings: GridSettings, grid_command: str | None = None, log=print, child: bool = False) -> GridSummary:
    """Run every cell of the grid that has no result yet; one child process per cell unless ``in_process``.

    ``child``: this is one cell's process of a larger grid, whose log already numbers the cell,
    says it is running and sums the grid up; it adds only what happened.
    """
    summary = GridSummary()
    cells = grid_cells(settings)
    _check_tasks(cells, settings)
    for number, cell in enumerate(cells, 1):
        label = f"  {cell.label()}" if child else f"[{number}/{len(cells)}] {cell.label()}"
        if all(p.exists() for p in cell.result_paths(settings.results)):
            conflict = _conflict(cell, settings)
            if conflict:
                summary.failed.append(cell.label())
                log(f"{label}: {conflict}")
                continue
            summary.skipped.append(cell.label())
            log(f"{label}: done before, skipped")
            continue
        reason = not_applicable(cell, settings)
        if reason:
            summary.not_applicable.append(cell.label())
            log(f"{label}: not applicable ({reason})")
            continue
        conflict = _other_data(cell, settings)
        if conflict:
            summary.failed.append(cell.label())
            log(f"{label}: {conflict}")
            continue
        if not child:
            log(f"{label}: running")
        if settings.in_process:
            try:
                paths = run_cell(cell, settings, grid_command)
            except MethodNotApplicable as err:
                summary.not_applicable.append(cell.label())
                log(f"{label}: not applicable ({err})")
                continue
            except Exception:  # noqa: BLE001 - one failed run must not stop the grid; it is reported at the end
                traceback.print_exc()
                summary.failed.append(cell.label())
                continue
            log(f"{label}: wrote {', '.join(str(p) for p in paths)}")
        else:
            argv = settings.cell_argv(list(cell.tasks), cell.method.name, cell.seed) + ["--in-process"]
            if not settings.progress:
                argv.append("--no-progress")
            if grid_command:
                argv += ["--grid-command", grid_command]
            code = subprocess.call([sys.executable, "-m", "mtpeft", *argv], env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if code != 0 or not all(p.exists() for p in cell.result_paths(settings.results)):
                summary.failed.append(cell.label())
                log(f"{label}: failed (exit code {code})")
                continue
        summary.done.append(cell.label())
    if not child:
        log(summary.line())
    return summary
