"""Shared measuring tools for the speed benchmarks: the machine's bf16 matmul peak, round-robin
timing (every configuration measured in turn, so drifts in the machine's speed hit all alike),
per-phase peak resident memory, and the JSON record every benchmark writes."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "results"
# The real datasets: $MTPEFT_DATA_ROOT, else ../shared/data beside the repository (as
# `mtpeft compare --data-root` defaults), for the benchmarks that train on them.
DATA = Path(os.environ.get("MTPEFT_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data")


def synchronizer(device: torch.device | str) -> Callable[[], None] | None:
    """What waits for ``device``'s queued work, so a timer stops when the work is done (CUDA
    runs asynchronously; the CPU needs nothing)."""
    device = torch.device(device)
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def matmul_peak_tflops(dtype: torch.dtype = torch.bfloat16, repeats: int = 7, device: torch.device | str = "cpu") -> dict:
    """Measured matmul throughput on shapes of a MiniLM layer (4096 tokens x 384 x 1536), best shape's median."""
    shapes = [(4096, 384, 1536), (4096, 1536, 384), (4096, 384, 384)]
    sync = synchronizer(device) or (lambda: None)
    calls = 10 if torch.device(device).type == "cpu" else 200  # a GPU matmul this size takes microseconds
    best = {}
    for n, k, m in shapes:
        a, b = torch.randn(n, k, dtype=dtype, device=device), torch.randn(k, m, dtype=dtype, device=device)
        for _ in range(calls):  # the first calls pay for kernel selection and warm-up
            a @ b
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                a @ b
            sync()
            times.append((time.perf_counter() - start) / calls)
        best[f"{n}x{k}x{m}"] = round(2 * n * k * m / statistics.median(times) / 1e12, 3)
    return {"dtype": str(dtype).removeprefix("torch."), "tflops_by_shape": best, "tflops": max(best.values())}


def round_robin(configs: dict[str, Callable[[], int]], repeats: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> dict[str, dict]:
    """Run each configuration ``repeats`` times in turn; each call returns the examples it processed.

    ``sync`` (see ``synchronizer``) runs before a timer starts and before it stops, so an
    accelerator's queued work is counted in the call that queued it.
    Returns per configuration the median examples/s and every repeat's figure.
    """
    sync = sync or (lambda: None)
    for fn in configs.values():  # oneDNN picks kernels and the allocator grows over the first seconds
        start, calls = time.perf_counter(), 0
        while calls < warmup or (warmup and time.perf_counter() - start < 3.0):
            fn()
            calls += 1
        sync()
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            sync()
            start = time.perf_counter()
            examples = fn()
            sync()
            rates[name].append(examples / (time.perf_counter() - start))
    return {name: {"examples_per_s": round(statistics.median(r), 1), "repeats": [round(x, 1) for x in r]}
            for name, r in rates.items()}


def matmul_flops_per_example(backbone: torch.nn.Module, tokens: int) -> int:
    """Forward-pass FLOPs of one example: the encoder's linear layers (2 x weights x tokens)
    plus attention scores and mixing (2 x 2 x tokens^2 x hidden per layer). Embedding lookups
    and the unused pooler cost no matmul; LoRA deltas are left out (under 3 % at r=8)."""
    linear = sum(m.weight.numel() for name, m in backbone.named_modules()
                 if isinstance(m, torch.nn.Linear) and "pooler" not in name and ".lora_" not in name)
    config = backbone.config
    attention = 4 * tokens * tokens * config.hidden_size * config.num_hidden_layers
    return 2 * linear * tokens + attention


def reset_peak_rss() -> None:
    """Start a new resident-memory high-water mark (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def machine(device: torch.device | str = "cpu") -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import peft
    import transformers
    record = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    if torch.device(device).type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def _portable(arg: str) -> str:
    """A command-line argument for the record: an absolute path (``--out /tmp/x.json``) as seen
    from the repository, or its name when outside it; no machine's paths in results/."""
    if not os.path.isabs(arg):
        return arg
    try:
        return Path(arg).resolve().relative_to(RESULTS.parent).as_posix()
    except ValueError:
        return Path(arg).name


def write_result(name: str, payload: dict, out: str | None = None, device: torch.device | str = "cpu") -> Path:
    """Write ``results/<name>.json`` with the command, date and machine (with ``device`` if a GPU), atomically."""
    from mtpeft.storage import write_json

    path = Path(out) if out else RESULTS / f"{name}.json"
    script = os.path.relpath(Path(sys.argv[0]).resolve(), RESULTS.parent)
    record = {"benchmark": name, "command": " ".join(["python", script, *map(_portable, sys.argv[1:])]),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(device), **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    print(json.dumps(record, indent=2))
    return path
