"""The accelerate config files under configs/accelerate/: they load with accelerate's own loader,
name only options ``accelerate launch`` knows, and the training loop refuses what it cannot run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {"ddp_cpu.yaml": DistributedType.MULTI_GPU, "ddp_gpu.yaml": DistributedType.MULTI_GPU,
            "fsdp.yaml": DistributedType.FSDP, "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
            "deepspeed_zero3.yaml": DistributedType.DEEPSPEED}


def test_every_config_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_names_only_known_launch_options(name):
    config = load_config_from_file(str(CONFIGS / name))
    assert isinstance(config, ClusterConfig) and config.distributed_type == EXPECTED[name]
    launch_options = {action.dest for action in launch_command_parser()._actions}
    # accelerate launch copies the nested sections into its own options: a misspelt key would be ignored
    unknown = sorted((set(config.fsdp_config) | set(config.deepspeed_config)) - launch_options)
    assert not unknown, unknown
    args, _, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "mtpeft", "train"]))
    assert args.use_fsdp == (name == "fsdp.yaml") and args.use_deepspeed == name.startswith("deepspeed")
    if name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-6])
        assert config.deepspeed_config["zero3_init_flag"] is False  # the training loop refuses it
    assert config.mixed_precision == "no"  # mtpeft chooses its own precision


def _fake_accelerator(kind: str, zero_stage: int | None = None):
    class Configured:
        def __init__(self, cpu=False, kwargs_handlers=()):
            self.distributed_type, self.process_index, self.num_processes = DistributedType(kind), 0, 2
            self.state = type("State", (), {"deepspeed_plugin": type("Plugin", (), {"zero_stage": zero_stage})})

    return Configured


def test_training_loop_refuses_megatron_clearly(monkeypatch):
    import accelerate

    from mtpeft.distributed import DataParallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setattr(accelerate, "Accelerator", _fake_accelerator("MEGATRON_LM"))
    with pytest.raises(ValueError, match="configured for MEGATRON_LM.*docs/distributed.md"):
        DataParallel()


def test_deepspeed_stages_other_than_2_and_3_are_refused(monkeypatch):
    import accelerate

    from mtpeft.distributed import DataParallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", raising=False)
    monkeypatch.setattr(accelerate, "Accelerator", _fake_accelerator("DEEPSPEED", zero_stage=1))
    with pytest.raises(ValueError, match="ZeRO stage 2 or 3; the config asks for stage 1"):
        DataParallel()
    monkeypatch.setattr(accelerate, "Accelerator", _fake_accelerator("DEEPSPEED", zero_stage=3))
    assert DataParallel().zero_stage == 3
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true")
    with pytest.raises(ValueError, match="zero3_init_flag is not supported"):
        DataParallel()


def test_deepspeed_optimizer_offload_is_refused_before_starting(monkeypatch):
    """With it accelerate swaps the run's AdamW for DeepSpeed's CPU Adam, whose state the
    checkpoints would not hold: a resumed run would restart AdamW's moments from zero."""
    import accelerate

    from mtpeft.distributed import DataParallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", raising=False)
    monkeypatch.setattr(accelerate, "Accelerator", _fake_accelerator("DEEPSPEED", zero_stage=2))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    assert DataParallel().zero_stage == 2
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(ValueError, match="offload_optimizer_device is not supported.*set it to none"):
        DataParallel()


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("FSDP_VERSION", "1", "fsdp_version: 2"),
    ("FSDP_ACTIVATION_CHECKPOINTING", "true", "fsdp_activation_checkpointing is not supported"),
])
def test_fsdp_settings_the_loop_does_not_apply_are_refused_before_starting(setting, value, message, monkeypatch):
    from mtpeft.distributed import DataParallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv(setting, value)
    with pytest.raises(ValueError, match=message):
        DataParallel()


def test_fsdp_blocks_come_from_the_config_or_the_backbone(backbone, monkeypatch):
    from mtpeft.distributed import block_classes
    from mtpeft.model import MultiTaskModel

    model = MultiTaskModel(backbone)
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    assert block_classes(model) == {"BertEmbeddings", "BertLayer"}  # BertModel._no_split_modules
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "BertLayer")
    assert block_classes(model) == {"BertLayer"}
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "GPT2Block")
    with pytest.raises(ValueError, match=r"names \['GPT2Block'\].*BertLayer"):
        block_classes(model)


def test_fsdp_refuses_tasks_that_train_more_than_adapter_and_head(backbone):
    from torch import nn

    from mtpeft.distributed import DataParallel
    from mtpeft.model import MultiTaskModel

    model = MultiTaskModel(backbone)
    model.extra_parameters["t"] = {"w": nn.Parameter(torch.zeros(2))}
    parallel = DataParallel()
    parallel.sharded, parallel.world_size = True, 2
    with pytest.raises(ValueError, match=r"FSDP shards LoRA and head-only tasks; \['t'\]"):
        parallel.shard_model(model, bf16=False)


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                    reason="the accelerate launcher is not installed beside this Python")
def test_ddp_cpu_config_starts_a_two_process_group(tmp_path):
    script = tmp_path / "show_ranks.py"
    script.write_text("import sys\nfrom pathlib import Path\nfrom mtpeft.distributed import DataParallel\n"
                      "p = DataParallel()\n"  # each process writes its own file: their stdout lines interleave
                      "Path(sys.argv[1], f'rank{p.rank}').write_text(f'{p.world_size} {p.accelerator.distributed_type.value}')\n"
                      "p.barrier()\n")
    launcher = str(Path(sys.executable).parent / "accelerate")
    run = subprocess.run([launcher, "launch", "--config_file", str(CONFIGS / "ddp_cpu.yaml"), str(script), str(tmp_path)],
                         check=False, env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = {p.name: p.read_text() for p in tmp_path.glob("rank?")}
    assert ranks == {"rank0": "2 MULTI_CPU", "rank1": "2 MULTI_CPU"}
