"""The curl session of docs/api.md, run against a real worker."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from classify_app.dev.images import SampleImageServer
from tests.support.workers import Worker

SESSION = Path(__file__).parents[2] / "docs" / "api.md"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_the_documented_curl_session_works(
    images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    worker = workers()
    await worker.start()
    commands = re.findall(r"^\$ (curl .*)$", SESSION.read_text(), flags=re.M)
    assert len(commands) >= 5
    for command in commands:
        command = command.replace("localhost:6066", worker.url.removeprefix("http://"))
        command = re.sub(r"http://127\.0\.0\.1:\d+/photos/", f"{images.url}/photos/", command)
        for _ in range(100):  # a result may still be pending: ask again, as a user would
            completed = subprocess.run(
                ["bash", "-c", command], capture_output=True, text=True, timeout=30
            )
            assert completed.returncode == 0, (command, completed.stderr)
            output = completed.stdout.strip()
            assert output, command
            if "grep" in command:
                break
            answer = json.loads(output)
            if answer.get("status") != "pending" and "unknown_ad" not in output:
                break
            await asyncio.sleep(0.2)
        if "/classify/results" in command:
            assert answer["status"] == "done" and answer["category"] == "animals", answer
