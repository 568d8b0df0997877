"""Training checkpoints: everything needed to continue a run exactly where it stopped.

One safetensors file holds the task's trainable weights, the AdamW state and the torch
RNG state; its metadata holds step counters, the data-loader position, the scheduler
state and a fingerprint of the run's settings. It is written atomically, so a crash
leaves the previous complete checkpoint. Resuming restores all of it, so on CPU a
resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from mtpeft.distributed import generator_gpu, like, local_rng_state
from mtpeft.storage import fault_point, read_safetensors_with_metadata, write_safetensors

CHECKPOINT_FILE = "checkpoint.safetensors"


@dataclass
class RunPosition:
    """Where a run is: optimizer steps done, epoch, batches of that epoch consumed, the
    last step's loss (a run that resumes at its last step reports it as its final loss), and
    the losses its tracker has not yet logged (the next point averages them too)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seen: int = 0
    elapsed: float = 0.0
    loss: float = float("nan")
    unlogged_losses: list[float] = field(default_factory=list)


class CheckpointMismatchError(ValueError):
    pass


# Settings a run may change when it resumes: they change neither what it trains on nor how.
RESUMABLE_SETTINGS = ("compile", "eval_batch_size", "max_eval_examples", "checkpoint_every")


def recipe_key(config) -> str:
    """A run's training settings, for its fingerprint: all but ``RESUMABLE_SETTINGS``. ``init_from``
    counts as the folder it names, so ``runs/squad`` and its absolute path resume the same run."""
    settings = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_SETTINGS}
    if settings.get("init_from"):
        settings["init_from"] = os.path.realpath(settings["init_from"])
    return json.dumps(settings, sort_keys=True)


def backbone_key(identity) -> str:
    """The backbone a run trains on, for its fingerprint: its weights, not the name it was loaded by."""
    return json.dumps({k: v for k, v in identity.to_dict().items() if k != "name"}, sort_keys=True)


def adapter_key(settings) -> str:
    """The LoRA adapter a run trains, for its fingerprint: the model's own settings, which the
    recipe's ``lora`` need not name (the Python API and ``train-joint --alpha`` set them apart)."""
    return json.dumps(None if settings is None else settings.to_dict(), sort_keys=True)


def features_digest(features: Sequence[dict], targets: Iterable[str]) -> str:
    """What a run trains on, for its fingerprint: every feature's token ids and targets, so a
    data file replaced by another with as many rows does not resume into a mix of the two."""
    digest = hashlib.sha256()
    for feature in features:
        for key in ("input_ids", "input_ids_b", *targets):
            value = feature.get(key)
            digest.update(array("q", value).tobytes() if isinstance(value, list) else repr(value).encode())
            digest.update(b"|")
    return f"{len(features)} {digest.hexdigest()[:16]}"


def save_checkpoint(path: Path | None, weights: dict[str, torch.Tensor], optimizer_state: dict, scheduler,
                    position: RunPosition, fingerprint: dict, save_count: int,
                    rng_states: Sequence[dict[str, torch.Tensor]] | None = None) -> None:
    """Write the checkpoint to ``path`` (``None``: a process that does not write).

    ``weights`` and ``optimizer_state`` (``Optimizer.state_dict()``'s layout) hold whole
    tensors, as ``DataParallel.checkpoint_state`` gathers them from shards or partitions;
    ``rng_states`` every process's ``local_rng_state()`` by rank (``DataParallel.rng_states``),
    else this process's. Rank 0's are ``rng.torch``/``rng.cuda``, rank r's ``rng.torch.r``/``rng.cuda.r``.
    """
    if path is None:
        return
    tensors = {f"param.{name}": w for name, w in weights.items()}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    for rank, states in enumerate(rng_states or [local_rng_state()]):
        tensors.update({f"rng.{kind}.{rank}" if rank else f"rng.{kind}": state for kind, state in states.items()})
    meta = {
        "position": asdict(position),
        "param_groups": optimizer_state["param_groups"],
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "fingerprint": fingerprint,
    }
    write_safetensors(path, tensors, metadata={"mtpeft_checkpoint": json.dumps(meta)},
                      before_replace=lambda: fault_point("checkpoint-write", save_count))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint's tensors and metadata; a damaged or foreign file is named, not a bare
    deserialisation or key error."""
    try:
        tensors, metadata = read_safetensors_with_metadata(path)
        return tensors, json.loads(metadata["mtpeft_checkpoint"])
    except (SafetensorError, KeyError, ValueError) as error:
        raise ValueError(f"{path} is not a readable mtpeft checkpoint ({type(error).__name__}: {error}); "
                         "delete it to start the run over") from error


def load_checkpoint(path: Path, trainable: dict[str, torch.nn.Parameter], scheduler,
                    fingerprint: dict, rank: int = 0,
                    device: torch.device | str | None = None) -> tuple[RunPosition, dict]:
    """Put the checkpoint's weights into ``trainable`` (each process its own shard of them), and
    its scheduler and RNG state (process ``rank``'s, where it was saved) back; return the
    position and the optimizer state (whole tensors, for ``DataParallel.load_optimizer_state``
    once the optimizer is prepared)."""
    tensors, meta = _read(path)
    saved = meta["fingerprint"]
    differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differing:
        details = "; ".join(_what_differs(k, saved.get(k), fingerprint.get(k)) for k in differing)
        raise CheckpointMismatchError(
            f"{path} was written by a run with different settings ({', '.join(differing)}: {details}); "
            f"continue with the same settings, or train into a new --out folder")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(like(param, tensors[f"param.{name}"]))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(meta["param_groups"])})
    torch.set_rng_state(_rng_state(tensors, "torch", rank))
    cuda = _rng_state(tensors, "cuda", rank)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda, generator_gpu(device))  # the GPU the run draws on (``device``), else the current one
    return RunPosition(**meta["position"]), {"state": state, "param_groups": meta["param_groups"]}


def _rng_state(tensors: dict[str, torch.Tensor], kind: str, rank: int) -> torch.Tensor | None:
    """Process ``rank``'s saved generator; the main process's where the run had fewer processes."""
    return tensors.get(f"rng.{kind}.{rank}", tensors.get(f"rng.{kind}"))


def _what_differs(key: str, saved, now) -> str:
    """The fields of a fingerprint entry that differ ("lr 0.001 there, 0.002 here"), where the
    entry is a JSON object (the recipe, the task's spec); else what the entry stands for."""
    described = {"features": "the training examples differ", "backbone": "the backbone's weights differ"}
    if key in described:
        return described[key]
    try:
        before, after = json.loads(saved), json.loads(now)
    except (TypeError, ValueError):
        before = after = None
    if isinstance(before, dict) and isinstance(after, dict):
        fields = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if fields:
            return ", ".join(f"{k} {before.get(k)!r} there, {after.get(k)!r} here" for k in fields)
    return f"{saved!r} there, {now!r} here"
