"""TLS in front of the development broker (Tansu 0.6's own TLS flags cannot be combined):
a throw-away certificate authority, and a TLS terminator, Python's `ssl` (OpenSSL) on one
side and plain TCP to the broker on the other, run in a thread of its own."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from classify_app.dev.processes import free_port


@dataclass(frozen=True)
class Certificates:
    """Files of a throw-away CA, a server certificate for 127.0.0.1, and a client one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting it must fail


def make_certificates(folder: Path) -> Certificates:
    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str, subject_key: ec.EllipticCurvePrivateKey, issuer: str,
        issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, host: bool = False,
    ) -> x509.Certificate:  # fmt: skip
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(subject_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if host:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        return builder.sign(issuer_key, hashes.SHA256())

    def write(path: Path, data: bytes) -> Path:
        path.write_bytes(data)
        return path

    def pem(item: x509.Certificate) -> bytes:
        return item.public_bytes(serialization.Encoding.PEM)

    def private(item: ec.EllipticCurvePrivateKey) -> bytes:
        return item.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, server_key, client_key, other_key = key(), key(), key(), key()
    return Certificates(
        ca=write(
            folder / "ca.pem", pem(certificate("test CA", ca_key, "test CA", ca_key, ca=True))
        ),
        server_cert=write(
            folder / "server.pem",
            pem(certificate("127.0.0.1", server_key, "test CA", ca_key, ca=False, host=True)),
        ),
        server_key=write(folder / "server.key", private(server_key)),
        client_cert=write(
            folder / "client.pem",
            pem(certificate("worker", client_key, "test CA", ca_key, ca=False)),
        ),
        client_key=write(folder / "client.key", private(client_key)),
        other_ca=write(
            folder / "other.pem",
            pem(certificate("other CA", other_key, "other CA", other_key, ca=True)),
        ),
    )


class TlsTerminator:
    """Accepts TLS on `port` (asking for a client certificate of the CA, when `mutual`) and
    forwards the bytes to the broker's plain `target` port."""

    def __init__(self, certificates: Certificates, target: int, *, mutual: bool = False) -> None:
        self.port = free_port()
        self.target = target
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certificates.server_cert, certificates.server_key)
        if mutual:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(certificates.ca)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _serve(self) -> asyncio.Server:
        return await asyncio.start_server(self._relay, "127.0.0.1", self.port, ssl=self.context)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ssl.SSLError, ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            with contextlib.suppress(OSError, ssl.SSLError, ConnectionError, RuntimeError):
                sink.close()

        await asyncio.gather(pipe(reader, broker_writer), pipe(broker_reader, writer))

    @contextlib.contextmanager
    def running(self) -> Iterator[TlsTerminator]:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result()
        try:
            yield self
        finally:
            self._loop.call_soon_threadsafe(server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
