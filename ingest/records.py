"""Wire records between stages: what travels on the raw and enriched topics.

Records are JSON objects (orjson) with a schema version `v`. Times are epoch milliseconds (UTC).
TypedDicts cost nothing per event; the gateway has already validated every field.

On the raw and enriched topics a record is either one event (`v` 1, the event itself) or an
envelope (`v` 2): `{"v":2,"count":N,"events":[...]}`, N ≥ 2 events of one partition in order,
each a `v` 1 event. An envelope makes Kafka's per-record costs per request instead of per event;
readers take both (`raw_records`, `enriched_events`), so a topic may hold either kind
(docs/RECORDS.md has the bytes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, NotRequired, TypedDict, cast

import orjson

RAW_SCHEMA_VERSION = 1
ENRICHED_SCHEMA_VERSION = 1
ENVELOPE_VERSION = 2
ENVELOPE_HEADER = b'{"v":2,"count":'  # how every envelope begins: readers may count from it
# Bytes an envelope adds around its events: `{"v":2,"count":N,"events":[` ... `]}`, N < 10^9.
ENVELOPE_OVERHEAD = 40


class Context(TypedDict, total=False):
    """What the gateway saw of the request; lives only on the raw topic."""

    ip: str
    user_agent: str
    country: str  # from a trusted edge header, when configured
    ip_hash: str  # only in dead letters, which carry it (and country) in place of `ip`
    env: str  # "test" when a test key sent the event; absent for live keys


class RawEvent(TypedDict):
    """An accepted /v1/track, /v1/identify or /v1/batch event, as the gateway published it."""

    v: int
    type: Literal["track", "identify"]
    project: str
    event_id: str
    event: str
    timestamp: int
    received_at: int
    anonymous_id: str | None
    user_id: str | None
    session_id: str | None
    url: str | None
    path: str | None
    referrer: str | None
    properties: dict[str, Any]
    traits: NotRequired[dict[str, Any]]
    campaign: NotRequired[dict[str, str]]  # utm_* from Segment's context.campaign
    context: Context


class EnrichedEvent(TypedDict):
    """A processed event: the raw fields without the IP, plus what the server adds."""

    v: int
    type: str
    project: str
    event_id: str
    event: str
    timestamp: int
    received_at: int
    anonymous_id: str
    user_id: str
    session_id: str
    url: str
    path: str
    referrer: str
    properties: str  # JSON text, serialized once by the processor
    source: str
    medium: str
    campaign: str
    channel: str
    source_confidence: float
    source_rule_id: str
    click_id: str
    click_id_network: str
    classifier_version: str
    country: str
    device_type: str
    browser: str
    os: str
    is_bot: bool
    ip_hash: str
    version: NotRequired[int]  # set by `millimetric replay` (its start, ms); none: 0, live
    env: NotRequired[str]  # "test" when a test key sent it (the raw context's `env`)


class ForgetRequest(TypedDict):
    """An accepted /v1/forget."""

    v: int
    forget_id: str
    project: str
    user_id: str | None
    anonymous_id: str | None
    suppress: bool
    received_at: int


class IdentityLink(TypedDict):
    """anonymous_id -> user_id, as the processor learned it from an identify."""

    v: int
    project: str
    anonymous_id: str
    user_id: str
    at: int


class ForgetControl(TypedDict):
    """Put on the raw topic by the processor, in order with one visitor's events, so the agent
    that owns that visitor's state drops it: a forget, or an `unlink` of a device past the
    devices-per-user cap (forget_id "")."""

    v: int
    type: Literal["forget", "unlink"]
    project: str
    anonymous_id: str
    forget_id: str


class Erasure(TypedDict):
    """A forget resolved to the whole person: what the sinks filter and delete."""

    v: int
    forget_id: str
    project: str
    user_id: str | None
    anonymous_ids: list[str]
    cutoff: int  # events received up to this instant are erased; later ones are new data
    suppress: bool  # erase later events too
    requested_at: int


class ForgetStatusRecord(TypedDict):
    """A forget's outcome, put on the keys topic (which every gateway follows) by the sink that
    carried it out, or by the one retrying it (`pending`, with the reason). Keyed
    `forget:{forget_id}`."""

    v: int
    record: Literal["forget_status"]
    forget_id: str
    project: str
    status: Literal["pending", "done"]
    reason: str  # why it is still pending ("" once done)
    attempts: int
    anonymous_ids: int
    events_deleted: int
    sessions_deleted: int
    identities_deleted: int
    requested_at: int
    completed_at: int


def record_key(project: str, anonymous_id: str | None, fallback: str) -> bytes:
    """Partition key: one visitor's events stay in order on one partition."""
    return f"{project}:{anonymous_id or fallback}".encode()


encode = orjson.dumps
decode = orjson.loads


def event_key(record: Any) -> bytes:
    """The partition key of a raw event (an envelope's events each have theirs)."""
    fallback = record.get("user_id") or record.get("event_id") or ""
    return record_key(record["project"], record.get("anonymous_id"), fallback)


def envelope(events: Sequence[bytes]) -> bytes:
    """One record holding `events` (each already encoded) in order: the event itself when
    there is one, else a `v` 2 envelope."""
    if len(events) == 1:
        return events[0]
    return b'%b%d,"events":[%b]}' % (ENVELOPE_HEADER, len(events), b",".join(events))


class Envelope(NamedTuple):
    """A record to send: its partition, key and value, and which input events it carries."""

    partition: int
    key: bytes
    value: bytes
    members: list[int]  # indices into the records given to `envelopes`


def envelopes(
    records: Sequence[tuple[bytes, bytes]], partition: Callable[[bytes], int], max_bytes: int
) -> list[Envelope]:
    """The records carrying the encoded (key, event) pairs `records`: one per partition (its
    events in order, keyed by the first one's key), more when one would pass `max_bytes` (an
    event larger on its own is alone in its record). A partition's records keep its order."""
    groups: dict[int, list[int]] = {}
    for index, (key, _) in enumerate(records):
        groups.setdefault(partition(key), []).append(index)
    out: list[Envelope] = []
    for number, group in groups.items():
        members: list[int] = []
        size = ENVELOPE_OVERHEAD
        for index in group:
            key, value = records[index]
            if members and size + len(key) + len(value) + 1 > max_bytes:
                out.append(_envelope(number, records, members))
                members, size = [], ENVELOPE_OVERHEAD
            members.append(index)
            size += len(key) + len(value) + 1
        out.append(_envelope(number, records, members))
    return out


def _envelope(
    partition: int, records: Sequence[tuple[bytes, bytes]], members: list[int]
) -> Envelope:
    value = envelope([records[index][1] for index in members])
    return Envelope(partition, records[members[0]][0], value, members)


def _entries(value: bytes) -> list[dict[str, Any]]:
    record = decode(value)
    if not isinstance(record, dict):
        raise TypeError(f"a JSON {type(record).__name__}, not an object")
    if record.get("v") != ENVELOPE_VERSION:
        return [record]
    events = record.get("events")
    if not isinstance(events, list) or record.get("count") != len(events):
        raise ValueError("an envelope whose count does not match its events")
    return events


def raw_records(value: bytes) -> list[dict[str, Any]]:
    """The records a raw-topic value carries, in order: one (a `v` 1 event, a webhook delivery,
    a control record or a heartbeat) or an envelope's events. Raises ValueError/TypeError on a
    value that is not one of these; an entry that is not an object is returned as it is, for
    the caller to refuse alone."""
    return _entries(value)


def enriched_events(value: bytes) -> list[EnrichedEvent]:
    """The events an enriched-topic value carries, in order (a heartbeat is returned as it is:
    `ingest.heartbeat.is_heartbeat` tells). Raises as `raw_records` does."""
    return cast(list[EnrichedEvent], _entries(value))


class ApiKeyRecord(TypedDict):
    """One API key on the keys topic: only its hash is stored, never the key."""

    v: int
    key_hash: str
    prefix: str  # e.g. "sk_live_3f9a", safe to show and log
    project: str
    kind: Literal["pk", "sk", "rk"]
    env: Literal["live", "test"]
    origins: list[str]
    created_at: int
    revoked_at: int | None


class ProjectLimitRecord(TypedDict):
    """A project's rate-limit override for one gateway route, on the keys topic.

    Keyed `limit:{project}:{route}` (compaction keeps the latest); `rate`/`burst` None removes
    the override, so the route's default from gateway/limits.toml applies again.
    """

    v: int
    record: Literal["project_limit"]
    project: str
    route: str
    rate: float | None
    burst: int | None
    updated_at: int


def hash_api_key(raw_key: str) -> str:
    """SHA-256 of a raw key: keys are random 256-bit secrets, so a plain hash is enough."""
    return hashlib.sha256(raw_key.encode()).hexdigest()


class HookRecord(TypedDict):
    """A webhook receiver on the keys topic, keyed `hook:{hook_id}`.

    `secrets` are newest first; all are valid (rotation). HMAC schemes need the secret itself, so
    it is stored as is; a bearer hook stores `sha256:<hex>` of its secret.
    """

    v: int
    record: Literal["hook"]
    hook_id: str
    project: str
    provider: str
    secrets: list[str]
    signature_header: str | None  # generic hooks only: the header carrying the HMAC
    mapping: dict[str, Any] | None  # a mapping file's keys, over the provider's defaults
    created_at: int
    revoked_at: int | None


class DestinationRecord(TypedDict):
    """A per-project destination on the keys topic, keyed `destination:{destination_id}`.

    A destination must send its credentials, so they cannot be hashed: `secrets` holds each one
    Fernet-encrypted (sinks/destinations/project_destinations.py); `settings` the others.
    """

    v: int
    record: Literal["destination"]
    destination_id: str
    project: str
    type: str  # posthog, mixpanel, amplitude or webhook
    settings: dict[str, str]  # e.g. url, host
    secrets: dict[str, str]  # e.g. api_key, token, auth: Fernet tokens, never plaintext
    created_at: int
    removed_at: int | None


class WebhookDelivery(TypedDict):
    """A verified webhook delivery on the raw topic; the processor maps it to a track event."""

    v: int
    type: Literal["webhook"]
    project: str
    event_id: str  # derived from hook_id and the provider's delivery id: redeliveries collide
    hook_id: str
    provider: str
    delivery_id: str
    received_at: int
    headers: dict[str, str]  # the scheme's keep_headers that were present
    body: str  # the raw body, as verified
    mapping: dict[str, Any]  # the hook's mapping at receipt
