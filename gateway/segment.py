"""Segment's tracking API (which RudderStack's SDKs speak too): its messages as our raw records.

`FIELDS` and `EVENTS` are the mapping; the conversion reads them and the README's "Coming from
Segment or RudderStack" table is rendered from them (tests/test_docs.py). Every key the mapping
does not move into a column is kept, under `properties["$segment"]`, except the key itself
(`writeKey`) and the IP and User-Agent, which are enriched, not stored.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError

from gateway.auth import SEGMENT_ROUTES
from gateway.models import TrackEvent, iso8601_millis
from gateway.validate import MAX_DETAILS, InvalidBody, Validator
from ingest.records import Context, RawEvent

META_KEY = "$segment"
SINGLE_ROUTES = SEGMENT_ROUTES  # Segment-only routes; /v1/track and /v1/identify sniff the body

# Segment message field -> our field, with what it means where it is not a plain copy.
FIELDS: tuple[tuple[str, str, str], ...] = (
    ("messageId", "event_id", "a retried message keeps its id, so it counts once"),
    ("anonymousId", "anonymous_id", ""),
    ("userId", "user_id", ""),
    ("event", "event", "track only; other types: see the event names below"),
    ("properties", "properties", ""),
    ("name", "properties.name", "page and screen"),
    ("category", "properties.category", "page and screen"),
    ("traits", "traits", "identify: the row's properties; group: `properties.traits`"),
    ("groupId", "properties.group_id", "group"),
    ("previousId", "anonymous_id", "alias: linked to `userId` as an identify links them"),
    ("context.page.url", "url", ""),
    ("context.page.path", "path", ""),
    ("context.page.referrer", "referrer", ""),
    ("context.campaign", "source, medium, campaign", "as utm_* when the URL has none"),
    ("context.ip", "ip", "`sk_` keys only, like our forwarded `ip`; never stored"),
    ("context.userAgent", "user_agent", "`sk_` keys only, like our forwarded `user_agent`"),
    ("timestamp", "timestamp", "+ (receivedAt - sentAt) when the batch or message has sentAt"),
    ("every other key", f"properties.{META_KEY}", "rest of context, integrations, timestamp"),
)
# What a message of each type needs besides an object (/openapi.json states it too).
REQUIRED: dict[str, tuple[str, ...]] = {"group": ("groupId",), "alias": ("previousId", "userId")}
SAFE_INTEGER = 2**53 - 1  # JavaScript's Number.MAX_SAFE_INTEGER
# Segment `type` -> our event name (track keeps its own `event`).
EVENTS: dict[str, str] = {
    "page": "$pageview",
    "screen": "$screen",
    "identify": "$identify",
    "group": "$group",
    "alias": "$alias",
}
_OURS = {ours: theirs for theirs, ours, _ in FIELDS if "." not in ours}
# Top-level keys the mapping consumes; `writeKey` is a credential and is never stored.
_MOVED = frozenset({"type", "messageId", "anonymousId", "userId", "event", "properties"})
_MOVED |= {"name", "category", "traits", "groupId", "previousId", "writeKey", "sentAt", "context"}
_CAMPAIGN = (("source", "utm_source"), ("medium", "utm_medium"), ("name", "utm_campaign"))


def markdown_table() -> str:
    """The mapping as the README shows it."""
    rows = ["| Segment | Millimetric | Note |", "|---|---|---|"]
    rows += [f"| `{theirs}` | `{ours}` | {note} |" for theirs, ours, note in FIELDS]
    rows += [f"| `type: {kind}` | event `{name}` | |" for kind, name in EVENTS.items()]
    return "\n".join(rows)


def is_segment_batch(body: bytes) -> dict[str, Any] | None:
    """The parsed body when it is Segment's `{"batch": [...]}`, else None (ours or not JSON)."""
    if b'"batch"' not in body:  # cheap: our own batches never reach the JSON parse here
        return None
    return _object(body, lambda o: "batch" in o and "events" not in o)


def is_segment_message(body: bytes) -> dict[str, Any] | None:
    """The parsed body when it is a Segment message (camelCase ids at the top), else None."""
    if b'Id"' not in body:
        return None
    return _object(body, lambda o: bool(o.keys() & {"userId", "anonymousId", "messageId"}))


def _object(body: bytes, test: Any) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # our parser answers with its own invalid_json
    return parsed if isinstance(parsed, dict) and test(parsed) else None


def parse_single(body: bytes) -> dict[str, Any]:
    """A Segment-only route's body as an object, or invalid_json / invalid_payload."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidBody("invalid_json", [{"field": "(body)", "message": str(error)}]) from None
    if not isinstance(parsed, dict):
        raise InvalidBody("invalid_payload", [{"field": "(body)", "message": "not an object"}])
    return parsed


def _id(value: Any) -> Any:
    # Segment's SDKs accept numeric ids and send them as numbers; JSON's 7.0 is the integer 7,
    # up to where a float is one integer only (past it, two ids would share a float: refused).
    if isinstance(value, float) and value.is_integer() and abs(value) <= SAFE_INTEGER:
        return str(int(value))
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class _Refused(Exception):
    """One message's problem, as an invalid_payload detail."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.detail = {"field": field, "message": message}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


OBJECTS = ("properties", "traits", "context", "integrations", "context.page", "context.campaign")


def _check_objects(message: dict[str, Any]) -> None:
    """Refuse a message whose object fields are something else (they would be lost)."""
    for path in OBJECTS:
        value: Any = message
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None and not isinstance(value, dict):
            raise _Refused(path, f"{path} must be an object")


def _time(value: Any, field: str) -> int | None:
    try:
        return iso8601_millis(value)
    except ValueError as error:
        raise _Refused(field, str(error)) from None


def _meta(message: dict[str, Any], context: dict[str, Any], sent_at: Any) -> dict[str, Any]:
    """Everything the columns do not hold: what `properties["$segment"]` keeps."""
    kept = {k: v for k, v in message.items() if k not in _MOVED}
    rest = {k: v for k, v in context.items() if k not in ("ip", "userAgent")}
    page = {k: v for k, v in _dict(context.get("page")).items()}
    for k in ("url", "path", "referrer"):
        page.pop(k, None)
    if page:
        rest["page"] = page
    else:
        rest.pop("page", None)
    if rest:
        kept["context"] = rest
    if sent_at is not None:
        kept["sentAt"] = sent_at
    return kept


def _event(
    message: dict[str, Any], kind: str, defaults: dict[str, Any], now: int
) -> tuple[TrackEvent, str, dict[str, Any] | None]:
    """One message -> (our event, record type, campaign utm values); raises _Refused."""
    _check_objects(defaults)
    _check_objects(message)
    context = {**_dict(defaults.get("context")), **_dict(message.get("context"))}
    message = {**{k: v for k, v in defaults.items() if k != "context"}, **message}
    page = _dict(context.get("page"))
    sent_at = message.get("sentAt")
    properties = dict(_dict(message.get("properties")))
    record_type = "track"
    if kind == "track":
        name = message.get("event")
    elif kind in EVENTS:
        name = EVENTS[kind]
    else:
        raise _Refused("type", f"unknown type {kind!r}; one of track, {', '.join(EVENTS)}")
    for field in REQUIRED.get(kind, ()):
        if not _id(message.get(field)):
            raise _Refused(field, f"{kind} needs {' and '.join(REQUIRED[kind])}")
    anonymous_id, user_id = _id(message.get("anonymousId")), _id(message.get("userId"))
    if kind in ("page", "screen"):
        for key in ("name", "category"):
            if message.get(key) is not None:
                properties[key] = message[key]
    elif kind == "identify":
        properties = dict(_dict(message.get("traits")))
        record_type = "identify" if anonymous_id and user_id else "track"
    elif kind == "group":
        properties = {"group_id": _id(message.get("groupId")), "traits": message.get("traits")}
    elif kind == "alias":
        anonymous_id, record_type = _id(message.get("previousId")), "identify"
    if meta := _meta(message, context, sent_at):
        properties[META_KEY] = meta
    ours = {
        "event": name,
        "event_id": _id(message.get("messageId")),
        "anonymous_id": anonymous_id,
        "user_id": user_id,
        "url": _str(page.get("url")),
        "path": _str(page.get("path")),
        "referrer": _str(page.get("referrer")),
        "properties": properties,
        "ip": _str(context.get("ip")),
        "user_agent": _str(context.get("userAgent")),
    }
    try:
        event = TrackEvent.model_validate(ours)
    except ValidationError as error:
        first = error.errors(include_url=False, include_input=False)[0]
        field = str(first["loc"][0]) if first["loc"] else "(body)"
        raise _Refused(_OURS.get(field, field), first["msg"]) from None
    timestamp = _time(message.get("timestamp"), "timestamp")
    sent = _time(sent_at, "sentAt")
    # Segment's clock-skew correction: the device's clock is off by as much as sentAt is.
    if timestamp is not None and sent is not None:
        timestamp += now - sent
    event.timestamp = timestamp
    campaign = _dict(context.get("campaign"))
    utm = {ours: v for theirs, ours in _CAMPAIGN if isinstance(v := campaign.get(theirs), str)}
    return event, record_type, utm or None


def records(
    validator: Validator,
    messages: list[Any],
    defaults: dict[str, Any],
    route: str | None,
    project: str,
    ctx: Context,
    now: int,
    trusted: bool,
) -> tuple[list[RawEvent], list[dict[str, Any]]]:
    """Segment messages -> (raw records, details of the messages refused); `route` gives the
    type of a single message. Not all or nothing: Segment's SDKs drop a refused batch whole, so
    the good messages are kept; when none is, InvalidBody.

    `defaults` are the batch's own keys (context, integrations, sentAt) under each message's."""
    if not messages:
        raise InvalidBody("invalid_payload", [{"field": "batch", "message": "empty batch"}])
    if len(messages) > validator.batch_max_events:
        limit = f"{len(messages)} messages; at most {validator.batch_max_events} per call"
        raise InvalidBody("payload_too_large", [{"field": "batch", "message": limit}])
    out: list[RawEvent] = []
    problems: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        index = {} if route else {"index": i}
        try:
            if not isinstance(message, dict):
                raise _Refused("(message)", "not an object")
            event, record_type, utm = _event(
                message, route or str(message.get("type")), defaults, now
            )
            [record] = validator.accept([event], project, ctx, now, trusted, indexed=False)
        except _Refused as refused:
            problems.append(index | refused.detail)
            continue
        except InvalidBody as error:  # the limits on properties and timestamp
            problems.extend(index | detail for detail in error.details)
            continue
        if record_type == "identify":
            record["type"] = "identify"
            record["traits"] = record["properties"]
            record["properties"] = {}
        if utm:
            record["campaign"] = utm
        out.append(record)
    if not out:
        raise InvalidBody("invalid_payload", problems[:MAX_DETAILS])
    return out, problems[:MAX_DETAILS]
