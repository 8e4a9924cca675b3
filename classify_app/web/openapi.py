"""The OpenAPI 3.1 description of the HTTP API, served at `GET /openapi.json`.

Written by hand next to the views it describes (`classify_app/web/`); statuses and reason
codes come from `classify_app.vocabulary`, limits from the settings and the views, the version
from the package. A test validates the document and checks real answers of a running worker
against its schemas.
"""

from __future__ import annotations

from typing import Any

from faust import web

from classify_app import __version__
from classify_app.application import app
from classify_app.records import ad_event_schema
from classify_app.settings import Settings
from classify_app.vocabulary import (
    HTTP_STATUS_REASON,
    IMAGE_STATUSES,
    ApiError,
    EventReason,
    ImageReason,
    Status,
)
from classify_app.web.api import MAX_LIST_LIMIT
from tables.similarity import MAX_K


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


K_PARAMETER = {
    "name": "k",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K},
}
EMBEDDINGS_PARAMETER = {
    "name": "embeddings",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "enum": ["true", "false"]},
    "description": "`true`: include embedding vectors (left out by default: 2.5 KB a photo).",
}
NULLABLE_STRING = {"type": ["string", "null"]}
NULLABLE_NUMBER = {"type": ["number", "null"]}
SCORES = {"type": "object", "additionalProperties": {"type": "number"}}
STATUS = {"type": "string", "enum": [str(status) for status in Status]}
IMAGE_REASON = {
    "anyOf": [
        {"type": "string", "enum": [str(reason) for reason in ImageReason]},
        {"type": "string", "pattern": f"^{HTTP_STATUS_REASON.pattern}$"},
    ],
    "description": "Why the image has no prediction (docs/schemas.md lists every code).",
}
ERROR_CODE = {
    "type": "string",
    "enum": sorted({str(code) for code in (*ApiError, *EventReason)}),
    "description": "A stable reason code (docs/schemas.md lists every code).",
}


def _schemas(settings: Settings) -> dict[str, Any]:
    return {
        "AdEvent": {
            key: value
            for key, value in ad_event_schema(
                max_images=settings.max_images_per_ad, strict=settings.strict_events
            ).items()
            if not key.startswith("$")
        },
        "Acceptance": {
            "type": "object",
            "required": ["ad_id", "request_id", "status", "result_url"],
            "properties": {
                "ad_id": {"type": "string"},
                "request_id": {"type": "string"},
                "status": {"const": "accepted"},
                "result_url": {"type": "string"},
            },
        },
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": ERROR_CODE,
                "message": {"type": "string"},
            },
        },
        "Label": {
            "type": "object",
            "required": ["name", "score"],
            "properties": {"name": {"type": "string"}, "score": {"type": "number"}},
        },
        "ImageError": {
            "type": "object",
            "required": ["reason", "message"],
            "properties": {
                "reason": IMAGE_REASON,
                "message": {"type": "string"},
            },
        },
        "ImageResult": {
            "type": "object",
            "required": ["index", "url", "status"],
            "properties": {
                "index": {"type": "integer"},
                "url": {"type": "string"},
                "status": {"type": "string", "enum": [str(status) for status in IMAGE_STATUSES]},
                "labels": {"type": "array", "items": _ref("Label")},
                "category": NULLABLE_STRING,
                "category_scores": SCORES,
                "error": {"oneOf": [_ref("ImageError"), {"type": "null"}]},
                "timings": SCORES,
                "outputs": {
                    "type": "object",
                    "additionalProperties": _ref("TaskOutput"),
                    "description": "Each model task's output under its name (docs/tasks.md).",
                },
            },
        },
        "TaskOutput": {
            "type": "object",
            "required": ["task", "version"],
            "properties": {
                "task": {"type": "string"},
                "version": {"type": "string"},
                "error": _ref("ImageError"),
                "flags": {"type": "array", "items": {"type": "string"}},
            },
            "additionalProperties": True,
            "description": "The task's own values (`category`, `nsfw_score`, `vector`...), "
            "or `error` when it failed on this image.",
        },
        "AdResult": {
            "type": "object",
            "required": [
                "ad_id",
                "request_id",
                "catalog_name",
                "catalog_ad_id",
                "status",
                "image_count",
                "images",
            ],
            "properties": {
                "ad_id": {"type": "string"},
                "request_id": {"type": "string"},
                "catalog_name": {"type": "string"},
                "catalog_ad_id": {"type": "string"},
                "status": STATUS,
                "image_count": {"type": "integer"},
                "images": {"type": "array", "items": _ref("ImageResult")},
                "category": NULLABLE_STRING,
                "category_scores": SCORES,
                "model": NULLABLE_STRING,
                "model_version": NULLABLE_STRING,
                "version": {"type": "number"},
                "submitted_at": {"type": "number"},
                "accepted_at": {"type": "number"},
                "completed_at": NULLABLE_NUMBER,
                "latency_seconds": NULLABLE_NUMBER,
                "flags": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "What the model tasks flagged on any image, e.g. nsfw.",
                },
                "duplicates": {
                    "type": "array",
                    "items": _ref("Neighbour"),
                    "description": "Images of earlier ads its images nearly repeat "
                    "(CLASSIFY_SIMILARITY).",
                },
            },
        },
        "Neighbour": {
            "type": "object",
            "required": ["ad_id", "image_index", "matched_image_index", "score"],
            "properties": {
                "ad_id": {"type": "string", "description": "The other ad."},
                "image_index": {"type": "integer", "description": "This ad's image."},
                "matched_image_index": {"type": "integer", "description": "The other's."},
                "score": {"type": "number", "description": "Cosine similarity."},
            },
        },
        "Similar": {
            "type": "object",
            "required": ["similar"],
            "properties": {
                "ad_id": {"type": "string"},
                "image": {"type": ["integer", "null"]},
                "url": {"type": "string"},
                "similar": {"type": "array", "items": _ref("Neighbour")},
            },
        },
        "SavedIndex": {
            "type": "object",
            "required": ["save", "files"],
            "properties": {
                "save": {"type": "string", "description": "The save's name."},
                "files": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "bytes"],
                        "properties": {
                            "name": {"type": "string"},
                            "bytes": {"type": "integer", "minimum": 0},
                        },
                    },
                },
            },
        },
        "ResultList": {
            "type": "object",
            "required": ["results"],
            "properties": {"results": {"type": "array", "items": _ref("AdResult")}},
        },
        "Check": {
            "type": "object",
            "required": ["ok", "detail"],
            "properties": {"ok": {"type": "boolean"}, "detail": {"type": "string"}},
        },
        "Readiness": {
            "type": "object",
            "required": ["ready", "status", "checks"],
            "properties": {
                "ready": {"type": "boolean"},
                "status": {"type": "string", "enum": ["ready", "degraded", "not_ready"]},
                "checks": {"type": "object", "additionalProperties": _ref("Check")},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "time"],
            "properties": {"status": {"const": "ok"}, "time": {"type": "number"}},
        },
    }


RESULT_PARAMETER = {
    "name": "ad_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
}


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The whole OpenAPI document, for a worker with these settings."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "classify-app",
            "version": __version__,
            "description": "Submit classified ads; read the classification of their photos. "
            "Submitting is decoupled from predicting: poll the result URL.",
        },
        "components": {
            "schemas": _schemas(settings),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/classify": {
                "post": {
                    "summary": "Submit an ad for classification",
                    "security": [{}, {"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("AdEvent")}},
                    },
                    "responses": {
                        "202": _json(_ref("Acceptance"), "Accepted: poll result_url."),
                        "400": _error("Invalid event (reason code in `error`)."),
                        "401": _error("CLASSIFY_API_TOKEN is set and the token is missing."),
                        "413": _error(
                            f"The body is over {settings.max_event_bytes} bytes "
                            "(CLASSIFY_MAX_EVENT_BYTES)."
                        ),
                    },
                }
            },
            "/classify/results/{ad_id}": {
                "get": {
                    "summary": "An ad's result (pending while in flight)",
                    "parameters": [RESULT_PARAMETER, EMBEDDINGS_PARAMETER],
                    "responses": {
                        "200": _json(_ref("AdResult"), "The result."),
                        "404": _error("Unknown ad."),
                        "503": _error("The partition owner is gone (rebalancing): retry."),
                    },
                }
            },
            "/classify/results": {
                "get": {
                    "summary": "Stored results, by catalog key or by category (MongoDB)",
                    "parameters": [
                        {"name": name, "in": "query", "required": False, "schema": schema}
                        for name, schema in (
                            ("catalog", {"type": "string"}),
                            ("catalog_ad_id", {"type": "string"}),
                            ("category", {"type": "string"}),
                            ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT}),
                        )
                    ]
                    + [EMBEDDINGS_PARAMETER],
                    "responses": {
                        "200": _json(
                            {"oneOf": [_ref("AdResult"), _ref("ResultList")]},
                            "One result (by catalog key) or a list (by category).",
                        ),
                        "400": _error("Neither query form."),
                        "404": _error("No such catalog ad."),
                        "501": _error("A table-only deployment (no MongoDB)."),
                        "503": _error("MongoDB did not answer."),
                    },
                }
            },
            "/classify/similar/{ad_id}": {
                "get": {
                    "summary": "The other ads most similar to an ad's images (any worker)",
                    "parameters": [
                        RESULT_PARAMETER,
                        K_PARAMETER,
                        {
                            "name": "image",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 0},
                        },
                    ],
                    "responses": {
                        "200": _json(_ref("Similar"), "Best first."),
                        "400": _error("k or image is not valid."),
                        "404": _error("The ad has no indexed image."),
                        "501": _error("CLASSIFY_SIMILARITY is false."),
                        "503": _error("The index is being rebuilt: retry."),
                    },
                }
            },
            "/classify/similar": {
                "get": {
                    "summary": "The ads most similar to a photo given by URL",
                    "parameters": [
                        {
                            "name": "url",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        K_PARAMETER,
                    ],
                    "responses": {
                        "200": _json(_ref("Similar"), "Best first."),
                        "400": _error("No url, or k is not valid."),
                        "422": _error("The photo could not be used (its image reason)."),
                        "501": _error("CLASSIFY_SIMILARITY is false."),
                        "503": _error("The index is being rebuilt, or the model is not ready."),
                    },
                }
            },
            "/classify/similarity/save": {
                "get": {
                    "summary": "The worker's newest saved similarity index (for another worker "
                    "to copy at its start)",
                    "responses": {
                        "200": _json(_ref("SavedIndex"), "The save's name and files."),
                        "404": _error("This worker has no saved index."),
                        "501": _error("CLASSIFY_SIMILARITY is false."),
                    },
                }
            },
            "/classify/similarity/save/{save}/{file}": {
                "get": {
                    "summary": "One file of the worker's newest saved similarity index",
                    "parameters": [
                        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                        for name in ("save", "file")
                    ],
                    "responses": {
                        "200": {
                            "description": "The file's bytes.",
                            "content": {
                                "application/octet-stream": {
                                    "schema": {"type": "string", "format": "binary"}
                                }
                            },
                        },
                        "404": _error("No such file of the newest save (a newer one replaced it)."),
                        "501": _error("CLASSIFY_SIMILARITY is false."),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "responses": {"200": _json(_ref("Health"), "The process runs.")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness, with the reason when not ready",
                    "responses": {
                        "200": _json(_ref("Readiness"), "Ready (or degraded)."),
                        "503": _json(_ref("Readiness"), "Not ready: see the failing check."),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document.")},
                }
            },
        },
    }


@app.page("/openapi.json")
class OpenAPIView(web.View):
    """`GET /openapi.json`: the OpenAPI 3.1 description of this API."""

    async def get(self, request: web.Request) -> web.Response:
        """The document for this worker's settings."""
        return self.json(openapi_document(app.settings))


@app.page("/schemas/ad-event.json")
class AdEventSchemaView(web.View):
    """`GET /schemas/ad-event.json`: the JSON Schema of the ad event this worker takes."""

    async def get(self, request: web.Request) -> web.Response:
        """`records.ad_event_schema` for this worker's settings."""
        return self.json(
            ad_event_schema(
                max_images=app.settings.max_images_per_ad, strict=app.settings.strict_events
            )
        )
