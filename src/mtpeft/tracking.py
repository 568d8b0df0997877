"""Experiment tracking for training runs: TensorBoard event files in the run directory by
default, and any other tracker that ``accelerate`` integrates (wandb, mlflow, comet_ml, aim,
clearml, dvclive, swanlab, trackio) when its package is installed.

Every tracker is one of accelerate's tracker classes, so each behaves as it does under
``Accelerator(log_with=...)``. Only the main process of a distributed run tracks.

Scalars, every ``log_every`` steps and at the last one: ``train/loss`` (mean since the last
point), ``train/learning_rate`` (the adapter's, after the step, as transformers' Trainer logs
it), ``train/examples_per_second``; at the end, ``eval/<metric>`` for each numeric metric.

    tensorboard --logdir runs/        # every run's events sit in runs/<run>/tensorboard/
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"


def _tracker(name: str, run_dir: Path, run_name: str, resume_step: int = 0):
    from accelerate import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    PartialState()  # accelerate's trackers log through its logger, which needs the (single- or multi-process) state

    if name not in LOGGER_TYPE_TO_CLASS:
        raise ValueError(f"unknown tracker {name!r}; choose from {sorted(LOGGER_TYPE_TO_CLASS)}")
    if name not in {str(t) for t in get_available_trackers()}:
        raise ValueError(f"tracker {name!r} needs its package: pip install {name.replace('_', '-')}")
    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":
        # A resumed run redoes the steps after its checkpoint: hide the interrupted run's points
        # from there on, or TensorBoard shows those steps twice.
        purge = {"purge_step": resume_step + 1} if resume_step else {}
        tracker = cls(TENSORBOARD_DIR, run_dir, **purge)  # events in <run_dir>/tensorboard/
    elif cls.requires_logging_directory:
        tracker = cls(run_name, run_dir)
    else:
        tracker = cls(run_name)
    tracker.main_process_only = False  # only the main process ever makes a RunTracker with trackers
    tracker.start()
    return tracker


def _flat(config: dict, prefix: str = "") -> dict:
    """Nested config as ``a/b: value`` scalars (what hyperparameter tables take)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}/"))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


class RunTracker:
    """The trackers of one training run; with none, every call does nothing."""

    def __init__(self, trackers: Sequence = (), log_every: int = 10) -> None:
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1 step, got {log_every}")
        self.trackers, self.log_every = list(trackers), log_every
        self._losses: list[float] = []
        self._examples, self._since = 0, time.perf_counter()

    @classmethod
    def open(cls, run_dir: str | os.PathLike | None, run_name: str, config: dict | None = None,
             report_to: Sequence[str] | None = ("tensorboard",), log_every: int = 10,
             resume_step: int = 0, unlogged_losses: Sequence[float] = ()) -> RunTracker:
        """Trackers named in ``report_to`` for the run written to ``run_dir``; none without a ``run_dir``.

        ``resume_step``: the checkpoint's step when the run continues an interrupted one;
        ``unlogged_losses``: the losses since the last point that its checkpoint kept, so the
        next point averages the steps an uninterrupted run's would."""
        if run_dir is None or not report_to:
            return cls((), log_every)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        trackers = [_tracker(name, run_dir, run_name, resume_step) for name in dict.fromkeys(report_to)]
        for tracker in trackers:
            if tracker.name == "tensorboard":  # training.json holds it too; hparams would add folders per run
                tracker.log({"config": json.dumps(config or {}, indent=2)}, step=0)
            else:
                tracker.store_init_configuration(_flat(config or {}))
        run = cls(trackers, log_every)
        run._losses = list(unlogged_losses)
        return run

    @property
    def unlogged_losses(self) -> list[float]:
        """The steps' losses since the last point, for a checkpoint."""
        return list(self._losses)

    def log(self, values: dict, step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def step(self, step: int, loss: float, learning_rate: float, examples: int, last: bool = False) -> None:
        """Record one optimizer step; writes a point every ``log_every`` steps and at the ``last``."""
        if not self.trackers:
            return
        self._losses.append(loss)
        self._examples += examples
        if step % self.log_every and not last:
            return
        now = time.perf_counter()
        self.log({"train/loss": sum(self._losses) / len(self._losses), "train/learning_rate": learning_rate,
                  "train/examples_per_second": self._examples / max(now - self._since, 1e-9)}, step)
        self._losses, self._examples, self._since = [], 0, now

    def finish(self, step: int, metrics: dict | None = None) -> None:
        """Log the evaluation ``metrics`` (numeric ones) and close every tracker."""
        numbers = {f"eval/{k}": float(v) for k, v in (metrics or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            self.log(numbers, step)
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
