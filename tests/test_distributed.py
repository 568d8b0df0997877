"""``accelerate launch`` with 2 CPU processes (DDP, FSDP or DeepSpeed ZeRO over gloo) matches one
process with the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_bert


def _write_data(path: Path) -> None:
    rng = random.Random(0)
    words = {"pos": ["great", "superb", "lovely"], "neg": ["awful", "broken", "poor"]}
    with open(path, "w", encoding="utf-8") as f:
        f.write("text,label\n")
        for _ in range(128):
            label = rng.choice(["pos", "neg"])
            f.write(f"the {rng.choice(words[label])} item {rng.choice(['came', 'is', 'was here'])},{label}\n")


ACCELERATE = Path(sys.executable).parent / "accelerate"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
needs_launcher = pytest.mark.skipif(not ACCELERATE.exists(), reason="the accelerate launcher is not installed beside this Python")
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or (shutil.which("c++") is None and shutil.which("g++") is None),
    reason="DeepSpeed is not installed (mtpeft[deepspeed]), or no C++ compiler builds its CPU communication op")


@pytest.fixture
def run_setup(tmp_path, tokenizer):
    """A tiny backbone on disk, a small data file, and the `mtpeft train` arguments for both."""
    backbone_dir = tmp_path / "backbone"
    tiny = tiny_bert(tokenizer)
    tiny.model.save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)
    _write_data(tmp_path / "train.csv")
    args = ["train", "--task", "t", "--task-type", "classification", "--data", str(tmp_path / "train.csv"),
            "--backbone", str(backbone_dir), "--batch-size", "16", "--epochs", "2", "--lr", "5e-3", "--fp32",
            "--no-progress", "--head-dropout", "0"]
    return tmp_path, args


def _run(command: list[str], fault: str | None = None, gpus: bool = False,
         extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MTPEFT_FAULT"} | (extra_env or {})
    env["OMP_NUM_THREADS"] = "1"
    if not gpus:  # the CPU tests run on CPU processes on a GPU machine too
        env["CUDA_VISIBLE_DEVICES"] = ""
    if fault:
        env["MTPEFT_FAULT"] = fault
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _single(args: list[str], out: Path) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "mtpeft", *args, "--out", str(out)])


def _launched(config: str, args: list[str], out: Path, fault: str | None = None,
              gpus: bool = False, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return _run([str(ACCELERATE), "launch", "--config_file", str(CONFIGS / config), "-m", "mtpeft", *args,
                 "--out", str(out)], fault, gpus, extra_env)


def _assert_same_adapter(one_dir: Path, two_dir: Path) -> None:
    one = load_file(one_dir / "adapter_model.safetensors")
    two = load_file(two_dir / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    moved = max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k)
    assert moved > 1e-3  # training did something
    for key in one:
        # Same data and steps; only the reductions' summation order differs.
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    head_one, head_two = load_file(one_dir / "head.safetensors"), load_file(two_dir / "head.safetensors")
    for key in head_one:
        torch.testing.assert_close(head_two[key], head_one[key], rtol=1e-4, atol=1e-5)


@needs_launcher
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_process_ddp_equals_single_process(run_setup, compiled):
    tmp_path, args = run_setup
    args = [*args, "--checkpoint-every", "-1"]
    single = _single(args, tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    # Each DDP process compiles its own backbone; the gradients DDP averages are the compiled graph's.
    # The compiler logs each graph it traces, which shows it did not fall back to eager.
    ddp = _launched("ddp_cpu.yaml", [*args, "--compile"] if compiled else args, tmp_path / "two",
                    extra_env={"TORCH_LOGS": "graph_code"} if compiled else None)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stderr.count(" training and ") == 2  # each of the two processes reported its data
    if compiled:
        tracing_processes = set(re.findall(r"^\S+ \S+ (\d+) .*TRACED GRAPH", ddp.stderr, re.MULTILINE))
        assert len(tracing_processes) == 2, ddp.stderr[-3000:]
        assert "won't convert" not in ddp.stderr.lower()
    _assert_same_adapter(tmp_path / "one", tmp_path / "two")


@needs_launcher
@pytest.mark.parametrize("examples", [61, 17], ids=["uneven", "fewer-rows-than-processes"])
def test_two_process_ddp_equals_single_process_when_a_batch_splits_unevenly(run_setup, examples):
    """61 examples in batches of 16 end each epoch with 13 rows, 7 on one process and 6 on the
    other: every row still weighs 1/13 of that step, as on one process. 17 end it with one row,
    which the other process runs at weight 0: the row is trained on in its epoch, as on one
    process (it was skipped, and the run made up the step from the next epoch)."""
    tmp_path, args = run_setup
    args = [*args, "--checkpoint-every", "-1", "--max-train-examples", str(examples)]
    single = _single(args, tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _launched("ddp_cpu.yaml", args, tmp_path / "two")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    _assert_same_adapter(tmp_path / "one", tmp_path / "two")
    # The reported loss is the whole batch's, not the main process's share of it.
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    assert two["steps"] == one["steps"] == 2 * -(-examples // 16)


ON_CPU_AND_TWO_GPUS = pytest.mark.parametrize("gpus", [False, pytest.param(True, marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="the NCCL path needs 2 CUDA GPUs"))], ids=["cpu-gloo", "gpu-nccl"])


@needs_launcher
@ON_CPU_AND_TWO_GPUS
def test_two_process_fsdp_shards_and_equals_single_process(run_setup, gpus):
    """The FSDP config shards the model over 2 processes (CPU over gloo, or 2 GPUs over NCCL);
    training, evaluation, saving and the metrics match one unsharded process."""
    tmp_path, args = run_setup
    args = [*args, "--checkpoint-every", "-1"]
    single = _single(args, tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    fsdp = _launched("fsdp.yaml", args, tmp_path / "two", gpus=gpus)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    held = re.search(r"sharded over 2 processes \(FSDP2, blocks: (.+)\): this process holds ([\d,]+) of the "
                     r"model's ([\d,]+) parameters", fsdp.stderr)
    assert held, fsdp.stderr[-3000:]
    assert "BertLayer" in held.group(1)
    assert int(held.group(2).replace(",", "")) < 0.6 * int(held.group(3).replace(",", ""))
    _assert_same_adapter(tmp_path / "one", tmp_path / "two")
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["metrics"]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["metrics"]
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-6)  # the same predictions


@needs_launcher
@pytest.mark.parametrize("config", ["fsdp.yaml", pytest.param("deepspeed_zero2.yaml", marks=needs_deepspeed),
                                    pytest.param("deepspeed_zero3.yaml", marks=needs_deepspeed)])
def test_sharded_run_killed_mid_training_resumes_to_the_same_adapter(run_setup, config):
    """Checkpoints of a sharded (FSDP) or partitioned (DeepSpeed) run hold whole tensors, written
    by one process; every process takes its own part of them back on resume."""
    tmp_path, args = run_setup
    args = [*args, "--checkpoint-every", "3"]
    whole = _launched(config, args, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _launched(config, args, tmp_path / "resumed", fault="step:8")
    assert killed.returncode != 0
    assert (tmp_path / "resumed" / "checkpoint.safetensors").exists()
    resumed = _launched(config, args, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming t from" in resumed.stderr and "at step 6/" in resumed.stderr
    _assert_same_adapter(tmp_path / "whole", tmp_path / "resumed")


@needs_launcher
def test_ddp_run_with_dropout_killed_mid_training_resumes_to_the_same_adapter(run_setup):
    """Each process draws its own dropout masks (7 rows on one, 6 on the other at each epoch's
    end), so each takes its own RNG state back on resume."""
    tmp_path, args = run_setup
    args = [*args, "--checkpoint-every", "3", "--lora-dropout", "0.1", "--max-train-examples", "61"]
    whole = _launched("ddp_cpu.yaml", args, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _launched("ddp_cpu.yaml", args, tmp_path / "resumed", fault="step:8")
    assert killed.returncode != 0
    resumed = _launched("ddp_cpu.yaml", args, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 6/" in resumed.stderr
    _assert_same_adapter(tmp_path / "whole", tmp_path / "resumed")


@needs_launcher
@needs_deepspeed
@ON_CPU_AND_TWO_GPUS
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_deepspeed_zero_equals_single_process(run_setup, stage, gpus):
    """ZeRO-2 partitions gradients and optimizer state, ZeRO-3 the weights too (so evaluation runs
    on both processes and saving gathers the task's weights); both match one plain process."""
    tmp_path, args = run_setup
    single = _single([*args, "--checkpoint-every", "-1"], tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    zero = _launched(f"deepspeed_zero{stage}.yaml", [*args, "--checkpoint-every", "-1"], tmp_path / "zero", gpus=gpus)
    assert zero.returncode == 0, zero.stderr[-3000:]
    assert f"DeepSpeed ZeRO stage {stage} over 2 processes" in zero.stderr
    _assert_same_adapter(tmp_path / "one", tmp_path / "zero")
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "zero" / "metrics.json").read_text())
    assert two["metrics"]["accuracy"] == pytest.approx(one["metrics"]["accuracy"], abs=1e-6)
    assert two["trainable_parameters"] == one["trainable_parameters"]  # counted whole under ZeRO-3 too
