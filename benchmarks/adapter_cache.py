"""Many registered tasks, few active: memory, cold-load latency and mixed-stream throughput.

N LoRA r=8 tasks (query/value, random non-zero B, 2-4-class classification heads) are saved
as one bundle on the packaged MiniLM, then served through ``AdapterStore``:

1. memory: resident memory per registered task (only ``task.json`` read), per task held
   as CPU tensors, and per active task (modules in the model), plus the exact tensor bytes;
2. cold load: ``ensure_active`` of a task that is neither active nor in memory (its files
   read and sha256-checked, then added, evicting the least recently used task), and of a
   task already held as CPU tensors; the bundle's files sit in the OS page cache;
3. throughput: a stream of short support messages whose tasks follow a Zipf popularity
   (p(rank k) ~ 1/k^s over a shuffled ranking) over 10 / 100 / 1,000 tasks, in batches
   of ``--batch-size`` rows through ``AdapterStore.run`` (what the server's batcher calls);
   one store per task count, the streams run in turn ``--repeats`` times, median rows/s;
   the largest stream runs again at each of ``--other-capacities`` (how much the cache
   size matters).

    .venv/bin/python benchmarks/adapter_cache.py --tasks 1000   # -> results/adapter_cache.json
    .venv/bin/python benchmarks/adapter_cache.py --tasks 50 --stream 512 --out results/adapter_cache_small.json

The bundle is generated once under ``--work-dir`` and reused while it holds enough tasks.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from importlib import resources
from pathlib import Path

import torch
from speedkit import write_result

from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.adapter_cache import DEFAULT_CAPACITY, AdapterStore
from mtpeft.config import LoraSettings
from mtpeft.examples import Example
from mtpeft.precision import resolve_bf16
from mtpeft.storage import BUNDLE_FILE, bundle_entries, read_json, save_bundle

RANK = 8
TARGETS = {"max_mb_per_registered_task": 1.0, "max_gb_over_backbone_all_tasks": 1.0, "max_cold_load_ms": 50.0,
           "min_throughput_ratio_1000_vs_10": 0.7}


def rss_bytes() -> int:
    """Resident memory now (Linux ``/proc/self/statm``)."""
    gc.collect()
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


def task_name(i: int) -> str:
    return f"task-{i:04d}"


def make_bundle(folder: Path, n: int, seed: int = 0) -> float:
    """Save ``n`` random r=8 tasks into ``folder`` (chunks of 50, so the generating model stays small)."""
    existing = read_json(folder / BUNDLE_FILE)["tasks"] if (folder / BUNDLE_FILE).is_file() else {}
    if all(task_name(i) in existing for i in range(n)):
        return 0.0
    started = time.perf_counter()
    model = MultiTaskModel.from_backbone()
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, 50):
        names = [task_name(i) for i in range(start, min(n, start + 50)) if task_name(i) not in existing]
        for name in names:
            labels = [f"class-{k}" for k in range(2 + int(name[-4:]) % 3)]
            model.add_task(TaskSpec(name=name, type="classification", labels=labels, max_length=64),
                           LoraSettings(r=RANK, alpha=2 * RANK))
            for layer in model.lora_layers(name).values():
                with torch.no_grad():
                    layer.lora_B[name].weight.normal_(0.0, 0.02, generator=generator)
        if names:
            save_bundle(model, folder, names)
        for name in names:
            model.remove_task(name)
        print(f"generated {min(n, start + 50)}/{n} tasks", flush=True)
    return time.perf_counter() - started


def messages() -> list[str]:
    path = resources.files("mtpeft") / "resources" / "support" / "sentiment.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def zipf_stream(n_tasks: int, rows: int, s: float, texts: list[str], seed: int) -> list[tuple[str, Example]]:
    rng = random.Random(seed)
    ranking = [task_name(i) for i in range(n_tasks)]
    rng.shuffle(ranking)  # popularity independent of the task's index
    weights = [1.0 / (k + 1) ** s for k in range(n_tasks)]
    tasks = rng.choices(ranking, weights=weights, k=rows)
    return [(task, Example(text=rng.choice(texts))) for task in tasks]


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"p50": round(statistics.median(ordered), 2), "p95": round(pick(0.95), 2), "max": round(ordered[-1], 2),
            "mean": round(statistics.fmean(ordered), 2), "count": len(ordered)}


def measure_memory(bundle: Path, n: int, capacity: int) -> dict:
    entries = bundle_entries(bundle)[:n]
    model = MultiTaskModel.from_backbone()
    backbone_bytes = sum(p.numel() * p.element_size() for p in model.backbone.parameters())
    before = rss_bytes()
    store = AdapterStore(model, capacity=capacity, keep_in_memory=True)
    started = time.perf_counter()
    for folder, digests in entries:
        store.register(folder, digests)
    register_s = time.perf_counter() - started
    registered = rss_bytes()
    store.prefetch(list(store.specs))  # every task's tensors into CPU memory
    in_memory = rss_bytes()
    tensor_bytes = store.memory_bytes()
    active = list(store.specs)[:capacity]
    store.ensure_active(active)
    with_active = rss_bytes()
    active_param_bytes = sum(p.numel() * p.element_size() for name in active
                             for p in model.task_parameters(name).values())
    return {
        "tasks": n, "capacity": capacity,
        "backbone_parameter_mb": round(backbone_bytes / 2**20, 1),
        "register_seconds": round(register_s, 3),
        "rss_mb_per_registered_task_on_disk": round((registered - before) / n / 2**20, 4),
        "rss_mb_per_task_in_cpu_memory": round((in_memory - before) / n / 2**20, 4),
        "tensor_mb_per_task_in_cpu_memory": round(tensor_bytes / n / 2**20, 4),
        # per task made active: fewer than the capacity when the bundle has fewer tasks
        "rss_mb_per_active_task": round((with_active - in_memory) / len(active) / 2**20, 4),
        "parameter_mb_per_active_task": round(active_param_bytes / len(active) / 2**20, 4),
        "rss_gb_over_backbone_all_tasks_in_memory_and_capacity_active": round((with_active - before) / 2**30, 3),
    }


def measure_cold_loads(bundle: Path, n: int, capacity: int, samples: int, seed: int) -> dict:
    model = MultiTaskModel.from_backbone()
    disk = AdapterStore(model, capacity=capacity, keep_in_memory=False)
    for folder, digests in bundle_entries(bundle)[:n]:
        disk.register(folder, digests)
    names = list(disk.specs)
    disk.ensure_active(names[:capacity])  # full: every cold load also evicts one task
    rng = random.Random(seed)
    cold = rng.sample(names[capacity:], min(samples, len(names) - capacity))
    from_disk, reads, installs = [], [], []
    for name in cold:
        load, install = disk.stats.load_seconds, disk.stats.install_seconds
        started = time.perf_counter()
        disk.ensure_active([name])
        from_disk.append(1000 * (time.perf_counter() - started))
        reads.append(1000 * (disk.stats.load_seconds - load))
        installs.append(1000 * (disk.stats.install_seconds - install))
    del disk, model
    model = MultiTaskModel.from_backbone()
    memory = AdapterStore(model, capacity=capacity, keep_in_memory=True)
    for folder, digests in bundle_entries(bundle)[:n]:
        memory.register(folder, digests)
    memory.prefetch(names)
    memory.ensure_active(names[:capacity])
    from_memory = []
    for name in cold:
        started = time.perf_counter()
        memory.ensure_active([name])
        from_memory.append(1000 * (time.perf_counter() - started))
    return {"from_disk_ms": percentiles(from_disk), "of_which_read_and_sha256_ms": percentiles(reads),
            "of_which_add_to_model_ms": percentiles(installs), "from_cpu_memory_ms": percentiles(from_memory)}


class StreamRun:
    """One task count's store and Zipf stream, warmed up; ``run`` times one pass over the stream."""

    def __init__(self, bundle: Path, n_tasks: int, args, texts: list[str], capacity: int | None = None) -> None:
        self.n_tasks, self.batch_size = n_tasks, args.batch_size
        self.capacity = capacity or args.capacity
        self.store = AdapterStore(MultiTaskModel.from_backbone(), capacity=self.capacity, keep_in_memory=True)
        for folder, digests in bundle_entries(bundle)[:n_tasks]:
            self.store.register(folder, digests)
        stream = zipf_stream(n_tasks, args.warmup + args.stream, args.zipf_s, texts, args.seed)
        warmup, self.measured = stream[:args.warmup], stream[args.warmup:]
        for start in range(0, len(warmup), args.batch_size):
            self.store.run(warmup[start:start + args.batch_size], batch_size=args.batch_size)
        self.rates, self.distinct, self.stats = [], [], None

    def run(self) -> None:
        before = self.store.stats.to_dict()
        distinct = []
        started = time.perf_counter()
        for start in range(0, len(self.measured), self.batch_size):
            batch = self.measured[start:start + self.batch_size]
            distinct.append(len({task for task, _ in batch}))
            self.store.run(batch, batch_size=self.batch_size)
        self.rates.append(len(self.measured) / (time.perf_counter() - started))
        self.distinct = distinct
        after = self.store.stats.to_dict()
        self.stats = {k: round(after[k] - before[k], 4) if isinstance(after[k], float) else after[k] - before[k]
                      for k in after}

    def result(self) -> dict:
        hits, misses = self.stats["hits"], self.stats["misses"]
        return {"tasks": self.n_tasks, "capacity": self.capacity, "rows": len(self.measured),
                "rows_per_second": round(statistics.median(self.rates), 1),
                "repeats_rows_per_second": [round(r, 1) for r in self.rates],
                "distinct_tasks_per_batch_mean": round(statistics.fmean(self.distinct), 1),
                "hit_rate": round(hits / max(1, hits + misses), 4), "store_last_repeat": self.stats}


def measure_throughput(bundle: Path, sizes: list[int], args, texts: list[str]) -> tuple[dict, dict]:
    """Every task count's stream in turn, ``--repeats`` times (round robin, so slow drifts of
    the machine hit all of them alike); median rows/s per task count at ``--capacity``, and
    the largest task count's stream again at each of ``--other-capacities``."""
    runs = [StreamRun(bundle, n, args, texts) for n in sizes]
    others = [StreamRun(bundle, sizes[-1], args, texts, capacity) for capacity in args.other_capacities]
    for _ in range(args.repeats):
        for run in runs + others:
            run.run()
    return ({str(run.n_tasks): run.result() for run in runs},
            {str(run.capacity): run.result() for run in others})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000, help="registered tasks (default 1000)")
    parser.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY,
                        help=f"most active tasks (default: the store's, {DEFAULT_CAPACITY})")
    parser.add_argument("--other-capacities", type=lambda v: [int(c) for c in v.split(",") if c], default=[64],
                        help="comma-separated capacities to also run the largest stream at (default 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per store.run call (default 64)")
    parser.add_argument("--stream", type=int, default=4096, help="measured rows per throughput run (default 4096)")
    parser.add_argument("--warmup", type=int, default=512, help="rows run before measuring (default 512)")
    parser.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent of task popularity (default 1.1)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over each stream, round robin (default 3)")
    parser.add_argument("--cold-samples", type=int, default=50, help="cold loads timed (default 50)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="runs/bench_adapter_cache", help="where the generated bundle lives")
    parser.add_argument("--out", help="result JSON (default results/adapter_cache.json)")
    args = parser.parse_args()
    if args.tasks < 10:
        parser.error("--tasks must be at least 10")
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = Path(args.work_dir) / "bundle"
    generate_s = make_bundle(bundle, args.tasks, args.seed)
    texts = messages()
    capacity = min(args.capacity, args.tasks)
    memory = measure_memory(bundle, args.tasks, capacity)
    cold = measure_cold_loads(bundle, args.tasks, min(capacity, args.tasks // 2), args.cold_samples, args.seed)
    sizes = [n for n in (10, 100, 1000) if n <= args.tasks] + ([args.tasks] if args.tasks not in (10, 100, 1000) else [])
    throughput, by_capacity = measure_throughput(bundle, sizes, args, texts)
    ratio = throughput[str(sizes[-1])]["rows_per_second"] / throughput["10"]["rows_per_second"]
    per_task = max(memory["rss_mb_per_task_in_cpu_memory"], memory["tensor_mb_per_task_in_cpu_memory"])
    checks = {  # value, target, met
        "mb_per_registered_task_in_cpu_memory": (per_task, TARGETS["max_mb_per_registered_task"], per_task <= 1.0),
        "gb_over_backbone_all_tasks": (memory["rss_gb_over_backbone_all_tasks_in_memory_and_capacity_active"],
                                       TARGETS["max_gb_over_backbone_all_tasks"],
                                       memory["rss_gb_over_backbone_all_tasks_in_memory_and_capacity_active"] <= 1.0),
        "cold_load_p95_ms": (cold["from_disk_ms"]["p95"], TARGETS["max_cold_load_ms"], cold["from_disk_ms"]["p95"] <= 50.0),
        f"throughput_ratio_{sizes[-1]}_vs_10": (round(ratio, 3), TARGETS["min_throughput_ratio_1000_vs_10"], ratio >= 0.7),
    }
    checks = {name: {"value": v, "target": t, "met": bool(met)} for name, (v, t, met) in checks.items()}
    write_result("adapter_cache", {
        "setup": {"tasks": args.tasks, "lora_r": RANK, "targets": "query,value", "capacity": args.capacity,
                  "batch_size": args.batch_size, "stream_rows": args.stream, "warmup_rows": args.warmup,
                  "repeats": args.repeats,
                  "zipf_s": args.zipf_s, "bf16": resolve_bf16(None, torch.device("cpu")),
                  "bundle_generation_seconds": round(generate_s, 1),
                  "note": "cold loads read files from the OS page cache (the bundle was just written or read)"},
        "memory": memory, "cold_load": cold, "throughput": throughput,
        f"throughput_{sizes[-1]}_tasks_by_capacity": by_capacity, "checks": checks,
    }, args.out)


if __name__ == "__main__":
    main()
