"""Fuzz the HTTP API from its own OpenAPI schema, longer than the test suite does.

schemathesis generates schema-valid and schema-breaking requests for every operation
(predictions, support, tasks, health, metrics and the task management endpoints, with the
API key) and checks each answer: no 5xx, and a status, content type, headers and body the
schema documents. The server runs in-process on a tiny random model with the three
support skills (``tests/tiny_bundle.py``), so the run measures the API, not the model.

    .venv/bin/python benchmarks/fuzz_api.py   # -> results/fuzz_api.json (about 2 minutes)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny bundle and the fuzzer the tests use

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KEY = "fuzz-key"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="generated requests per operation and mode (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE.parent / "results" / "fuzz_api.json"))
    args = parser.parse_args()

    from api_fuzz import fuzz
    from tiny_bundle import support_app
    from transformers import AutoTokenizer

    from mtpeft.backbone import default_backbone_path

    tokenizer = AutoTokenizer.from_pretrained(default_backbone_path())
    with tempfile.TemporaryDirectory() as tmp:
        app = support_app(tokenizer, Path(tmp) / "bundle", api_key=KEY, max_wait_ms=0.5)
        report = fuzz(app, args.examples, headers={"Authorization": f"Bearer {KEY}", "X-API-Key": KEY},
                      random_seed=args.seed)
    result = {
        "benchmark": "fuzz_api",
        "command": " ".join(["python", "benchmarks/fuzz_api.py", *(Path(a).name if os.path.isabs(a) else a
                                                                  for a in sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {name: version(name) for name in ("schemathesis", "hypothesis", "fastapi", "starlette", "httpx")},
        "examples_per_operation_and_mode": args.examples,
        "seed": args.seed,
        "checks": "schemathesis defaults except positive_data_acceptance (schema-valid requests may be refused "
                  "by design: unknown task, blank text, server limits)",
        **report,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("cases", "server_errors", "failures", "seconds")}), f"-> {out}")
    return 1 if report["failures"] or report["server_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
