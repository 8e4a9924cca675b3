"""schemathesis against the OpenAPI document a running worker serves: requests generated from
the document (valid and not), every answer checked against it, no 5xx."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from classify_app.dev.images import SampleImageServer
from tests.support.workers import Worker

TOKEN = "fuzz-secret"


async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(
    images: SampleImageServer, workers: Callable[..., Worker], tmp_path: Path
) -> None:
    # Similarity on: its routes are fuzzed answering, not only saying they are off (501).
    worker = workers(
        env={
            "CLASSIFY_API_TOKEN": TOKEN,
            "CLASSIFY_TASKS": "category,embedding",
            "CLASSIFY_SIMILARITY": "true",
        }
    )
    await worker.start()
    report = tmp_path / "schemathesis.txt"
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{worker.url}/openapi.json",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance,response_headers_conformance",
            "--max-examples",
            "25",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--request-timeout",
            "20",
            "--generation-deterministic",
            "--suppress-health-check",
            "all",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_COLOR": "1"},
    )
    report.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert "No issues found" in done.stdout or "passed" in done.stdout
