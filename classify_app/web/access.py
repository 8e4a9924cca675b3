"""Who may call the HTTP API: with `CLASSIFY_API_TOKEN` set, every route but the probes
(`/healthz`, `/readyz`) needs `Authorization: Bearer <token>`; `CLASSIFY_API_READ_TOKEN`, when
set, is accepted too for reading (GET), except the saved similarity index, which holds every
ad's embeddings at once and is for the workers only. Requests one worker forwards to another
(table routing) carry the caller's header along."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from classify_app.settings import Settings
from classify_app.vocabulary import ApiError

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
READ_METHODS = frozenset({"GET", "HEAD"})
WORKERS_ONLY = "/classify/similarity/save"  # and below: what one worker copies from another

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer_token_guard(
    settings: Settings,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The aiohttp middleware enforcing the API tokens of `settings` (none: open)."""
    tokens = [token.encode() for token in (settings.api_token,) if token]
    read_tokens = [
        *tokens,
        *([settings.api_read_token.encode()] if settings.api_read_token else []),
    ]

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not tokens or request.path in OPEN_PATHS:
            return await handler(request)
        reading = request.method in READ_METHODS and not request.path.startswith(WORKERS_ONLY)
        allowed = read_tokens if reading else tokens
        if not any(hmac.compare_digest(_presented(request), token) for token in allowed):
            return web.json_response(
                {"error": ApiError.UNAUTHORIZED, "message": "a valid bearer token is required"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="classify-app"'},
            )
        return await handler(request)

    return guard


def _presented(request: web.Request) -> bytes:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else b""
