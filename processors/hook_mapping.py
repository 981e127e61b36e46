"""Webhook deliveries -> track events: the mapping runs here, after the delivery is durable.

A mapping (the provider's default from `gateway/webhook_schemes.toml`, overridden key by key by
the hook's mapping file) names where each field comes from, as `header.<name>` or `body.<path>`:

    event_prefix = "billing"                 # event = prefix "." the parts found, joined by "."
    event = ["body.type"]
    timestamp = "body.created"               # epoch s or ms, or ISO 8601; absent: received_at
    user_id = "body.data.object.customer"
    anonymous_id = "body.data.object.metadata.visitor"
    properties = "body"                      # one source (an object), or a table name -> source

A delivery whose event name cannot be made raises Unmappable: the processor dead-letters it with
the reason. Properties over the size limit are trimmed by `trim_properties`.
"""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ingest.hook_sources import lookup
from ingest.records import RAW_SCHEMA_VERSION, RawEvent, WebhookDelivery

MAPPING_KEYS = ("event_prefix", "event", "timestamp", "user_id", "anonymous_id", "properties")
MAX_EVENT = 128  # the longest event name /v1/track accepts
MAX_ID = 128
SECONDS_BELOW = 100_000_000_000  # epoch values under this are seconds (year 5138 in seconds)


class Unmappable(Exception):
    """A delivery the mapping cannot turn into an event; the message is the reason."""


def check_mapping(mapping: dict[str, Any]) -> dict[str, Any]:
    """Return a mapping file's table if every key and source is one the mapper reads."""
    unknown = set(mapping) - set(MAPPING_KEYS)
    if unknown:
        raise ValueError(f"unknown mapping keys {sorted(unknown)}; known: {list(MAPPING_KEYS)}")
    sources: list[Any] = [mapping.get(k) for k in ("timestamp", "user_id", "anonymous_id")]
    event = mapping.get("event", [])
    if not isinstance(event, list):
        raise ValueError('event is a list of sources, e.g. ["body.type"]')
    sources += event
    properties = mapping.get("properties")
    sources += list(properties.values()) if isinstance(properties, dict) else [properties]
    for source in sources:
        if source is not None and (
            not isinstance(source, str) or not source.startswith(("header.", "body"))
        ):
            raise ValueError(f"a source is header.<name> or body.<path>, not {source!r}")
    if not isinstance(mapping.get("event_prefix", ""), str):
        raise ValueError("event_prefix is a string")
    return mapping


def load_mapping_file(path: Path) -> dict[str, Any]:
    """Read and check a TOML mapping file."""
    with path.open("rb") as f:
        return check_mapping(tomllib.load(f))


def _millis(value: Any, fallback: int) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return int(value * 1000) if value < SECONDS_BELOW else int(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return fallback
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        return int(parsed.timestamp() * 1000)
    return fallback


def _id(value: Any) -> str | None:
    if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
        return str(value)[:MAX_ID]
    return None


def trim_properties(properties: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """At most `max_bytes` of compact JSON: top-level keys are kept in the payload's order while
    they fit, each that does not is dropped (a later, smaller one may still fit), and `$dropped`
    lists the dropped keys' names."""
    if len(orjson.dumps(properties)) <= max_bytes:
        return properties
    names = list(properties)
    budget = max_bytes - len(orjson.dumps({"$dropped": names}))
    if budget <= 2:
        return {"$dropped": len(names)}
    kept: dict[str, Any] = {}
    size = 2  # "{}"
    for name, value in properties.items():
        entry = len(orjson.dumps({name: value})) - 1  # the entry and its comma
        if size + entry <= budget:
            kept[name] = value
            size += entry
    return {**kept, "$dropped": [n for n in names if n not in kept]}


def map_delivery(delivery: WebhookDelivery, properties_max_bytes: int) -> RawEvent:
    """The track event a verified delivery stands for."""
    mapping, headers = delivery["mapping"], delivery["headers"]
    body = orjson.loads(delivery["body"])
    parts = [_id(lookup(source, headers, body)) for source in mapping.get("event", [])]
    found = [p for p in parts if p]
    if not found:
        raise Unmappable(f"no event name: none of {mapping.get('event')} in the delivery")
    event = ".".join([p for p in (mapping.get("event_prefix"), *found) if p])[:MAX_EVENT]
    properties_source = mapping.get("properties", "body")
    if isinstance(properties_source, dict):
        properties = {k: lookup(s, headers, body) for k, s in properties_source.items()}
    else:
        value = lookup(properties_source, headers, body)
        properties = value if isinstance(value, dict) else {} if value is None else {"value": value}

    def field(name: str) -> Any:
        source = mapping.get(name)
        return lookup(source, headers, body) if source else None

    received = delivery["received_at"]
    return {
        "v": RAW_SCHEMA_VERSION,
        "type": "track",
        "project": delivery["project"],
        "event_id": delivery["event_id"],
        "event": event,
        "timestamp": _millis(field("timestamp"), received),
        "received_at": received,
        "anonymous_id": _id(field("anonymous_id")),
        "user_id": _id(field("user_id")),
        "session_id": None,
        "url": None,
        "path": None,
        "referrer": None,
        "properties": trim_properties(properties, properties_max_bytes),
        "context": {},
    }
