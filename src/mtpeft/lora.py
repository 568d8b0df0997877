"""LoRA on the activation path, with one adapter per task and a task per batch row.

Reparametrising the weight (W + BA) lets a batch use only one adapter. Adding the
low-rank delta to the layer's *output* instead lets every row of a batch pick its own
task's adapter, which is what mixed-task serving needs:

    out = base(x) + (alpha / r) * B_t(A_t(dropout(x)))      for the rows of task t

In training, the rows of a mixed batch are grouped by task and each group gets one pair of
small matmuls; in inference every task's A and B are stacked into one pair of matmuls for
the whole batch (``MultiLoraLayer._stacked_delta``). Parameter names follow PEFT
(``base_layer``, ``lora_A.<task>``, ``lora_B.<task>``) so saving to the PEFT layout is a renaming that drops the task name.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from mtpeft.backbone import UNUSED_MODULES


# A mixed batch whose tasks' ranks sum to more than this uses per-row gathered adapters
# instead of one stacked matmul (see MultiLoraLayer._stacked_delta). Measured on MiniLM
# (batch 64 short texts, r=8): the stacked matmul was faster up to the 38 tasks per batch of
# a 1,000-task Zipf stream (benchmarks/adapter_cache.py, 283 vs 255 rows/s) and, once both
# were built from cached per-task casts, level with the gathered one (132.3 vs 132.5 ms per
# batch of 38 tasks, a new task set each batch; in-process timing); applying each task to its own contiguous rows was slower than both
# (one small matmul per task and shape). So stacking is used until its width passes the
# hidden sizes of typical backbones.
STACKED_MAX_COLUMNS = 1024
# Stacked weights kept per layer, one entry per task set: a steady mix repeats its few sets,
# while a server over many tasks rarely repeats one and would only hold memory with more.
STACK_CACHE_ENTRIES = 8
# Stacked widths are padded to a multiple of this (see MultiLoraLayer._stacks).
STACK_COLUMN_MULTIPLE = 32
# Removed adapters' modules kept per layer and rank for the next install to reuse: a server
# that evicts one task to load another then swaps weights instead of building modules.
SPARE_ADAPTERS = 4


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
        self._merged_from: tuple | None = None  # the merged adapter's _adapter_state when it was merged
        self._stack_cache: dict = {}
        self._cast_cache: dict[str, dict[torch.dtype, tuple]] = {}  # task -> dtype -> (versions, (A, scaled B))
        self._spare: dict[int, list[tuple[nn.Linear, nn.Linear]]] = {}  # rank -> removed adapters' (A, B) modules

    def add_adapter(self, task: str, r: int, alpha: float, dropout: float = 0.0, *, initialize: bool = True,
                    training: bool = False) -> None:
        """Create task's A (kaiming-uniform, as PEFT) and B (zeros: the adapter starts as a no-op).

        ``initialize=False`` leaves A and B unset for a caller that copies saved weights in
        right away: a server swapping adapters in and out skips two random fills per layer,
        and takes the modules of a removed adapter of the same rank when there is one.
        ``training`` is the mode of the new modules (their dropout).
        """
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got r={r}")
        device = self.base_layer.weight.device
        if initialize:
            a = nn.Linear(self.in_features, r, bias=False, device=device)
            b = nn.Linear(r, self.out_features, bias=False, device=device)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        elif self._spare.get(r):
            a, b = self._spare[r].pop()  # a removed task's modules, weights overwritten by the caller
            a.weight.requires_grad_(True)  # as a new module's
            b.weight.requires_grad_(True)
        else:
            a = _uninitialised_linear(self.in_features, r, device)
            b = _uninitialised_linear(r, self.out_features, device)
        # Adapters without dropout share one stateless Identity: a server installing adapters
        # by the thousand would otherwise build a module per layer per install.
        dropout_layer = nn.Dropout(dropout) if dropout > 0 else self.__dict__.setdefault("_no_dropout", nn.Identity())
        for store, module in ((self.lora_A, a), (self.lora_B, b), (self.lora_dropout, dropout_layer)):
            module.__dict__["training"] = training  # leaf modules: no walk, no Module.__setattr__ checks
            if task in store:
                del store[task]
            store._modules[task] = module  # ModuleDict's name checks cost as much as building the module
        self.scaling[task] = alpha / r

    def remove_adapter(self, task: str) -> None:
        if self.merged == task:
            self.unmerge()
        self._stack_cache = {key: value for key, value in self._stack_cache.items() if task not in _tasks_of(key)}
        self._cast_cache.pop(task, None)
        if task in self.lora_A and task in self.lora_B:
            a, b = self.lora_A[task], self.lora_B[task]
            spare = self._spare.setdefault(a.out_features, [])
            if len(spare) < SPARE_ADAPTERS and type(a) is nn.Linear and type(b) is nn.Linear:
                spare.append((a, b))
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            if task in store:
                del store[task]
        self.scaling.pop(task, None)

    def _apply(self, fn, recurse: bool = True):
        """A move (``to()``, ``cuda()``) drops the spare modules and cached casts: they are not
        submodules, so they would stay behind on the old device and hold its memory."""
        self._spare.clear()
        self._stack_cache.clear()
        self._cast_cache.clear()
        return super()._apply(fn, recurse)

    def _delta(self, task: str, x: torch.Tensor) -> torch.Tensor:
        # The adapter's fp32 master weights are cast to the activations' dtype (bf16 when the
        # backbone computes in bf16); autograd carries the gradient back to the fp32 copy.
        # The scaling goes into the (out, r) B, not onto the (batch, tokens, out) delta: one
        # element-wise pass over the activations less, forward and backward, per layer.
        a = self.lora_A[task].weight.to(x.dtype)
        b = (self.lora_B[task].weight * self.scaling[task]).to(x.dtype)
        return F.linear(F.linear(self.lora_dropout[task](x), a), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None and self._merged_from != self._adapter_state(self.merged):
            # Its adapter changed since the merge: a batch too small to merge again would run the old delta.
            self.unmerge()
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

    def _cast(self, task: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Task's A and scaled B in ``dtype``, cached until either weight or the scaling changes."""
        a, b = self.lora_A[task].weight, self.lora_B[task].weight
        versions = self._adapter_state(task)
        by_dtype = self._cast_cache.setdefault(task, {})
        cached = by_dtype.get(dtype)
        if cached is None or cached[0] != versions:
            cached = by_dtype[dtype] = (versions, (a.to(dtype), (b * self.scaling[task]).to(dtype)))
        return cached[1]

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
        casts = {t: self._cast(t, dtype) for t in tasks if t in self.lora_A}
        key = ("padded", tasks, dtype)
        cached = self._cached_stack(key, list(casts.values()))
        if cached is not None:
            return cached
        rank = max(a.shape[0] for a, _ in casts.values())
        some_a, some_b = next(iter(casts.values()))
        zero_a, zero_b = some_a.new_zeros(rank, self.in_features), some_b.new_zeros(self.out_features, rank)
        padded = [casts.get(t, (zero_a, zero_b)) for t in tasks]
        if any(a.shape[0] != rank for a, _ in padded):  # mixed ranks: pad each to the largest
            padded = [(F.pad(a, (0, 0, 0, rank - a.shape[0])), F.pad(b, (0, rank - b.shape[1]))) for a, b in padded]
        a = torch.stack([a for a, _ in padded])
        b = torch.stack([b for _, b in padded])
        if len(self._stack_cache) >= STACK_CACHE_ENTRIES:
            self._stack_cache.clear()
        self._stack_cache[key] = (list(casts.values()), (a, b))
        return a, b

    def _cached_stack(self, key: tuple, casts: list[tuple[torch.Tensor, torch.Tensor]]):
        """The stack cached under ``key`` if it was built from exactly these per-task casts."""
        cached = self._stack_cache.get(key)
        if cached is not None and len(cached[0]) == len(casts) and all(x is y for x, y in zip(cached[0], casts)):
            return cached[1]
        return None

    def _stacks(self, tasks: tuple[str, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum r, in) stacked A, (out, sum r) stacked and scaled B, and each column's group index.

        Cached per task tuple and dtype until any of those weights changes. A server whose
        batches rarely repeat a task set rebuilds the stack from per-task casts (``_cast``):
        one concatenation, not a cast of every task's weights for every batch.
        """
        present = [(i, t) for i, t in enumerate(tasks) if t in self.lora_A]
        casts = [self._cast(t, dtype) for _, t in present]  # each task's weights cast once, not per task set
        key = (tasks, dtype)
        cached = self._cached_stack(key, casts)
        if cached is not None:
            return cached
        # Zero columns pad the width to a multiple of STACK_COLUMN_MULTIPLE (owner -1: no row's):
        # the matmul library compiles a kernel per shape, and a server's task counts vary.
        width = sum(a_t.shape[0] for a_t, _ in casts)
        pad = -width % STACK_COLUMN_MULTIPLE
        device = casts[0][0].device
        a = torch.cat([a_t for a_t, _ in casts] + [casts[0][0].new_zeros(pad, self.in_features)])
        b = torch.cat([b_t for _, b_t in casts] + [casts[0][1].new_zeros(self.out_features, pad)], dim=1)
        groups = torch.tensor([i for i, _ in present] + [-1], device=device)
        owner = groups.repeat_interleave(torch.tensor([a_t.shape[0] for a_t, _ in casts] + [pad], device=device))
        if len(self._stack_cache) >= STACK_CACHE_ENTRIES:
            self._stack_cache.clear()
        self._stack_cache[key] = (casts, (a, b, owner))
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
        if task not in self.lora_A or self.merged == task and self._merged_from == self._adapter_state(task):
            return
        self.unmerge()  # another task's delta, or this task's from weights changed since (a reload, an edit)
        weight = self.base_layer.weight
        self._unmerged_weight = weight.detach().clone()
        weight.copy_((weight.float() + self._delta_weight(task)).to(weight.dtype))
        self.merged, self._merged_from = task, self._adapter_state(task)

    def _adapter_state(self, task: str) -> tuple:
        """What changes when ``task``'s adapter weights or scaling do (in place or replaced)."""
        a, b = self.lora_A[task].weight, self.lora_B[task].weight
        return a._version, a.data_ptr(), b._version, b.data_ptr(), self.scaling[task]

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            return
        self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = None


def _tasks_of(cache_key: tuple) -> tuple[str, ...]:
    """The tasks a ``MultiLoraLayer._stack_cache`` entry was built from."""
    return cache_key[1] if cache_key[0] == "padded" else cache_key[0]


def _uninitialised_linear(in_features: int, out_features: int, device: torch.device) -> nn.Linear:
    """A bias-free ``nn.Linear`` with its weight allocated but not filled.

    ``nn.Linear(...)`` always runs its kaiming init and ``torch.nn.utils.skip_init`` goes
    through the meta device; either took most of an adapter install's ~1.8 ms (profiled:
    1,000-task server, 12 LoRA layers per task). This builds the module the way
    ``nn.Linear.__init__`` does, minus ``reset_parameters``.
    """
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.__dict__.update(in_features=in_features, out_features=out_features)  # plain ints, as nn.Linear has
    # Straight into the parameter table: register_parameter's name checks cost more than the rest.
    layer._parameters["weight"] = nn.Parameter(torch.empty(out_features, in_features, device=device))
    layer._parameters["bias"] = None
    return layer


def modules_outside_lora(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that does not descend into LoRA layers: their per-task adapters can
    number thousands of modules in a server holding many tasks."""
    yield prefix, module
    if isinstance(module, MultiLoraLayer):
        return
    for name, child in module.named_children():
        yield from modules_outside_lora(child, f"{prefix}.{name}" if prefix else name)


# Bumped by every ``replace_submodule``: the LoRA layers found in a model stay valid until then.
_structure_version = 0
# Every module and parameter registered anywhere in the process (PyTorch's global registration
# hooks). Replacing or adding a module or parameter registers it, so what a walk over a model's
# modules found stays valid while this count is unchanged; a steady server registers nothing.
_registrations = 0


def _count_registration(*_args) -> None:
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)


def registrations() -> int:
    """How many modules and parameters have been registered in this process so far."""
    return _registrations


def lora_layers_of(model: nn.Module) -> dict[str, MultiLoraLayer]:
    """Every LoRA layer of ``model`` by module path, without walking the adapters inside them.

    Cached on the model until a module is replaced: a server swapping adapters looks the
    layers up several times per install and eviction, and each walk of the backbone's
    modules cost ~0.5 ms (profiled, packaged MiniLM).
    """
    cached = model.__dict__.get("_lora_layers_cache")  # not an nn.Module attribute: no state_dict entry
    if cached is None or cached[0] != _structure_version:
        layers = {path: m for path, m in modules_outside_lora(model) if isinstance(m, MultiLoraLayer)}
        cached = model.__dict__["_lora_layers_cache"] = (_structure_version, layers)
    return dict(cached[1])


def replace_submodule(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` in ``model`` (the wrapper of the module that was there)."""
    global _structure_version
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
    _structure_version += 1
    return module


def inject_lora_layers(model: nn.Module, target_modules: Sequence[str],
                       exclude: Sequence[str] = UNUSED_MODULES) -> dict[str, MultiLoraLayer]:
    """Wrap every module whose name ends with a target in a ``MultiLoraLayer``.

    Modules under ``exclude`` (by default the backbone's ``UNUSED_MODULES``, such as BERT's pooler) are left alone.

    Returns the wrapped layers by their module path in ``model``. Already wrapped layers
    are returned as they are, so adding a task with the same targets is cheap: while no
    module was replaced since, the paths found last time are reused without a walk.
    """
    key = (tuple(target_modules), tuple(exclude))
    found = model.__dict__.setdefault("_lora_injected", {}).get(key)
    if found is not None and found[0] == _structure_version:
        layers = lora_layers_of(model)
        return {path: layers[path] for path in found[1]}
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
    model.__dict__["_lora_injected"][key] = (_structure_version, list(layers))
    return layers
