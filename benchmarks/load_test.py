"""Load test on loopback: `mtpeft serve` under many concurrent clients, with task reloads.

Starts `mtpeft serve BUNDLE` on 127.0.0.1 in a child process, sends ``--requests`` requests
from ``--concurrency`` concurrent httpx clients (every task of the bundle with inputs of its
shape from the packaged support data, some left to the router, some to ``/v1/support``),
reloads a task through the management API every ``--reload-every`` requests, samples the
server's resident memory every ``--sample-every`` requests, then stops the server with
SIGTERM (a graceful drain). Any non-200 answer or failed request is an error.

    .venv/bin/mtpeft demo --out runs/demo                              # the bundle (once; minutes)
    .venv/bin/python benchmarks/load_test.py --bundle runs/demo --requests 10000   # -> results/load_test.json

Without ``--bundle`` it uses ``runs/demo`` and builds it with ``mtpeft demo`` when missing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_BUNDLE = "runs/demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shown(path: Path) -> str:
    """A path for the JSON: relative to the repository when inside it, else just its name."""
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path.name


def request_mix(tasks: list[dict], support: bool, seed: int):
    """An endless, seeded stream of ``(endpoint, body, kind)`` over every task, shaped from the packaged data."""
    from mtpeft.tasks.presets import support_data_dir

    def rows(name):
        with open(support_data_dir() / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    texts = [r["text"] for r in rows("sentiment.jsonl")]
    pairs = [[r["question1"], r["question2"]] for r in rows("question_pairs.jsonl")]
    qa = [{"question": r["question"], "context": r["context"]} for r in rows("qa.jsonl")]
    by_shape = {"text": texts, "pair": pairs, "qa": qa}
    rng = random.Random(seed)
    while True:
        roll = rng.random()
        if support and roll < 0.05:
            yield "/v1/support", {"message": rng.choice(texts)}, "support"
        elif roll < 0.15:  # the router picks the task
            yield "/v1/predict", {"inputs": [rng.choice(texts) for _ in range(rng.randint(1, 4))]}, "routed"
        else:
            task = rng.choice(tasks)
            inputs = [rng.choice(by_shape[task["input"]]) for _ in range(rng.randint(1, 4))]
            yield "/v1/predict", {"inputs": inputs, "task": task["name"]}, task["name"]


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {}
    def pick(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": values[-1], "mean": sum(values) / len(values)}


async def load(base: str, pid: int, args, key: str) -> dict:
    server = psutil.Process(pid)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout, limits=limits) as client:
        info = (await client.get("/v1/tasks")).json()
        mix = request_mix(info["tasks"], info["support"], args.seed)
        names = [t["name"] for t in info["tasks"]]
        latencies: dict[str, list[float]] = {}
        errors: dict[str, int] = {}
        error_examples: list[str] = []
        memory = [{"requests": 0, "rss_mib": round(server.memory_info().rss / 2**20, 2), "seconds": 0.0}]
        reloads = {"done": 0, "failed": 0, "seconds": []}
        unrouted = 0
        sent = done = 0
        started = time.perf_counter()
        deadline = started + args.max_seconds

        async def reload(name: str) -> None:
            t = time.perf_counter()
            try:
                r = await client.post(f"/v1/admin/tasks/{name}/reload", headers={"Authorization": f"Bearer {key}"})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            reloads["done" if ok else "failed"] += 1
            reloads["seconds"].append(time.perf_counter() - t)

        async def worker() -> None:
            nonlocal sent, done, unrouted
            while sent < args.requests and time.perf_counter() < deadline:
                sent += 1
                endpoint, body, kind = next(mix)
                t = time.perf_counter()
                try:
                    r = await client.post(endpoint, json=body)
                    status = str(r.status_code)
                    if r.status_code == 200 and endpoint == "/v1/predict":
                        unrouted += sum(1 for result in r.json()["results"] if result["prediction"] is None)
                except httpx.HTTPError as err:
                    status, r = type(err).__name__, None
                latencies.setdefault(kind, []).append(time.perf_counter() - t)
                if status != "200":
                    errors[status] = errors.get(status, 0) + 1
                    if len(error_examples) < 10:
                        error_examples.append(f"{endpoint} {status}: {r.text[:200] if r is not None else ''}")
                done += 1
                if done % args.sample_every == 0:
                    memory.append({"requests": done, "rss_mib": round(server.memory_info().rss / 2**20, 2),
                                   "seconds": round(time.perf_counter() - started, 2)})
                if args.reload_every and done % args.reload_every == 0:
                    await reload(names[(done // args.reload_every) % len(names)])

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
    if memory[-1]["requests"] != done:
        memory.append({"requests": done, "rss_mib": round(server.memory_info().rss / 2**20, 2),
                       "seconds": round(wall, 2)})
    every = [x for values in latencies.values() for x in values]

    def ms(seconds: dict) -> dict:
        return {k: round(v * 1000, 2) for k, v in seconds.items()}

    warm = memory[1] if len(memory) > 2 else memory[0]  # after the first samples the caches are warm
    second_half = [m["rss_mib"] for m in memory if m["requests"] >= done / 2]
    return {
        "requests": done, "stopped_early": done < args.requests, "errors": sum(errors.values()),
        "errors_by_status": errors, "error_examples": error_examples,
        "unrouted_inputs (answered: no task matched)": unrouted,
        "seconds": round(wall, 2), "throughput_rps": round(done / wall, 2),
        "latency_ms": ms(percentiles(every)), "latency_ms_by_kind": {k: ms(percentiles(v)) for k, v in latencies.items()},
        "reloads": {"done": reloads["done"], "failed": reloads["failed"],
                    "latency_ms": ms(percentiles(reloads["seconds"]))},
        "memory_rss_mib": memory,
        "rss_growth_mib_after_warmup": round(memory[-1]["rss_mib"] - warm["rss_mib"], 2),
        # Flat means: over the second half of the run the samples stay within a few MiB.
        "rss_range_mib_second_half": round(max(second_half) - min(second_half), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=DEFAULT_BUNDLE, help=f"bundle to serve (default {DEFAULT_BUNDLE}, built by `mtpeft demo` when missing)")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--sample-every", type=int, default=500, help="sample the server's RSS every N requests (default 500)")
    parser.add_argument("--reload-every", type=int, default=2000, help="reload a task every N requests; 0: never (default 2000)")
    parser.add_argument("--max-seconds", type=float, default=3600, help="stop sending after this long (default 3600)")
    parser.add_argument("--request-timeout", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "results" / "load_test.json"))
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1 or args.sample_every < 1:
        parser.error("--requests, --concurrency and --sample-every must be >= 1")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    mtpeft = [sys.executable, "-m", "mtpeft"]
    bundle = Path(args.bundle)
    if not (bundle / "bundle.json").is_file():
        if args.bundle != DEFAULT_BUNDLE:
            parser.error(f"--bundle {args.bundle}: no bundle.json there; build one with `mtpeft demo --out {args.bundle}`")
        print(f"no bundle at {bundle}: building it with `mtpeft demo --out {bundle}` (trains three skills)", flush=True)
        subprocess.run([*mtpeft, "demo", "--out", str(bundle)], check=True, env=env)

    key = secrets.token_urlsafe(16)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen([*mtpeft, "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port)],
                                      env={**env, "MTPEFT_API_KEY": key}, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            started = time.perf_counter()
            while True:  # wait until the model is loaded and the port answers
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - started > 300:
                    raise SystemExit(f"the server did not answer in 300 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            startup = time.perf_counter() - started
            result = asyncio.run(load(base, server.pid, args, key))
            stop = time.perf_counter()
            server.send_signal(signal.SIGTERM)  # uvicorn stops taking connections, the app drains
            exit_code = server.wait(timeout=60)
            result["server"] = {"startup_seconds": round(startup, 2), "shutdown_seconds": round(time.perf_counter() - stop, 2),
                                # uvicorn re-raises SIGTERM once shut down, so -15 is a normal end
                                "exit_code_after_sigterm": exit_code,
                                "graceful_shutdown": "Application shutdown complete" in log_path.read_text()}
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor())
    record = {
        "benchmark": "load_test",
        "command": " ".join(["python", "benchmarks/load_test.py", *(shown(Path(a)) if os.path.isabs(a) else a
                                                                   for a in sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu, "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "platform": platform.platform(), "python": platform.python_version()},
        "bundle": shown(bundle), "concurrency": args.concurrency, "requests_asked": args.requests,
        "reload_every": args.reload_every, "sample_every": args.sample_every,
        **result,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    summary = {k: record[k] for k in ("requests", "errors", "throughput_rps", "latency_ms", "rss_growth_mib_after_warmup")}
    print(json.dumps(summary), f"-> {out}")
    failed = record["errors"] or record["reloads"]["failed"] or record["stopped_early"]
    return 1 if failed or not record["server"]["graceful_shutdown"] else 0


if __name__ == "__main__":
    sys.exit(main())
