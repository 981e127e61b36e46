"""PostHog: the batch capture API (`POST {host}/batch/`), one request per batch.

`distinct_id` is the user id, else the anonymous id; an identify becomes `$identify` with its
traits in `$set`; `uuid` is derived from our event id, so PostHog drops what a retry sends again.
The batch API refuses a whole batch (400) without naming an event: the runner halves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from ingest.records import EnrichedEvent, Erasure
from sinks.destinations.contract import (
    Answer,
    enriched_properties,
    insert_id,
    iso_timestamp,
    json_request,
    message,
    person_ids,
    properties,
)

# Enriched fields that PostHog knows under its own names.
POSTHOG_NAMES = {
    "url": "$current_url",
    "path": "$pathname",
    "referrer": "$referrer",
    "session_id": "$session_id",
    "browser": "$browser",
    "os": "$os",
    "device_type": "$device_type",
}


class PostHog:
    """Sends to one PostHog project."""

    name = "posthog"

    def __init__(self, api_key: str, host: str) -> None:
        self.api_key = api_key
        self.url = host.rstrip("/") + "/batch/"

    def event(self, event: EnrichedEvent) -> dict[str, Any]:
        """One event as PostHog's capture API takes it."""
        props = {POSTHOG_NAMES.get(k, k): v for k, v in enriched_properties(event).items()}
        out: dict[str, Any] = {
            "event": event["event"],
            "distinct_id": event["user_id"] or event["anonymous_id"],
            "properties": props,
            "timestamp": iso_timestamp(event["timestamp"]),
            "uuid": insert_id(event["event_id"]),
        }
        if event["type"] == "identify":
            out["event"] = "$identify"
            out["$set"] = properties(event)  # where PostHog's SDKs put it
            if event["user_id"] and event["anonymous_id"]:
                props["$anon_distinct_id"] = event["anonymous_id"]
        else:
            props.update(properties(event))
        return out

    def request(self, events: Sequence[EnrichedEvent]) -> httpx.Request:
        """`POST /batch/` with the project API key in the body, as PostHog's SDKs send it."""
        body = {
            "api_key": self.api_key,
            "batch": [self.event(e) for e in events],
            "historical_migration": False,
            "sent_at": datetime.now(UTC).isoformat(),
        }
        return json_request(self.url, body)

    def answer(self, response: httpx.Response, events: Sequence[EnrichedEvent]) -> Answer:
        """200: all taken; a 4xx refuses the whole batch."""
        return Answer() if response.is_success else Answer(batch_error=message(response))


class PostHogDeletion:
    """PostHog's person deletion: `POST {app host}/api/projects/{id}/persons/bulk_delete/` with
    every distinct id of the person, their events too (a personal API key)."""

    name = "posthog"

    def __init__(self, personal_api_key: str, project_id: str, app_host: str) -> None:
        self.personal_api_key = personal_api_key
        self.url = f"{app_host.rstrip('/')}/api/projects/{project_id}/persons/bulk_delete/"

    def request(self, erasure: Erasure) -> httpx.Request | None:
        """Every id the person was known by in PostHog (user id and devices)."""
        ids = person_ids(erasure)
        auth = {"authorization": f"Bearer {self.personal_api_key}"}
        return (
            json_request(self.url, {"distinct_ids": ids, "delete_events": True}, auth)
            if ids
            else None
        )
