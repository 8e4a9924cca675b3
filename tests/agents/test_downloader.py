"""The image downloader against a real local HTTP server: every failure has its reason, and
the address guard keeps it out of private networks."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.downloader import DENIED_NETWORKS, AddressGuard, ImageDownloader
from classify_app.dev.images import SampleImageServer
from classify_app.settings import Settings
from classify_app.vocabulary import is_transient
from models import ImageRejected


@pytest.fixture()
async def downloader(settings: Settings) -> AsyncIterator[ImageDownloader]:
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


@pytest.fixture()
async def guarded(settings: Settings) -> AsyncIterator[ImageDownloader]:
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


async def test_every_redirect_hop_is_checked(
    settings: Settings, image_server: SampleImageServer
) -> None:
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


PRIVATE_IPV4 = [
    *("10.1.2.3", "127.0.0.1", "169.254.169.254", "172.16.5.4", "192.168.1.1", "100.64.0.1"),
    *("0.0.0.1", "198.18.0.1", "192.0.0.8", "224.0.0.1", "240.0.0.1"),
]


def ipv6_forms(ipv4: str) -> list[str]:
    """Every IPv6 address that embeds or translates `ipv4`."""
    packed = int(ipaddress.IPv4Address(ipv4))
    high, low = packed >> 16, packed & 0xFFFF
    return [
        f"::ffff:{ipv4}",  # mapped
        f"::{ipv4}",  # compatible
        f"::ffff:0:{high:x}:{low:x}",  # translated
        f"64:ff9b::{high:x}:{low:x}",  # NAT64, well-known prefix
        f"64:ff9b:1::{high:x}:{low:x}",  # NAT64, local-use prefix
        f"2002:{high:x}:{low:x}::1",  # 6to4
        # Teredo: the client's address, inverted, in the last 32 bits.
        f"2001:0:4136:e378:8000:63bf:{high ^ 0xFFFF:x}:{low ^ 0xFFFF:x}",
    ]


@pytest.mark.parametrize("address", [
    *PRIVATE_IPV4,
    *(form for ipv4 in PRIVATE_IPV4 for form in ipv6_forms(ipv4)),
    *("::1", "::", "fe80::1", "fec0::1", "fc00::1", "fd12:3456::1", "ff02::1"),
    *("2001:db8::1", "100::1"),
])  # fmt: skip
def test_the_guard_refuses_every_private_range_in_every_form(address: str) -> None:
    assert AddressGuard("").refusal(address) is not None


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::1", "::ffff:1.1.1.1"],
)
def test_the_guard_lets_public_addresses_through(address: str) -> None:
    assert AddressGuard("").refusal(address) is None


@given(
    st.sampled_from(DENIED_NETWORKS).flatmap(
        lambda net: st.integers(0, net.num_addresses - 1).map(lambda i: net[i])
    )
)
def test_any_address_of_a_denied_range_is_refused(address: ipaddress._BaseAddress) -> None:
    guard = AddressGuard("")
    assert guard.refusal(str(address)) is not None
    if address.version == 4:
        assert all(guard.refusal(form) is not None for form in ipv6_forms(str(address)))


async def test_a_redirect_to_an_invalid_location_is_an_invalid_url(
    settings: Settings, image_server: SampleImageServer
) -> None:
    fetcher = ImageDownloader(dataclasses.replace(settings, download_allow_nets="127.0.0.1/32"))
    try:
        with pytest.raises(ImageRejected) as caught:
            await fetcher.fetch(f"{image_server.url}/bad-redirect")
        assert caught.value.reason == "invalid_url"
    finally:
        await fetcher.close()
