"""The on-disk format, owned here alone.

A task folder holds:

- ``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA adapter in the PEFT
  layout (keys ``base_model.model.<module>.lora_A.weight``, task name stripped), so
  ``peft.PeftModel.from_pretrained(backbone, folder)`` loads it;
- ``head.safetensors``: the task head;
- ``task.json``: the task spec, adapter settings, backbone identity and recorded metrics (and a
  warm-started task's ``init_from``: the task folder its adapter started from);
- ``README.md``: a model card.

A bundle is a folder of task folders plus ``bundle.json``. No backbone weights are ever
written. Every file is written atomically (temporary file in the same folder, fsync,
rename), and only safetensors are read: never pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from transformers.pytorch_utils import Conv1D

from mtpeft.config import LoraSettings
from mtpeft.model_card import render_model_card
from mtpeft.tasks import TaskSpec

if TYPE_CHECKING:
    from mtpeft.model import MultiTaskModel

FAULT_ENV = "MTPEFT_FAULT"  # crash tests: kill the process at a named point
TASK_FILE = "task.json"
BUNDLE_FILE = "bundle.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
MODEL_CARD = "README.md"
TASK_FORMAT = "mtpeft-task/1"
BUNDLE_FORMAT = "mtpeft-bundle/1"
UNFINISHED = "unfinished"  # in the manifest a bundle's first save writes before its tasks
PEFT_PREFIX = "base_model.model."
# The packaged default is these weights; PEFT users with a hub can load adapters by this name.
DEFAULT_BACKBONE_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def fault_point(kind: str, at: int | str) -> None:
    """SIGKILL this process when ``MTPEFT_FAULT`` is ``kind:at`` (crash tests only)."""
    if os.environ.get(FAULT_ENV) == f"{kind}:{at}":
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str | os.PathLike, data: bytes, before_replace=None) -> None:
    """Write ``data`` so that ``path`` holds either its old or its new content, never a mix.

    ``before_replace`` runs after the temporary file is complete, just before the rename
    (the crash tests kill the process there, as ``MTPEFT_FAULT=save:<file name>`` does).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("save", path.name)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)  # make the rename itself durable


def _new_temporary(path: Path) -> tuple[int, str]:
    """A new empty temporary file beside ``path``, opened for writing.

    Created with the umask's permissions, as ``open`` would: ``mkstemp``'s are owner-only,
    and the rename would give them to the saved file, which a server running as another
    user then could not read.
    """
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:
            continue


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporary files (and ``save_pretrained_atomically``'s folders) that a crash left
    behind in ``folder``: never complete files."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def save_pretrained_atomically(save: Callable[[Path], object], folder: str | os.PathLike) -> list[Path]:
    """Run ``save(staging)`` (a library's ``save_pretrained``, which writes its files in place)
    in a hidden folder inside ``folder``, then move each file it wrote to the same place under
    ``folder`` with ``atomic_write``'s guarantees: each file is its old or its new complete
    version, never half written. Returns the files written, relative to ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".save_pretrained.{secrets.token_hex(6)}.tmp"
    staging.mkdir()
    try:
        save(staging)
        written = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
        for relative in written:
            source, target = staging / relative, folder / relative
            with open(source, "rb") as f:
                os.fsync(f.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            fault_point("save", relative.name)
            os.replace(source, target)
            _fsync_folder(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _fsync_folder(folder: Path) -> None:
    """Make renames into ``folder`` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: str | os.PathLike, data: dict) -> None:
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None,
                      before_replace=None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, save_safetensors_bytes(tensors, metadata=metadata), before_replace)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_safetensors_bytes(Path(path).read_bytes())


def read_safetensors_with_metadata(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


# ------------------------------------------------------------------ one task


def peft_adapter_config(lora: LoraSettings, base_model: str, module_paths: list[str],
                        fan_in_fan_out: bool = False, base_model_class: type | None = None) -> dict:
    """``adapter_config.json`` exactly as PEFT writes it for these settings.

    Targets are the full module paths, so PEFT adapts exactly the layers we adapted
    (a leaf name such as ``dense`` would also catch BERT's pooler). ``fan_in_fan_out``
    marks layers that store their weight as (in, out), GPT-2's ``Conv1D``.
    ``base_model_class`` (the backbone's class) goes into ``auto_mapping``, as PEFT saves
    an adapter without a task type: ``peft.AutoPeftModel`` reads the class to build there.
    """
    from peft import LoraConfig

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=sorted(module_paths), bias="none", fan_in_fan_out=fan_in_fan_out,
                        base_model_name_or_path=base_model, inference_mode=True)
    data = config.to_dict()
    for key, value in data.items():
        if isinstance(value, set):
            data[key] = sorted(value)
    if base_model_class is not None:
        data["auto_mapping"] = {"base_model_class": base_model_class.__name__,
                                "parent_library": base_model_class.__module__}
    return data


def check_task_folder(folder: str | os.PathLike) -> None:
    """Refuse to write a task into a bundle's own folder: a folder with a task.json loads as that
    one task, so the bundle's other tasks would be hidden (and unreadable) behind it."""
    if (Path(folder) / BUNDLE_FILE).is_file():
        raise ValueError(f"{folder} is a bundle ({BUNDLE_FILE}); a task saved there would hide the bundle's tasks. "
                         "Save the task into a folder of its own (MultiTaskModel.save(bundle, tasks=[name]) "
                         "adds a task to a bundle)")


def check_bundle_folder(folder: str | os.PathLike) -> None:
    """Refuse to write a bundle into a saved task's folder, whose task.json would hide the bundle."""
    if (Path(folder) / TASK_FILE).is_file():
        raise ValueError(f"{folder} holds a saved task ({TASK_FILE}), which a bundle saved there would hide behind "
                         "it; save the bundle into a folder of its own")


def save_task(model: MultiTaskModel, name: str, folder: str | os.PathLike) -> Path:
    """Write one task's adapter, head and task.json into ``folder``.

    A task of a joint model uses an adapter it shares with other tasks; its folder holds a
    copy of that adapter, so every task folder stands alone (PEFT loads each one), and
    ``task.json`` names the tasks it was shared with. The copy costs an adapter's size on
    disk (~300 KB at r=8 on MiniLM) per task.
    """
    folder = Path(folder)
    check_task_folder(folder)
    spec = model.spec(name)
    adapter = model.adapter_alias.get(name, name)
    lora = model.adapters[name] if adapter == name else model.shared_adapters[adapter]
    weights = {}
    if lora is not None:
        for path, layer in model.lora_layers(adapter).items():
            weights[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter].weight
            weights[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter].weight
        base_name = _peft_base_name(model)
        write_safetensors(folder / ADAPTER_WEIGHTS, weights, metadata={"format": "pt"})
        layers = model.lora_layers(adapter)
        conv1d = any(isinstance(layer.base_layer, Conv1D) for layer in layers.values())
        write_json(folder / ADAPTER_CONFIG, peft_adapter_config(lora, base_name, list(layers), fan_in_fan_out=conv1d,
                                                             base_model_class=type(model.backbone)))
    write_safetensors(folder / HEAD_WEIGHTS, dict(model.heads[name].state_dict()))
    written = [ADAPTER_WEIGHTS, ADAPTER_CONFIG, HEAD_WEIGHTS] if lora is not None else [HEAD_WEIGHTS]
    record = {
        "format": TASK_FORMAT,
        "spec": spec.to_dict(),
        "adapter": None if lora is None else {"type": "lora", **lora.to_dict()},
        "backbone": model.identity.to_dict(),
        "trainable_parameters": sum(p.numel() for p in model.task_parameters(name).values()),
        "metrics": model.task_metrics.get(name, {}),
        # task.json is written after these: a save killed between them leaves a task.json whose
        # sha256s the files do not match, so a task folder outside a bundle is never read torn.
        "files": {file: _sha256(folder / file) for file in written},
    }
    if name in model.task_init_from:  # where the adapter came from: its data's licence may carry over
        record["init_from"] = model.task_init_from[name]
    if adapter != name:  # task_parameters holds the task's head; the shared adapter trained for it too
        record["trainable_parameters"] += sum(w.numel() for w in weights.values())
        record["adapter"]["shared_with"] = sorted(t for t, a in model.adapter_alias.items() if a == adapter)
    write_json(folder / TASK_FILE, record)
    if lora is None:  # saved over a task that had an adapter: PEFT would still load the old one
        for stale in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            (folder / stale).unlink(missing_ok=True)
    atomic_write(folder / MODEL_CARD, render_model_card(record, _peft_base_name(model)).encode())
    return folder


def _peft_base_name(model: MultiTaskModel) -> str:
    return DEFAULT_BACKBONE_HUB_NAME if model.identity.name == "default" else model.identity.name


@dataclass
class SavedTask:
    """One saved task read into CPU memory, not yet part of any model.

    Reading apart from adding lets a server read a task's files while its model keeps
    serving other tasks, then add it in a moment (``install_task``).
    """

    spec: TaskSpec
    lora: LoraSettings | None
    adapter: dict[str, torch.Tensor]  # PEFT keys; empty for a head-only task
    head: dict[str, torch.Tensor]
    record: dict  # task.json
    source: str  # where it was read from, for messages

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.adapter.values(), *self.head.values()))


def _read_checked(path: Path, digest: str | None, recorded: str | None = None) -> bytes:
    """The bytes of ``path``, checked against the sha256 its bundle manifest recorded, and the
    one its task's ``task.json`` recorded (``recorded``)."""
    data = path.read_bytes()
    if digest is None and recorded is None:
        return data
    actual = hashlib.sha256(data).hexdigest()
    if digest is not None and actual != digest:
        raise BundleIntegrityError(f"{path}: changed since the bundle was saved (sha256 differs from its manifest)")
    if recorded is not None and actual != recorded:
        raise BundleIntegrityError(f"{path}: not the file its {TASK_FILE} was saved with (sha256 differs): "
                                   "a save of the task stopped midway, or the file was replaced; save the task again")
    return data


def read_task_record(folder: str | os.PathLike, digests: dict[str, str] | None = None) -> dict:
    """``task.json`` of a task folder; ``digests`` ({file name: sha256}) come from a bundle manifest."""
    path = Path(folder) / TASK_FILE
    record = json.loads(_read_checked(path, (digests or {}).get(TASK_FILE)))
    if record.get("format") != TASK_FORMAT:
        raise ValueError(f"{path}: not an mtpeft task file (format {record.get('format')!r})")
    return record


def read_task(folder: str | os.PathLike, digests: dict[str, str] | None = None, record: dict | None = None) -> SavedTask:
    """Read a task folder (adapter, head, ``task.json``) into CPU tensors, checking ``digests`` when given."""
    folder, digests = Path(folder), digests or {}
    record = record if record is not None else read_task_record(folder, digests)
    adapter = record.get("adapter")
    lora = None if adapter is None else LoraSettings(r=adapter["r"], alpha=adapter["alpha"], dropout=adapter["dropout"],
                                                     target_modules=adapter["target_modules"])
    recorded = record.get("files") or {}  # absent in task.json files written before it was kept
    weights = {}
    if lora is not None:
        weights = load_safetensors_bytes(_read_checked(folder / ADAPTER_WEIGHTS, digests.get(ADAPTER_WEIGHTS),
                                                       recorded.get(ADAPTER_WEIGHTS)))
    head = load_safetensors_bytes(_read_checked(folder / HEAD_WEIGHTS, digests.get(HEAD_WEIGHTS),
                                                recorded.get(HEAD_WEIGHTS)))
    return SavedTask(TaskSpec.from_dict(record["spec"]), lora, weights, head, record, str(folder))


def copy_adapter_weights(model: MultiTaskModel, task: str, saved: SavedTask) -> None:
    """Copy ``saved``'s LoRA weights into ``task``'s adapter, which must have the same layers and rank."""
    layers = model.lora_layers(task)
    expected = {f"{PEFT_PREFIX}{p}.lora_{ab}.weight" for p in layers for ab in "AB"}
    if set(saved.adapter) != expected:
        missing, extra = sorted(expected - set(saved.adapter)), sorted(set(saved.adapter) - expected)
        raise ValueError(f"{Path(saved.source) / ADAPTER_WEIGHTS} does not fit the backbone: "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for path, layer in layers.items():
            layer.lora_A[task].weight.copy_(saved.adapter[f"{PEFT_PREFIX}{path}.lora_A.weight"])
            layer.lora_B[task].weight.copy_(saved.adapter[f"{PEFT_PREFIX}{path}.lora_B.weight"])


def install_task(model: MultiTaskModel, saved: SavedTask) -> str:
    """Add a task read by ``read_task`` to ``model``; returns its name. On a mismatch the model is left as it was.

    A task saved from a joint model's shared adapter shares it again with the partners the
    model holds, however the tasks arrive: a whole bundle, the admin API one at a time, or
    the adapter cache swapping them in.
    """
    spec = saved.spec
    model.identity.check_matches(saved.record["backbone"], f"task {spec.name!r} in {saved.source}")
    model.add_task(spec, saved.lora, head_only=saved.lora is None, initialize=False)  # weights copied in below
    try:
        if saved.lora is not None:
            copy_adapter_weights(model, spec.name, saved)
        model.heads[spec.name].load_state_dict(saved.head)
    except BaseException:
        model.remove_task(spec.name)
        raise
    model.task_metrics[spec.name] = saved.record.get("metrics", {})
    if saved.record.get("init_from"):  # kept when the task is saved again (a bundle)
        model.task_init_from[spec.name] = saved.record["init_from"]
    _share_with_partners(model, spec.name, saved.record)
    return spec.name


def load_task(model: MultiTaskModel, folder: str | os.PathLike) -> str:
    """Add the task saved in ``folder`` to ``model``; returns its name."""
    return install_task(model, read_task(folder))


# ------------------------------------------------------------------ bundles


class BundleIntegrityError(ValueError):
    """A bundle file differs from the sha256 its manifest recorded."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_bundle(model: MultiTaskModel, folder: str | os.PathLike, tasks=None) -> Path:
    """Save tasks under ``folder`` and (re)write ``bundle.json`` with a sha256 per file; saving
    every task saves the model's learned router too (``router/``).

    Every name is checked first: a task rewritten before an unknown one failed the save would
    no longer match the manifest, and the bundle would not load.
    """
    folder = Path(folder)
    check_bundle_folder(folder)
    names = list(tasks) if tasks is not None else model.task_names
    for name in names:
        model.spec(name)
    manifest = {"format": BUNDLE_FORMAT, "backbone": model.identity.to_dict(), "tasks": {}, "files": {}}
    previous = read_json(folder / BUNDLE_FILE) if (folder / BUNDLE_FILE).exists() else None
    if previous is None or previous.get(UNFINISHED):
        # Without a manifest, the task folders with a task.json are the bundle: a first save
        # stopped midway would load as a bundle of fewer tasks. This one says it is unfinished.
        write_json(folder / BUNDLE_FILE, {**manifest, "tasks": {name: name for name in names}, UNFINISHED: True})
        previous = {}
    for name in names:
        save_task(model, name, folder / name)
    # Adding tasks to an existing bundle keeps the others.
    manifest["tasks"].update(previous.get("tasks", {}))
    manifest["files"].update({k: v for k, v in previous.get("files", {}).items() if k.split("/", 1)[0] not in names})
    for name in names:
        manifest["tasks"][name] = name
        for file in sorted((folder / name).iterdir()):
            if file.is_file() and not file.name.startswith("."):
                manifest["files"][f"{name}/{file.name}"] = _sha256(file)
    write_json(folder / BUNDLE_FILE, manifest)
    router = getattr(model, "router", None)
    if tasks is None and hasattr(router, "save"):  # a learned router (MultiTaskModel.load reads it back)
        from mtpeft.router import ROUTER_DIR

        router.save(folder / ROUTER_DIR)
    return folder


def record_in_manifest(folder: str | os.PathLike) -> None:
    """Add the files of ``folder`` (inside a bundle, e.g. its ``router/``) to the bundle's sha256 list."""
    folder = Path(folder)
    bundle = folder.parent
    if not (bundle / BUNDLE_FILE).is_file():
        return
    manifest = read_json(bundle / BUNDLE_FILE)
    files = manifest.setdefault("files", {})
    for file in sorted(folder.iterdir()):
        if file.is_file() and not file.name.startswith("."):
            files[f"{folder.name}/{file.name}"] = _sha256(file)
    write_json(bundle / BUNDLE_FILE, manifest)


def read_bundle_file(path: str | os.PathLike) -> bytes:
    """The bytes of a file in a bundle's sub-folder (e.g. ``router/``), checked against the sha256
    the bundle's manifest recorded for it; a file outside a bundle, or not listed, is read as is."""
    path = Path(path)
    manifest = path.parent.parent / BUNDLE_FILE
    digest = None
    if manifest.is_file():
        files = read_json(manifest).get("files")
        digest = files.get(f"{path.parent.name}/{path.name}") if isinstance(files, dict) else None
    return _read_checked(path, digest)


def _inside(root: Path, relative: str, manifest: Path) -> Path:
    path = (root / relative).resolve()
    if root.resolve() not in path.parents:  # a manifest may never point outside its bundle
        raise ValueError(f"{manifest}: {relative!r} points outside the bundle")
    return path


def bundle_entries(path: str | os.PathLike) -> list[tuple[Path, dict[str, str]]]:
    """The task folders at ``path`` (itself if it is one, else the bundle's tasks), each with
    the sha256 its bundle manifest records per file name; nothing is hashed here."""
    path = Path(path)
    if not path.is_dir():  # a typo in the path, not a folder that lacks a task
        raise FileNotFoundError(f"{path}: no such folder" if not path.exists() else
                                f"{path} is a file; pass a saved task's or bundle's folder")
    if (path / TASK_FILE).is_file():
        return [(path, {})]
    manifest_path = path / BUNDLE_FILE
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        if manifest.get(UNFINISHED):
            raise BundleIntegrityError(f"{manifest_path}: the bundle's first save did not finish (stopped midway), "
                                       "so some of its tasks are missing or incomplete; save it again")
        digests: dict[Path, dict[str, str]] = {}
        for relative, digest in manifest.get("files", {}).items():
            file = _inside(path, relative, manifest_path)
            digests.setdefault(file.parent, {})[file.name] = digest
        folders = [_inside(path, relative, manifest_path) for relative in manifest["tasks"].values()]
        return [(folder, digests.get(folder, {})) for folder in folders]
    folders = sorted(p.parent for p in path.glob(f"*/{TASK_FILE}"))
    if not folders:
        raise FileNotFoundError(f"{path}: no {TASK_FILE} here or in its sub-folders; is this a saved task or bundle?")
    return [(folder, {}) for folder in folders]


def task_folders(path: str | os.PathLike) -> list[Path]:
    """The task folders at ``path``: itself if it is one, else the bundle's tasks.

    The tasks' files are checked against the sha256 recorded in the bundle's manifest; the
    bundle's other folders (``router/``) are checked where they are read, so a damaged router
    does not keep the tasks from loading to train a new one.
    """
    entries = bundle_entries(path)
    folders = {folder for folder, _ in entries}
    manifest_path = Path(path) / BUNDLE_FILE
    if manifest_path.is_file() and not (Path(path) / TASK_FILE).is_file():
        for relative, digest in read_json(manifest_path).get("files", {}).items():
            file = _inside(Path(path), relative, manifest_path)
            if file.parent not in folders:
                continue
            if not file.is_file() or _sha256(file) != digest:
                raise BundleIntegrityError(f"{file}: missing or changed since the bundle was saved "
                                           f"(sha256 differs from {manifest_path})")
    return [folder for folder, _ in entries]


def read_backbone_name(path: str | os.PathLike) -> str:
    """The backbone the tasks at ``path`` were saved on; a bundle of no tasks names it in its manifest."""
    folders = task_folders(path)
    if not folders:
        return read_json(Path(path) / BUNDLE_FILE)["backbone"]["name"]
    return read_json(folders[0] / TASK_FILE)["backbone"]["name"]


def load_into(model: MultiTaskModel, path: str | os.PathLike) -> list[str]:
    """Add the tasks saved at ``path``; tasks saved from one shared adapter share one copy again."""
    return [load_task(model, folder) for folder in task_folders(path)]


def _share_with_partners(model: MultiTaskModel, task: str, record: dict) -> None:
    """``task``, just installed and saved from one shared adapter (a joint model's), shares one
    copy again with those of its partners the model holds whose copies still equal its own: a
    task retrained since keeps its own."""
    partners = [t for t in (record.get("adapter") or {}).get("shared_with") or () if t in model.specs and t != task]
    equal = [t for t in partners if model.adapters_equal([task, t])]
    if any(model.adapter_of(t) != model.adapter_of(task) for t in equal):
        model.share_adapter([*equal, task])
