"""`GET /classify/similar/{ad_id}` and `GET /classify/similar?url=`: the ads nearest to an
ad's images, or to a photo given by URL, from the similarity index every worker holds whole
(`tables.similarity`): any worker answers, and all answer the same."""

from __future__ import annotations

from typing import Any

import numpy as np
from faust import web

from classify_app.application import app
from classify_app.vocabulary import ApiError
from classify_app.web.api import error
from models import ImageRejected
from models.batching import ModelUnavailable
from tables.similarity import MAX_K, SimilarityIndex

DEFAULT_K = 10


def _index(view: web.View) -> SimilarityIndex | Any:
    """The index, or the answer that says why there is none to ask."""
    index, feeder = app.parts.similarity, app.parts.index_feeder
    if index is None or feeder is None:
        return error(view, 501, ApiError.SIMILARITY_DISABLED, "CLASSIFY_SIMILARITY is false")
    if not feeder.caught_up.is_set():
        answer = error(
            view,
            503,
            ApiError.SIMILARITY_WARMING,
            f"the index is reading the vectors topic ({feeder.records} records so far)",
        )
        answer.headers["Retry-After"] = "1"
        return answer
    return index


def _number(text: str | None) -> int | None:
    """A query parameter's decimal number (ASCII digits only), or None."""
    if text is None or not (text.isascii() and text.isdigit()) or len(text) > 9:
        return None
    return int(text)


def _k(request: web.Request) -> int | None:
    k = _number(request.query.get("k", str(DEFAULT_K)))
    return k if k is not None and 1 <= k <= MAX_K else None


def _answer(view: web.View, asked: dict[str, Any], neighbours: list[Any]) -> web.Response:
    return view.json({**asked, "similar": [n.as_record() for n in neighbours]})


@app.page("/classify/similar/{ad_id}")
class SimilarToAd(web.View):
    """The `k` other ads most similar to an ad (any of its images, or `?image=N`)."""

    async def get(self, request: web.Request, ad_id: str) -> web.Response:
        index = _index(self)
        if not isinstance(index, SimilarityIndex):
            return index  # the answer saying why there is none
        k = _k(request)
        image = _number(request.query.get("image"))
        if k is None or ("image" in request.query and image is None):
            return error(
                self, 400, ApiError.INVALID_QUERY, f"k is 1 to {MAX_K}; image an image index"
            )
        vectors = index.vectors_of(ad_id)
        if vectors is None:
            return error(self, 404, ApiError.UNKNOWN_AD, f"ad {ad_id!r} has no indexed image")
        if image is not None:
            if image not in vectors:
                return error(
                    self, 404, ApiError.UNKNOWN_AD, f"ad {ad_id!r} has no indexed image {image}"
                )
            vectors = {image: vectors[image]}
        neighbours = index.similar(vectors, k, exclude=ad_id)
        return _answer(self, {"ad_id": ad_id, "image": image}, neighbours)


@app.page("/classify/similar")
class SimilarToPhoto(web.View):
    """The `k` ads most similar to a photo given by URL (downloaded with the worker's
    limits and guard, and embedded by its model)."""

    async def get(self, request: web.Request) -> web.Response:
        index = _index(self)
        if not isinstance(index, SimilarityIndex):
            return index  # the answer saying why there is none
        k = _k(request)
        url = request.query.get("url", "")
        if k is None or not url:
            return error(self, 400, ApiError.INVALID_QUERY, f"url is required; k is 1 to {MAX_K}")
        try:
            vector = await app.parts.images.embed(url)
        except ImageRejected as exc:
            return error(self, 422, ApiError.IMAGE_REFUSED, f"{exc.reason}: {exc.message}")
        except ModelUnavailable as exc:
            answer = error(self, 503, ApiError.SIMILARITY_WARMING, f"the model: {exc}")
            answer.headers["Retry-After"] = "1"
            return answer
        neighbours = index.similar({0: np.asarray(vector, dtype=np.float32)}, k)
        return _answer(self, {"url": url}, neighbours)
