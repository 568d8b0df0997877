"""Serving latency and throughput on loopback, against offline batch throughput.

Measures, for one task and short texts (customer messages of 6-12 words):
1. offline: ``MultiTaskModel.run`` over the texts in batches of 64, in this process,
   before the server starts (the two never share the CPU);
2. ``mtpeft serve`` on 127.0.0.1 in a child process, one text per ``POST /v1/predict``,
   from 1, 8 and 64 concurrent keep-alive connections: p50/p99 latency and throughput.
   The load comes from ``wrk`` (C, Debian package ``wrk``) when it is installed: a Python
   client on the same two cores takes CPU from the server it measures. Without ``wrk``, an
   httpx client runs, and the JSON says which one did.
The micro-batcher gathers concurrent requests into one forward pass, so under load the
server's throughput is compared with the offline figure.

    .venv/bin/python benchmarks/serve_latency.py --bundle runs/serving-demo   # -> results/serve_latency.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from speedkit import write_result

from mtpeft import MultiTaskModel
from mtpeft.examples import Example

OPENERS = ["my order", "the parcel", "your app", "the refund", "customer support", "the new update", "my account",
           "the delivery", "this product", "the invoice"]
ENDINGS = ["arrived broken and nobody answers", "works perfectly, thank you so much", "is still missing after two weeks",
           "was charged twice this month", "is great but a bit slow", "keeps logging me out", "made my day",
           "is the worst I have ever had"]


def short_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(OPENERS)} {rng.choice(ENDINGS)}" for _ in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def offline(bundle: str, task: str, texts: list[str], repeats: int = 5) -> dict:
    model = MultiTaskModel.load(bundle)
    items = [(task, Example(text=t)) for t in texts]
    model.run(items[:256])  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.run(items, batch_size=64)
        rates.append(len(items) / (time.perf_counter() - start))
    single = []
    for text in texts[:200]:
        start = time.perf_counter()
        model.run([(task, Example(text=text))])
        single.append((time.perf_counter() - start) * 1e3)
    return {"examples_per_s": round(statistics.median(rates), 1), "repeats": [round(r, 1) for r in rates],
            "single_text_ms_p50": round(statistics.median(single), 2)}


async def clients(base: str, task: str, texts: list[str], concurrency: int, requests: int,
                  warmed_up=lambda: None) -> dict:
    queue = list(range(requests))
    latencies: list[float] = []
    errors = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while queue:
            i = queue.pop()
            start = time.perf_counter()
            response = await http.post(f"{base}/v1/predict", json={"inputs": [texts[i % len(texts)]], "task": task})
            latencies.append((time.perf_counter() - start) * 1e3)
            errors += response.status_code != 200

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        for _ in range(20):  # warm-up
            await http.post(f"{base}/v1/predict", json={"inputs": [texts[0]], "task": task})
        warmed_up()
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests, "errors": errors,
            "p50_ms": round(statistics.median(latencies), 2), "p99_ms": round(percentile(latencies, 0.99), 2),
            "requests_per_s": round(requests / seconds, 1)}


def wrk_level(base: str, task: str, text: str, concurrency: int, seconds: float, warmed_up=lambda: None) -> dict:
    """One concurrency level with wrk: the same request over and over on keep-alive connections."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        body = json.dumps({"inputs": [text], "task": task})
        script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\nwrk.headers["Content-Type"] = "application/json"\n')
    url = f"{base}/v1/predict"
    subprocess.run(["wrk", "-t1", f"-c{concurrency}", "-d2s", "-s", script.name, url], capture_output=True, check=True)
    warmed_up()
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "-s", script.name, "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return round(float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit], 2)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"concurrency": concurrency, "requests": total, "errors": int(non_2xx.group(1)) if non_2xx else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else None,
            "p50_ms": ms("50%"), "p99_ms": ms("99%"),
            "requests_per_s": round(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), 1)}


def batch_totals(base: str) -> tuple[float, float]:
    """(model calls, rows) the server has run so far, from its Prometheus histogram."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    def value(name: str) -> float:
        return float(re.search(rf"^{name} ([\d.e+]+)$", text, re.M).group(1))
    return value("mtpeft_batch_rows_count"), value("mtpeft_batch_rows_sum")


def with_batches(base: str, measure) -> dict:
    """``measure(warmed_up)``'s result plus the mean rows per model call the server ran after
    ``measure`` called ``warmed_up()``: its warm-up requests, one row a call, are not counted."""
    before = []
    result = measure(lambda: before.append(batch_totals(base)))
    (calls, rows), = before
    calls_after, rows_after = batch_totals(base)
    result["rows_per_model_call"] = round((rows_after - rows) / max(1.0, calls_after - calls), 2)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="runs/demo")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--requests", type=int, default=1000, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=10, help="seconds per concurrency level (wrk)")
    parser.add_argument("--httpx", action="store_true", help="use the Python client even when wrk is installed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    texts = short_texts(2048)
    offline_result = offline(args.bundle, args.task, texts)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen([sys.executable, "-m", "mtpeft", "serve", args.bundle, "--port", str(port),
                                       "--max-wait-ms", str(args.max_wait_ms)], env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while True:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not start:\n{log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            if shutil.which("wrk") and not args.httpx:
                generator = "wrk"
                levels = [with_batches(base, lambda warmed_up, c=c: wrk_level(base, args.task, texts[0], int(c), args.seconds,
                                                                             warmed_up))
                          for c in args.concurrency.split(",")]
            else:
                generator = "httpx"
                levels = [with_batches(base, lambda warmed_up, c=c: asyncio.run(clients(base, args.task, texts, int(c),
                                                                                     args.requests, warmed_up)))
                          for c in args.concurrency.split(",")]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    for level in levels:
        level["fraction_of_offline_throughput"] = round(level["requests_per_s"] / offline_result["examples_per_s"], 3)
    write_result("serve_latency", {
        "setup": {"bundle": args.bundle, "task": args.task, "texts": "6-12 word customer messages, one per request",
                  "max_wait_ms": args.max_wait_ms, "load_generator": generator,
                  "per_level": f"{args.seconds:g} s" if generator == "wrk" else f"{args.requests} requests"},
        "offline": offline_result, "server": levels,
        "targets": {"single_request_p50_ms": 10, "fraction_of_offline_throughput_under_load": 0.8},
    }, args.out)


if __name__ == "__main__":
    main()
