"""A run killed with SIGKILL (also mid-checkpoint) resumes to the same result as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).with_name("_resume_job.py")


def _run(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MTPEFT_FAULT"}
    if fault:
        env["MTPEFT_FAULT"] = fault
    env["PYTHONPATH"] = os.pathsep.join([str(JOB.parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(JOB), str(out)], env=env, capture_output=True, text=True, timeout=300)


def _result(out: Path) -> tuple[bytes, bytes, dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    return ((out / "adapter_model.safetensors").read_bytes(), (out / "head.safetensors").read_bytes(),
            {k: metrics[k] for k in ("metrics", "steps", "final_loss")})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert _run(out).returncode == 0
    assert not (out / "checkpoint.safetensors").exists()
    return _result(out)


# 24 steps in all (64 examples / 8 per batch x 3 epochs), a checkpoint every 3 steps and at each epoch end.
@pytest.mark.parametrize("fault", ["step:5", "step:17", "checkpoint-write:1", "checkpoint-write:4"])
def test_killed_run_resumes_bit_identical(tmp_path, reference, fault):
    killed = _run(tmp_path, fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "task.json").exists()
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if fault != "checkpoint-write:1":  # that one died before any checkpoint existed
        assert "resuming t from" in resumed.stderr
    assert _result(tmp_path) == reference
    assert not list(tmp_path.glob(".*.tmp"))  # the half-written file of the killed run is cleaned up
