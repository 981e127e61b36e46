"""What every destination is: it builds one HTTP request from a batch of enriched events and reads
the provider's answer into what it accepted, the events it refused (with its message) and whether
to try again later. The runner (sinks/destinations/runner.py) does everything else.
"""

from __future__ import annotations

import email.utils
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
import orjson

from ingest.records import EnrichedEvent, Erasure
from sinks.batch import EVENT_FIELDS

# Our event ids become UUIDs in this namespace: the same event always gets the same insert id, so
# the providers' own deduplication drops what a retry or a replay sends again.
INSERT_ID_NAMESPACE = uuid.UUID("6f1c7a52-8d2e-4b7e-9a55-0c3d1f6e2b90")
RETRYABLE_STATUSES = frozenset({408, 425, 429}) | frozenset(range(500, 600))
# Fields each provider gets elsewhere (ids, name, times, its own properties) or never (bot flag,
# IP hash): every other enriched field is sent as an event property.
NOT_PROPERTIES = frozenset(
    {"event_id", "type", "event", "timestamp", "received_at", "anonymous_id", "user_id",
     "properties", "is_bot", "ip_hash"}
)  # fmt: skip
ENRICHED_PROPERTIES = tuple(f for f in EVENT_FIELDS if f not in NOT_PROPERTIES)


class TryLater(Exception):
    """The provider (or the way to it) failed in a way that heals: send the batch again."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # read by ingest.retry's wait


@dataclass(frozen=True, slots=True)
class Answer:
    """What a provider said of a batch it did not ask us to send again."""

    rejected: dict[int, str] = field(default_factory=dict)  # index in the batch -> its message
    batch_error: str | None = None  # the whole batch refused, no event named
    others_accepted: bool = True  # False: the provider took none, send the unrejected again


class Destination(Protocol):
    """One provider's side of the contract."""

    name: str

    def request(self, events: Sequence[EnrichedEvent]) -> httpx.Request:
        """The request that sends `events` (built again for every attempt)."""
        ...

    def answer(self, response: httpx.Response, events: Sequence[EnrichedEvent]) -> Answer:
        """Read a non-retryable answer (2xx or 4xx)."""
        ...


class Deletion(Protocol):
    """A provider's deletion API: a forget forwarded."""

    name: str

    def request(self, erasure: Erasure) -> httpx.Request | None:
        """The request that deletes the forgotten person (None: nothing this provider can
        delete, such as Amplitude's users for a person never identified)."""
        ...


def person_ids(erasure: Erasure) -> list[str]:
    """Every id a forgotten person was known by: their user id, then their devices."""
    return [*([erasure["user_id"]] if erasure["user_id"] else []), *erasure["anonymous_ids"]]


def insert_id(event_id: str) -> str:
    """The UUID every provider gets as the event's insert id (PostHog `uuid`, Mixpanel
    `$insert_id`, Amplitude `insert_id`)."""
    return str(uuid.uuid5(INSERT_ID_NAMESPACE, event_id))


def properties(event: EnrichedEvent) -> dict[str, Any]:
    """The event's own properties (an identify's: its traits)."""
    value = orjson.loads(event["properties"] or "{}")
    return value if isinstance(value, dict) else {}


def enriched_properties(event: EnrichedEvent) -> dict[str, Any]:
    """What the pipeline added and knows of the event, its empty fields left out."""
    return {
        name: event[name]  # type: ignore[literal-required]
        for name in ENRICHED_PROPERTIES
        if event.get(name) not in (None, "")
    }


def iso_timestamp(millis: int) -> str:
    """An epoch-milliseconds time as ISO 8601 UTC."""
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="milliseconds")


def retry_after(response: httpx.Response) -> float | None:
    """Seconds a `Retry-After` header asks for (a number or an HTTP date); None without one."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def json_request(url: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Request:
    """A JSON POST."""
    return httpx.Request(
        "POST",
        url,
        content=orjson.dumps(body),
        headers={"content-type": "application/json", **(headers or {})},
    )


def message(response: httpx.Response) -> str:
    """A provider's answer as text for a dead letter (bounded)."""
    return f"HTTP {response.status_code}: {response.text[:500]}"
