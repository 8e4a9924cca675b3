"""`POST /classify` and the result lookups.

Submitting only validates and publishes the event: the prediction happens in the stream, and
the client polls the result URL (the request is decoupled from the prediction).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from faust import web
from pymongo.errors import PyMongoError

from agents.sinks import NotDelivered, deliver
from classify_app.application import app
from classify_app.identity import result_path
from classify_app.records import AdResult, InvalidEvent, parse_ad_event
from classify_app.topics import ads_topic
from classify_app.vocabulary import ApiError
from tables.results import results_table
from tables.store import ResultStore

MAX_LIST_LIMIT = 500
# How long `POST /classify` waits for the broker to take the ad before answering 503.
SUBMIT_TIMEOUT_S = 10.0

Lookup = Callable[[ResultStore], Awaitable[AdResult | None]]


@app.page("/classify")
class SubmitAd(web.View):
    """`POST /classify`: validate an ad event and publish it to the `ads` topic (202)."""

    async def post(self, request: web.Request) -> web.Response:
        """Answer 202 with the ad id and the URL to poll, or 4xx with the reason."""
        limit = app.settings.max_event_bytes
        body = await request.read()  # aiohttp refuses bodies over 1 MB itself
        if len(body) > limit:
            return error(self, 413, ApiError.TOO_LARGE, f"bodies are limited to {limit} bytes")
        try:
            ad = parse_ad_event(
                body,
                max_images=app.settings.max_images_per_ad,
                max_bytes=limit,
                strict=app.settings.strict_events,
            )
        except InvalidEvent as exc:
            return error(self, 400, exc.reason, exc.message)
        try:
            # 202 only once the broker has the ad: an accepted ad is never lost.
            await deliver(
                ads_topic,
                key=ad.ad_id,
                value=json.dumps(ad.asdict()).encode(),
                timeout=SUBMIT_TIMEOUT_S,
            )
        except NotDelivered as exc:
            response = error(
                self, 503, ApiError.BROKER_UNAVAILABLE, f"the broker did not take the ad: {exc}"
            )
            response.headers["Retry-After"] = "1"
            return response
        return self.json(
            {
                "ad_id": ad.ad_id,
                "request_id": ad.request_id(),
                "status": "accepted",
                "result_url": result_path(ad.ad_id),
            },
            status=202,
        )


@app.page("/classify/results/{ad_id}")
class AdResultView(web.View):
    """`GET /classify/results/{ad_id}`: served by the worker that owns the ad's partition."""

    async def get(self, request: web.Request, ad_id: str) -> web.Response:
        """Route to the partition owner (Faust's table routing), then answer there. While the
        group rebalances the owner may be gone: then MongoDB answers for a finished ad, and
        otherwise 503 asks the client to retry."""
        await app.partition_metadata(results_table.changelog_topic.get_topic_name())
        try:
            # Faust types the routed handler as taking (View, Request) only.
            return await self._get_routed(request, ad_id=ad_id)  # type: ignore[call-arg]
        except aiohttp.ClientError as exc:
            unreachable = error(
                self,
                503,
                ApiError.OWNER_UNREACHABLE,
                f"the worker that owns ad {ad_id!r} did not answer ({type(exc).__name__}); "
                "the group is probably rebalancing, retry shortly",
            )
            unreachable.headers["Retry-After"] = "1"
            return await stored(
                self, request, lambda store: store.find(ad_id), otherwise=unreachable
            )

    @app.table_route(table=results_table, match_info="ad_id")  # type: ignore[arg-type]
    async def _get_routed(self, request: web.Request, **params: Any) -> web.Response:
        """The ad's result (`pending` while in flight); an ad the table does not hold (one
        classified long ago, or by a previous deployment) is looked up in MongoDB."""
        ad_id = params["ad_id"]
        result = results_table.get(ad_id)
        if result is not None:
            return self.json(public(result, request))
        return await stored(
            self,
            request,
            lambda store: store.find(ad_id),
            otherwise=_unknown(self, f"ad {ad_id!r}"),
        )


@app.page("/classify/results")
class StoredResults(web.View):
    """`GET /classify/results?catalog=..&catalog_ad_id=..`: one ad by its catalog key;
    `GET /classify/results?category=..&limit=..`: the latest results of a category.
    Both answer from MongoDB."""

    async def get(self, request: web.Request) -> web.Response:
        """200 with the result (or `{"results": [...]}`), 400 for a bad query, 404 if unknown."""
        query = request.query
        store = app.parts.store
        if store is None:
            return error(
                self, 501, ApiError.STORE_DISABLED, "this deployment keeps no MongoDB store"
            )
        if "catalog" in query and "catalog_ad_id" in query:
            catalog, catalog_ad_id = query["catalog"], query["catalog_ad_id"]
            return await stored(
                self,
                request,
                lambda mongo: mongo.find_by_catalog(catalog, catalog_ad_id),
                otherwise=_unknown(self, f"catalog ad {catalog!r}/{catalog_ad_id!r}"),
            )
        if "category" in query:
            try:
                limit = int(query.get("limit", "50"))
            except ValueError:
                limit = 0
            if not 1 <= limit <= MAX_LIST_LIMIT:
                return error(self, 400, ApiError.INVALID_QUERY, f"limit must be 1-{MAX_LIST_LIMIT}")
            try:
                results = await store.latest_in_category(query["category"], limit)
            except PyMongoError as exc:
                return _store_unavailable(self, exc)
            return self.json({"results": [public(result, request) for result in results]})
        return error(
            self,
            400,
            ApiError.INVALID_QUERY,
            "query by catalog=..&catalog_ad_id=.. or by category=..[&limit=..]",
        )


async def stored(
    view: web.View, request: web.Request, lookup: Lookup, *, otherwise: web.Response
) -> web.Response:
    """The result MongoDB holds; `otherwise` when there is no store or it holds none; 503 if
    MongoDB does not answer. The one fallback of every lookup."""
    store = app.parts.store
    if store is None:
        return otherwise
    try:
        result = await lookup(store)
    except PyMongoError as exc:
        return _store_unavailable(view, exc)
    return otherwise if result is None else view.json(public(result, request))


def error(view: web.View, status: int, code: str, message: str) -> web.Response:
    """An error answer: a reason code of `classify_app.vocabulary` and a readable message."""
    return view.json({"error": code, "message": message}, status=status)


def _unknown(view: web.View, what: str) -> web.Response:
    return error(view, 404, ApiError.UNKNOWN_AD, f"no classification for {what}")


def _store_unavailable(view: web.View, exc: Exception) -> web.Response:
    return error(
        view, 503, ApiError.STORE_UNAVAILABLE, f"MongoDB did not answer: {type(exc).__name__}"
    )


def public(result: AdResult, request: web.Request) -> dict[str, Any]:
    """A result as the API answers it: embedding vectors (2.5 KB a photo) only when asked
    for with `?embeddings=true`; `results` and MongoDB always carry them."""
    answer = result.asdict()
    if request.query.get("embeddings", "").lower() in ("1", "true", "yes"):
        return answer
    answer["images"] = [
        {**image.asdict(), "outputs": _without_vectors(image.outputs)} for image in result.images
    ]
    return answer


def _without_vectors(outputs: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {k: v for k, v in output.items() if k != "vector"}
        if name == "embedding" and isinstance(output, dict)
        else output
        for name, output in outputs.items()
    }
