"""A run killed with SIGKILL (also mid-checkpoint) resumes to the same result as an uninterrupted run;
a save killed midway leaves every file complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import tiny_bert
from mtpeft import MultiTaskModel
from mtpeft.backbone import default_backbone_path
from mtpeft.storage import BundleIntegrityError

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


SAVE_JOB = Path(__file__).with_name("_save_job.py")
BUNDLE_FILES = ["t/adapter_model.safetensors", "t/adapter_config.json", "t/head.safetensors", "t/task.json",
                "t/README.md", "bundle.json"]


def _save(out: Path, scale: float, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MTPEFT_FAULT"}
    if fault:
        env["MTPEFT_FAULT"] = fault
    env["PYTHONPATH"] = os.pathsep.join([str(SAVE_JOB.parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(SAVE_JOB), str(out), str(scale)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Every bundle file as saved at scale 1 (old) and at scale 2 (new)."""
    found = {}
    for scale in (1.0, 2.0):
        out = tmp_path_factory.mktemp(f"scale{scale}")
        assert _save(out, scale).returncode == 0
        found[scale] = {name: (out / name).read_bytes() for name in BUNDLE_FILES}
    assert all(found[1.0][name] != found[2.0][name] for name in BUNDLE_FILES if name != "t/adapter_config.json")
    return found


@pytest.mark.parametrize("killed_at", ["adapter_model.safetensors", "head.safetensors", "task.json", "bundle.json"])
def test_save_killed_midway_leaves_each_file_old_or_new(tmp_path, versions, killed_at):
    """A bundle saved over an old one and killed just before a file's rename: every file is
    one complete version, and loading either works or fails its sha256 check, never worse."""
    assert _save(tmp_path, 1.0).returncode == 0
    killed = _save(tmp_path, 2.0, fault=f"save:{killed_at}")
    assert killed.returncode == -9, killed.stderr[-2000:]
    states = {name: "old" if (tmp_path / name).read_bytes() == versions[1.0][name] else
              "new" if (tmp_path / name).read_bytes() == versions[2.0][name] else "torn" for name in BUNDLE_FILES}
    assert "torn" not in states.values(), states
    assert states[f"t/{killed_at}" if killed_at != "bundle.json" else killed_at] == "old"
    try:
        MultiTaskModel.load(tmp_path, backbone=tiny_bert(AutoTokenizer.from_pretrained(default_backbone_path())))
    except BundleIntegrityError:
        assert set(states.values()) == {"old", "new"}  # a mix of versions is caught, not served
    else:
        assert set(states.values()) == {"old"} or set(states.values()) == {"new"}


@pytest.mark.parametrize("content", [b"not a checkpoint", None], ids=["damaged", "another-safetensors-file"])
def test_unreadable_checkpoint_is_named(tmp_path, content):
    """A checkpoint.safetensors that is damaged, or not mtpeft's, is refused naming the file."""
    import torch
    from safetensors.torch import save_file

    from mtpeft.checkpoint import load_checkpoint

    path = tmp_path / "checkpoint.safetensors"
    if content is None:
        save_file({"w": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="checkpoint.safetensors is not a readable mtpeft checkpoint"):
        load_checkpoint(path, {}, None, {})
