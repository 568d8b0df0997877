"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis), in-process: no 5xx, and
every response (status, content type, headers, body) as the schema documents it.

A bounded run (about 10 s); ``benchmarks/fuzz_api.py`` runs the same fuzzer longer.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from api_fuzz import fuzz  # noqa: E402
from tiny_bundle import support_app  # noqa: E402

KEY = "fuzz-key"


def test_fuzzing_the_api_finds_no_server_error_and_no_undocumented_response(tokenizer, tmp_path):
    app = support_app(tokenizer, tmp_path / "bundle", api_key=KEY, max_wait_ms=0.5)
    # With the key, so that the management endpoints' own checks get the generated inputs.
    report = fuzz(app, max_examples=25, headers={"Authorization": f"Bearer {KEY}", "X-API-Key": KEY})
    assert report["server_errors"] == 0 and report["failures"] == 0, json.dumps(report["failure_examples"], indent=1)
    operations = report["operations"]
    assert {"POST /v1/predict", "POST /v1/support", "POST /v1/admin/tasks", "DELETE /v1/admin/tasks/{name}",
            "POST /v1/admin/tasks/{name}/reload", "GET /v1/tasks", "GET /healthz", "GET /metrics"} <= set(operations)
    assert 200 in operations["POST /v1/predict"]["positive"] and 200 in operations["POST /v1/support"]["positive"]
    assert all(401 not in by_mode.get("positive", {}) for label, by_mode in operations.items() if "admin" in label)
    assert report["cases"] > 250
