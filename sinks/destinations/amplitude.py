"""Amplitude: the HTTP V2 API (`POST {host}/2/httpapi`), `api2.amplitude.com` or, for projects in
the EU data centre, `api.eu.amplitude.com`.

`insert_id` is derived from our event id, so Amplitude drops what a retry sends again. A 400 names
the events it refused by index (`events_with_invalid_fields` and the like) and takes none of the
batch: the runner sends the others again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from ingest.records import EnrichedEvent, Erasure
from sinks.destinations.contract import (
    Answer,
    enriched_properties,
    insert_id,
    json_request,
    message,
    properties,
)

# The 400 answer's maps of field -> indices of the events at fault.
INDEXED_ERRORS = (
    "events_with_invalid_fields",
    "events_with_missing_fields",
    "events_with_invalid_id_lengths",
)


class Amplitude:
    """Sends to one Amplitude project."""

    name = "amplitude"

    def __init__(self, api_key: str, host: str) -> None:
        self.api_key = api_key
        self.url = host.rstrip("/") + "/2/httpapi"

    def event(self, event: EnrichedEvent) -> dict[str, Any]:
        """One event as the HTTP V2 API takes it."""
        out: dict[str, Any] = {
            "event_type": event["event"],
            "device_id": event["anonymous_id"],
            "time": event["timestamp"],
            "insert_id": insert_id(event["event_id"]),
            "event_properties": enriched_properties(event),
        }
        if event["user_id"]:
            out["user_id"] = event["user_id"]
        if event["os"]:
            out["os_name"] = event["os"]
        if event["country"]:
            out["country"] = event["country"]
        if event["type"] == "identify":
            out["event_type"] = "$identify"
            out["user_properties"] = {"$set": properties(event)}
        else:
            out["event_properties"].update(properties(event))
        return out

    def request(self, events: Sequence[EnrichedEvent]) -> httpx.Request:
        """The batch with the project's API key in the body."""
        return json_request(
            self.url, {"api_key": self.api_key, "events": [self.event(e) for e in events]}
        )

    def answer(self, response: httpx.Response, events: Sequence[EnrichedEvent]) -> Answer:
        """A 400 naming indices refuses those events; one naming none refuses the batch."""
        if response.is_success:
            return Answer()
        try:
            body = response.json()
        except ValueError:
            body = {}
        rejected: dict[int, str] = {}
        if isinstance(body, dict):
            for key in INDEXED_ERRORS:
                for name, indices in (body.get(key) or {}).items():
                    for index in indices:
                        rejected[int(index)] = f"amplitude: {body.get('error', '')} ({key}: {name})"
            for index in body.get("silenced_events") or ():
                rejected[int(index)] = "amplitude: silenced device or user"
        return (
            Answer(rejected=rejected, others_accepted=False)
            if rejected
            else Answer(batch_error=message(response))
        )


class AmplitudeDeletion:
    """Amplitude's user deletion: `POST {app host}/api/2/deletions/users` (basic auth with the
    API key and secret key). Amplitude deletes by user id: a person never identified has none."""

    name = "amplitude"

    def __init__(self, api_key: str, secret_key: str, app_host: str) -> None:
        self.auth = httpx.BasicAuth(api_key, secret_key)
        self.url = f"{app_host.rstrip('/')}/api/2/deletions/users"

    def request(self, erasure: Erasure) -> httpx.Request | None:
        """The person's user id (None without one)."""
        if not erasure["user_id"]:
            return None
        request = json_request(
            self.url,
            {"user_ids": [erasure["user_id"]], "requester": "millimetric",
             "ignore_invalid_id": "True"},
        )  # fmt: skip
        return next(self.auth.auth_flow(request))
