"""The commands of classify-app's command line, next to Faust's own:
`faust -A classify_app <command> --help` (or `python -m classify_app <command> --help`)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NoReturn

import numpy as np
from faust.cli import AppCommand, argument, option

from classify_app.application import app, create_model_from, create_store_from, settings
from classify_app.client import (
    Acceptance,
    AsyncClassifyClient,
    ClassificationResult,
    ClassifyError,
)
from classify_app.dead_letters import replay_dead_letters
from tables.migrations import MIGRATIONS, pending
from tables.migrations import migrate as apply_migrations


def bootstrap_servers() -> str:
    """The Kafka bootstrap servers of `CLASSIFY_BROKER`, as aiokafka takes them."""
    return ",".join(f"{url.host}:{url.port or 9092}" for url in app.conf.broker)


def fail(command: AppCommand, message: str) -> NoReturn:
    """End a command with `message` on standard error and exit status 1 (no traceback)."""
    command.say(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


@app.command()
async def migrate(self: AppCommand) -> None:
    """Apply the pending MongoDB schema migrations, each exactly once (safe to run anywhere,
    any number of times, also while workers start)."""
    store = create_store_from(settings)
    if store is None:
        fail(self, "CLASSIFY_MONGO_URI is empty: this deployment has no MongoDB store")
    try:
        waiting = await pending(store)
        ran = await apply_migrations(store)
        for migration in ran:
            self.say(f"applied {migration.version}: {migration.name}")
        skipped = len(waiting) - len(ran)
        self.say(
            f"{len(ran)} migrations applied"
            + (f", {skipped} applied by another runner meanwhile" if skipped > 0 else "")
            + f"; schema at version {max(m.version for m in MIGRATIONS)}"
        )
    finally:
        await store.close()


@app.command(
    option("--reason", default=None, help="Replay only dead letters with this reason code."),
    option("--limit", type=int, default=0, help="Replay at most this many (0: all)."),
    option("--dry-run", is_flag=True, default=False, help="List them, publish nothing."),
)
async def dlq_replay(self: AppCommand, reason: str | None, limit: int, dry_run: bool) -> None:
    """Re-publish dead-lettered events to the topics they came from.

    Reads the dead-letter topic from where the last replay stopped (consumer group
    `classify-app-dlq-replay`) up to its current end, publishes each payload again with its
    original key, and commits, so running it twice does not replay twice. Fix the cause first
    (a producer bug, a MongoDB conflict): an event that still fails is dead-lettered again.
    """
    replayed, skipped = await replay_dead_letters(
        bootstrap_servers(), settings.dead_letter_topic, reason=reason, limit=limit, dry_run=dry_run
    )
    for letter in replayed:
        self.say(
            f"{'would replay' if dry_run else 'replayed'} {letter.reason}: "
            f"{letter.topic}[{letter.partition}]@{letter.offset}"
        )
    self.say(
        f"{len(replayed)} dead letters {'to replay' if dry_run else 'replayed'}, {skipped} skipped"
    )


DEFAULT_URL = "http://127.0.0.1:6066"


url_option = option(
    "--url", default=DEFAULT_URL, show_default=True, help="A worker's HTTP address."
)
token_option = option("--token", default=None, help="Bearer token (CLASSIFY_API_TOKEN).")
kafka_option = option(
    "--kafka", is_flag=True, default=False, help="Produce to the ads topic instead of HTTP."
)


def _client(url: str, token: str | None, kafka: bool) -> AsyncClassifyClient:
    return AsyncClassifyClient(
        url,
        token=token,
        kafka_bootstrap=bootstrap_servers() if kafka else None,
        ads_topic=settings.ads_topic,
    )


@app.command(
    option("--ad-id", default=None, help="The ad's id."),
    option("--catalog", default=None, help="The catalog's name."),
    option("--catalog-ad-id", default=None, help="The ad's id in its catalog (default: ad id)."),
    option("--image", "images", multiple=True, help="An image URL (repeat for more)."),
    option("--title", default=None, help="The ad's title."),
    option("--json", "json_event", default=None, help="The whole event as JSON instead."),
    option("--wait", type=float, default=0.0, help="Wait this many seconds for the result."),
    url_option,
    token_option,
    kafka_option,
)
async def send(
    self: AppCommand,
    ad_id: str | None,
    catalog: str | None,
    catalog_ad_id: str | None,
    images: tuple[str, ...],
    title: str | None,
    json_event: str | None,
    wait: float,
    url: str,
    token: str | None,
    kafka: bool,
) -> None:
    """Submit one ad, from flags or JSON; with --wait, print its result."""
    if json_event:
        ad = json.loads(json_event)
    else:
        if not (ad_id and catalog and images):
            fail(self, "give --ad-id, --catalog and --image, or --json")
        ad = {"ad_id": ad_id, "catalog_name": catalog, "images": list(images)}
        ad.update({k: v for k, v in (("catalog_ad_id", catalog_ad_id), ("title", title)) if v})
    async with _client(url, token, kafka) as client:
        try:
            accepted = await client.submit(ad)
        except ClassifyError as exc:
            fail(self, f"refused: {exc}")
        self.say(f"accepted {accepted.ad_id} (request {accepted.request_id})")
        if wait:
            result = await client.wait(accepted.ad_id, timeout=wait, request_id=accepted.request_id)
            self.say(json.dumps(result.raw, indent=2))


@app.command(
    argument("path"),
    option("--concurrency", type=int, default=16, show_default=True, help="Ads in flight."),
    option("--wait", type=float, default=0.0, help="Then wait up to this many seconds for all."),
    url_option,
    token_option,
    kafka_option,
)
async def send_file(
    self: AppCommand,
    path: str,
    concurrency: int,
    wait: float,
    url: str,
    token: str | None,
    kafka: bool,
) -> None:
    """Submit every ad of a JSON-lines file (one event per line), with progress and a summary.

    PATH is the file ("-" reads standard input).
    """
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    lines = text.splitlines()
    events = [line for line in lines if line.strip()]
    refused: Counter[str] = Counter()
    accepted: list[Acceptance] = []
    slots = asyncio.Semaphore(concurrency)
    started = time.monotonic()

    async with _client(url, token, kafka) as client:

        async def submit(line: str) -> None:
            async with slots:
                try:
                    accepted.append(await client.submit(json.loads(line)))
                except json.JSONDecodeError:
                    refused["malformed_json"] += 1
                except ClassifyError as exc:
                    refused[exc.reason] += 1
                done = len(accepted) + sum(refused.values())
                print(f"\rsent {done}/{len(events)}", end="", file=sys.stderr, flush=True)

        await asyncio.gather(*(submit(line) for line in events))
        print(file=sys.stderr)
        self.say(
            f"{len(accepted)} accepted, {sum(refused.values())} refused"
            + "".join(f", {reason}: {count}" for reason, count in sorted(refused.items()))
            + f" in {time.monotonic() - started:.1f} s"
        )
        if wait and accepted:
            results = await asyncio.gather(
                *(client.wait(a.ad_id, timeout=wait, request_id=a.request_id) for a in accepted),
                return_exceptions=True,
            )
            statuses = Counter(
                r.status if isinstance(r, ClassificationResult) else "no result" for r in results
            )
            self.say("results: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))


@app.command(argument("ad_id"), url_option, token_option)
async def result(self: AppCommand, ad_id: str, url: str, token: str | None) -> None:
    """Print an ad's current result as JSON (exit status 1 if the service does not know it).

    AD_ID is the ad's id.
    """
    async with AsyncClassifyClient(url, token=token) as client:
        found = await client.result(ad_id)
    if found is None:
        fail(self, f"no classification for ad {ad_id!r}")
    self.say(json.dumps(found.raw, indent=2))


@app.command(
    argument("path_or_url"),
    option("--top-k", type=int, default=5, show_default=True, help="Labels shown."),
)
async def classify_image(self: AppCommand, path_or_url: str, top_k: int) -> None:
    """Classify one image with the configured model, here, without broker or worker.

    PATH_OR_URL is a local file or an http(s) URL (downloaded with the worker's limits).
    """
    from agents.download import ImageDownloader, ImagePreparer
    from models import ImageRejected

    model = create_model_from(settings)
    downloader = ImageDownloader(settings)
    try:
        if path_or_url.startswith(("http://", "https://")):
            data = await downloader.fetch(path_or_url)
        else:
            data = Path(path_or_url).read_bytes()
        await asyncio.get_running_loop().run_in_executor(None, model.load)
        preparer = ImagePreparer(model, threads=1, max_pixels=settings.max_image_pixels)
        pixels = await preparer.prepare(data)
    except ImageRejected as exc:
        fail(self, f"{exc.reason}: {exc.message}")
    finally:
        await downloader.close()
    [prediction] = model.predict_batch(np.stack([pixels]))
    self.say(f"{path_or_url}: category {prediction.category} ({model.name} on {model.device})")
    for label in prediction.labels[:top_k]:
        self.say(f"  {label.score:6.1%}  {label.name}")


@app.command(argument("which"), argument("args", nargs=-1, type=str))
async def bench(self: AppCommand, which: str, args: tuple[str, ...]) -> None:
    """Run a benchmark of the source tree's bench/ (model, pipeline, store or soak).

    WHICH names it; the arguments after `--` go to it (see `python bench/WHICH.py --help`).
    """
    script = Path(__file__).resolve().parents[1] / "bench" / f"{which}.py"
    if not script.exists():
        fail(self, f"no benchmark {which!r} at {script} (bench/ is in the source tree)")
    completed = subprocess.run([sys.executable, str(script), *args], check=False)
    if completed.returncode:
        fail(self, f"{which} exited with status {completed.returncode}")
