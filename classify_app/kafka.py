"""How every Kafka client of the project reaches a secured cluster: SASL (PLAIN, SCRAM-SHA-256,
SCRAM-SHA-512) and TLS (a CA file, an optional client certificate, the host name checked),
from the `CLASSIFY_KAFKA_*` settings. The worker gets them as Faust credentials, everything
else (dlq-replay, the CLI's `--kafka`, the examples, the consumer's offset probe) as aiokafka
keyword arguments, so all of them connect the same way."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from classify_app.settings import Settings


def security_protocol(settings: Settings) -> str:
    """`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`, as Kafka clients name it."""
    if settings.kafka_sasl_mechanism:
        return "SASL_SSL" if settings.kafka_tls else "SASL_PLAINTEXT"
    return "SSL" if settings.kafka_tls else "PLAINTEXT"


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for the cluster, or None without TLS."""
    if not settings.kafka_tls:
        return None
    context = ssl.create_default_context(
        purpose=ssl.Purpose.SERVER_AUTH, cafile=settings.kafka_ca_file or None
    )
    context.check_hostname = settings.kafka_check_hostname
    if settings.kafka_cert_file:
        context.load_cert_chain(
            settings.kafka_cert_file,
            settings.kafka_key_file or None,
            password=settings.kafka_key_password or None,
        )
    return context


def faust_credentials(settings: Settings) -> dict[str, Any]:
    """The `faust.App` options that carry the credentials (none for a plain cluster)."""
    context = ssl_context(settings)
    if settings.kafka_sasl_mechanism:
        return {
            "broker_credentials": faust.SASLCredentials(
                username=settings.kafka_username,
                password=settings.kafka_password,
                mechanism=settings.kafka_sasl_mechanism,
                ssl_context=context,
            )
        }
    if context is not None:
        return {"broker_credentials": faust.SSLCredentials(context)}
    return {}


class KafkaUnreachable(Exception):
    """The cluster cannot be reached with these settings; the message says why, in a line."""


async def check_connection(settings: Settings, bootstrap: str, timeout: float = 20.0) -> None:
    """Connect once as every client will, so that a wrong password or an untrusted certificate
    stops the worker at start with one line saying so, instead of a retry loop."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        request_timeout_ms=int(timeout * 1000),
        **aiokafka_options(settings),
    )
    try:
        async with asyncio.timeout(timeout):
            await producer.start()
    except Exception as exc:
        # aiokafka logs a TLS failure and raises a bare "unable to bootstrap": ask TLS itself.
        reason = await _tls_refusal(settings, bootstrap) or _cause(exc)
        if settings.kafka_sasl_mechanism and isinstance(exc, KeyError | KafkaError):
            # aiokafka reads a SCRAM refusal ("e=unknown-user") as a missing "v" field.
            reason = f"SASL {settings.kafka_sasl_mechanism} authentication failed for user "
            reason += f"{settings.kafka_username!r} (wrong user or password?): {_cause(exc)}"
        raise KafkaUnreachable(
            f"cannot connect to Kafka at {bootstrap} ({security_protocol(settings)}): {reason}"
        ) from None
    finally:
        await producer.stop()


async def _tls_refusal(settings: Settings, bootstrap: str) -> str | None:
    """Why a TLS handshake with the first bootstrap server fails, or None if it does not."""
    context = ssl_context(settings)
    if context is None:
        return None
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        async with asyncio.timeout(10):
            _, writer = await asyncio.open_connection(host, int(port), ssl=context)
            writer.close()
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return f"TLS: {exc}"
    return None


def _cause(exc: BaseException) -> str:
    """The innermost reason of a connection failure (aiokafka wraps TLS and SASL errors)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        inner = exc.__cause__ or exc.__context__
        if inner is None or isinstance(inner, asyncio.CancelledError):
            break
        exc = inner
    if isinstance(exc, TimeoutError):
        return "no answer (a TLS listener spoken to in plain text, or the other way round?)"
    return f"{type(exc).__name__}: {exc}"


def bootstrap_servers(settings: Settings) -> str:
    """`CLASSIFY_BROKER` (`kafka://a:9092;kafka://b:9092`), read as Faust reads it, as
    aiokafka's `host:port,...`."""
    from faust.utils.urls import urllist

    urls = urllist(settings.broker, default_scheme="kafka")
    return ",".join(f"{url.host}:{url.port or 9092}" for url in urls)


def aiokafka_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for an aiokafka producer, consumer or admin client."""
    options: dict[str, Any] = {"security_protocol": security_protocol(settings)}
    context = ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.kafka_sasl_mechanism:
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_username,
            sasl_plain_password=settings.kafka_password,
        )
    return options
