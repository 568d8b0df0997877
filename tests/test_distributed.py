"""``accelerate launch`` with 2 CPU processes (DDP, gloo) matches one process with the same global batch."""

from __future__ import annotations

import os
import random
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


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                    reason="the accelerate launcher is not installed beside this Python")
def test_two_process_ddp_equals_single_process(tmp_path, tokenizer):
    backbone_dir = tmp_path / "backbone"
    tiny = tiny_bert(tokenizer)
    tiny.model.save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)
    _write_data(tmp_path / "train.csv")
    args = ["train", "--task", "t", "--task-type", "classification", "--data", str(tmp_path / "train.csv"),
            "--backbone", str(backbone_dir), "--batch-size", "16", "--epochs", "2", "--lr", "5e-3", "--fp32",
            "--no-progress", "--checkpoint-every", "-1", "--head-dropout", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "mtpeft", *args, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = str(Path(sys.executable).parent / "accelerate")
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp_cpu.yaml"
    ddp = subprocess.run([launcher, "launch", "--config_file", str(config), "-m", "mtpeft", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stderr.count(" training and ") == 2  # each of the two processes reported its data
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    moved = max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k)
    assert moved > 1e-3  # training did something
    for key in one:
        # Same data and steps; only the all-reduce's summation order differs.
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
