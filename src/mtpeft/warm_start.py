"""Start a task's training from a saved task's adapter and head (intermediate-task transfer).

A few hundred examples teach an adapter little: trained on the packaged FAQ's 267 QA rows
alone, the demo's answer extraction stayed weak. Started from an adapter trained on SQuAD's
8,582 questions (``presets.packaged_adapter("squad-qa")``), it starts from what extractive QA
needs, and the FAQ rows teach it their style and when the entry holds no answer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mtpeft.backbone import BackboneMismatchError
from mtpeft.checkpoint import CHECKPOINT_FILE
from mtpeft.model import MultiTaskModel
from mtpeft.storage import PEFT_PREFIX, TASK_FILE, copy_adapter_weights, read_json, read_task, read_task_record

FRESH = "init_from=None; on the command line --init-from none"


def warm_start(model: MultiTaskModel, task: str, source: str | os.PathLike) -> str:
    """Copy the adapter saved in ``source`` (a task folder) into ``task``'s adapter, and its
    head where the two tasks' heads are alike. Returns what was copied, for the run's log.

    The adapters must match in layers, rank and scale (``alpha / r``): the copy is then the
    same update to the backbone. The head is copied when both tasks are of one type with
    one output layout (for classification: the same labels in the same order); otherwise
    it keeps its fresh initialisation, and only the adapter's features carry over.
    """
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"init_from {source}: no such task folder (a folder written by mtpeft train --out)")
    if not (source / TASK_FILE).is_file():
        raise FileNotFoundError(_not_a_task_folder(source))
    saved = read_task(source)
    try:
        model.identity.check_matches(saved.record["backbone"], f"init_from: the adapter in {source}")
    except BackboneMismatchError as error:
        raise BackboneMismatchError(f"{error}, or train from a fresh adapter ({FRESH})") from None
    mine = model.adapters.get(task)
    if saved.lora is None or mine is None:
        has = "has no adapter" if saved.lora is None else "has one"
        raise ValueError(f"init_from {source}: the saved task {has}, task {task!r} "
                         f"{'has one' if mine is not None else 'has none (head only)'}; both need a LoRA adapter")
    if (saved.lora.r, saved.lora.alpha) != (mine.r, mine.alpha):
        raise ValueError(f"init_from {source}: its adapter has r={saved.lora.r}, alpha={saved.lora.alpha:g}, "
                         f"task {task!r}'s r={mine.r}, alpha={mine.alpha:g}: train with its rank and alpha, or from "
                         f"a fresh adapter ({FRESH})")
    # The same rank on other layers fails the copy; said here in terms of the settings that differ.
    if {key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for key in saved.adapter} != set(model.lora_layers(task)):
        theirs = ",".join(saved.lora.target_modules or ["(the default)"])
        raise ValueError(f"init_from {source}: its adapter adapts the layers {theirs}, task {task!r}'s "
                         f"{','.join(mine.target_modules)}: train with --target-modules {theirs}, or from a fresh "
                         f"adapter ({FRESH})")
    copy_adapter_weights(model, task, saved)
    model.task_init_from[task] = str(source)

    spec, head = model.spec(task), model.heads[task]
    same_outputs = saved.spec.type == spec.type and saved.spec.labels == spec.labels
    shapes = {k: v.shape for k, v in head.state_dict().items()}
    if same_outputs and {k: v.shape for k, v in saved.head.items()} == shapes:
        with torch.no_grad():
            head.load_state_dict(saved.head)
        return f"adapter and head from {source}"
    return f"adapter from {source} (head freshly initialised: {saved.spec.type} task {saved.spec.name!r} has other outputs)"


def _not_a_task_folder(source: Path) -> str:
    """Why ``source`` holds no task to start from: a bundle holds several (none is picked for
    the user), another method's folder has no LoRA adapter to copy, and an interrupted run
    has only its checkpoint."""
    tasks = sorted(p.parent.name for p in source.glob(f"*/{TASK_FILE}"))
    if tasks:
        return (f"init_from {source}: a bundle of tasks ({', '.join(tasks)}); name one task's folder, "
                f"e.g. {source / tasks[0]}")
    if (source / "method.json").is_file():
        method = read_json(source / "method.json").get("method", {})
        return (f"init_from {source}: trained with method {method.get('name')!r} ({method.get('kind')}), which has "
                f"no LoRA adapter to start from; name a LoRA task's folder, or train from a fresh adapter ({FRESH})")
    if (source / CHECKPOINT_FILE).is_file():
        return (f"init_from {source}: a run that has not finished (a checkpoint, no {TASK_FILE} yet); run it again "
                "to finish it, then start from its folder")
    return f"init_from {source}: no {TASK_FILE}, so not a saved task's folder (mtpeft train --out writes one)"


def same_backbone(model: MultiTaskModel, source: str | os.PathLike) -> bool:
    """Whether the task saved in ``source`` was trained on ``model``'s backbone, as a warm start
    needs: the demo on another backbone trains its QA skill from a fresh adapter."""
    try:
        model.identity.check_matches(read_task_record(source)["backbone"], str(source))
    except BackboneMismatchError:
        return False
    return True
