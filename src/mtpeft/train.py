"""The one training loop, for every task type.

The task type supplies features, loss and metrics; the model supplies which parameters
belong to the task. Compute runs in bf16 where the hardware is fast at it (a frozen
backbone holds bf16 weights, see ``MultiTaskModel.encode``), while the trainable parameters
and optimizer state stay fp32 (AdamW on fp32 master weights).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from mtpeft.batching import bucketed_batches, collate
from mtpeft.checkpoint import (CHECKPOINT_FILE, RunPosition, adapter_key, backbone_key, fault_point, features_digest,
                               load_checkpoint, recipe_key, save_checkpoint)
from mtpeft.compiled import compiled
from mtpeft.data import fixed_subset
from mtpeft.config import TrainConfig
from mtpeft.distributed import DataParallel, parameter_count
from mtpeft.evaluate import evaluate_task
from mtpeft.examples import Example
from mtpeft.model import MultiTaskModel
from mtpeft.precision import autocast, resolve_bf16
from mtpeft.storage import check_task_folder, remove_stale_temporaries, save_task, write_json
from mtpeft.tasks import task_type
from mtpeft.tracking import RunTracker
from mtpeft.warm_start import warm_start

# The run's settings, next to the task it saved. Not config.json: transformers reads a folder
# holding one as a whole model, so AutoModel.from_pretrained(task_folder) failed on a trained
# task ("Should have a `model_type` key") instead of loading its adapter onto the backbone.
RUN_RECORD = "training.json"


@dataclass
class TrainResult:
    task: str
    metrics: dict[str, float]
    steps: int
    train_examples: int
    train_seconds: float
    examples_per_second: float
    final_loss: float
    trainable_parameters: int
    bf16: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _optimizer(model: MultiTaskModel, task: str, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay, head = [], [], []
    for name, param in model.task_parameters(task).items():
        if name.startswith("head."):
            head.append(param)
        elif param.ndim >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "lr": config.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": config.lr},
        {"params": head, "weight_decay": 0.0, "lr": config.head_lr or config.lr},
    ]
    groups = [g for g in groups if g["params"]]
    # foreach: one fused kernel launch per parameter group instead of one per tensor.
    return torch.optim.AdamW(groups, lr=config.lr, foreach=True)


def finite_loss(value: float, task: str, step: int) -> float:
    """``value``, or an error before the update: one NaN or infinite loss makes every trained
    weight NaN, and the run went on to save and score that adapter without a word."""
    if not math.isfinite(value):
        raise ValueError(f"task {task!r}: the loss is {value} at step {step}; stopped before the update, which "
                         "would make every trained weight NaN (a lower learning rate, or fp32, may avoid it)")
    return value


def train_task(model: MultiTaskModel, task: str, train_examples: Sequence[Example],
               eval_examples: Sequence[Example] | None = None, config: TrainConfig | None = None,
               out_dir: str | Path | None = None, progress: bool = True, run_info: dict | None = None,
               save: bool = True, report_to: Sequence[str] | None = ("tensorboard",)) -> TrainResult:
    """Train ``task``'s adapter and head on ``train_examples``; evaluate; save to ``out_dir``.

    Only the task's own parameters train: the backbone and other tasks stay frozen. With
    ``out_dir``, a checkpoint is written every ``config.checkpoint_every`` steps, at each
    epoch end and after the last step (kept until the results are saved), and a run that
    finds one there continues from it. ``save=False`` keeps
    ``out_dir`` to checkpoints, training.json and metrics.json: methods whose weights are not a
    LoRA adapter (``mtpeft.methods``) write their own. ``report_to`` names the trackers
    (``mtpeft.tracking``) that record the run in ``out_dir``; empty: none. A NaN or infinite
    loss stops the run with an error before its update (``finite_loss``); the last checkpoint stays.
    """
    config = config or TrainConfig()
    spec = model.spec(task)
    kind = task_type(spec)
    if out_dir is not None:
        check_task_folder(out_dir)  # before training, not at the save
    shared = model.adapter_alias.get(task)
    if shared is not None:
        others = sorted(t for t, a in model.adapter_alias.items() if a == shared and t != task)
        raise ValueError(f"task {task!r} shares its adapter with {others}: training it alone would change "
                         f"theirs too. model.unshare_adapter({task!r}) gives it its own copy first; "
                         "train_joint trains them together")
    train_examples = fixed_subset(train_examples, config.max_train_examples)[0]
    if eval_examples is not None:
        eval_examples = fixed_subset(eval_examples, config.max_eval_examples)[0]
    if not train_examples:
        raise ValueError(f"task {task!r}: no training examples (an empty data file, or every row skipped)")
    torch.manual_seed(config.seed)

    for param in model.parameters():
        param.requires_grad_(False)
    trainable = model.task_parameters(task)
    for param in trainable.values():
        param.requires_grad_(True)

    parallel = DataParallel()
    if config.compile and (parallel.sharded or parallel.zero_stage is not None):
        raise ValueError("compile runs on one process or under DDP; FSDP and DeepSpeed train uncompiled")
    device = parallel.device or model.device
    use_bf16 = resolve_bf16(model.bf16 if config.bf16 is None else config.bf16, device)
    checkpoint = Path(out_dir) / CHECKPOINT_FILE if out_dir is not None and config.checkpoint_every >= 0 else None
    resuming = checkpoint is not None and checkpoint.exists()
    if config.init_from and not resuming:  # a resumed run's checkpoint holds the weights it reached
        started_from = warm_start(model, task, config.init_from)
        if parallel.is_main:
            print(f"{task}: starting from the {started_from}", file=sys.stderr)
    elif config.init_from:  # the run it resumes started there (its fingerprint holds init_from)
        model.task_init_from[task] = config.init_from
    # Encoded after the warm start, so a wrong init_from fails before minutes of tokenising.
    features = kind.encode(spec, model.tokenizer, train_examples)
    lengths = [len(f["input_ids"]) for f in features]
    steps_per_epoch = math.ceil(len(features) / config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    sharding = parallel.shard_model(model, use_bf16)  # FSDP: the parameters become shards on ``device``
    if sharding and parallel.is_main:
        print(sharding, file=sys.stderr)
    trainable = model.task_parameters(task)  # again: sharding replaces the parameters
    optimizer = _optimizer(model, task, config)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    pad_id = model.tokenizer.pad_token_id

    # What must not change between a run and its resumption.
    fingerprint = {"task": json.dumps(spec.to_dict(), sort_keys=True), "config": recipe_key(config),
                   "adapter": adapter_key(model.adapters.get(task)),
                   "features": features_digest(features, kind.targets), "backbone": backbone_key(model.identity)}
    position, saved_optimizer = RunPosition(), None
    if out_dir is not None and Path(out_dir).is_dir():
        remove_stale_temporaries(out_dir)
    if resuming:
        position, saved_optimizer = load_checkpoint(checkpoint, trainable, scheduler, fingerprint, parallel.rank, device)
        print(f"resuming {task} from {checkpoint} at step {position.step}/{total_steps}", file=sys.stderr)

    writer = checkpoint if parallel.is_main else None  # one writer; every process reads on resume
    step_model, optimizer = parallel.prepare(model, optimizer, config.batch_size, config.max_grad_norm)
    if saved_optimizer is not None:
        parallel.load_optimizer_state(optimizer, saved_optimizer)
    if parallel.zero_stage is not None and parallel.is_main:
        print(f"DeepSpeed ZeRO stage {parallel.zero_stage} over {parallel.world_size} processes", file=sys.stderr)
    tracker = RunTracker.open(out_dir if parallel.is_main else None, task, config.to_dict(), report_to,
                              resume_step=position.step, unlogged_losses=position.unlogged_losses)
    step, seen, epoch, loss_value = position.step, position.seen, position.epoch, position.loss
    saves = 0
    started = time.perf_counter() - position.elapsed
    bar = tqdm(total=total_steps, initial=step, desc=f"train {task}", unit="step",
               disable=not progress or not parallel.is_main,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)

    def save_position(batch_in_epoch: int, at_epoch: int) -> None:
        nonlocal saves
        saves += 1
        weights, optimizer_state = parallel.checkpoint_state(trainable, optimizer)
        save_checkpoint(writer, weights, optimizer_state, scheduler,
                        RunPosition(step, at_epoch, batch_in_epoch, seen, time.perf_counter() - started, loss_value,
                                    tracker.unlogged_losses),
                        fingerprint, saves, parallel.rng_states(device))

    try:  # an interrupted run leaves the model's precision and dropout as they came in
        with model.training_run(use_bf16, config.backbone_dropout), compiled(model.backbone, config.compile):
            model.train()  # after the run's dropout setting is in place
            while step < total_steps:
                batches = bucketed_batches(lengths, config.batch_size, shuffle=True, seed=config.seed + epoch)
                skip = position.batch_in_epoch if epoch == position.epoch else 0
                for index in range(skip, len(batches)):
                    if step >= total_steps:
                        break
                    indices, weight = parallel.shard(batches[index])
                    rows = collate([features[i] for i in indices], pad_id, kind.targets, config.pad_to_multiple_of)
                    batch = {k: v.to(device) for k, v in rows.items()}
                    with autocast(device, use_bf16):
                        outputs = step_model(batch, task)
                    loss = kind.loss(spec, outputs, batch)
                    # Before the backward pass: DeepSpeed's engine updates the weights in it.
                    loss_value = finite_loss(parallel.batch_loss(loss, weight), task, step + 1)
                    parallel.backward(loss * weight if weight != 1 else loss)
                    if config.max_grad_norm and not parallel.engine_steps:
                        torch.nn.utils.clip_grad_norm_(trainable.values(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    seen += len(batches[index])
                    bar.update(1)
                    tracker.step(step, loss_value, scheduler.get_last_lr()[0], len(batches[index]), last=step == total_steps)
                    if step % 10 == 0 or step == total_steps:
                        bar.set_postfix(loss=f"{loss_value:.4f}", ex_s=f"{seen / (time.perf_counter() - started):.0f}")
                    fault_point("step", step)
                    # The last step too: an evaluation that fails then resumes without training again.
                    if checkpoint is not None and (config.checkpoint_every and step % config.checkpoint_every == 0
                                                   or step == total_steps):
                        save_position(index + 1, epoch)
                epoch += 1
                if checkpoint is not None and step < total_steps:
                    save_position(0, epoch)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    model.eval()
    for param in trainable.values():
        param.requires_grad_(False)

    if not parallel.is_main:  # the main process evaluates and writes the results
        if parallel.forward_needs_all:  # ... but a partitioned model's forward pass needs every process
            if eval_examples:
                with parallel.inference(model):
                    evaluate_task(model, task, eval_examples, config.eval_batch_size)
            with parallel.gathered(model, trainable):
                pass  # the main process saves the whole tensors this gathers
        parallel.barrier()
        return TrainResult(task, {}, step, len(train_examples), round(elapsed, 3), round(seen / elapsed, 2),
                           loss_value, parameter_count(trainable.values()), use_bf16)
    with parallel.inference(model):
        metrics = evaluate_task(model, task, eval_examples, config.eval_batch_size) if eval_examples else {}
    model.task_metrics[task] = metrics
    tracker.finish(step, metrics)
    result = TrainResult(task=task, metrics=metrics, steps=step, train_examples=len(train_examples),
                         train_seconds=round(elapsed, 3), examples_per_second=round(seen / elapsed, 2),
                         final_loss=loss_value, trainable_parameters=parameter_count(trainable.values()),
                         bf16=use_bf16)
    with parallel.gathered(model, trainable):
        if out_dir is not None and save:
            save_task(model, task, Path(out_dir))
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / RUN_RECORD, {"task": spec.to_dict(), "train": config.to_dict(), **(run_info or {})})
        write_json(out_dir / "metrics.json", result.to_dict())
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)  # the finished adapter supersedes it
    parallel.barrier()
    return result


def format_metrics(metrics: dict) -> str:
    return json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()})
