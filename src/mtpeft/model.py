"""MultiTaskModel: one frozen backbone, a LoRA adapter and a head per task.

The path of one prediction: inputs -> task's features -> batches that may mix tasks ->
backbone forward with each row's adapter -> each row's head -> task post-processing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mtpeft.backbone import Backbone, load_backbone
from mtpeft.batching import bucketed_batches, pad_sequences, sequences
from mtpeft.bottleneck import BottleneckLayer
from mtpeft.config import LoraSettings
from mtpeft.examples import Example
from mtpeft.lora import (MultiLoraLayer, inject_lora_layers, lora_layers_of, modules_outside_lora, registrations,
                         routing_of)
from mtpeft.precision import autocast, resolve_bf16
from mtpeft.predictions import NoTaskPrediction, Prediction
from mtpeft.router import ROUTER_DIR, ROUTER_FILE
from mtpeft.runtime import tune_allocator
from mtpeft.tasks import TaskSpec, task_type
from mtpeft.tasks.base import encode_sequences, sequence_encoding_key
from mtpeft.tasks.spec import UnknownTaskError

if TYPE_CHECKING:
    from mtpeft.router import RouteDecision, Router

SHARED_ADAPTER = "_shared"  # not a valid task name, so it can never clash with one

ModelInput = str | tuple[str, str] | dict


class MultiTaskModel(nn.Module):
    """A frozen backbone shared by many tasks, each with its own adapter and head.

    Build one with ``MultiTaskModel.from_backbone()`` (the packaged MiniLM by default) and
    ``add_task``, or open saved tasks with ``MultiTaskModel.load(path)``.
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone.model
        self.tokenizer = backbone.tokenizer
        self.identity = backbone.identity
        self.backbone_info = backbone
        self.routing = routing_of(self.backbone)
        self.heads = nn.ModuleDict()
        self.specs: dict[str, TaskSpec] = {}
        self.adapters: dict[str, LoraSettings | None] = {}
        self.task_metrics: dict[str, dict] = {}
        # The saved task folder each warm-started task's adapter started from (task.json's "init_from").
        self.task_init_from: dict[str, str] = {}
        self.bf16: bool | None = None  # None: bf16 where the hardware is fast at it
        self.backbone_dropout = False
        # Inference on a single-task batch of at least this many rows folds the task's LoRA
        # into the backbone weights (one matmul per layer instead of three); 0 never merges.
        self.merge_min_rows = 8
        # fp32 originals of the frozen backbone weights while the backbone computes in bf16, by
        # parameter: a layer wrapped for a new adapter meanwhile renames its weight, not the parameter.
        self._fp32_backbone: list[tuple[nn.Parameter, torch.Tensor]] = []
        # Sharded over processes (FSDP, mtpeft.distributed): the weights are FSDP's to gather
        # and cast, so they are never re-held in another precision or merged here.
        self.sharded = False
        self._inference_attention = self.backbone.config._attn_implementation
        tune_allocator()
        # Parameters a training method gives a task beyond its LoRA adapter and head (a peft
        # wrapper's, bottleneck adapters, the whole backbone for full fine-tuning); see methods.py.
        self.extra_parameters: dict[str, dict[str, nn.Parameter]] = {}
        # task -> the adapter its rows use when it is not the task's own (joint training shares one),
        # and the settings of each such shared adapter.
        self.adapter_alias: dict[str, str] = {}
        self.shared_adapters: dict[str, LoraSettings] = {}
        # Which task an input without one is for, when the model holds several: the bundle's
        # learned router once loaded (or one assigned), else the shape rule (mtpeft.router).
        self.router: Router | None = None

    # ----------------------------------------------------------------- building

    @classmethod
    def from_backbone(cls, backbone: str | os.PathLike | Backbone | None = None) -> MultiTaskModel:
        """A model with no tasks on ``backbone``: ``"default"``, a local path or a hub name."""
        return cls(backbone if isinstance(backbone, Backbone) else load_backbone(backbone))

    @property
    def task_names(self) -> list[str]:
        return list(self.specs)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def add_task(self, spec: TaskSpec, lora: LoraSettings | None = None, *, head_only: bool = False,
                 initialize: bool = True) -> None:
        """Register ``spec`` with a fresh head and (unless ``head_only``) a fresh LoRA adapter.

        The new modules take the model's current mode. ``initialize=False`` leaves the LoRA
        weights unset, for a caller that loads saved ones right after (``install_task``).
        """
        if spec.name in self.specs:
            raise ValueError(f"task {spec.name!r} already exists; remove_task it first")
        positions = self.max_positions()
        if positions is not None and spec.max_length > positions:
            raise ValueError(f"task {spec.name!r}: max_length={spec.max_length} is longer than the {positions} tokens "
                             f"backbone {self.identity.name!r} takes; use max_length <= {positions}")
        lora = None if head_only else (lora or LoraSettings())
        if lora is not None:
            targets = self._targets(lora)
            lora = LoraSettings(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=targets)
            for layer in inject_lora_layers(self.backbone, targets).values():
                layer.add_adapter(spec.name, lora.r, lora.alpha, lora.dropout, initialize=initialize,
                                  training=self.training)
        head = task_type(spec).build_head(spec, self.identity.hidden_size)
        self.heads[spec.name] = head.to(self.device).train(self.training)
        self.specs[spec.name] = spec
        self.adapters[spec.name] = lora

    def max_positions(self) -> int | None:
        """The longest input the backbone's position embeddings cover (None: no such limit known).

        A longer input failed only once one came, deep in the backbone ("The size of tensor a
        (600) must match the size of tensor b (512)"), in training possibly after hours.
        """
        return max_positions(self.backbone)

    def _targets(self, lora: LoraSettings) -> list[str]:
        if lora.target_modules is None:
            return self.backbone_info.default_targets()
        if list(lora.target_modules) == ["all-linear"]:
            return self.backbone_info.default_targets(all_linear=True)
        return list(lora.target_modules)

    def remove_task(self, name: str) -> None:
        self.spec(name)
        for layer in self.lora_layers().values():
            layer.remove_adapter(name)
        for _, module in modules_outside_lora(self.backbone):
            if isinstance(module, BottleneckLayer):  # a bottleneck method's adapters (methods.py)
                module.remove_adapter(name)
        del self.heads[name], self.specs[name], self.adapters[name]
        self.task_metrics.pop(name, None)
        self.task_init_from.pop(name, None)
        self.extra_parameters.pop(name, None)
        self._drop_alias(name)

    def unshare_adapter(self, name: str) -> None:
        """Give ``name`` its own copy of the adapter it shares with other tasks (joint training).

        Training one task of a joint model alone would otherwise change the shared adapter
        under every other task; after this, ``train_task`` trains the copy and the others keep
        theirs. A task with an adapter of its own is left as it is.
        """
        self.spec(name)
        shared = self.adapter_alias.get(name)
        if shared is None:
            return
        settings = self.shared_adapters[shared]
        self._copy_adapter(shared, name, settings)
        self.adapters[name] = LoraSettings(r=settings.r, alpha=settings.alpha, dropout=settings.dropout,
                                           target_modules=list(settings.target_modules or []))
        self._drop_alias(name)

    def share_adapter(self, tasks: Sequence[str]) -> str:
        """Make ``tasks``, each holding a copy of one adapter, use a single copy; returns its name.

        A joint model saves its shared adapter into every task's folder, so each folder stands
        alone; loading them back gives each task a copy. Shared again, one copy stays in memory,
        and a batch that mixes these tasks runs through one adapter, which merges into the
        backbone as a single task's does. A task may already use a shared adapter (one loaded
        earlier): the others join it. Copies that differ (one retrained since) raise ValueError.
        """
        tasks = list(dict.fromkeys(tasks))
        if len(tasks) < 2:
            raise ValueError(f"sharing an adapter takes two or more tasks, got {tasks}")
        if not self.adapters_equal(tasks):
            raise ValueError(f"tasks {tasks} do not hold equal LoRA adapters, so they cannot share one")
        self.unmerge_adapters()
        name = next((self.adapter_alias[t] for t in tasks if t in self.adapter_alias), None)
        if name is None:
            first, settings = tasks[0], self.adapters[tasks[0]]
            name = next(n for n in (f"{SHARED_ADAPTER}{i or ''}" for i in range(len(self.shared_adapters) + 1))
                        if n not in self.shared_adapters)
            self._copy_adapter(first, name, settings)
            self.shared_adapters[name] = settings
        for task in tasks:
            if self.adapter_alias.get(task) == name:
                continue
            if task in self.adapter_alias:
                self._drop_alias(task)  # an equal copy shared under another name
            else:
                for layer in self.lora_layers(task).values():
                    layer.remove_adapter(task)
            self.adapters[task] = None
            self.adapter_alias[task] = name
        return name

    def _copy_adapter(self, source: str, target: str, settings: LoraSettings) -> None:
        """A new adapter ``target`` in every layer that holds ``source``, with ``source``'s weights."""
        for layer in self.lora_layers(source).values():
            layer.add_adapter(target, settings.r, settings.alpha, settings.dropout, initialize=False,
                              training=self.training)
            with torch.no_grad():
                layer.lora_A[target].weight.copy_(layer.lora_A[source].weight)
                layer.lora_B[target].weight.copy_(layer.lora_B[source].weight)

    def adapter_of(self, task: str) -> str | None:
        """The name of the LoRA adapter ``task``'s rows use: its own, a shared one, or None (head only)."""
        self.spec(task)
        if task in self.adapter_alias:
            return self.adapter_alias[task]
        return task if self.adapters.get(task) is not None else None

    def adapters_equal(self, tasks: Sequence[str]) -> bool:
        """Whether every task in ``tasks`` uses a LoRA adapter (its own or a shared one), all with
        equal settings and weights."""
        names = [self.adapter_of(t) for t in tasks]
        if not names or None in names:
            return False
        settings = [self.shared_adapters[n] if n in self.shared_adapters else self.adapters[n] for n in names]
        if any(s != settings[0] for s in settings[1:]):
            return False
        layers = self.lora_layers(names[0])
        for name in names[1:]:
            for layer in layers.values():
                if name not in layer.lora_A or not (
                        torch.equal(layer.lora_A[name].weight, layer.lora_A[names[0]].weight)
                        and torch.equal(layer.lora_B[name].weight, layer.lora_B[names[0]].weight)):
                    return False
        return True

    def _drop_alias(self, name: str) -> None:
        """``name`` stops using a shared adapter; the adapter goes when no task uses it."""
        shared = self.adapter_alias.pop(name, None)
        if shared is not None and shared not in self.adapter_alias.values():
            for layer in self.lora_layers(shared).values():
                layer.remove_adapter(shared)
            del self.shared_adapters[shared]

    def spec(self, name: str) -> TaskSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise UnknownTaskError(f"unknown task {name!r}; known tasks: {sorted(self.specs) or 'none'}") from None

    def lora_layers(self, task: str | None = None) -> dict[str, MultiLoraLayer]:
        """LoRA layers by module path in the backbone; with ``task``, only those holding its adapter."""
        return {path: m for path, m in lora_layers_of(self.backbone).items() if task is None or task in m.lora_A}

    def task_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The parameters that belong to one task: its adapter and its head."""
        self.spec(name)
        params = {f"head.{k}": p for k, p in self.heads[name].named_parameters()}
        for path, layer in self.lora_layers(name).items():
            params[f"{path}.lora_A"] = layer.lora_A[name].weight
            params[f"{path}.lora_B"] = layer.lora_B[name].weight
        params.update(self.extra_parameters.get(name, {}))
        return params

    def backbone_parameter_count(self) -> int:
        return sum(p.numel() for n, p in self.backbone.named_parameters() if ".lora_" not in n)

    # ----------------------------------------------------------------- forward

    def encode(self, batch: dict[str, torch.Tensor], tasks: str | Sequence[str] | None) -> torch.Tensor:
        """Backbone hidden states (B, T, H), fp32; row i uses the adapter of ``tasks[i]``.

        A frozen backbone computes in bf16 where the hardware is fast at it (``self.bf16``),
        with its weights held in bf16 rather than re-cast by autocast every pass; a backbone
        that trains (full fine-tuning) keeps fp32 weights and runs under bf16 autocast.
        """
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        if self.adapter_alias and tasks is not None:
            alias = self.adapter_alias
            tasks = alias.get(tasks, tasks) if isinstance(tasks, str) else [alias.get(t, t) for t in tasks]
        device = batch["input_ids"].device
        bf16 = resolve_bf16(self.bf16, device)
        frozen = not any(p.requires_grad for p in self._frozen_backbone_weights().values())
        if not self.sharded:
            self._hold_backbone_in(torch.bfloat16 if bf16 and frozen else torch.float32)
        names = [tasks] if isinstance(tasks, str) else list(tasks) if tasks is not None else []
        single = names[0] if names and len(set(names)) == 1 else None
        merged = self._merged_task()
        if merged is not None and merged != single:
            self.unmerge_adapters()  # a merged adapter would leak into other tasks' rows
        # Autocast only for a training backbone; a caller's autocast must not re-cast bf16 weights.
        with self.routing.use(tasks, device=device), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not frozen):
            hidden = self.backbone(**inputs).last_hidden_state
        return hidden.float()

    def _frozen_backbone_weights(self) -> dict[str, nn.Parameter]:
        """The backbone's own floating-point parameters (not the adapters inside it); read only.

        Walks modules, not ``named_parameters``: a model holding many tasks has thousands of
        adapter tensors. This runs before every forward pass, so the walk (~0.45 ms on 2 CPU
        cores) is kept until a module or parameter is registered anywhere (``registrations``);
        a sharded model's parameters are FSDP's to swap, so it walks every time.
        """
        stamp = registrations()
        cached = self.__dict__.get("_frozen_weights_cache")  # not an nn.Module attribute: no state_dict entry
        if cached is not None and cached[0] == stamp and not self.sharded:
            return cached[1]
        weights = {}
        for path, module in modules_outside_lora(self.backbone):
            owner, prefix = (module.base_layer, f"{path}.base_layer") if isinstance(module, MultiLoraLayer) else (module, path)
            recurse = isinstance(module, MultiLoraLayer)
            for name, param in owner.named_parameters(recurse=recurse):
                if param.is_floating_point():
                    weights[f"{prefix}.{name}" if prefix else name] = param
        self.__dict__["_frozen_weights_cache"] = (stamp, weights)
        return weights

    def _hold_backbone_in(self, dtype: torch.dtype) -> None:
        """Switch the backbone weights between fp32 and bf16, keeping the fp32 originals.

        Holding bf16 also takes in fp32 weights put in place since (a replaced module's),
        which would otherwise meet bf16 activations.
        """
        if dtype == torch.bfloat16:
            weights = [p for p in self._frozen_backbone_weights().values() if p.dtype == torch.float32]
            if not weights:
                return
            self.unmerge_adapters()
            # Outside inference mode even when predict casts: training the same model later
            # could not save inference tensors for backward.
            with torch.inference_mode(False):
                for param in weights:
                    self._fp32_backbone.append((param, param.data))
                    param.data = param.data.to(torch.bfloat16)
        elif self._fp32_backbone:
            self.unmerge_adapters()
            for param, original in self._fp32_backbone:
                param.data = original
            self._fp32_backbone.clear()

    def full_precision(self) -> MultiTaskModel:
        """Put the backbone's own fp32 weights back (export, inspecting weights, sharding them over
        processes): unmerged too, as an fp32 backbone a batch of one task merged into is not."""
        self.unmerge_adapters()
        self._hold_backbone_in(torch.float32)
        return self

    def _apply(self, fn, recurse: bool = True):
        """``to()``, ``cuda()`` and the like move the fp32 weights: the kept originals would
        otherwise stay on the old device and come back there at the next switch to fp32."""
        self._hold_backbone_in(torch.float32)
        self.__dict__.pop("_frozen_weights_cache", None)  # a conversion may put new parameters in place
        return super()._apply(fn, recurse)

    def _merged_task(self) -> str | None:
        return next((layer.merged for layer in self.lora_layers().values() if layer.merged), None)

    def merge_adapter(self, task: str) -> None:
        """Fold ``task``'s LoRA into the backbone weights until a batch needs otherwise."""
        for layer in self.lora_layers().values():
            if task in layer.lora_A:
                layer.merge(task)
            else:
                layer.unmerge()

    def unmerge_adapters(self) -> None:
        for layer in self.lora_layers().values():
            layer.unmerge()

    def forward(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        """Head outputs for a single-task batch (the training path)."""
        self.spec(task)
        hidden = self.encode(batch, task)
        return self.heads[task](hidden, batch["attention_mask"])

    @contextmanager
    def training_run(self, bf16: bool, backbone_dropout: bool | None) -> Iterator[None]:
        """A training run's precision and backbone dropout (``None``: the model's own) for the
        length of the run; the model's settings come back afterwards, also after an error."""
        saved = self.bf16, self.backbone_dropout
        self.bf16 = bf16  # encode() holds and runs the backbone in this precision
        if backbone_dropout is not None:
            self.backbone_dropout = backbone_dropout
        try:
            yield
        finally:
            self.bf16, self.backbone_dropout = saved

    def train(self, mode: bool = True) -> MultiTaskModel:
        """Heads and adapters follow ``mode``; the backbone keeps its dropout off unless
        ``backbone_dropout`` is set (full fine-tuning, or ``TrainConfig.backbone_dropout``): on a
        frozen backbone it gained LoRA nothing beyond the seeds' spread (SST-2, STS-B, SQuAD) and
        slowed training (RESULTS.md).

        Training uses the backbone's eager attention: PyTorch's fused CPU attention is fast
        forward but its backward is not (packaged MiniLM, batch 32 x 64 tokens, bf16: ~100
        training examples/s with it, ~210 with eager attention; inference keeps SDPA).
        """
        super().train(mode)
        self.backbone.train(mode and self.backbone_dropout)
        for layer in self.lora_layers().values():
            layer.lora_dropout.train(mode)
        if mode:
            self.unmerge_adapters()
        if hasattr(self.backbone, "set_attn_implementation") and self._inference_attention == "sdpa":
            wanted = "eager" if mode else self._inference_attention
            if self.backbone.config._attn_implementation != wanted:
                self.backbone.set_attn_implementation(wanted)
        return self

    # ----------------------------------------------------------------- inference

    @torch.inference_mode()
    def run(self, items: Sequence[tuple[str, Example]], batch_size: int = 64) -> list[Prediction]:
        """Predictions for ``(task, example)`` pairs of any mix of tasks, in input order.

        Features of all tasks are sorted by length and batched together, so one forward
        pass serves rows of different tasks with their own adapters and heads.
        """
        if batch_size < 1:  # a negative size would run no batch and find no outputs
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        by_task: dict[str, list[int]] = {}
        for i, (task, _) in enumerate(items):
            self.spec(task)
            by_task.setdefault(task, []).append(i)
        # Not eval() on every call: the walk over a server's many adapter modules shows in
        # profiles. The flags checked catch a model, backbone or head left in training mode.
        if self.training or self.backbone.training or any(self.heads[t].training for t in by_task):
            self.eval()
        task_features = self._encode_for_inference(by_task, items)
        features = [(task, f) for task in by_task for f in task_features[task]]
        summaries: dict[int, Any] = {}
        device = self.device
        use_bf16 = resolve_bf16(self.bf16, device)
        pad_id = self.tokenizer.pad_token_id
        for batch_indices in bucketed_batches([len(f["input_ids"]) for _, f in features], batch_size, shuffle=False):
            # Rows of one task sit together: (task, first row, end row, its features).
            groups: dict[str, list[dict]] = {}
            for i in batch_indices:
                groups.setdefault(features[i][0], []).append(features[i][1])
            rows, row_tasks, spans = [], [], []
            for task, group in groups.items():
                task_rows = sequences(group)
                spans.append((task, len(rows), len(rows) + len(task_rows), group))
                rows.extend(task_rows)
                row_tasks.extend([task] * len(task_rows))
            batch = {k: v.to(device) for k, v in pad_sequences(rows, pad_id).items()}
            # One adapter for every row (one task, or tasks sharing an adapter): merge it.
            adapters = {self.adapter_alias.get(task, task) for task, *_ in spans}
            if len(adapters) == 1 and self.merge_min_rows and len(rows) >= self.merge_min_rows and not self.sharded:
                self.merge_adapter(adapters.pop())
            hidden = self.encode(batch, row_tasks)
            with autocast(device, use_bf16):
                for task, start, end, group in spans:
                    spec = self.specs[task]
                    outputs = self.heads[task](hidden[start:end], batch["attention_mask"][start:end])
                    for feature, summary in zip(group, task_type(spec).summarize(spec, outputs, group)):
                        summaries[id(feature)] = summary
        results: list[Prediction | None] = [None] * len(items)
        for task, indices in by_task.items():
            spec = self.specs[task]
            encoded = task_features[task]
            predictions = task_type(spec).predict(spec, [summaries[id(f)] for f in encoded], encoded,
                                                  [items[i][1] for i in indices])
            for i, prediction in zip(indices, predictions):
                results[i] = prediction
        return results

    def _encode_for_inference(self, by_task: dict[str, list[int]],
                              items: Sequence[tuple[str, Example]]) -> dict[str, list[dict]]:
        """Each task's features, label-free. Tasks whose inputs tokenise alike (plain texts or
        pairs, same length limits) share one tokenizer call: a batch over many tasks would
        otherwise pay the tokenizer's per-call overhead (~0.2 ms) once per task."""
        shared: dict[tuple, list[str]] = {}
        encoded: dict[str, list[dict]] = {}
        for task in by_task:
            spec = self.specs[task]
            key = sequence_encoding_key(spec)
            if key is None:
                encoded[task] = task_type(spec).encode(spec, self.tokenizer, [items[i][1] for i in by_task[task]])
            else:
                shared.setdefault(key, []).append(task)
        for tasks in shared.values():
            examples = [items[i][1] for task in tasks for i in by_task[task]]
            features = encode_sequences(self.specs[tasks[0]], self.tokenizer, examples)
            start = 0
            for task in tasks:
                end = start + len(by_task[task])
                encoded[task] = features[start:end] if start == 0 else [
                    {**f, "example": f["example"] - start} for f in features[start:end]]
                start = end
        return encoded

    def predict(self, inputs: ModelInput | Sequence[ModelInput], task: str | Sequence[str | None] | None = None,
                batch_size: int = 64) -> Prediction | NoTaskPrediction | list[Prediction | NoTaskPrediction]:
        """Predict for one input or a list of inputs.

        Inputs: a string, an ``(a, b)`` tuple for pair tasks, or ``{"question", "context"}``
        for QA. ``task`` names the task for all inputs or one per input. Where it is left out
        (or an entry is ``None``) and the model holds several tasks, ``route`` picks the task;
        an input it routes nowhere gets a ``NoTaskPrediction`` with the candidates, not a guess.
        A single input gives a single prediction.
        """
        single = isinstance(inputs, (str, tuple, dict))
        try:
            batch = [inputs] if single else list(inputs)
        except TypeError:
            raise TypeError("inputs must be a string, an (a, b) tuple, a {'question': ..., 'context': ...} dict "
                            f"or a list of these; got {type(inputs).__name__}") from None
        if task is None and len(self.specs) <= 1:
            task = self.resolve_task(None)
        predictions = answer_routed(batch, self.route(batch, task), self.spec, self.run, batch_size)
        return predictions[0] if single else predictions

    def route(self, inputs: ModelInput | Sequence[ModelInput],
              task: str | Sequence[str | None] | None = None) -> list[RouteDecision]:
        """Each input's task (one input or a list, as ``predict`` takes them): an explicit ``task``
        (one for all, or one per input) wins; the rest go to ``self.router``, else to the shape
        rule (the one task that takes the input's shape)."""
        from mtpeft.router import ShapeRouter, decide

        batch = [inputs] if isinstance(inputs, (str, tuple, dict)) else list(inputs)
        return decide(batch, task if task is None or isinstance(task, str) else list(task),
                      self.router or ShapeRouter(self.specs))

    def resolve_task(self, task: str | None) -> str:
        if task is not None:
            return self.spec(task).name
        if len(self.specs) == 1:
            return next(iter(self.specs))
        if not self.specs:
            raise ValueError("this model holds no task yet; add_task or load one first")
        raise ValueError(f"this model holds several tasks; pass task= one of {sorted(self.specs)}")

    def support(self, message: str, faq: str | os.PathLike | None = None, **settings):
        """The customer-support reply to ``message``: sentiment, similar FAQ questions, answer.

        ``faq`` is a CSV/JSONL file of question/context rows (default: the packaged demo FAQ);
        see ``mtpeft.support.SupportPipeline`` for the task names and thresholds.
        """
        from mtpeft.support import answer

        return answer(self, message, faq, **settings)

    # ----------------------------------------------------------------- storage

    def save(self, path: str | os.PathLike, tasks: Sequence[str] | None = None) -> None:
        """Save tasks as a bundle: one PEFT-layout folder per task, no backbone weights."""
        from mtpeft.storage import save_bundle

        save_bundle(self, path, tasks)

    @classmethod
    def load(cls, path: str | os.PathLike, backbone: str | os.PathLike | Backbone | None = None,
             router: bool = True) -> MultiTaskModel:
        """Open a task folder or a bundle of them on one shared backbone.

        ``backbone`` defaults to the one the tasks were trained on; ``router=False`` leaves a
        bundle's learned router unread (for work that never routes, or retrains it).
        """
        from mtpeft.storage import load_into, read_backbone_name

        if backbone is None:
            backbone = _load_recorded_backbone(path, read_backbone_name(path))
        elif not isinstance(backbone, Backbone):
            backbone = load_backbone(backbone)
        model = cls(backbone)
        load_into(model, path)
        if router and (Path(path) / ROUTER_DIR / ROUTER_FILE).is_file():  # a bundle's learned router
            from mtpeft.router import LearnedRouter

            model.router = LearnedRouter.load(Path(path) / ROUTER_DIR, model)
        return model



def _load_recorded_backbone(path: str | os.PathLike, name: str) -> Backbone:
    """The backbone the tasks at ``path`` name. One that does not load here (a folder since moved,
    a hub name without a hub) is an error that says how to name another: transformers' own
    message spoke of the hub alone."""
    try:
        return load_backbone(name)
    except OSError as err:
        raise ValueError(f"the tasks at {path} were trained on backbone {name!r}, which does not load here "
                         f"({err}); name where it is: backbone=... (--backbone on the command line)") from err


def max_positions(backbone: nn.Module) -> int | None:
    """``MultiTaskModel.max_positions`` of a bare transformer. RoBERTa-style embeddings number
    positions from ``padding_idx + 1``, so two fewer fit."""
    positions = getattr(backbone.config, "max_position_embeddings", None)  # GPT-2: n_positions
    if not isinstance(positions, int):
        return None
    padding_idx = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    return positions - (padding_idx + 1 if isinstance(padding_idx, int) else 0)


def answer_routed(batch: Sequence[ModelInput], decisions: Sequence[RouteDecision], spec: Callable[[str], TaskSpec],
                  run: Callable[..., list[Prediction]], batch_size: int = 64) -> list[Prediction | NoTaskPrediction]:
    """Each input's prediction by its routed task in one ``run`` call; ``NoTaskPrediction`` for an
    input routed nowhere, or routed (not named) to a task whose input it does not fit."""
    predictions: list = [NoTaskPrediction(d.reason, d.confidence, d.candidates) for d in decisions]
    items, answered = [], []
    for i, (value, decision) in enumerate(zip(batch, decisions)):
        if decision.task is None:
            continue
        try:
            items.append((decision.task, to_example(value, spec(decision.task))))
        except ValueError as err:
            if decision.source == "explicit":  # the caller's own mistake
                raise
            # a plain-text request ("are these two the same?") routed to a task that needs a pair
            predictions[i].reason = (f"routed to {decision.task!r} (p={decision.confidence:.2f}), "
                                     f"which needs another input: {err}")
            continue
        answered.append(i)
    for i, prediction in zip(answered, run(items, batch_size=batch_size)):
        predictions[i] = prediction
    return predictions

def to_example(value: ModelInput, spec: TaskSpec) -> Example:
    """Turn a user input into an ``Example`` of ``spec``'s shape, or say what shape it needs."""
    if spec.type == "extractive-qa":
        if isinstance(value, dict) and {"question", "context"} <= set(value):
            return Example(text=_text(value["question"], spec, "question"),
                           text_pair=_text(value["context"], spec, "context"))
        if isinstance(value, tuple) and len(value) == 2:
            return Example(text=_text(value[0], spec, "question"), text_pair=_text(value[1], spec, "context"))
        raise ValueError(f"task {spec.name!r} answers questions: pass {{'question': ..., 'context': ...}}")
    if spec.is_pair:
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return Example(text=_text(value[0], spec, "first text"), text_pair=_text(value[1], spec, "second text"))
        if isinstance(value, dict) and {"text", "text_pair"} <= set(value):
            return Example(text=_text(value["text"], spec, "text"), text_pair=_text(value["text_pair"], spec, "text_pair"))
        raise ValueError(f"task {spec.name!r} compares two texts: pass a pair (text_a, text_b)")
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    if not isinstance(value, str):
        raise ValueError(f"task {spec.name!r} takes one text per input, got {type(value).__name__}")
    return Example(text=value)


def _text(value, spec: TaskSpec, part: str) -> str:
    """One part of an input as text. A missing part (None, JSON null) is refused: as ``str(None)``
    it was answered as the text "None" (a QA context of "None" gave the answer "None")."""
    if value is None:
        raise ValueError(f"task {spec.name!r}: the input's {part} is None, not a text")
    return str(value)
