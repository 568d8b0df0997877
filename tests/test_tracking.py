"""Training runs leave TensorBoard event files whose scalars read back; tracking can be turned off."""

from __future__ import annotations

import random

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.config import LoraSettings, TrainConfig
from mtpeft.examples import Example
from mtpeft.tracking import TENSORBOARD_DIR, RunTracker
from mtpeft.train import train_task

SPEC = TaskSpec(name="mood", type="classification", labels=["neg", "pos"], max_length=16)


def _examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    words = {0: ["awful", "broken", "sad"], 1: ["great", "lovely", "happy"]}
    return [Example(text=f"it was {rng.choice(words[label])}", label=label) for label in (rng.randint(0, 1) for _ in range(n))]


def _scalars(run_dir) -> dict[str, list]:
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_training_run_leaves_loss_and_learning_rate_in_tensorboard(backbone, tmp_path):
    model = MultiTaskModel(backbone)
    model.add_task(SPEC, LoraSettings(r=2, alpha=4))
    config = TrainConfig(epochs=3, batch_size=4, lr=1e-2, warmup_ratio=0.0, checkpoint_every=-1, bf16=False)
    train_task(model, "mood", _examples(24), _examples(8, seed=1), config, out_dir=tmp_path / "run", progress=False)
    scalars = _scalars(tmp_path / "run")
    assert {"train/loss", "train/learning_rate", "train/examples_per_second", "eval/accuracy"} <= set(scalars)
    total = 3 * 24 // 4  # 18 steps: points at 10 and at the last step
    assert [step for step, _ in scalars["train/loss"]] == [10, total]
    # linear decay from 1e-2 to 0 without warm-up: after step s the rate is 1e-2 * (1 - s / total)
    for step, value in scalars["train/learning_rate"]:
        assert value == pytest.approx(1e-2 * (1 - step / total), abs=1e-7)
    assert all(value > 0 for _, value in scalars["train/loss"])
    assert scalars["eval/accuracy"][0][0] == total


def test_tracking_off_writes_no_events(backbone, tmp_path):
    model = MultiTaskModel(backbone)
    model.add_task(SPEC, LoraSettings(r=2, alpha=4))
    config = TrainConfig(epochs=1, batch_size=8, checkpoint_every=-1, bf16=False)
    train_task(model, "mood", _examples(16), None, config, out_dir=tmp_path / "run", progress=False, report_to=())
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_tracker_points_average_the_loss_between_them(tmp_path):
    tracker = RunTracker.open(tmp_path, "run", {"lr": 0.1, "lora": {"r": 2}}, log_every=2)
    for step, loss in enumerate([4.0, 2.0, 1.0], start=1):
        tracker.step(step, loss, 0.1, examples=8, last=step == 3)
    tracker.finish(3, {"accuracy": 0.5, "examples": 10, "note": "text is left out"})
    scalars = _scalars(tmp_path)
    assert scalars["train/loss"] == [(2, 3.0), (3, 1.0)]
    assert scalars["eval/accuracy"] == [(3, 0.5)] and "eval/note" not in scalars


def test_unknown_or_missing_tracker_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown tracker 'tensorbored'"):
        RunTracker.open(tmp_path, "run", report_to=["tensorbored"])
    with pytest.raises(ValueError, match="log_every"):
        RunTracker(log_every=0)
    assert RunTracker.open(None, "run").trackers == []  # no run directory: nothing to write into


def test_cli_turns_tensorboard_off():
    from mtpeft.cli import build_parser

    args = build_parser().parse_args(["train", "--task", "sst2", "--data", "d", "--out", "o", "--no-tensorboard"])
    assert args.no_tensorboard
    args = build_parser().parse_args(["train", "--task", "sst2", "--data", "d", "--out", "o", "--report-to", "tensorboard,mlflow"])
    assert args.report_to == ["tensorboard", "mlflow"] and not args.no_tensorboard


def test_resumed_run_logs_each_step_once(tokenizer, tmp_path, monkeypatch):
    from conftest import tiny_bert

    # 18 steps, checkpoints at the epoch ends (6, 12); stopped after step 11, so the resumed run
    # redoes steps 7-11 and logs step 10 again: TensorBoard must show one point per step, and
    # that point averages steps 1-10 as the uninterrupted run's does (it averaged 7-10).
    config = TrainConfig(epochs=3, batch_size=4, lr=1e-2, warmup_ratio=0.0, checkpoint_every=0, bf16=False)

    def run(folder):
        model = MultiTaskModel(tiny_bert(tokenizer))
        model.add_task(SPEC, LoraSettings(r=2, alpha=4))
        return train_task(model, "mood", _examples(24), _examples(8, seed=1), config, out_dir=tmp_path / folder,
                          progress=False)

    def interrupt(where, step):
        if step == 11:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("mtpeft.train.fault_point", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run("run")
    run("run")
    run("whole")
    assert [step for step, _ in _scalars(tmp_path / "run")["train/loss"]] == [10, 18]
    assert _scalars(tmp_path / "run")["train/loss"] == _scalars(tmp_path / "whole")["train/loss"]
