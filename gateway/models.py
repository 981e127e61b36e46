"""The request bodies as pydantic models: what the gateway accepts and /openapi.json describes.

Fields the server computes (source, country, ...) are accepted and dropped, as the spec
promises; any other unknown field is refused so that typos do not silently lose data.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
)

Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Text = Annotated[str, StringConstraints(max_length=8192)]

# 1970..2105 fits every ClickHouse DateTime type, including the oldest server we support.
MIN_TS_MS = 0
MAX_TS_MS = 4_291_747_199_000


def iso8601_millis(value: Any) -> int | None:
    """An ISO 8601 time as epoch milliseconds (None stays None); ValueError when it is not one."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("timestamp must be an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("timestamp is not ISO 8601 (e.g. 2026-05-16T19:00:00.000Z)") from None
    if parsed.tzinfo is None:  # no offset given: the spec's examples are UTC
        parsed = parsed.replace(tzinfo=UTC)
    try:
        millis = int(parsed.timestamp() * 1000)
    except (OverflowError, ValueError):  # year 1 or 9999 shifted out of range by the offset
        millis = -1
    if not MIN_TS_MS <= millis <= MAX_TS_MS:
        raise ValueError("timestamp must be between 1970 and 2105")
    return millis


Timestamp = Annotated[
    int | None,
    BeforeValidator(iso8601_millis),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}],
            "description": "ISO 8601; no offset means UTC. At most "
            "MILLIMETRIC_TIMESTAMP_MAX_AGE_DAYS (3650) days before the server's clock and "
            "MILLIMETRIC_TIMESTAMP_MAX_FUTURE_S (86400) seconds after it. Default: server time.",
        }
    ),
]
Ignored = Annotated[Any, Field(None, exclude=True, description="Set by the server; ignored.")]
Properties = Annotated[
    dict[str, Any],
    Field(
        default_factory=dict,
        description="Free-form JSON object, at most MILLIMETRIC_PROPERTIES_MAX_BYTES (8192) "
        "bytes as compact UTF-8 JSON; numbers must be finite and fit in 64 bits.",
    ),
]
ForwardedIp = Annotated[
    str | None,
    StringConstraints(max_length=64),
    Field(None, description="End user's IP, honoured for sk_ keys only."),
]
ForwardedUserAgent = Annotated[
    str | None,
    StringConstraints(max_length=2048),
    Field(None, description="End user's User-Agent, honoured for sk_ keys only."),
]


class ServerFields(BaseModel):
    """Fields the server adds; clients may send them and they are ignored."""

    model_config = ConfigDict(extra="forbid")

    source: Ignored
    medium: Ignored
    campaign: Ignored
    channel: Ignored
    source_confidence: Ignored
    source_rule_id: Ignored
    country: Ignored
    device_type: Ignored
    browser: Ignored
    os: Ignored
    ip_hash: Ignored


class TrackEvent(ServerFields):
    """One event, as /v1/track and each /v1/batch entry take it (see the spec's field table)."""

    event: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    event_id: Id | None = None
    timestamp: Timestamp = None
    anonymous_id: Id | None = None
    user_id: Id | None = None
    session_id: Id | None = None
    url: Text | None = None
    path: Text | None = None
    referrer: Text | None = None
    properties: Properties
    # Forwarded end-user context, honoured for sk_ keys only (server-side and webhook senders).
    ip: ForwardedIp
    user_agent: ForwardedUserAgent


class TrackBody(TrackEvent):
    """/v1/track body."""


class IdentifyBody(ServerFields):
    """/v1/identify body: link an anonymous visitor to a user, with traits."""

    anonymous_id: Id
    user_id: Id
    traits: Properties
    timestamp: Timestamp = None
    ip: ForwardedIp
    user_agent: ForwardedUserAgent


class BatchBody(BaseModel):
    """/v1/batch body."""

    model_config = ConfigDict(extra="forbid")

    events: list[TrackEvent]


class ForgetBody(BaseModel):
    """/v1/forget body: a user_id, an anonymous_id, or both."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id | None = None
    anonymous_id: Id | None = None
    suppress: bool = False
