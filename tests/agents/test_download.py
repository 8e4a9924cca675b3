"""The download stage against a real local HTTP server: every failure has its reason."""

from __future__ import annotations

import dataclasses
import json
import time
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest

from agents.classify import ModelUnavailable
from agents.download import ImageDownloader, download_images, handle_ad_event, is_transient
from classify_app.application import runtime, settings
from classify_app.local import SampleImageServer
from classify_app.records import AdAccepted, DeadLetter, ImageOutcome
from classify_app.topics import dead_letter_topic, image_outcomes_topic
from models import ImageRejected


@pytest.fixture()
async def downloader() -> Any:
    limited = dataclasses.replace(settings, download_timeout_s=1.0, download_max_bytes=2_000_000)
    fetcher = ImageDownloader(limited)
    yield fetcher
    await fetcher.close()


async def test_a_photo_downloads(downloader: ImageDownloader, image_server: SampleImageServer):
    data = await downloader.fetch(image_server.photo_url("coffee"))
    assert data[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/status/404", "http_404"),
        ("/status/503", "http_503"),
        ("/slow/2", "timeout"),
        ("/huge", "too_large"),
    ],
)
async def test_download_failures_have_reasons(
    downloader: ImageDownloader, image_server: SampleImageServer, path: str, reason: str
) -> None:
    with pytest.raises(ImageRejected) as caught:
        await downloader.fetch(image_server.url + path)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "unsupported_scheme"),
        ("ftp://example.com/a.jpg", "unsupported_scheme"),
        ("not a url", "invalid_url"),
        ("http://127.0.0.1:1/nothing-listens.jpg", "connection_error"),
    ],
)
async def test_unusable_urls_have_reasons(downloader: ImageDownloader, url: str, reason: str):
    with pytest.raises(ImageRejected) as caught:
        await downloader.fetch(url)
    assert caught.value.reason == reason


async def test_the_agent_turns_an_ad_into_outcomes(
    faust_app: Any, sent: Any, image_server: SampleImageServer
) -> None:
    base = image_server.url
    ad = {
        "ad_id": "ad-7",
        "catalog_name": "mixed",
        "images": [
            image_server.photo_url("coffee"),
            f"{base}/status/404",
            f"{base}/html-as-jpeg",
            f"{base}/truncated.jpg",
            f"{base}/bomb.png",
            image_server.photo_url("chelsea"),
        ],
    }
    async with download_images.test_context() as agent:
        await agent.put(key=b"ad-7", value=json.dumps(ad).encode())
        await sent.wait_for(1 + 6, timeout=60)

    [accepted, *outcomes] = sent.values(image_outcomes_topic)
    assert isinstance(accepted, AdAccepted) and accepted.ad.image_count == 6
    assert all(isinstance(outcome, ImageOutcome) for outcome in outcomes)
    by_index = {outcome.index: outcome for outcome in outcomes}
    reasons = {i: o.error.reason for i, o in by_index.items() if o.error is not None}
    assert reasons == {1: "http_404", 2: "not_an_image", 3: "corrupt_image", 4: "too_many_pixels"}
    # The two photos went through the inference stage, in memory.
    assert by_index[0].labels[0].name == "espresso"
    assert by_index[5].category == "animals"
    assert by_index[0].ad.request_id == accepted.ad.request_id
    assert by_index[0].timings["download_seconds"] > 0
    assert by_index[0].timings["batch_size"] >= 1


async def test_a_malformed_event_goes_to_the_dead_letter_topic(faust_app: Any, sent: Any):
    async with download_images.test_context() as agent:
        await agent.put(key=b"x", value=b'{"ad_id": "x", "images": ')
        await agent.put(key=b"y", value=json.dumps({"ad_id": "y", "images": [3]}).encode())
        await sent.wait_for(2)

    letters: list[DeadLetter] = sent.values(dead_letter_topic)
    assert [letter.reason for letter in letters] == ["malformed_json", "invalid_event"]
    assert letters[0].payload == '{"ad_id": "x", "images": '
    assert sent.values(image_outcomes_topic) == []


@pytest.fixture()
async def guarded() -> Any:
    """A downloader with the production address guard: no allowed private networks."""
    strict = dataclasses.replace(settings, download_timeout_s=1.0, download_allow_nets="")
    fetcher = ImageDownloader(strict)
    yield fetcher
    await fetcher.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.jpg",
        "http://10.0.0.1/a.jpg",
        "http://192.168.1.20/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/a.jpg",
        "http://[::ffff:127.0.0.1]/a.jpg",
        "http://224.0.0.1/a.jpg",
        "http://0.0.0.0/a.jpg",
        "http://localhost/a.jpg",  # a name: refused when it resolves
    ],
)
async def test_private_addresses_are_refused(guarded: ImageDownloader, url: str) -> None:
    with pytest.raises(ImageRejected) as caught:
        await guarded.fetch(url)
    assert caught.value.reason == "forbidden_address"
    assert "CLASSIFY_DOWNLOAD_ALLOW_NETS" in caught.value.message


async def test_every_redirect_hop_is_checked(image_server: SampleImageServer) -> None:
    # The image server itself is allowed, the metadata service it redirects to is not.
    only_server = dataclasses.replace(settings, download_allow_nets="127.0.0.1/32")
    fetcher = ImageDownloader(only_server)
    try:
        redirect = f"{image_server.url}/redirect?to="
        assert (await fetcher.fetch(redirect + image_server.photo_url("coffee")))[:2] == b"\xff\xd8"
        for target, reason in [
            ("http://169.254.169.254/latest/meta-data/", "forbidden_address"),
            ("http://[::1]:8080/", "forbidden_address"),
            ("file:///etc/passwd", "unsupported_scheme"),
        ]:
            with pytest.raises(ImageRejected) as caught:
                await fetcher.fetch(redirect + target)
            assert caught.value.reason == reason, target
        chain = image_server.photo_url("coffee")
        for _ in range(settings.download_max_redirects + 1):
            chain = redirect + quote(chain, safe="")
        with pytest.raises(ImageRejected) as caught:
            await fetcher.fetch(chain)
        assert caught.value.reason == "too_many_redirects"
    finally:
        await fetcher.close()


async def test_an_endless_answer_times_out(
    downloader: ImageDownloader, image_server: SampleImageServer
) -> None:
    with pytest.raises(ImageRejected) as caught:
        await downloader.fetch(image_server.url + "/endless")
    assert caught.value.reason == "timeout"


@pytest.mark.parametrize(
    ("reason", "transient"),
    [
        ("timeout", True),
        ("connection_error", True),
        ("http_503", True),
        ("http_429", True),
        ("http_404", False),
        ("not_an_image", False),
        ("forbidden_address", False),
        ("too_large", False),
    ],
)
def test_only_transient_failures_are_retried(reason: str, transient: bool) -> None:
    assert is_transient(reason) is transient


async def test_an_ad_is_left_unacknowledged_when_the_model_cannot_load(
    faust_app: Any, sent: Any, image_server: SampleImageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_start() -> None:
        raise RuntimeError("no such device: cuda:7")

    monkeypatch.setattr(runtime, "start", broken_start)
    fetcher = ImageDownloader(settings)  # the module's session belongs to an earlier test's loop
    monkeypatch.setattr("agents.download.downloader", fetcher)
    ad = {"ad_id": "ad-8", "catalog_name": "c", "images": [image_server.photo_url("coffee")]}
    try:
        with pytest.raises(ModelUnavailable, match="cuda:7"):
            await handle_ad_event(RawEvent(json.dumps(ad).encode()))  # type: ignore[arg-type]
    finally:
        await fetcher.close()
    # The ad was announced, but neither failed nor dead-lettered: it is processed again.
    assert [type(m) for m in sent.values(image_outcomes_topic)] == [AdAccepted]
    assert sent.values(dead_letter_topic) == []


class RawEvent:
    """The parts of a Faust event that the download stage reads."""

    def __init__(self, value: bytes) -> None:
        self.value = value
        self.message = SimpleNamespace(timestamp=time.time(), topic="ads", partition=0, offset=0)
