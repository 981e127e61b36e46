"""Responses: every error body comes from the error table in `ingest.errors`.

The models below describe the bodies the gateway answers with; /openapi.json is generated from
them and the tests validate real answers against them. The hot path serializes plain dicts.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response
from starlette.types import Send

from ingest.errors import ERROR_CODES
from ingest.metrics import REJECTED


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TrackAccepted(_Strict):
    """202 of /v1/track and /v1/identify."""

    ok: Literal[True]
    event_id: str = Field(description="The sent event_id, or the one the server generated.")


class BatchAccepted(_Strict):
    """202 of /v1/batch: every event_id, in the order the events were sent."""

    ok: Literal[True]
    event_ids: list[str]
    rejected: list[ErrorDetail] | None = Field(
        None,
        description="Segment batches only (200): the messages refused, the others accepted.",
    )


class ForgetAccepted(_Strict):
    """202 of /v1/forget."""

    ok: Literal[True]
    forget_id: str


class ForgetStatus(_Strict):
    """GET /v1/forget/{forget_id}: `pending` until a sink carried it out, then `done`. A forget
    a sink is retrying is `pending` with the `reason` of its last failure and its `attempts`."""

    ok: Literal[True]
    forget_id: str
    status: Literal["pending", "done"]
    reason: str | None = None
    attempts: int | None = None
    anonymous_ids: int | None = None
    events_deleted: int | None = None
    sessions_deleted: int | None = None
    identities_deleted: int | None = None
    duration_ms: int | None = None


class StatsBucket(_Strict):
    """One bucket of /v1/stats: distinct events, visitors (anonymous_ids) and users."""

    start: str = Field(description="The bucket's start, ISO 8601 with its UTC offset.")
    events: int
    visitors: int
    users: int


class StatsAnswer(_Strict):
    """GET /v1/stats: buckets in time order; a bucket without events is left out."""

    ok: Literal[True]
    buckets: list[StatsBucket]


class SourcesAnswer(_Strict):
    """GET /v1/sources: one row per entry source (the `group_by` value names its key), most
    sessions first."""

    ok: Literal[True]
    rows: list[dict[str, str | int | float]] = Field(
        description="`{<group_by>: str, sessions, visitors, conversions, conversion_rate}`."
    )


class EventsAnswer(_Strict):
    """GET /v1/events: a page of rows in (timestamp, event_id) order."""

    ok: Literal[True]
    events: list[dict[str, Any]]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: last.")


class ErrorDetail(_Strict):
    """One thing wrong with the body; `index` is the event's position on /v1/batch."""

    index: int | None = Field(None, ge=0)
    field: str
    message: str


class ErrorBody(_Strict):
    """Every 4xx/5xx answer."""

    ok: Literal[False]
    error: Literal[tuple(ERROR_CODES)]  # type: ignore[valid-type]
    message: str
    details: list[ErrorDetail] | None = None


class Health(_Strict):
    """GET /health: the process is up."""

    ok: bool


class Ready(_Strict):
    """GET /ready: the broker answers and the keys topic has been read (503 otherwise)."""

    ok: bool
    broker: bool
    keys_loaded: bool


def json_response(
    payload: dict[str, Any], status: int = 202, headers: dict[str, str] | None = None
) -> Response:
    """A JSON response serialized with orjson."""
    return Response(orjson.dumps(payload), status, headers, media_type="application/json")


async def send_json(
    send: Send, status: int, payload: dict[str, Any], headers: dict[str, str]
) -> None:
    """Send a JSON answer straight to the ASGI server (the hot path's 202, no Response object)."""
    body = orjson.dumps(payload)
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def error_response(code: str, headers: dict[str, str] | None = None, **extra: Any) -> Response:
    """`{"ok": false, "error": code, "message": ..., **extra}` with the table's status."""
    entry = ERROR_CODES[code]
    REJECTED.labels(code).inc()
    body = {"ok": False, "error": code, "message": entry.message, **extra}
    return json_response(body, entry.status, headers)
