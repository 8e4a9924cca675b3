"""Fetching image bytes from the URLs in ad events, which other systems wrote: every limit a
downloader of untrusted URLs needs, and an address guard so that an event cannot point the
worker at the network it runs in. Raises `ImageRejected` with a reason code; knows nothing of
Kafka.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from classify_app.settings import Settings
from classify_app.vocabulary import ImageReason, http_reason
from models import ImageRejected

DOWNLOAD_CHUNK_BYTES = 64 * 1024
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class ForbiddenAddress(OSError):
    """A host resolved only to addresses the downloader must not reach."""


# Never reached, whatever `is_global` says: private, shared, loopback, link-local (the cloud
# metadata service), documentation, benchmarking, multicast and reserved ranges.
DENIED_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7",
        "fe80::/10", "fec0::/10", "ff00::/8",
    )
)  # fmt: skip
# IPv6 ranges that carry an IPv4 address (which is checked in its place): mapped, compatible
# and translated forms, NAT64 (well-known and local-use prefixes), 6to4 and Teredo.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it embeds or translates one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's address (the server's is public by design)
    low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _TRANSLATED or any(ip in prefix for prefix in _NAT64):
        return low
    if ip in _COMPATIBLE and int(ip) > 1:  # :: and ::1 are themselves, not IPv4
        return low
    return None


class AddressGuard:
    """Decides which IP addresses the downloader may connect to.

    Only public unicast addresses, unless an address is inside one of the
    `CLASSIFY_DOWNLOAD_ALLOW_NETS` networks. Denied by explicit ranges (`DENIED_NETWORKS`) as
    well as by `is_global`; an IPv6 address that embeds or translates an IPv4 one (NAT64 with
    DNS64, 6to4, Teredo, mapped, compatible) is judged by that IPv4 address too.
    """

    def __init__(self, allow_nets: str) -> None:
        self.allowed_networks = [
            ipaddress.ip_network(net.strip(), strict=False)
            for net in allow_nets.split(",")
            if net.strip()
        ]

    def refusal(self, address: str) -> str | None:
        """Why `address` may not be reached, or None if it may."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and (inner := embedded_ipv4(ip)) is not None:
            candidates = [inner] if ip.ipv4_mapped is not None else [ip, inner]
        for candidate in candidates:
            if any(candidate in network for network in self.allowed_networks):
                continue
            if (
                candidate.is_multicast
                or not candidate.is_global
                or any(candidate in network for network in DENIED_NETWORKS)
            ):
                shown = f"{ip} ({candidate})" if candidate != ip else str(ip)
                return f"{shown} is not a public address"
        return None


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses `AddressGuard` allows.

    The connection is made to an address checked here, so a name that resolves to a public
    address when checked and a private one when connecting (DNS rebinding) cannot get through.
    """

    def __init__(self, guard: AddressGuard) -> None:
        self.guard = guard
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Called by aiohttp's connector for every new connection to a host name."""
        results = await self._resolver.resolve(host, port, family)
        allowed = [result for result in results if self.guard.refusal(result["host"]) is None]
        if not allowed:
            refusal = self.guard.refusal(results[0]["host"]) if results else "no address"
            raise ForbiddenAddress(f"{host}: {refusal}")
        return allowed

    async def close(self) -> None:
        """Called when the session closes."""
        await self._resolver.close()


class ImageDownloader:
    """Fetches image bytes with one shared HTTP session and hard limits.

    Limits: `download_connections` connections, a connect timeout and a total timeout per
    image, a byte limit checked while streaming, and a bounded number of redirects, each hop
    checked again. Only http(s) URLs, and only public addresses (`AddressGuard`). Failures
    raise `ImageRejected` with a reason code.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.guard = AddressGuard(settings.download_allow_nets)
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=settings.download_timeout_s, sock_connect=settings.download_connect_timeout_s
        )

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.settings.download_connections,
                    limit_per_host=self.settings.download_connections_per_host,
                    ttl_dns_cache=300,
                    resolver=GuardedResolver(self.guard),
                ),
                timeout=self._timeout,
                headers={"User-Agent": "classify-app/0.1 (+image classification)"},
                auto_decompress=True,
            )
        return self._session

    async def fetch(self, url: str) -> bytes:
        """Download one image's bytes, or raise `ImageRejected`."""
        target = self._checked_url(url)
        try:
            async with asyncio.timeout(self.settings.download_timeout_s):
                return await self._fetch(target)
        except ImageRejected:
            raise
        except TimeoutError:
            raise ImageRejected(
                ImageReason.TIMEOUT,
                f"no complete answer within {self.settings.download_timeout_s:g} s",
            ) from None
        except aiohttp.InvalidURL as exc:
            raise ImageRejected(ImageReason.INVALID_URL, f"invalid URL: {exc}") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            refused = getattr(exc, "os_error", None)  # set by GuardedResolver's refusal
            if isinstance(refused, ForbiddenAddress):
                raise ImageRejected(
                    ImageReason.FORBIDDEN_ADDRESS, _forbidden(str(refused))
                ) from None
            raise ImageRejected(
                ImageReason.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}"
            ) from None
        except aiohttp.ClientError as exc:
            raise ImageRejected(ImageReason.HTTP_ERROR, f"{type(exc).__name__}: {exc}") from None

    async def _fetch(self, url: URL) -> bytes:
        for _ in range(self.settings.download_max_redirects + 1):
            async with self._get_session().get(url, allow_redirects=False) as response:
                if response.status not in REDIRECTS:
                    return await self._read(response)
                location = response.headers.get("Location")
                if not location:
                    raise ImageRejected(
                        http_reason(response.status), "a redirect without a Location header"
                    )
                try:
                    target = str(url.join(URL(location)))
                except (ValueError, TypeError) as exc:
                    raise ImageRejected(
                        ImageReason.INVALID_URL,
                        f"a redirect to an invalid URL {location[:200]!r}: {exc}",
                    ) from None
                url = self._checked_url(target)
        raise ImageRejected(
            ImageReason.TOO_MANY_REDIRECTS,
            f"more than {self.settings.download_max_redirects} redirects",
        )

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self.settings.download_max_bytes
        if response.status >= 400:
            raise ImageRejected(
                http_reason(response.status),
                f"the image server answered {response.status} {response.reason or ''}".strip(),
            )
        if response.content_length is not None and response.content_length > limit:
            raise ImageRejected(
                ImageReason.TOO_LARGE,
                f"{response.content_length} bytes announced, the limit is {limit}",
            )
        body = bytearray()
        async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                raise ImageRejected(ImageReason.TOO_LARGE, f"more than {limit} bytes, the limit")
        return bytes(body)

    async def close(self) -> None:
        """Close the HTTP session and its connections."""
        if self._session is not None:
            await self._session.close()

    def _checked_url(self, url: str) -> URL:
        """The URL if it may be fetched: http(s), a host, not a forbidden IP literal (host
        names are checked when they are resolved, by `GuardedResolver`)."""
        try:
            target = URL(url)
        except (ValueError, TypeError) as exc:
            raise ImageRejected(ImageReason.INVALID_URL, f"invalid URL: {exc}") from None
        if not target.scheme:
            raise ImageRejected(ImageReason.INVALID_URL, f"not an absolute URL: {url[:200]!r}")
        if target.scheme not in ("http", "https"):
            raise ImageRejected(
                ImageReason.UNSUPPORTED_SCHEME,
                f"only http and https URLs are fetched, not {url[:200]!r}",
            )
        if not target.host:
            raise ImageRejected(ImageReason.INVALID_URL, f"the URL has no host: {url[:200]!r}")
        try:
            refusal = self.guard.refusal(target.host)
        except ValueError:
            return target  # a host name
        if refusal is not None:
            raise ImageRejected(ImageReason.FORBIDDEN_ADDRESS, _forbidden(refusal))
        return target


def _forbidden(refusal: str) -> str:
    return f"{refusal}; private networks are reached only through CLASSIFY_DOWNLOAD_ALLOW_NETS"
