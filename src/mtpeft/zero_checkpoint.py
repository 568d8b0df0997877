"""Checkpoints of a DeepSpeed ZeRO-2/3 run as whole tensors, in torch's optimizer layout.

DeepSpeed's own checkpoints are pickles, which mtpeft never loads. Its ZeRO optimizer steps
flat fp32 partitions, so neither the weights nor the AdamW state sit in the tensors the model
names. ``deepspeed.utils.safe_get_full_*`` / ``safe_set_full_*`` gather and scatter them per
parameter; this module turns them into the same ``{"state", "param_groups"}`` dictionary a
plain ``optimizer.state_dict()`` gives, so a checkpoint is one safetensors file whether or not
DeepSpeed wrote it, and resumes under either.

Two places lean on deepspeed 0.19.8 internals, named where they are used: the attributes
holding the fp32 partitions, and re-linking ZeRO-2 parameters to their optimizer state.
"""

from __future__ import annotations

import torch
from torch import nn


class ZeroCheckpoint:
    """Reads and writes the whole-tensor state of the optimizer that DeepSpeed wrapped.

    Built from the plain torch optimizer *before* ``accelerator.prepare``: its parameter
    order and group sizes are the layout checkpoints use.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, stage: int) -> None:
        self.inner = optimizer  # DeepSpeed steps it on flat partitions; its state is keyed by them
        self.stage = stage
        self.ordered = [p for group in optimizer.param_groups for p in group["params"]]
        self.group_sizes = [len(group["params"]) for group in optimizer.param_groups]

    def whole_state(self, trainable: dict[str, nn.Parameter],
                    prepared: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
        """The trainable fp32 weights and the optimizer state, whole, on the CPU (a collective)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._link(prepared)
        weights = {name: safe_get_full_fp32_param(p).cpu() for name, p in trainable.items()}
        sample = next(iter(self.inner.state.values()), {})
        keys = [k for k, v in sample.items() if torch.is_tensor(v) and v.dim() > 0]
        state = {}
        for index, param in enumerate(self.ordered):
            state[index] = {key: safe_get_full_optimizer_state(param, key).cpu() for key in keys}
            if "step" in sample:
                state[index]["step"] = torch.as_tensor(sample["step"]).detach().clone().cpu()
        groups, start = [], 0
        for group, count in zip(self.inner.param_groups, self.group_sizes):  # torch's layout: indices per group
            settings = {k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, bool, str, tuple))}
            groups.append({**settings, "params": list(range(start, start + count))})
            start += count
        return weights, {"state": state, "param_groups": groups}

    def load_state(self, prepared: torch.optim.Optimizer, saved: dict) -> None:
        """Scatter a checkpoint's optimizer state (whole tensors) into the ZeRO partitions."""
        from deepspeed.utils import safe_set_full_optimizer_state

        # Before its first step the optimizer has no state to write into: create it as AdamW
        # does on its first step (zeros, step 0), then overwrite it part by part.
        zero = prepared.optimizer  # DeepSpeed's ZeRO optimizer, inside accelerate's wrapper
        # The fp32 partitions it steps (attribute names of ZeRO-3 and ZeRO-2, deepspeed 0.19.8)
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
        keys = {k for entry in saved["state"].values() for k, v in entry.items() if k != "step" and v.dim() > 0}
        for flat in flats:
            entry = self.inner.state[flat]
            for key in keys:
                entry.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
            entry.setdefault("step", torch.tensor(0.0))
        self._link(prepared)
        device = self.ordered[0].device
        for index, param in enumerate(self.ordered):
            for key, value in saved["state"].get(index, {}).items():
                if key != "step":
                    safe_set_full_optimizer_state(param, value.to(device), key)
        steps = [entry["step"] for entry in saved["state"].values() if "step" in entry]
        for entry in self.inner.state.values():
            if steps and "step" in entry:
                entry["step"] = steps[0].clone().to(torch.as_tensor(entry["step"]).device)
        for group, saved_group in zip(self.inner.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})

    def _link(self, prepared: torch.optim.Optimizer) -> None:
        """ZeRO-2 (deepspeed 0.19.8) links each parameter to its part of the optimizer state once,
        after the first parameter group's first step, so the groups after it stay unlinked and
        ``safe_get_full_optimizer_state`` cannot find their state; link them again."""
        zero = getattr(prepared, "optimizer", prepared)  # inside accelerate's wrapper
        if self.stage == 2 and hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
