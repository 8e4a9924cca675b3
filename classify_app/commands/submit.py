"""Commands that talk to a running worker through the SDK: send, send-file, result."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

from faust.cli import AppCommand, argument, option

from classify_app.application import app
from classify_app.commands import bootstrap_servers, fail
from classify_app.kafka import aiokafka_options
from classify_app.sdk import (
    Acceptance,
    AsyncClassifyClient,
    ClassificationResult,
    ClassifyError,
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
        kafka_options=aiokafka_options(app.settings) if kafka else None,
        ads_topic=app.settings.ads_topic,
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
    argument("ad_id", required=False),
    option("--photo", "photo_url", default=None, help="A photo's URL to search with instead."),
    option("--k", type=int, default=10, show_default=True, help="Ads to list."),
    option("--image", type=int, default=None, help="Only this image of the ad."),
    url_option,
    token_option,
)
async def similar(
    self: AppCommand,
    ad_id: str | None,
    photo_url: str | None,
    k: int,
    image: int | None,
    url: str,
    token: str | None,
) -> None:
    """List the ads most similar to an ad's images, or to a photo (`--photo URL`), best first.

    AD_ID is the ad's id (or give `--photo URL` instead).
    """
    if (ad_id is None) == (photo_url is None):
        fail(self, "give an AD_ID or --photo URL")
    try:
        async with AsyncClassifyClient(url, token=token) as client:
            if photo_url is not None:
                found = await client.similar_to(photo_url, k=k)
            else:
                assert ad_id is not None
                maybe = await client.similar(ad_id, k=k, image=image)
                if maybe is None:
                    fail(self, f"ad {ad_id!r} has no indexed image")
                found = maybe
    except ClassifyError as exc:
        fail(self, f"{exc.reason}: {exc}")
    for neighbour in found:
        self.say(
            f"{neighbour.score:7.4f}  {neighbour.ad_id}  image {neighbour.matched_image_index}"
            f" (for image {neighbour.image_index})"
        )
