"""LoRA on the activation path, with one adapter per task and a task per batch row.

Reparametrising the weight (W + BA) lets a batch use only one adapter. Adding the
low-rank delta to the layer's *output* instead lets every row of a batch pick its own
task's adapter, which is what mixed-task serving needs:

    out = base(x) + (alpha / r) * B_t(A_t(dropout(x)))      for the rows of task t

The rows of a mixed batch are grouped by task and each group gets one pair of small
matmuls. Parameter names follow PEFT (``base_layer``, ``lora_A.<task>``, ``lora_B.<task>``)
so saving to the PEFT layout is a renaming that drops the task name.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


# A mixed batch whose tasks' ranks sum to more than this uses per-row gathered adapters
# instead of one stacked matmul (see MultiLoraLayer._stacked_delta). Measured with
# benchmarks/adapter_cache.py (MiniLM, batch 64, r=8): the stacked matmul stayed faster up
# to the 38 tasks per batch of a 1,000-task Zipf stream (283 vs 255 rows/s), so it is used
# until the stacked width passes the hidden sizes of typical backbones.
STACKED_MAX_COLUMNS = 1024


class AdapterRouting:
    """Which task's adapter each row of the current forward pass uses.

    One instance is shared by every LoRA layer of a model. ``single`` is set when the
    whole batch is one task (the fast path); ``groups`` holds ``(task, row_indices)``
    for a mixed batch, and ``row_group`` the index into ``groups`` of every row. Neither
    set means no adapter: the bare backbone.
    """

    def __init__(self) -> None:
        self.single: str | None = None
        self.groups: list[tuple[str, torch.Tensor]] = []
        self.row_group: torch.Tensor | None = None

    @contextlib.contextmanager
    def use(self, tasks: str | Sequence[str] | None, device: torch.device | None = None) -> Iterator[None]:
        """Route a forward pass: one task name for the batch, or one name per row."""
        previous = (self.single, self.groups, self.row_group)
        self.single, self.groups, self.row_group = None, [], None
        if isinstance(tasks, str):
            self.single = tasks
        elif tasks is not None:
            names = list(tasks)
            if len(set(names)) == 1:
                self.single = names[0]
            else:
                order: dict[str, list[int]] = {}
                for row, name in enumerate(names):
                    order.setdefault(name, []).append(row)
                self.groups = [(name, torch.tensor(rows, device=device)) for name, rows in order.items()]
                index = {name: i for i, name in enumerate(order)}
                self.row_group = torch.tensor([index[name] for name in names], device=device)
        try:
            yield
        finally:
            self.single, self.groups, self.row_group = previous


def routing_of(model: nn.Module) -> AdapterRouting:
    """The routing shared by every LoRA layer of ``model``, created on first use.

    It lives on the backbone, not on whoever wraps it, so layers and routing can never
    disagree even when two wrappers share one backbone.
    """
    routing = getattr(model, "_adapter_routing", None)
    if routing is None:
        routing = AdapterRouting()
        model._adapter_routing = routing
    return routing


class MultiLoraLayer(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus per-task low-rank deltas."""

    def __init__(self, base_layer: nn.Module, routing: AdapterRouting) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif isinstance(base_layer, Conv1D):  # weight is (in, out)
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            raise TypeError(f"LoRA supports nn.Linear and Conv1D layers, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.routing = routing
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.merged: str | None = None
        self._unmerged_weight: torch.Tensor | None = None
        self._stack_cache: dict = {}

    def add_adapter(self, task: str, r: int, alpha: float, dropout: float = 0.0) -> None:
        """Create task's A (kaiming-uniform, as PEFT) and B (zeros: the adapter starts as a no-op)."""
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got r={r}")
        weight = self.base_layer.weight
        self.lora_A[task] = nn.Linear(self.in_features, r, bias=False, device=weight.device)
        self.lora_B[task] = nn.Linear(r, self.out_features, bias=False, device=weight.device)
        nn.init.kaiming_uniform_(self.lora_A[task].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[task].weight)
        self.lora_dropout[task] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[task] = alpha / r

    def remove_adapter(self, task: str) -> None:
        if self.merged == task:
            self.unmerge()
        self._stack_cache.clear()
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            if task in store:
                del store[task]
        self.scaling.pop(task, None)

    def _delta(self, task: str, x: torch.Tensor) -> torch.Tensor:
        # The adapter's fp32 master weights are cast to the activations' dtype (bf16 when the
        # backbone computes in bf16); autograd carries the gradient back to the fp32 copy.
        a = self.lora_A[task].weight.to(x.dtype)
        b = self.lora_B[task].weight.to(x.dtype)
        return F.linear(F.linear(self.lora_dropout[task](x), a), b) * self.scaling[task]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        single = self.routing.single
        if single is not None:
            if single in self.lora_A and single != self.merged:
                out = out + self._delta(single, x)
            return out
        groups = [(task, rows) for task, rows in self.routing.groups if task in self.lora_A]
        if not groups:
            return out
        if self.merged is not None:
            raise RuntimeError("a mixed-task batch cannot run while an adapter is merged; unmerge first")
        if not torch.is_grad_enabled() and x.dim() == 3:
            return self._stacked_delta(x, out)
        for task, rows in groups:
            # x: (B, T, in) -> rows of this task only: (b_t, T, in)
            out = out.index_add(0, rows, self._delta(task, x.index_select(0, rows)).to(out.dtype))
        return out

    def _stacked_delta(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Inference on a mixed batch: every task's A stacked into one matmul for all rows,
        the columns of other tasks' rows zeroed, then every B in one matmul.

        Two large matmuls replace a gather, two small matmuls and a scatter per task:
        measured on the packaged MiniLM (batch 64 x 64 tokens, 4 tasks, r=8, bf16) it is
        the faster path (benchmarks/mixed_batch.py). Rows whose task has no adapter in
        this layer get no delta.
        """
        groups = self.routing.groups
        a_stack, b_stack, owner = self._stacks(tuple(task for task, _ in groups), x.dtype)
        row_group = self.routing.row_group  # (B,) index into groups
        if a_stack.shape[0] > STACKED_MAX_COLUMNS:
            return self._gathered_delta(x, out, tuple(task for task, _ in groups), row_group)
        mask = (owner.unsqueeze(0) == row_group.unsqueeze(1)).to(x.dtype)  # (B, sum r)
        low = F.linear(x, a_stack) * mask.unsqueeze(1)  # (B, T, sum r)
        return out.add_(F.linear(low, b_stack).to(out.dtype))

    def _gathered_delta(self, x: torch.Tensor, out: torch.Tensor, tasks: tuple[str, ...],
                        row_group: torch.Tensor) -> torch.Tensor:
        """Many tasks in one batch: each row gathers its own task's A and B (padded to the
        largest rank) and two batched matmuls apply them, a cost that does not grow with the
        number of tasks the way the stacked matmul's width does."""
        a_padded, b_padded = self._padded(tasks, x.dtype)  # (G, r, in), (G, out, r)
        low = torch.bmm(x, a_padded[row_group].transpose(1, 2))  # (B, T, r)
        return out.add_(torch.bmm(low, b_padded[row_group].transpose(1, 2)).to(out.dtype))

    def _padded(self, tasks: tuple[str, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task A (G, r_max, in) and scaled B (G, out, r_max), zeros for tasks without an adapter here."""
        present = [t for t in tasks if t in self.lora_A]
        versions = tuple((w._version, w.data_ptr()) for t in present for w in (self.lora_A[t].weight, self.lora_B[t].weight))
        key = ("padded", tasks, dtype)
        cached = self._stack_cache.get(key)
        if cached is not None and cached[0] == versions:
            return cached[1]
        rank = max(self.lora_A[t].weight.shape[0] for t in present)
        device = self.base_layer.weight.device
        a = torch.zeros(len(tasks), rank, self.in_features, dtype=dtype, device=device)
        b = torch.zeros(len(tasks), self.out_features, rank, dtype=dtype, device=device)
        for i, task in enumerate(tasks):
            if task in self.lora_A:
                r = self.lora_A[task].weight.shape[0]
                a[i, :r] = self.lora_A[task].weight.to(dtype)
                b[i, :, :r] = (self.lora_B[task].weight * self.scaling[task]).to(dtype)
        if len(self._stack_cache) > 64:
            self._stack_cache.clear()
        self._stack_cache[key] = (versions, (a, b))
        return a, b

    def _stacks(self, tasks: tuple[str, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum r, in) stacked A, (out, sum r) stacked and scaled B, and each column's group index.

        Cached per task tuple and dtype until any of those weights changes (``_version``).
        """
        present = [(i, t) for i, t in enumerate(tasks) if t in self.lora_A]
        versions = tuple((w._version, w.data_ptr()) for _, t in present
                         for w in (self.lora_A[t].weight, self.lora_B[t].weight))
        key = (tasks, dtype)
        cached = self._stack_cache.get(key)
        if cached is not None and cached[0] == versions:
            return cached[1]
        a = torch.cat([self.lora_A[t].weight for _, t in present]).to(dtype)
        b = torch.cat([self.lora_B[t].weight * self.scaling[t] for _, t in present], dim=1).to(dtype)
        owner = torch.cat([torch.full((self.lora_A[t].weight.shape[0],), i, device=a.device) for i, t in present])
        if len(self._stack_cache) > 64:
            self._stack_cache.clear()
        self._stack_cache[key] = (versions, (a, b, owner))
        return a, b, owner

    def _delta_weight(self, task: str) -> torch.Tensor:
        a, b = self.lora_A[task].weight, self.lora_B[task].weight
        delta = (b.float() @ a.float()) * self.scaling[task]  # (out, in)
        return delta if isinstance(self.base_layer, nn.Linear) else delta.T

    @torch.no_grad()
    def merge(self, task: str) -> None:
        """Fold task's delta into the base weight: one plain matmul per layer at inference.

        The unmerged weight is kept aside, so unmerging restores it exactly even in bf16,
        where subtracting the delta again would not.
        """
        if self.merged == task or task not in self.lora_A:
            return
        self.unmerge()
        weight = self.base_layer.weight
        self._unmerged_weight = weight.detach().clone()
        weight.copy_((weight.float() + self._delta_weight(task)).to(weight.dtype))
        self.merged = task

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            return
        self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = None


def modules_outside_lora(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that does not descend into LoRA layers: their per-task adapters can
    number thousands of modules in a server holding many tasks."""
    yield prefix, module
    if isinstance(module, MultiLoraLayer):
        return
    for name, child in module.named_children():
        yield from modules_outside_lora(child, f"{prefix}.{name}" if prefix else name)


def lora_layers_of(model: nn.Module) -> dict[str, MultiLoraLayer]:
    """Every LoRA layer of ``model`` by module path, without walking the adapters inside them."""
    return {path: m for path, m in modules_outside_lora(model) if isinstance(m, MultiLoraLayer)}


def replace_submodule(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` in ``model`` (the wrapper of the module that was there)."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
    return module


def inject_lora_layers(model: nn.Module, target_modules: Sequence[str],
                       exclude: Sequence[str] = ("pooler",)) -> dict[str, MultiLoraLayer]:
    """Wrap every module whose name ends with a target in a ``MultiLoraLayer``.

    Modules under ``exclude`` (BERT's pooler, which mean-pooling heads never use) are left alone.

    Returns the wrapped layers by their module path in ``model``. Already wrapped layers
    are returned as they are, so adding a task with the same targets is cheap.
    """
    routing = routing_of(model)
    layers: dict[str, MultiLoraLayer] = {}
    for path, module in list(modules_outside_lora(model)):
        if path.rsplit(".", 1)[-1] not in target_modules or any(part in exclude for part in path.split(".")):
            continue
        if not isinstance(module, MultiLoraLayer):
            module = replace_submodule(model, path, MultiLoraLayer(module, routing))
        layers[path] = module
    if not layers:
        raise ValueError(f"no module of the backbone matches LoRA target_modules={list(target_modules)}")
    return layers
