"""Validation: request bodies -> wire records, or the error details a client can act on.

Pydantic parses the JSON bytes directly into the models of `models.py` (one pass in
pydantic-core); what a model cannot say (sizes of free-form JSON, 64-bit integers) is checked
here.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from gateway.models import BatchBody, ForgetBody, IdentifyBody, TrackBody, TrackEvent
from ingest.records import RAW_SCHEMA_VERSION, Context, ForgetRequest, RawEvent

M = TypeVar("M", bound=BaseModel)


class InvalidBody(Exception):
    """A body that cannot be accepted; `code` is a row of the error table."""

    def __init__(self, code: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.details = details or []


MAX_DETAILS = 100  # a 1 MiB batch of bad events must not produce a 10 MiB answer


def _details(error: ValidationError, indexed: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for e in error.errors(include_url=False, include_input=False)[:MAX_DETAILS]:
        loc = list(e["loc"])
        entry: dict[str, Any] = {}
        if indexed and len(loc) >= 2 and loc[0] == "events" and isinstance(loc[1], int):
            entry["index"] = loc[1]
            loc = loc[2:]
        entry["field"] = ".".join(str(p) for p in loc) or "(body)"
        entry["message"] = e["msg"]
        out.append(entry)
    return out


def _parse(model: type[M], body: bytes, indexed: bool = False) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        invalid = [e for e in error.errors(include_url=False) if e["type"] == "json_invalid"]
        if invalid:
            raise InvalidBody(
                "invalid_json", [{"field": "(body)", "message": invalid[0]["msg"]}]
            ) from None
        raise InvalidBody("invalid_payload", _details(error, indexed)) from None


def new_id() -> str:
    """A random UUID v4 as 32 hex digits: `uuid.uuid4().hex` without building a UUID object."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()


INT64 = (-(2**63), 2**64 - 1)  # what orjson (and ClickHouse's JSON functions) can represent


def _json_problem(value: dict[str, Any], max_bytes: int) -> str | None:
    """Why a free-form JSON object cannot be stored as is, or None when it can."""
    stack: list[Any] = [value]
    while stack:  # the parser already bounded the depth; this walk is iterative anyway
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            return "numbers must be finite (no NaN or Infinity)"
        elif isinstance(item, int) and not INT64[0] <= item <= INT64[1]:
            return "integers must fit in 64 bits"
    size = len(orjson.dumps(value)) if value else 2
    if size > max_bytes:
        return f"is {size} bytes as compact JSON; at most {max_bytes}"
    return None


def _iso(millis: int) -> str:
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="milliseconds")


def _refuse(problems: list[dict[str, Any] | None]) -> None:
    """Raise `invalid_payload` with the problems found, if any."""
    if found := [p for p in problems if p]:
        raise InvalidBody("invalid_payload", found[:MAX_DETAILS])


class Validator:
    """Turns request bodies into raw records, enforcing the configured limits."""

    def __init__(
        self,
        properties_max_bytes: int,
        batch_max_events: int,
        timestamp_max_age_days: int,
        timestamp_max_future_s: int,
    ) -> None:
        self.properties_max_bytes = properties_max_bytes
        self.batch_max_events = batch_max_events
        self.timestamp_max_age_days = timestamp_max_age_days
        self.timestamp_max_future_s = timestamp_max_future_s

    def _record(
        self, e: TrackEvent, project: str, ctx: Context, now: int, trusted: bool
    ) -> RawEvent:
        if trusted and (e.ip or e.user_agent):
            ctx = {**ctx}
            if e.ip:
                ctx["ip"] = e.ip
            if e.user_agent:
                ctx["user_agent"] = e.user_agent
        return {
            "v": RAW_SCHEMA_VERSION,
            "type": "track",
            "project": project,
            "event_id": e.event_id or new_id(),
            "event": e.event,
            "timestamp": e.timestamp if e.timestamp is not None else now,
            "received_at": now,
            "anonymous_id": e.anonymous_id,
            "user_id": e.user_id,
            "session_id": e.session_id,
            "url": e.url,
            "path": e.path,
            "referrer": e.referrer,
            "properties": e.properties,
            "context": ctx,
        }

    def _check_size(
        self, value: dict[str, Any], field: str, index: int | None
    ) -> dict[str, Any] | None:
        problem = _json_problem(value, self.properties_max_bytes)
        if problem is None:
            return None
        detail: dict[str, Any] = {} if index is None else {"index": index}
        return detail | {"field": field, "message": f"{field}: {problem}"}

    def _check_time(self, millis: int | None, now: int, index: int | None) -> dict[str, Any] | None:
        """A detail when a client's timestamp is outside the window around the server's clock."""
        if millis is None:
            return None
        if millis < now - self.timestamp_max_age_days * 86_400_000:
            problem = f"is more than {self.timestamp_max_age_days} days in the past"
        elif millis > now + self.timestamp_max_future_s * 1000:
            problem = f"is more than {self.timestamp_max_future_s} seconds in the future"
        else:
            return None
        detail: dict[str, Any] = {} if index is None else {"index": index}
        return detail | {
            "field": "timestamp",
            "message": f"timestamp {_iso(millis)} {problem} (server time {_iso(now)})",
        }

    def track(self, body: bytes, project: str, ctx: Context, now: int, trusted: bool) -> RawEvent:
        """Validate a /v1/track body."""
        event = _parse(TrackBody, body)
        _refuse(
            [
                self._check_size(event.properties, "properties", None),
                self._check_time(event.timestamp, now, None),
            ]
        )
        return self._record(event, project, ctx, now, trusted)

    def batch(
        self, body: bytes, project: str, ctx: Context, now: int, trusted: bool
    ) -> list[RawEvent]:
        """Validate a /v1/batch body: all events or none."""
        batch = _parse(BatchBody, body, indexed=True)
        return self.accept(batch.events, project, ctx, now, trusted, indexed=True)

    def accept(
        self,
        events: list[TrackEvent],
        project: str,
        ctx: Context,
        now: int,
        trusted: bool,
        indexed: bool,
    ) -> list[RawEvent]:
        """Parsed events -> raw records, all or none: the batch, size and time limits."""
        if not events:
            raise InvalidBody("invalid_payload", [{"field": "events", "message": "empty batch"}])
        if len(events) > self.batch_max_events:
            raise InvalidBody(
                "payload_too_large",
                [
                    {
                        "field": "events",
                        "message": f"{len(events)} events; "
                        f"at most {self.batch_max_events} per call",
                    }
                ],
            )
        _refuse(
            [
                p
                for i, e in enumerate(events)
                for p in (
                    self._check_size(e.properties, "properties", i if indexed else None),
                    self._check_time(e.timestamp, now, i if indexed else None),
                )
            ]
        )
        return [self._record(e, project, ctx, now, trusted) for e in events]

    def identify(
        self, body: bytes, project: str, ctx: Context, now: int, trusted: bool
    ) -> RawEvent:
        """Validate a /v1/identify body into an `$identify` event."""
        ident = _parse(IdentifyBody, body)
        _refuse(
            [
                self._check_size(ident.traits, "traits", None),
                self._check_time(ident.timestamp, now, None),
            ]
        )
        event = TrackEvent(
            event="$identify",
            anonymous_id=ident.anonymous_id,
            user_id=ident.user_id,
            ip=ident.ip,
            user_agent=ident.user_agent,
        )
        record = self._record(event, project, ctx, now, trusted)
        record["type"] = "identify"
        record["timestamp"] = ident.timestamp if ident.timestamp is not None else now
        record["traits"] = ident.traits
        return record

    def forget(self, body: bytes, project: str, now: int) -> ForgetRequest:
        """Validate a /v1/forget body."""
        forget = _parse(ForgetBody, body)
        if forget.user_id is None and forget.anonymous_id is None:
            raise InvalidBody(
                "invalid_payload",
                [{"field": "user_id", "message": "send user_id, anonymous_id, or both"}],
            )
        return {
            "v": 1,
            "forget_id": f"fgt_{new_id()}",
            "project": project,
            "user_id": forget.user_id,
            "anonymous_id": forget.anonymous_id,
            "suppress": forget.suppress,
            "received_at": now,
        }
