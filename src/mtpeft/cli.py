"""The ``mtpeft`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path

from mtpeft import __version__
from mtpeft.config import LoraSettings, TrainConfig
from mtpeft.tasks.spec import TASK_TYPES, TaskSpec


PAD_HELP = "pad each batch to its longest input rounded up to this (default 1: exactly)"
LOADED_BACKBONE_HELP = "backbone (default: the one the tasks were trained on, by the name or folder they record)"
DROPOUT_HELP = ("keep the frozen backbone's dropout on while training an adapter (default: off; full fine-tuning "
                "always has it on)")


def resolve_device(name: str) -> str:
    """``--device`` as a device of this machine: torch's own errors for a mistyped name or a
    missing GPU (RuntimeError, AssertionError) came out as tracebacks once the model had loaded."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device; pass cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"--device {name!r}: no CUDA GPU is available here; pass cpu or auto")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return name


def _csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _init_from(value: str) -> str:
    """A task folder to start from, or "" for 'none' (a fresh start, also for a preset that warm-starts)."""
    return "" if value.strip().lower() == "none" else value


def _example_count(value: str) -> int:
    """A number of examples: 0 would train or score nothing, and a negative one means nothing."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _range(value: str) -> list[float]:
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:  # argparse would name this function instead of the value's form
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (two numbers), got {value!r}") from None
    return [low, high]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtpeft", description="Multi-task LoRA adapters on one frozen backbone.")
    parser.add_argument("--version", action="version", version=f"mtpeft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train, evaluate, save, reload and query the customer-support skills")
    demo.add_argument("--out", default="runs/demo", help="bundle folder to write (default: runs/demo)")
    demo.add_argument("--backbone", default="default", help="backbone: 'default' (packaged MiniLM), a path or a hub name")
    demo.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every skill's epochs (e.g. 0.2 for a quick look)")

    train = sub.add_parser("train", help="train one task's adapter and head")
    train.add_argument("--task", required=True, help="a built-in task (sst2, stsb, mrpc, qqp, imdb, squad, ...) or a new task's name")
    train.add_argument("--data", required=True, help="a folder holding the built-in task's files, or a data file (.tsv/.csv/.jsonl/.json)")
    train.add_argument("--eval-data", help="evaluation file (default: the preset's dev file, else every 10th row held out)")
    train.add_argument("--out", required=True, help="folder to write the trained task into")
    train.add_argument("--backbone", default="default", help="'default' (packaged MiniLM), a local path or a hub name")
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (a GPU when there is one)")
    custom = train.add_argument_group("your own task (when --task is not built in)")
    custom.add_argument("--task-type", choices=TASK_TYPES)
    custom.add_argument("--text-column", help="column of the text / first sentence / question")
    custom.add_argument("--text-pair-column", help="column of the second sentence / QA context")
    custom.add_argument("--label-column", help="column of the label / score / QA answers")
    custom.add_argument("--labels", type=_csv_list, help="comma-separated class names (default: the values found in the data)")
    custom.add_argument("--label-range", type=_range, help="regression: low,high of the scores")
    custom.add_argument("--max-length", type=int, help="tokens per input (default 128; QA 384)")
    custom.add_argument("--doc-stride", type=int, help="QA: tokens shared by consecutive context windows "
                                                       "(default a third of --max-length)")
    custom.add_argument("--head-dropout", type=float, help="dropout before the head's linear layer (default 0.1)")
    custom.add_argument("--allow-no-answer", action="store_true",
                        help="QA: some questions have no answer in their context (SQuAD v2.0: answers []); "
                             "predictions may be empty")
    recipe = train.add_argument_group("recipe (defaults: the task's preset, else TrainConfig's)")
    recipe.add_argument("--epochs", type=float)
    recipe.add_argument("--lr", type=float)
    recipe.add_argument("--head-lr", type=float)
    recipe.add_argument("--batch-size", type=int)
    recipe.add_argument("--seed", type=int)
    recipe.add_argument("--max-train-examples", type=int, help="train on a fixed random N examples (seeded, in file order)")
    recipe.add_argument("--max-eval-examples", type=int, help="evaluate on a fixed random N examples (seeded, in file order)")
    recipe.add_argument("--r", type=int, help="LoRA rank (default: the preset's, else 8)")
    recipe.add_argument("--alpha", type=float, help="LoRA alpha (default: the preset's with its rank, else 2*r)")
    recipe.add_argument("--lora-dropout", type=float, help="dropout on the adapter's input (default: the preset's, else 0)")
    recipe.add_argument("--target-modules", type=_csv_list, help="layers to adapt, e.g. query,value or all-linear "
                                                                 "(default: the preset's, else query/value)")
    recipe.add_argument("--head-only", action="store_true", help="no adapter: train the head on the frozen backbone")
    recipe.add_argument("--init-from", type=_init_from,
                        help="a task folder (mtpeft train --out) whose adapter, and head where it fits, this run "
                             "starts from (same --r and --alpha); 'none': a fresh start (default: the preset's; "
                             "faq-answer starts from the packaged SQuAD adapter)")
    recipe.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    recipe.add_argument("--pad-to-multiple-of", type=int, help=PAD_HELP)
    recipe.add_argument("--backbone-dropout", action="store_true", default=None, help=DROPOUT_HELP)
    recipe.add_argument("--compile", action="store_true",
                        help="torch.compile the backbone for training: faster steps after a one-off compilation "
                             "of about a minute (long runs)")
    recipe.add_argument("--checkpoint-every", type=int,
                        help="steps between checkpoints in --out (default 500; 0: epoch ends only; -1: none). "
                             "A run that finds a checkpoint in --out continues from it")
    train.add_argument("--skip-bad-rows", action="store_true", help="skip invalid rows (and report them) instead of stopping")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--report-to", type=_csv_list, default=["tensorboard"],
                       help="experiment trackers, comma-separated: tensorboard (default; events in --out/tensorboard), "
                            "wandb, mlflow, ... (accelerate's integrations, when installed)")
    train.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")

    evaluate = sub.add_parser("evaluate", help="score a trained task on labelled data")
    evaluate.add_argument("path", help="a trained task folder or a bundle")
    evaluate.add_argument("--data", required=True, help="a folder with the built-in task's files, or an evaluation file")
    evaluate.add_argument("--task", help="which task of a bundle")
    evaluate.add_argument("--out", help="metrics JSON to write (default: PATH/eval-metrics.json for a task folder)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--backbone", help=LOADED_BACKBONE_HELP)
    evaluate.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (a GPU when there is one)")
    evaluate.add_argument("--skip-bad-rows", action="store_true")

    predict = sub.add_parser("predict", help="predict for texts; prints JSON lines")
    predict.add_argument("path", help="a trained task folder or a bundle")
    predict.add_argument("text", nargs="*", help="inputs, one per argument (a pair or QA input as a JSON list/object); "
                                                 "omit to read --file or standard input")
    predict.add_argument("--task", help="which task; without it a bundle's inputs are routed (its learned router, "
                                        "else the one task that takes each input's shape)")
    predict.add_argument("--file", help="read one input per line from this file")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--backbone", help=LOADED_BACKBONE_HELP)
    predict.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (a GPU when there is one)")

    export = sub.add_parser("export", help="write a task as a plain transformers model folder (LoRA merged)")
    export.add_argument("path", help="a trained task folder or a bundle")
    export.add_argument("--task", help="which task (needed when the bundle holds several)")
    export.add_argument("--out", required=True, help="folder to write")
    export.add_argument("--backbone", help=LOADED_BACKBONE_HELP)
    export.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (a GPU when there is one)")

    sub.add_parser("tasks", help="list the built-in tasks")

    router = sub.add_parser("train-router", help="train the bundle's router (which task an input is for); saves BUNDLE/router")
    router.add_argument("bundle", help="a bundle folder")
    router.add_argument("--data", action="append", default=[], metavar="[TASK=]PATH",
                        help="a task's training data (TASK=FILE or TASK=FOLDER), a data root (glue/MRPC, squad, ... "
                             "inside), or a folder holding built-in tasks' files; repeatable "
                             "(default: the packaged support data, for the tasks it has)")
    router.add_argument("--phrasings", action="append", default=[], metavar="FILE",
                        help="extra request phrasings: JSON Lines of {'task': NAME or null, 'text': ...}; repeatable")
    router.add_argument("--no-packaged-phrasings", action="store_true", help="leave out the packaged phrasings")
    router.add_argument("--threshold", type=float, default=0.5, help="below this probability: no task (default 0.5)")
    router.add_argument("--c", type=float, default=30.0, help="inverse regularisation of the classifier (default 30)")
    router.add_argument("--backbone", help=LOADED_BACKBONE_HELP)

    support = sub.add_parser("support", help="answer one customer message: sentiment, similar FAQ questions, answer (JSON)")
    support.add_argument("bundle", help="a bundle with sentiment, similar-questions and faq-answer tasks")
    support.add_argument("message", help="the customer's message")
    support.add_argument("--faq", help="FAQ file (.jsonl/.json/.csv/.tsv with question and context/answer; default: the packaged demo FAQ)")
    support.add_argument("--top-k", type=int, default=5, help="FAQ questions to retrieve and re-rank (default 5)")
    support.add_argument("--answer-threshold", type=float, default=0.3, help="below this answer probability: no answer")
    support.add_argument("--backbone", help=LOADED_BACKBONE_HELP)

    serve = sub.add_parser("serve", help="serve a bundle over HTTP (FastAPI + uvicorn)")
    serve.add_argument("bundle", help="a bundle folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--faq", help="FAQ file for /v1/support (default: the packaged demo FAQ when the bundle has the support tasks)")
    serve.add_argument("--max-wait-ms", type=float, default=2.0, help="longest a request waits to share a forward pass (default 2)")
    serve.add_argument("--max-inputs", type=int, default=64, help="inputs per /v1/predict request (default 64)")
    serve.add_argument("--max-text-chars", type=int, default=2000, help="characters per text (default 2000)")
    serve.add_argument("--max-queued", type=int, default=1024,
                       help="requests waiting for the model; beyond it 503 with Retry-After (default 1024)")
    serve.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="longest a prediction may take; beyond it 503 (default 30)")
    serve.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="at shutdown, longest to finish the requests already accepted (default 10)")
    serve.add_argument("--backbone", help=LOADED_BACKBONE_HELP)
    serve.add_argument("--admin-root", help="folder the task management API loads tasks from (default: the bundle); "
                                            "the API is on only when MTPEFT_API_KEY is set")
    serve.add_argument("--max-active-adapters", type=int, metavar="N",
                       help="at most N tasks active in the model; others load from the bundle on demand (default: all active)")
    joint = sub.add_parser("train-joint", help="train several tasks together: one shared LoRA adapter, a head per "
                                               "task; saves a bundle")
    joint.add_argument("--tasks", type=_csv_list, required=True, help="comma-separated tasks: built-in ones or --task-file names")
    joint.add_argument("--out", required=True, help="bundle folder to write (one task folder per task)")
    joint.add_argument("--data-root", default="../shared/data",
                       help="folder with the built-in tasks' data (glue/SST-2, imdb, squad, ...; default ../shared/data)")
    joint.add_argument("--data", action="append", default=[], metavar="TASK=FOLDER", help="a task's data folder; repeatable")
    joint.add_argument("--task-file", action="append", default=[], metavar="FILE",
                       help="your own task: JSON with spec (TaskSpec fields), data, eval_data, recipe; repeatable")
    joint.add_argument("--sampling", choices=("temperature", "proportional"), default="temperature",
                       help="how each step's task is drawn: by size^(1/T) (default) or by size")
    joint.add_argument("--temperature", type=float, default=2.0, help="T of temperature sampling (default 2)")
    joint.add_argument("--backbone", default="default", help="'default' (packaged MiniLM), a local path or a hub name")
    joint.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    joint.add_argument("--epochs", type=float, help="every task's epochs (default: each task's preset epochs); the "
                                                    "run takes the steps the separate runs would take together")
    joint.add_argument("--lr", type=float, help="the shared adapter's learning rate")
    joint.add_argument("--head-lr", type=float, help="the heads' learning rate")
    joint.add_argument("--batch-size", type=int)
    joint.add_argument("--seed", type=int)
    joint.add_argument("--max-train", type=_example_count, help="a fixed random subset of N training examples per task")
    joint.add_argument("--r", type=int, help="LoRA rank of the shared adapter (default 8)")
    joint.add_argument("--alpha", type=float, help="LoRA alpha (default 2*r)")
    joint.add_argument("--target-modules", type=_csv_list, help="layers to adapt, e.g. query,value or all-linear")
    joint.add_argument("--fp32", action="store_true", help="no bf16")
    joint.add_argument("--pad-to-multiple-of", type=int, help=PAD_HELP)
    joint.add_argument("--backbone-dropout", action="store_true", default=None, help=DROPOUT_HELP)
    joint.add_argument("--checkpoint-every", type=int,
                       help="steps between checkpoints in --out/joint (default 500; 0 or -1: none). A run that finds a "
                            "checkpoint there continues from it")
    joint.add_argument("--no-progress", action="store_true")

    compare = sub.add_parser("compare", help="run a method x task grid; one result JSON per run (resumable)")
    compare.add_argument("--tasks", type=_csv_list, help="comma-separated tasks: built-in ones or --task-file names")
    compare.add_argument("--methods", type=_csv_list, help="comma-separated methods (see --list-methods)")
    compare.add_argument("--seeds", type=_int_list, default=[1], help="comma-separated seeds (default 1)")
    compare.add_argument("--list-methods", action="store_true", help="list the methods and exit")
    compare.add_argument("--data-root", default="../shared/data",
                         help="folder with the built-in tasks' data (glue/SST-2, imdb, squad, ...; default ../shared/data)")
    compare.add_argument("--data", action="append", default=[], metavar="TASK=FOLDER", help="a task's data folder; repeatable")
    compare.add_argument("--task-file", action="append", default=[], metavar="FILE",
                         help="your own task: JSON with spec (TaskSpec fields), data, eval_data, recipe; repeatable")
    compare.add_argument("--results", default="results/compare", help="where run JSONs go (default results/compare)")
    compare.add_argument("--work", default="runs/compare", help="checkpoints of runs in progress (default runs/compare)")
    compare.add_argument("--backbone", default="default", help="'default' (packaged MiniLM), a local path or a hub name")
    compare.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    compare.add_argument("--max-train", type=_example_count, help="a fixed random subset of N training examples per task")
    compare.add_argument("--max-eval", type=_example_count, help="a fixed random subset of N evaluation examples per task")
    compare.add_argument("--epochs", type=float, help="override every method's epochs")
    compare.add_argument("--lr", type=float, help="override the adapter's (full: the backbone's) learning rate")
    compare.add_argument("--head-lr", type=float, help="override the head's learning rate")
    compare.add_argument("--batch-size", type=int, help="override the batch size")
    compare.add_argument("--backbone-dropout", action="store_true", default=None, help=DROPOUT_HELP)
    compare.add_argument("--joint-temperature", type=float, default=2.0, help="T of joint-temperature sampling (default 2)")
    compare.add_argument("--keep-weights", action="store_true", help="keep each run's trained weights under --work")
    compare.add_argument("--in-process", action="store_true", help="run every cell in this process (no child processes)")
    compare.add_argument("--no-progress", action="store_true")
    compare.add_argument("--grid-command", help=argparse.SUPPRESS)  # set for the child process of a grid

    report = sub.add_parser("report", help="write RESULTS.md's quality section and plots from compare's run JSONs")
    report.add_argument("--results", default="results/compare", help="folder of run JSONs (default results/compare)")
    report.add_argument("--out", default="RESULTS.md", help="markdown file whose quality section is rewritten")
    report.add_argument("--plots", default="results/plots", help="folder for the PNG plots (default results/plots)")
    return parser


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in _csv_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes a command's positionals in one go, so `predict RUN --task T "text" ...` left the
    # texts over: after the options, they are texts all the same.
    if args.command == "predict" and extra and not any(e.startswith("-") for e in extra):
        args.text, extra = [*args.text, *extra], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    command = {"demo": _demo, "train": _train, "evaluate": _evaluate, "predict": _predict, "tasks": _tasks,
               "export": _export, "train-router": _train_router, "support": _support, "serve": _serve,
               "train-joint": _train_joint, "compare": _compare, "report": _report}[args.command]
    try:
        if args.command != "train" and os.environ.get("WORLD_SIZE", "1") != "1":
            from mtpeft.distributed import refuse_several_processes

            refuse_several_processes(f"mtpeft {args.command}")
        with _progress_bars(not getattr(args, "no_progress", False)):
            return command(args)
    except (ValueError, KeyError, OSError) as err:  # OSError: a path in the way, no permission, a full disk ...
        system = isinstance(err, OSError) and err.filename and err.strerror  # "[Errno 20] ..." -> "PATH: ..."
        print(f"mtpeft: error: {f'{err.filename}: {err.strerror}' if system else err}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _named_by_flags(flags: dict[str, str]):
    """Settings objects name a bad value by its Python name (``top_k``); on the command line the
    user typed a flag (``--top-k``), so the error says that."""
    try:
        yield
    except ValueError as err:
        message = str(err)
        for name, flag in flags.items():
            if message.startswith(f"{name} "):
                raise ValueError(flag + message[len(name):]) from None
        raise


@contextlib.contextmanager
def _progress_bars(shown: bool):
    """--no-progress quiets transformers' own bars too (loading weights), for logs kept in files."""
    if shown:
        yield
        return
    from transformers.utils import logging as transformers_logging

    was_shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_shown:
            transformers_logging.enable_progress_bar()


def _demo(args) -> int:
    from mtpeft.demo import run_demo

    run_demo(out=args.out, backbone=args.backbone, epochs_scale=args.epochs_scale)
    return 0


def _tasks(args) -> int:
    from mtpeft.tasks.presets import get_preset, preset_names

    for name in preset_names():
        preset = get_preset(name)
        print(f"{name:18} {preset.spec.type:20} {preset.spec.description}")
    return 0


def _custom_spec(args) -> TaskSpec:
    if not args.task_type:
        from mtpeft.tasks.presets import preset_names

        raise ValueError(f"--task {args.task!r} is not built in ({', '.join(preset_names())}); "
                         "for your own data pass --task-type and the column options")
    qa = args.task_type == "extractive-qa"
    fields = {"name": args.task, "type": args.task_type,
              "text_column": args.text_column or ("question" if qa else "text"),
              "text_pair_column": args.text_pair_column or ("context" if qa else None),
              "label_column": args.label_column or ("answers" if qa else "label"),
              "labels": args.labels, "label_range": args.label_range}
    if args.task_type in ("classification", "pair-classification") and not args.labels:
        from mtpeft.data import labels_in

        fields["labels"] = labels_in(args.data, fields["label_column"], "--label-column", "pass --labels")
    if args.head_dropout is not None:
        fields["head_dropout"] = args.head_dropout
    if args.allow_no_answer:
        if not qa:
            raise ValueError(f"--allow-no-answer is for --task-type extractive-qa, not {args.task_type}")
        fields["allow_no_answer"] = True
    return TaskSpec(**fields, **_window_flags(args))


def _count(used: int, found: int) -> str:
    return f"{used}" if used == found else f"{used} (of {found})"


def _window_flags(args) -> dict:
    """``--max-length`` and ``--doc-stride`` where given: they apply to built-in tasks too."""
    return {k: v for k, v in (("max_length", args.max_length), ("doc_stride", args.doc_stride)) if v is not None}


# Flags that say how your own data reads: a built-in task reads its files its own way.
DATA_FLAGS = ("text_column", "text_pair_column", "label_column", "labels", "label_range")


def _preset_spec(spec: TaskSpec, args) -> TaskSpec:
    """A built-in task's spec with the task flags that apply to it (window, head dropout, no-answer
    QA); the data flags are refused. All of them but the window's used to be ignored without a word."""
    given = [f"--{name.replace('_', '-')}" for name in DATA_FLAGS if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: for your own task; built-in task {spec.name!r} reads its data as "
                         "its preset says (add --task-type to read the data as your own task of that name)")
    changes = _window_flags(args)
    if args.head_dropout is not None:
        changes["head_dropout"] = args.head_dropout
    if args.allow_no_answer:
        if spec.type != "extractive-qa":
            raise ValueError(f"--allow-no-answer is for extractive-qa tasks, not {spec.name!r} ({spec.type})")
        changes["allow_no_answer"] = True
    return TaskSpec.from_dict({**spec.to_dict(), **changes}) if changes else spec


def _lora_settings(args, preset: LoraSettings | None) -> LoraSettings:
    """The adapter of ``mtpeft train``: the preset's (else the defaults), with each LoRA flag given
    replacing its one setting. A new ``--r`` without ``--alpha`` takes alpha = 2 * r."""
    base = preset or LoraSettings(r=8, alpha=16.0)
    r = args.r if args.r is not None else base.r
    alpha = args.alpha if args.alpha is not None else base.alpha if args.r is None else 2.0 * r
    return LoraSettings(r=r, alpha=alpha,
                        dropout=args.lora_dropout if args.lora_dropout is not None else base.dropout,
                        target_modules=args.target_modules if args.target_modules is not None else base.target_modules)


def _train(args) -> int:
    import torch

    from mtpeft.distributed import fsdp_launch
    from mtpeft.model import MultiTaskModel
    from mtpeft.sources import load_task_data
    from mtpeft.tasks.presets import get_preset, preset_names
    from mtpeft.train import format_metrics, train_task

    preset = get_preset(args.task) if args.task in preset_names() and not args.task_type else None
    spec = _preset_spec(preset.spec, args) if preset else _custom_spec(args)
    recipe = preset.adapter_recipe() if preset else {}
    for key in ("epochs", "lr", "head_lr", "batch_size", "seed", "max_train_examples", "max_eval_examples",
                "checkpoint_every", "pad_to_multiple_of", "backbone_dropout", "init_from"):
        if getattr(args, key) is not None:
            value = getattr(args, key)
            recipe[key] = None if key == "init_from" and not value else value  # --init-from none: ""; --seed 0 stays 0
    preset_lora = recipe.pop("lora", None)
    if args.head_only and args.init_from is None:  # a preset's warm start is of its adapter
        recipe.pop("init_from", None)
    lora = None if args.head_only else _lora_settings(args, preset_lora)
    config = TrainConfig(**recipe, lora=lora, bf16=False if args.fp32 else None, compile=args.compile)

    data = load_task_data(spec, args.data, args.eval_data, preset.layout if preset else None, args.skip_bad_rows)
    if data.skipped:
        print(f"skipped {len(data.skipped)} bad rows; first: {data.skipped[0]}", file=sys.stderr)
    train_n, eval_n = (min(len(examples), limit) if limit else len(examples)
                       for examples, limit in ((data.train, config.max_train_examples),
                                               (data.eval, config.max_eval_examples)))
    print(f"task {spec.name}: {_count(train_n, len(data.train))} training and {_count(eval_n, len(data.eval))} "
          "evaluation examples", file=sys.stderr)
    if not eval_n:
        print("warning: no evaluation examples: the run will not be scored (pass --eval-data)", file=sys.stderr)
    device = "cpu" if fsdp_launch() else resolve_device(args.device)
    model = MultiTaskModel.from_backbone(args.backbone).to(device)
    torch.manual_seed(config.seed)  # the adapter's and head's initial weights
    model.add_task(spec, lora, head_only=args.head_only)
    run_info = {"data": data.description, "skipped_rows": len(data.skipped), "backbone": args.backbone,
                "command": "mtpeft " + shlex.join(args.argv)}
    result = train_task(model, spec.name, data.train, data.eval, config, out_dir=args.out,
                        progress=not args.no_progress, run_info=run_info,
                        report_to=[t for t in args.report_to if not (args.no_tensorboard and t == "tensorboard")])
    if os.environ.get("RANK", "0") == "0":  # one line per run, from the process that evaluated
        print(f"{spec.name}: {format_metrics(result.metrics)} ({result.train_seconds:.0f} s, "
              f"{result.trainable_parameters:,} trainable parameters) -> {args.out}")
    return 0


def _evaluate(args) -> int:
    from mtpeft.evaluate import evaluate_task
    from mtpeft.model import MultiTaskModel
    from mtpeft.sources import load_eval_examples
    from mtpeft.storage import TASK_FILE, write_json
    from mtpeft.tasks.presets import built_in_layout

    device = resolve_device(args.device)  # before the model loads: a bad one fails fast
    model = MultiTaskModel.load(args.path, backbone=args.backbone, router=False).to(device)
    task = _one_task(model, args)
    spec = model.spec(task)
    examples = load_eval_examples(spec, args.data, built_in_layout(spec), args.skip_bad_rows)
    metrics = evaluate_task(model, task, examples, args.batch_size)
    out = args.out or (Path(args.path) / "eval-metrics.json" if (Path(args.path) / TASK_FILE).is_file() else None)
    if out:
        write_json(out, {"task": task, "data": str(args.data), "metrics": metrics})
    print(json.dumps({"task": task, **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}}))
    return 0


def _one_task(model, args) -> str:
    """The task a command works on: --task, or the only one the folder holds."""
    if args.task is None and len(model.specs) > 1:
        raise ValueError(f"{args.path} holds several tasks; pass --task, one of {sorted(model.specs)}")
    return model.resolve_task(args.task)


def _export(args) -> int:
    from mtpeft.export import export_task
    from mtpeft.model import MultiTaskModel

    device = resolve_device(args.device)  # before the model loads: a bad one fails fast
    model = MultiTaskModel.load(args.path, backbone=args.backbone, router=False).to(device)
    task = _one_task(model, args)
    export_task(model, task, args.out)
    print(f"exported {task} to {args.out}: load the model and its tokenizer with transformers and "
          "trust_remote_code=True")
    return 0


def parse_input_line(line: str):
    """A JSON object/array line is parsed (QA dicts, pairs); a tab separates a pair; else plain text."""
    stripped = line.strip()
    if stripped.startswith(("{", "[")):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ValueError(f"{stripped!r} starts like JSON but is not valid JSON ({err.msg} at character {err.pos}); "
                             'a pair is ["text a", "text b"], a QA input {"question": ..., "context": ...}') from None
        return tuple(value) if isinstance(value, list) else value
    if "\t" in stripped:
        return tuple(stripped.split("\t", 1))
    return stripped


# How an input of a pair or QA task is written on the command line (an argument or a --file line).
CLI_INPUTS = {
    "pair": 'compares two texts: on the command line a pair is a JSON list, e.g. \'["first text", "second text"]\'',
    "qa": 'answers questions: on the command line a question is a JSON object, '
          'e.g. \'{"question": "...", "context": "..."}\'',
}


def _check_inputs(spec: TaskSpec, lines: list[tuple[str, str]], inputs: list) -> None:
    """Inputs for one named task, checked before predicting: a wrong one is named by its place; one
    of the wrong shape is told how to write the input on the command line (the Python API speaks of
    tuples), one of the right shape keeps the model's message (e.g. which part is null)."""
    from mtpeft.model import to_example
    from mtpeft.router import input_shape, task_shape

    for (where, _), value in zip(lines, inputs):
        try:
            to_example(value, spec)
        except ValueError as err:
            try:
                shape = input_shape(value)
            except ValueError:
                shape = None
            how = CLI_INPUTS.get(task_shape(spec)) if shape != task_shape(spec) else None
            raise ValueError(f"{where}: " + (f"task {spec.name!r} {how}" if how else str(err))) from None


def _refuse_blank(where: str, value) -> None:
    """An empty text (or one of only invisible characters) would still get a confident answer,
    as the HTTP API's 422 says; here it is named by its place before the model loads."""
    from mtpeft.data import is_blank
    from mtpeft.router import input_shape, routing_texts

    try:
        texts = routing_texts(value) + ([value["context"]] if input_shape(value) == "qa" else [])
    except (ValueError, TypeError, KeyError):
        return  # a wrong shape is the model's (or _check_inputs') to name
    if any(isinstance(text, str) and is_blank(text) for text in texts):
        raise ValueError(f"{where}: empty text")


def _predict(args) -> int:
    from mtpeft.model import MultiTaskModel
    from mtpeft.router import ShapeRouter

    if args.text and args.file:
        raise ValueError("pass inputs as arguments or --file, not both")
    if args.text:
        lines = [(f"argument {i}", text) for i, text in enumerate(args.text, 1)]
    else:
        source = open(args.file, encoding="utf-8") if args.file else sys.stdin
        with source:
            lines = [(f"{args.file or 'stdin'}:{i}", line) for i, line in enumerate(source, 1) if line.strip()]
    inputs = []
    for where, line in lines:
        try:
            inputs.append(parse_input_line(line))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        _refuse_blank(where, inputs[-1])
    device = resolve_device(args.device)
    model = MultiTaskModel.load(args.path, backbone=args.backbone).to(device)  # after the inputs and device: a bad one fails fast
    if model.router is None:  # the shape rule's advice, in the command line's terms
        model.router = ShapeRouter(model.specs, "pass --task")
    task = model.resolve_task(args.task) if args.task is not None or len(model.specs) == 1 else None
    if task is not None:
        _check_inputs(model.spec(task), lines, inputs)
    for prediction in model.predict(inputs, task=task, batch_size=args.batch_size):
        print(json.dumps(prediction.to_dict()))
    return 0


def _router_data(model, values: list[str]) -> dict:
    """``--data`` values as {task: path}: ``TASK=PATH`` names one task; a folder is a data root
    (``glue/MRPC``, ``squad``, ... inside, as ``--data-root`` elsewhere) or a folder of built-in
    tasks' files, each task's training file found under its own name."""
    from mtpeft.compare import DATA_DIRS
    from mtpeft.tasks.presets import built_in_layout, support_data_dir

    layouts = {t: layout for t in model.task_names if (layout := built_in_layout(model.spec(t)))}
    built_in = list(layouts)  # a task of one's own named as a built-in one has its own files
    data = {}
    for value in values or [str(support_data_dir())]:
        task, sep, path = value.partition("=")
        if sep and task in model.specs:
            data[task] = path
            continue
        if not Path(value).is_dir():  # a folder may have '=' in its name (runs/lr=1e-3)
            if sep:
                raise ValueError(f"--data {value!r}: unknown task {task!r}; tasks in the bundle: {model.task_names}")
            raise ValueError(f"--data {value!r}: pass TASK=FILE for a data file, or a folder of built-in tasks' files")
        under_root = {t: str(Path(value) / DATA_DIRS[t]) for t in built_in if t in DATA_DIRS
                      and (Path(value) / DATA_DIRS[t] / layouts[t].train_file).is_file()}
        if under_root:
            data.update({t: path for t, path in under_root.items() if t not in data})
            continue
        found = [t for t in built_in if (Path(value) / layouts[t].train_file).is_file()]
        by_file: dict[str, list[str]] = {}
        for t in found:
            by_file.setdefault(layouts[t].train_file, []).append(t)
        shared = {file: tasks for file, tasks in by_file.items() if len(tasks) > 1}
        if shared:  # MRPC's train.tsv read as STS-B's failed on its columns
            file, tasks = next(iter(shared.items()))
            raise ValueError(f"--data {value!r}: its {file} could be the data of {sorted(tasks)}; "
                             f"name the task: --data {tasks[0]}={value}")
        if not found and values:  # the packaged folder by default serves only the tasks it has
            raise ValueError(f"--data {value!r}: no training file of the bundle's built-in tasks ({built_in}) here or "
                             f"in a data root's sub-folders ({sorted({DATA_DIRS[t] for t in built_in if t in DATA_DIRS})}); "
                             "pass TASK=PATH")
        data.update({t: value for t in found if t not in data})
    return data


def _train_router(args) -> int:
    from mtpeft.model import MultiTaskModel
    from mtpeft.router import ROUTER_DIR, LearnedRouter
    from mtpeft.router_data import router_examples

    model = MultiTaskModel.load(args.bundle, backbone=args.backbone, router=False)  # the router being replaced
    examples, summary = router_examples(model, _router_data(model, args.data), args.phrasings,
                                        packaged=not args.no_packaged_phrasings)
    missing = [t for t in model.task_names if not any(task == t for task, _ in examples)]
    if missing:
        print(f"warning: no examples for tasks {missing}: the router will never choose them "
              "(pass --data TASK=FILE or --phrasings)", file=sys.stderr)
    router = LearnedRouter.fit(model, examples, threshold=args.threshold, c=args.c)
    folder = router.save(Path(args.bundle) / ROUTER_DIR)
    print(json.dumps({"router": str(folder), "classes": router.classes, "threshold": router.threshold,
                      "train_accuracy": round(router.info["train_accuracy"], 4), **summary}, indent=2))
    return 0


def _support(args) -> int:
    from mtpeft.model import MultiTaskModel
    from mtpeft.support import SupportPipeline

    model = MultiTaskModel.load(args.bundle, backbone=args.backbone, router=False)
    with _named_by_flags({"top_k": "--top-k", "answer_threshold": "--answer-threshold"}):
        pipeline = SupportPipeline(model, args.faq, top_k=args.top_k, answer_threshold=args.answer_threshold)
    print(json.dumps(pipeline.answer(args.message).to_dict(), indent=2))
    return 0


def _serve(args) -> int:
    from mtpeft.serve import ServeSettings, serve

    if not 0 <= args.port <= 65535:  # uvicorn took 99999 and said it was running there
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    flags = {name: f"--{name.replace('_', '-')}" for name in ("max_wait_ms", "max_inputs", "max_text_chars", "max_queued")}
    with _named_by_flags({**flags, "request_timeout_s": "--request-timeout", "drain_timeout_s": "--drain-timeout"}):
        settings = ServeSettings(max_wait_ms=args.max_wait_ms, max_inputs=args.max_inputs,
                                 max_text_chars=args.max_text_chars, max_queued=args.max_queued,
                                 request_timeout_s=args.request_timeout, drain_timeout_s=args.drain_timeout)
    serve(args.bundle, host=args.host, port=args.port, faq=args.faq, backbone=args.backbone, settings=settings,
          max_active_adapters=args.max_active_adapters, admin_root=args.admin_root)
    return 0


def _compare(args) -> int:
    from mtpeft.compare import GridSettings, run_grid
    from mtpeft.methods import METHODS

    if args.list_methods:
        for name, method in METHODS.items():
            print(f"{name:20} {method.kind:11} {method.description}")
        print(f"{'lora-r<N>[-all]':20} {'lora':11} LoRA of any rank N on query/value (or every linear layer)")
        return 0
    if not args.tasks or not args.methods:
        raise ValueError("compare needs --tasks and --methods (see --list-methods)")
    resolve_device(args.device)  # a bad name fails here, not in every cell; the cells resolve "auto" themselves
    settings = GridSettings(
        tasks=args.tasks, methods=args.methods, seeds=args.seeds, data_root=args.data_root, data=_task_data(args.data),
        task_files=args.task_file, results=args.results, work=args.work, backbone=args.backbone, device=args.device,
        max_train=args.max_train, max_eval=args.max_eval, epochs=args.epochs, lr=args.lr, head_lr=args.head_lr,
        batch_size=args.batch_size, backbone_dropout=args.backbone_dropout, joint_temperature=args.joint_temperature,
        keep_weights=args.keep_weights, in_process=args.in_process, progress=not args.no_progress)
    grid_command = args.grid_command or "mtpeft " + shlex.join(args.argv)
    summary = run_grid(settings, grid_command, log=lambda line: print(line, file=sys.stderr, flush=True),
                       child=args.grid_command is not None)
    return 1 if summary.failed else 0


def _task_data(values: list[str]) -> dict[str, str]:
    """``--data TASK=FOLDER`` arguments as {task: folder}."""
    data = {}
    for value in values:
        task, sep, path = value.partition("=")
        if not sep or not task or not path:
            raise ValueError(f"--data {value!r}: expected TASK=FOLDER")
        data[task] = path
    return data


def _train_joint(args) -> int:
    from mtpeft.backbone import load_backbone
    from mtpeft.compare import check_data_flags, resolve_task
    from mtpeft.data import fixed_subset
    from mtpeft.joint import build_joint_model, train_joint
    from mtpeft.methods import get_method
    from mtpeft.sources import load_task_data
    from mtpeft.storage import check_bundle_folder, record_in_manifest, write_json
    from mtpeft.train import format_metrics

    if len(set(args.tasks)) < 2:
        raise ValueError(f"--tasks: name at least two different tasks to train together, got {args.tasks}")
    twice = sorted({t for t in args.tasks if args.tasks.count(t) > 1})
    if twice:
        raise ValueError(f"--tasks: {', '.join(map(repr, twice))} {'is' if len(twice) == 1 else 'are'} named more than once")
    check_bundle_folder(args.out)  # before training, not at the save
    method = get_method(f"joint-{args.sampling}")
    overrides = {"epochs": args.epochs, "lr": args.lr, "head_lr": args.head_lr, "batch_size": args.batch_size,
                 "seed": args.seed, "checkpoint_every": args.checkpoint_every,
                 "pad_to_multiple_of": args.pad_to_multiple_of, "backbone_dropout": args.backbone_dropout}
    config = method.train_config({}, {**overrides, "bf16": False if args.fp32 else None})
    lora = method.lora_settings()
    if args.r is not None or args.alpha is not None or args.target_modules is not None:
        # `is None`, not `or`: --r 0 trained r=8 (not refused, as train refuses it) and --alpha 0 took 2*r.
        r = lora.r if args.r is None else args.r
        lora = LoraSettings(r=r, alpha=2.0 * r if args.alpha is None else args.alpha, target_modules=args.target_modules)
        config = TrainConfig.from_dict({**config.to_dict(), "lora": lora})  # training.json records the adapter trained
    check_data_flags(_task_data(args.data), args.tasks)
    sources = {t: resolve_task(t, args.data_root, _task_data(args.data), args.task_file) for t in args.tasks}
    data = {}
    for task, source in sources.items():
        loaded = load_task_data(source.spec, source.data, source.eval_data, source.layout)
        train, subset = fixed_subset(loaded.train, args.max_train)
        print(f"task {task}: {len(train)} training ({subset}) and {len(loaded.eval)} evaluation examples",
              file=sys.stderr)
        data[task] = (train, loaded.eval)
    task_epochs = {t: args.epochs or s.recipe.get("epochs", config.epochs) for t, s in sources.items()}
    model = build_joint_model(load_backbone(args.backbone), [s.spec for s in sources.values()], lora, config.seed)
    model = model.to(resolve_device(args.device))
    temperature = args.temperature if args.sampling == "temperature" else 1.0
    result = train_joint(model, data, config, args.sampling, temperature, task_epochs=task_epochs,
                         progress=not args.no_progress, out_dir=Path(args.out) / "joint")
    model.full_precision()
    model.save(args.out)
    record = {"command": "mtpeft " + shlex.join(args.argv), "tasks": list(args.tasks), "sampling": args.sampling,
              "temperature": temperature, "task_epochs": task_epochs, "config": config.to_dict(),
              **result.to_dict()}
    write_json(Path(args.out) / "joint" / "training.json", record)
    record_in_manifest(Path(args.out) / "joint")
    for task in args.tasks:
        print(f"{task}: {format_metrics(result.metrics[task])} ({result.steps[task]} of {result.total_steps} steps)")
    print(f"{result.train_seconds:.0f} s, {result.shared_parameters:,} shared and "
          f"{sum(result.head_parameters.values()):,} head parameters -> {args.out}")
    return 0


def _report(args) -> int:
    from mtpeft.report import write_report

    out = write_report(args.results, args.out, args.plots)
    print(f"wrote the quality section of {out} (plots in {args.plots})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
