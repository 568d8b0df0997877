"""Joint multi-task training: one shared LoRA adapter, one head per task.

Each step draws a task, takes that task's next batch and updates the shared adapter and
the task's head. Tasks are drawn with probability

    p_t ~ n_t ** (1 / T)

where ``n_t`` is the task's number of training features: ``T = 1`` is proportional
sampling (big tasks dominate), larger ``T`` flattens towards uniform so small tasks are
not drowned (temperature-scaled sampling, as in multilingual/multi-task NMT and MT-DNN
follow-ups). The shared adapter and the heads have separate learning rates
(``TrainConfig.lr`` and ``TrainConfig.head_lr``).

The tasks' rows are routed to the shared adapter through ``MultiTaskModel.adapter_alias``,
so prediction and evaluation are the ordinary ``MultiTaskModel.run``.

With an ``out_dir``, a run checkpoints as ``train_task`` does and continues from it when run
again: the task schedule and each task's batches are seeded, so they are replayed up to
the saved step and the resumed run ends bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from mtpeft.backbone import Backbone
from mtpeft.batching import bucketed_batches, collate
from mtpeft.checkpoint import (CHECKPOINT_FILE, RunPosition, adapter_key, backbone_key, fault_point, features_digest,
                               load_checkpoint, recipe_key, save_checkpoint)
from mtpeft.config import LoraSettings, TrainConfig
from mtpeft.data import fixed_subset
from mtpeft.distributed import local_rng_state, refuse_several_processes
from mtpeft.evaluate import evaluate_task
from mtpeft.examples import Example
from mtpeft.lora import inject_lora_layers
from mtpeft.model import SHARED_ADAPTER, MultiTaskModel
from mtpeft.precision import autocast, resolve_bf16
from mtpeft.storage import remove_stale_temporaries
from mtpeft.tasks import TaskSpec, task_type
from mtpeft.train import finite_loss

SAMPLINGS = ("proportional", "temperature")


def sampling_probabilities(sizes: dict[str, int], sampling: str = "temperature",
                           temperature: float = 2.0) -> dict[str, float]:
    """Probability of drawing each task: proportional to ``size ** (1 / T)`` (``T = 1`` for proportional)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown task sampling {sampling!r}; choose one of {SAMPLINGS}")
    if sampling == "temperature" and not temperature > 0:  # NaN too: it failed later, in random.choices
        raise ValueError(f"sampling temperature must be > 0, got {temperature}")
    if not sizes or any(n <= 0 for n in sizes.values()):
        raise ValueError(f"every task needs training examples; sizes: {sizes}")
    power = 1.0 if sampling == "proportional" else 1.0 / temperature
    weights = {task: n ** power for task, n in sizes.items()}
    total = sum(weights.values())
    return {task: w / total for task, w in weights.items()}


class TaskSampler:
    """Seeded draws of task names with given probabilities."""

    def __init__(self, probabilities: dict[str, float], seed: int = 0) -> None:
        self.tasks = list(probabilities)
        self.weights = [probabilities[t] for t in self.tasks]
        self.rng = random.Random(seed)

    def draw(self, n: int) -> list[str]:
        return self.rng.choices(self.tasks, weights=self.weights, k=n)


def build_joint_model(backbone: Backbone, specs: Sequence[TaskSpec], lora: LoraSettings | None = None,
                      seed: int = 0) -> MultiTaskModel:
    """``specs`` as tasks of one model: a head each, and one LoRA adapter they all use."""
    lora = lora or LoraSettings()
    torch.manual_seed(seed)
    model = MultiTaskModel(backbone)
    for spec in specs:
        model.add_task(spec, head_only=True)
        model.adapter_alias[spec.name] = SHARED_ADAPTER
    targets = model._targets(lora)
    for layer in inject_lora_layers(model.backbone, targets).values():
        layer.add_adapter(SHARED_ADAPTER, lora.r, lora.alpha, lora.dropout)
    model.shared_adapters[SHARED_ADAPTER] = LoraSettings(r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                                         target_modules=targets)
    return model


def shared_parameters(model: MultiTaskModel) -> dict[str, torch.nn.Parameter]:
    """The shared adapter's parameters by name."""
    params = {}
    for path, layer in model.lora_layers(SHARED_ADAPTER).items():
        params[f"{path}.lora_A"] = layer.lora_A[SHARED_ADAPTER].weight
        params[f"{path}.lora_B"] = layer.lora_B[SHARED_ADAPTER].weight
    return params


def joint_optimizer(model: MultiTaskModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the shared adapter at ``config.lr`` and every head at ``config.head_lr``."""
    heads = [p for head in model.heads.values() for p in head.parameters()]
    groups = [{"params": list(shared_parameters(model).values()), "weight_decay": config.weight_decay, "lr": config.lr},
              {"params": heads, "weight_decay": 0.0, "lr": config.head_lr or config.lr}]
    return torch.optim.AdamW(groups, lr=config.lr, foreach=True)


@dataclass
class JointResult:
    metrics: dict[str, dict[str, float]]
    steps: dict[str, int]  # optimizer steps spent on each task
    probabilities: dict[str, float]
    total_steps: int
    train_seconds: float
    examples_per_second: float
    final_loss: float
    shared_parameters: int
    head_parameters: dict[str, int]
    bf16: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _batch_stream(lengths: list[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Length-bucketed batches of one task, reshuffled at each pass over its data."""
    for epoch in range(sys.maxsize):
        yield from bucketed_batches(lengths, batch_size, shuffle=True, seed=seed + epoch)


def train_joint(model: MultiTaskModel, data: dict[str, tuple[Sequence[Example], Sequence[Example] | None]],
                config: TrainConfig | None = None, sampling: str = "temperature", temperature: float = 2.0,
                task_epochs: dict[str, float] | None = None, total_steps: int | None = None,
                progress: bool = True, out_dir: str | Path | None = None) -> JointResult:
    """Train the shared adapter and the heads of ``data``'s tasks together; evaluate each task.

    ``data`` maps task name -> (train examples, eval examples or None). The run takes
    ``total_steps`` steps; by default as many as separate runs of every task would take
    together: ``task_epochs[t]`` (else ``config.epochs``) times task t's batches, summed.
    With ``out_dir``, a checkpoint is written there every ``config.checkpoint_every`` steps
    (0 or -1: none; the run has no epochs), a run that finds one continues from it, and it is
    deleted at the end.
    """
    refuse_several_processes("train_joint")  # its loop has no data-parallel share of the batches
    config = config or TrainConfig()
    if config.init_from:  # was ignored: the run trained from fresh weights without a word
        raise ValueError(f"init_from={config.init_from!r}: train_joint trains its shared adapter from a fresh start; "
                         "a warm start is of one task's adapter (train_task)")
    # Checked as TrainConfig checks epochs: a misnamed task or a count <= 0 would otherwise
    # silently change the run's length (or train nothing at all).
    unknown = sorted(set(task_epochs or {}) - set(data))
    if unknown:
        raise ValueError(f"task_epochs names tasks that are not trained here: {unknown} (tasks: {list(data)})")
    for task, epochs in (task_epochs or {}).items():
        if not epochs > 0:
            raise ValueError(f"task_epochs[{task!r}] must be > 0, got {epochs}")
    if total_steps is not None and total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    # A fixed random N of each task's examples, as train_task takes them.
    data = {t: (fixed_subset(train, config.max_train_examples)[0],
                fixed_subset(evaluation, config.max_eval_examples)[0] if evaluation else evaluation)
            for t, (train, evaluation) in data.items()}
    torch.manual_seed(config.seed)
    features, lengths = {}, {}
    for task, (train, _) in data.items():
        spec = model.spec(task)
        if not train:
            raise ValueError(f"task {task!r}: no training examples (an empty data file, or every row skipped)")
        features[task] = task_type(spec).encode(spec, model.tokenizer, train)
        lengths[task] = [len(f["input_ids"]) for f in features[task]]
    probabilities = sampling_probabilities({t: len(f) for t, f in features.items()}, sampling, temperature)
    if total_steps is None:
        epochs = task_epochs or {}
        total_steps = max(1, sum(math.ceil(epochs.get(t, config.epochs) * math.ceil(len(f) / config.batch_size))
                                 for t, f in features.items()))
    for param in model.parameters():
        param.requires_grad_(False)
    named = {f"shared.{n}": p for n, p in shared_parameters(model).items()}
    named.update({f"head.{t}.{n}": p for t, h in model.heads.items() for n, p in h.named_parameters()})
    trainable = list(named.values())
    for param in trainable:
        param.requires_grad_(True)
    optimizer = joint_optimizer(model, config)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    checkpoint = Path(out_dir) / CHECKPOINT_FILE if out_dir is not None and config.checkpoint_every >= 0 else None
    fingerprint = {"tasks": json.dumps({t: model.spec(t).to_dict() for t in features}, sort_keys=True),
                   "config": recipe_key(config), "adapter": adapter_key(model.shared_adapters[SHARED_ADAPTER]),
                   "sampling": f"{sampling} T={temperature}", "total_steps": str(total_steps),
                   "features": json.dumps({t: features_digest(f, task_type(model.spec(t)).targets)
                                          for t, f in features.items()}),
                   "backbone": backbone_key(model.identity)}
    position = RunPosition()
    if out_dir is not None and Path(out_dir).is_dir():
        remove_stale_temporaries(out_dir)
    if checkpoint is not None and checkpoint.exists():
        position, saved_optimizer = load_checkpoint(checkpoint, named, scheduler, fingerprint, device=model.device)
        optimizer.load_state_dict(saved_optimizer)
        print(f"resuming the joint run from {checkpoint} at step {position.step}/{total_steps}", file=sys.stderr)
    device = model.device
    use_bf16 = resolve_bf16(model.bf16 if config.bf16 is None else config.bf16, device)
    pad_id = model.tokenizer.pad_token_id
    streams = {task: _batch_stream(lengths[task], config.batch_size, config.seed + 1000 * i)
               for i, task in enumerate(features)}
    schedule = TaskSampler(probabilities, config.seed).draw(total_steps)
    steps = {task: 0 for task in features} | Counter(schedule[:position.step])
    for task, done in steps.items():  # replay each task's batches up to the checkpoint
        for _ in range(done):
            next(streams[task])
    seen, loss_value = position.seen, position.loss
    with model.training_run(use_bf16, config.backbone_dropout):  # restored also after an error
        model.train()
        started = time.perf_counter() - position.elapsed
        bar = tqdm(schedule[position.step:], desc="train joint", unit="step", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
        for step, task in enumerate(bar, start=position.step + 1):
            spec = model.spec(task)
            kind = task_type(spec)
            indices = next(streams[task])
            rows = collate([features[task][i] for i in indices], pad_id, kind.targets, config.pad_to_multiple_of)
            batch = {k: v.to(device) for k, v in rows.items()}
            with autocast(device, use_bf16):
                outputs = model(batch, task)  # rows routed to the shared adapter, then this task's head
            loss = kind.loss(spec, outputs, batch)
            loss_value = finite_loss(float(loss.detach()), task, step)
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps[task] += 1
            seen += len(indices)
            fault_point("step", step)
            # The last step too: an evaluation that fails then resumes without training again.
            if checkpoint is not None and config.checkpoint_every and \
                    (step % config.checkpoint_every == 0 or step == total_steps):
                reached = RunPosition(step=step, seen=seen, elapsed=time.perf_counter() - started, loss=loss_value)
                save_checkpoint(checkpoint, {n: p.detach() for n, p in named.items()}, optimizer.state_dict(),
                                scheduler, reached, fingerprint, step, [local_rng_state(device)])
        bar.close()
    elapsed = time.perf_counter() - started
    model.eval()
    for param in trainable:
        param.requires_grad_(False)
    metrics = {}
    for task, (_, evaluation) in data.items():
        metrics[task] = evaluate_task(model, task, evaluation, config.eval_batch_size) if evaluation else {}
        model.task_metrics[task] = metrics[task]
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return JointResult(
        metrics=metrics, steps=steps, probabilities=probabilities, total_steps=total_steps,
        train_seconds=round(elapsed, 3), examples_per_second=round(seen / elapsed, 2), final_loss=loss_value,
        shared_parameters=sum(p.numel() for p in shared_parameters(model).values()),
        head_parameters={t: sum(p.numel() for p in model.heads[t].parameters()) for t in data}, bf16=use_bf16)
