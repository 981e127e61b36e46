"""What the client queues and what it reports: messages, their JSON, failures and flush results."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

# (route, body, future): "batch" for a track event; identify and forget go to their own routes
Message = tuple[str, dict[str, Any], "Future[str] | None"]


@dataclass(frozen=True, slots=True)
class Failure:
    """Events the gateway did not accept and never will from this client, and why.

    `reason` is the gateway's error code (`invalid_payload`, `invalid_api_key`, ...) or the
    client's own: `queue_full`, `unserializable`, `closed` (still unsent when close() gave up).
    """

    reason: str
    message: str
    events: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class FlushResult:
    """Events accepted and failed since the previous flush()/close(), and those still unsettled
    when the wait ran out (0 when the flush completed)."""

    accepted: int
    failed: int
    pending: int
    reasons: dict[str, int] = field(default_factory=dict)  # failed events by Failure.reason

    @property
    def ok(self) -> bool:
        """True when every event was accepted."""
        return not self.failed and not self.pending


class RejectedError(Exception):
    """Set on the future of forget() when the gateway refused it."""


def _iso(seconds: float) -> str:
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{int(seconds * 1000) % 1000:03d}Z"


def _json_default(value: object) -> str:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode(body: dict[str, Any]) -> bytes:
    """One event as compact JSON; its timestamp (epoch seconds when the client set it) as ISO."""
    if isinstance(body.get("timestamp"), float | int):
        body = {**body, "timestamp": _iso(body["timestamp"])}
    return json.dumps(
        body, separators=(",", ":"), allow_nan=False, default=_json_default, ensure_ascii=False
    ).encode()
