"""Training on several processes: data parallel (DDP) or DeepSpeed ZeRO through Hugging Face
``accelerate``, or the model sharded over the processes with PyTorch's FSDP2.

Under ``accelerate launch`` each process takes its share of every global batch and the
gradients are averaged, so a run on N processes follows the same optimisation path as one
process with the same global batch. Launched plainly (one process), every call here is a
no-op.

- DDP (gloo on CPU, NCCL on GPUs): ``accelerator.prepare_model`` wraps the model.
- FSDP (an accelerate config with ``distributed_type: FSDP``): the loop applies FSDP2's
  ``fully_shard`` itself, to every block named by ``fsdp_transformer_layer_cls_to_wrap`` and
  then to the whole model, with the config's ``fsdp_reshard_after_forward``. accelerate
  (1.15) sets FSDP up only on accelerator devices, while ``fully_shard`` shards over gloo on
  the CPU as well as over NCCL, so one code path serves both and is tested on the CPU.
  Parameters become ``DTensor`` shards; ``full`` and ``like`` convert between them and the
  whole tensors that checkpoints and saved tasks hold.
- DeepSpeed (``distributed_type: DEEPSPEED``, ZeRO stage 2 or 3): ``accelerator.prepare``
  wraps model and optimizer in DeepSpeed's engine, whose ``backward`` also clips, steps and
  zeroes. On a machine without GPUs accelerate needs the gloo backend named to start the
  group. ZeRO-3 partitions the weights, so forward passes need every process and saving
  gathers the task's weights first. Checkpoints hold the whole fp32 weights and optimizer
  state (``mtpeft.zero_checkpoint``), the same safetensors files as without DeepSpeed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def _env_flag(name: str, default: bool = False) -> bool:
    return os.environ.get(name, str(default)).lower() in ("1", "true", "yes")


def _deepspeed_launch() -> bool:
    return _env_flag("ACCELERATE_USE_DEEPSPEED")


def launched_processes() -> int:
    """How many processes ``accelerate launch`` or ``torchrun`` started for this run (1 when
    started plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def refuse_several_processes(what: str) -> None:
    """Raise for work that one process does alone: launched on several, each process would run
    all of it and write the same files."""
    if launched_processes() > 1:
        raise ValueError(f"{what} runs in one process, not under accelerate launch or torchrun "
                         f"({launched_processes()} processes); data-parallel training is `mtpeft train` "
                         "(docs/distributed.md)")


def fsdp_launch() -> bool:
    """Started by ``accelerate launch`` with an FSDP config on several processes. The model is
    then built on the CPU: sharding moves each process's part onto its own device."""
    return launched_processes() > 1 and _env_flag("ACCELERATE_USE_FSDP")


class DataParallel:
    """The process's place in a run: which share of a batch it takes, whether it writes,
    and how the model is spread over the processes."""

    def __init__(self) -> None:
        self.accelerator = None
        self.sharded = False  # FSDP
        self.zero_stage: int | None = None  # DeepSpeed
        self._zero = None  # its checkpoint reader/writer, once the optimizer is prepared
        self.device: torch.device | None = None  # where sharding puts this process's part
        self.rank, self.world_size = 0, 1
        if launched_processes() <= 1:
            return
        if fsdp_launch():
            self._join_for_fsdp()
            return
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        cuda, deepspeed = torch.cuda.is_available(), _deepspeed_launch()
        if deepspeed and _env_flag("ACCELERATE_DEEPSPEED_ZERO3_INIT"):
            raise ValueError("zero3_init_flag is not supported by mtpeft's training loop (the model is built whole, "
                             "then partitioned by DeepSpeed); set it to false")
        if deepspeed and os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower() != "none":
            raise ValueError("offload_optimizer_device is not supported by mtpeft's training loop (accelerate then "
                             "replaces its AdamW by DeepSpeed's CPU Adam, whose state checkpoints do not hold); "
                             "set it to none")
        # Without a GPU, accelerate makes DDP processes a group (gloo) only when told to use the
        # CPU, and DeepSpeed processes only when the backend is named.
        handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not cuda else []
        self.accelerator = Accelerator(cpu=not cuda and not deepspeed, kwargs_handlers=handlers)
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        kind = self.accelerator.distributed_type.value
        if kind == "DEEPSPEED":
            self.zero_stage = int(self.accelerator.state.deepspeed_plugin.zero_stage)
            if self.zero_stage not in (2, 3):
                raise ValueError(f"mtpeft runs DeepSpeed ZeRO stage 2 or 3; the config asks for stage {self.zero_stage}")
        elif kind == "MEGATRON_LM":
            raise ValueError(f"this training loop runs DDP, FSDP or DeepSpeed processes; accelerate is configured "
                             f"for {kind}, which it does not support (see docs/distributed.md)")

    def _join_for_fsdp(self) -> None:
        import torch.distributed as dist

        if os.environ.get("FSDP_VERSION", "2") != "2":
            raise ValueError("mtpeft shards with FSDP2 (fully_shard); set fsdp_version: 2 in the accelerate config")
        if _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
            raise ValueError("fsdp_activation_checkpointing is not supported by mtpeft's training loop; set it to false")
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.sharded = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def engine_steps(self) -> bool:
        """DeepSpeed's engine clips, steps and zeroes the gradients inside ``backward``."""
        return self.zero_stage is not None

    @property
    def forward_needs_all(self) -> bool:
        """Weights are partitioned (FSDP, ZeRO-3): every process must run every forward pass."""
        return self.sharded or self.zero_stage == 3

    def shard_model(self, model: nn.Module, bf16: bool) -> str | None:
        """FSDP: shard ``model`` in place over the processes (before its optimizer is built:
        the parameters are replaced by shards). Blocks compute in bf16 when ``bf16``, from
        fp32 shards that the optimizer updates; gradients are reduced in fp32."""
        if not self.sharded:
            return None
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        task_extras = [name for name, extra in getattr(model, "extra_parameters", {}).items() if extra]
        if task_extras:
            raise ValueError(f"FSDP shards LoRA and head-only tasks; {task_extras} train other parameters "
                             "(a peft wrapper, bottleneck adapters or the whole backbone)")
        model.full_precision()  # fp32 shards: FSDP casts to bf16 as it gathers
        model.sharded = True
        cuda = self.device.type == "cuda"
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        settings = {"mesh": mesh, "reshard_after_forward": _env_flag("FSDP_RESHARD_AFTER_FORWARD", True)}
        if bf16:
            settings["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if cuda and _env_flag("FSDP_OFFLOAD_PARAMS"):
            settings["offload_policy"] = CPUOffloadPolicy()
        blocks = block_classes(model)
        for module in list(model.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module, **settings)
        fully_shard(model, **settings)
        held = sum(local(p).numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        return (f"sharded over {self.world_size} processes (FSDP2, blocks: {', '.join(sorted(blocks))}): "
                f"this process holds {held:,} of the model's {total:,} parameters ({held / total:.0%})")

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int,
                max_grad_norm: float) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The module to call for training steps and the optimizer to step: DDP-wrapped when
        data-parallel, DeepSpeed's engine and optimizer wrapper under DeepSpeed."""
        if self.accelerator is None:
            return model, optimizer
        if self.zero_stage is None:
            return self.accelerator.prepare_model(model, device_placement=True), optimizer
        from mtpeft.zero_checkpoint import ZeroCheckpoint

        self._zero = ZeroCheckpoint(optimizer, self.zero_stage)  # before DeepSpeed re-lays its parameters out
        settings = self.accelerator.state.deepspeed_plugin.deepspeed_config
        micro = max(1, batch_size // self.world_size)
        settings.update({"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
                         "train_batch_size": micro * self.world_size, "gradient_clipping": max_grad_norm or 0.0,
                         # mtpeft chooses its own precision (bf16 autocast over fp32 weights), as with DDP
                         "bf16": {"enabled": False}, "fp16": {"enabled": False}})
        model.full_precision()
        if self.zero_stage == 3:
            model.sharded = True  # partitioned weights: never re-held in bf16 or merged
        return self.accelerator.prepare(model, optimizer)

    def checkpoint_state(self, trainable: dict[str, nn.Parameter],
                         optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
        """The trainable weights and the optimizer state (``state_dict`` layout) as whole tensors.
        A collective where the model is sharded or partitioned: every process must call it."""
        if self.zero_stage is not None:
            return self._zero.whole_state(trainable, optimizer)
        weights = {name: full(p.detach()) for name, p in trainable.items()}
        state = optimizer.state_dict()
        whole = {i: {k: full(v) if torch.is_tensor(v) else v for k, v in entry.items()}
                 for i, entry in state["state"].items()}
        return weights, {"state": whole, "param_groups": state["param_groups"]}

    def rng_states(self, device: torch.device | str | None = None) -> list[dict[str, torch.Tensor]]:
        """Every process's ``local_rng_state(device)`` (CPU and GPU generators), by rank (a
        collective): each draws its own dropout masks, so each must take its own state back on resume."""
        if self.world_size == 1:
            return [local_rng_state(device)]
        import torch.distributed as dist

        states = [None] * self.world_size
        dist.all_gather_object(states, local_rng_state(device))
        return states

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: dict) -> None:
        """Put a checkpoint's optimizer state (whole tensors) back into the prepared optimizer."""
        if self.zero_stage is not None:
            self._zero.load_state(optimizer, saved)
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {i: {k: like(params[i], v) if v.shape == params[i].shape else v for k, v in entry.items()}
                 for i, entry in saved["state"].items()}
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine_steps:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def batch_loss(self, loss: torch.Tensor, weight: float) -> float:
        """The mean loss over the whole batch, from each process's ``loss`` on its share and its
        weight from ``shard`` (a collective), so a run reports what one process would."""
        if self.world_size == 1:
            return float(loss.detach())
        import torch.distributed as dist

        total = loss.detach().float() * weight
        dist.all_reduce(total)
        return float(total) / self.world_size

    def shard(self, indices: Sequence[int]) -> tuple[list[int], float]:
        """This process's rows of a global batch, and what its mean loss over them is multiplied
        by: the processes' gradients are averaged, so with unequal shares each row still counts
        ``1 / len(indices)``, as on one process. A process left without a row (a batch with fewer
        rows than processes) runs the batch's first row with weight 0: it still joins the step, so
        the batch is trained on in its epoch and the run takes the steps one process takes."""
        if self.world_size == 1:
            return list(indices), 1.0
        rows = list(indices[self.rank::self.world_size])
        if not rows:
            return list(indices[:1]), 0.0
        return rows, len(rows) * self.world_size / len(indices)

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        elif self.sharded:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def inference(self, model: nn.Module) -> Iterator[None]:
        """FSDP: the model's own parameters outside its blocks (embeddings, heads) gathered while
        the block runs. Inference calls the backbone and heads directly, not ``model.forward``,
        whose hooks gather them in training; the blocks still gather themselves. Every process
        must run the same forward passes inside it."""
        if not self.sharded:
            yield
            return
        model.unshard()
        try:
            yield
        finally:
            model.reshard()

    @contextlib.contextmanager
    def gathered(self, model: nn.Module, parameters: dict[str, nn.Parameter]) -> Iterator[None]:
        """Whole tensors in place of the shards of ``parameters`` while the block runs (to save
        them); every process must enter it, in the same order."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(parameters.values())):
                yield
            return
        if not self.sharded:
            yield
            return
        wanted = {id(p) for p in parameters.values()}
        swapped = []
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and id(param) in wanted:
                    module._parameters[name] = nn.Parameter(full(param).detach(), requires_grad=False)
                    swapped.append((module, name, param))
        try:
            yield
        finally:
            for module, name, param in swapped:
                module._parameters[name] = param


def block_classes(model: nn.Module) -> set[str]:
    """The module classes FSDP shards one by one: the accelerate config's
    ``fsdp_transformer_layer_cls_to_wrap``, else what the backbone names as unsplittable."""
    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if named:
        classes = {c.strip() for c in named.split(",") if c.strip()}
    else:
        backbone = getattr(model, "backbone", model)
        classes = set(getattr(backbone, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    missing = classes - present
    if named and missing:
        raise ValueError(f"fsdp_transformer_layer_cls_to_wrap names {sorted(missing)}, which this backbone does not "
                         f"have; its block class is one of {sorted(c for c in present if c.endswith(('Layer', 'Block')))}")
    return classes & present


def parameter_count(parameters) -> int:
    """Elements of ``parameters``, whole, also where ZeRO-3 has partitioned them away."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in parameters)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process must call it), else ``tensor``."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a shard, else ``tensor``."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_rng_state(device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """This process's generators: the CPU's, and its GPU's once it has drawn on one (dropout on
    a GPU draws from the GPU's own generator): ``device``'s where it names a GPU (a run on
    ``cuda:1``), else the current GPU's."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(generator_gpu(device))
    return state


def generator_gpu(device: torch.device | str | None) -> torch.device | str:
    """``device`` if it is a GPU, else the current one (torch's ``"cuda"``)."""
    return device if device is not None and torch.device(device).type == "cuda" else "cuda"


def like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as ``param`` is: this process's shard of it where ``param`` is a
    shard (every process holds ``whole``, so nothing is sent), else ``whole`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return whole
    return distribute_tensor(whole.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
