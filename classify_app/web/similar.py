"""`GET /classify/similar/{ad_id}` and `GET /classify/similar?url=`: the ads nearest to an
ad's images, or to a photo given by URL, from the similarity index every worker holds whole
(`tables.similarity`): any worker answers, and all answer the same.

`GET /classify/similarity/save` and its files: the worker's newest saved index, which a
worker starting without one copies instead of rebuilding the index from the topic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from aiohttp.web import FileResponse
from faust import web

from classify_app.application import app
from classify_app.vocabulary import ApiError
from classify_app.web.api import error
from models import ImageRejected
from models.batching import ModelUnavailable
from tables.similarity import MAX_K, SAVE_FILES, SimilarityIndex, newest_save_files

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


def _newest_save(view: web.View) -> tuple[str, list[Path]] | web.Response:
    """The worker's newest save (its name and files), or the answer saying why there is none."""
    feeder = app.parts.index_feeder
    if feeder is None:
        return error(view, 501, ApiError.SIMILARITY_DISABLED, "CLASSIFY_SIMILARITY is false")
    found = None if feeder.save_folder is None else newest_save_files(feeder.save_folder)
    if found is None:
        return error(view, 404, ApiError.NO_SAVED_INDEX, "this worker has no saved index")
    return found


@app.page("/classify/similarity/save")
class SavedIndex(web.View):
    """What the worker's newest saved index is made of: its name and its files' sizes."""

    async def get(self, request: web.Request) -> web.Response:
        found = _newest_save(self)
        if not isinstance(found, tuple):
            return found  # the answer saying why there is none
        name, files = found
        try:
            sizes = [{"name": path.name, "bytes": path.stat().st_size} for path in files]
        except FileNotFoundError:  # replaced by a newer save just now
            return error(self, 404, ApiError.NO_SAVED_INDEX, "the save is being replaced")
        return self.json({"save": name, "files": sizes})


@app.page("/classify/similarity/save/{save}/{file}")
class SavedIndexFile(web.View):
    """One file of the worker's newest saved index, streamed from disk (404 once a newer
    save has replaced it: ask `/classify/similarity/save` again)."""

    async def get(self, request: web.Request, save: str, file: str) -> Any:
        found = _newest_save(self)
        if not isinstance(found, tuple):
            return found  # the answer saying why there is none
        name, files = found
        if save != name or file not in SAVE_FILES:
            return error(self, 404, ApiError.NO_SAVED_INDEX, f"the newest save is {name}")
        # Opened when the answer starts: a newer save removing the file meanwhile does not
        # cut the copy short (the data stays until the file is closed).
        path = files[SAVE_FILES.index(file)]
        return FileResponse(path, headers={"Content-Type": "application/octet-stream"})
