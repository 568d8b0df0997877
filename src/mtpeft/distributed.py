"""Data-parallel training through Hugging Face ``accelerate``.

Under ``accelerate launch`` (several processes, DDP; gloo on CPU, NCCL on GPUs) each
process takes its share of every global batch and DDP averages the gradients, so a run
on N processes follows the same optimisation path as one process with the same global
batch. Launched plainly (one process), every call here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import nn


class DataParallel:
    """The process's place in a run: which share of a batch it takes, whether it writes."""

    def __init__(self) -> None:
        self.accelerator = None
        self.rank, self.world_size = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import Accelerator

            # Without a GPU, accelerate makes the processes a group (gloo) only when told to use the CPU.
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
            self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
            kind = self.accelerator.distributed_type.value
            if kind in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):  # they need model and optimizer prepared together
                raise ValueError(f"this training loop runs data-parallel (DDP) processes; accelerate is configured "
                                 f"for {kind}, which it does not support yet (see docs/distributed.md)")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call for training steps: DDP-wrapped when distributed."""
        if self.accelerator is None:
            return model
        return self.accelerator.prepare_model(model, device_placement=True)

    def shard(self, indices: Sequence[int]) -> list[int] | None:
        """This process's rows of a global batch; ``None`` when the batch is too small to split
        (every process sees the same batch, so all skip it together)."""
        if self.world_size == 1:
            return list(indices)
        if len(indices) < self.world_size:
            return None
        return list(indices[self.rank::self.world_size])

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
