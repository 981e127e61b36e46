"""Mixpanel: the import API (`POST {host}/import?strict=1`, basic auth with the API secret) when an
API secret is set, else the track API (`POST {host}/track`, recent events only), as the `data`
form field Mixpanel's SDKs send.

`$insert_id` is derived from our event id, so Mixpanel drops what a retry sends again. With
`strict=1` the import API names each event it refused (`failed_records`) and imports the rest.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from ingest.records import EnrichedEvent, Erasure
from sinks.destinations.contract import (
    Answer,
    enriched_properties,
    insert_id,
    json_request,
    message,
    person_ids,
    properties,
)


class Mixpanel:
    """Sends to one Mixpanel project."""

    name = "mixpanel"

    def __init__(self, token: str, host: str, api_secret: str | None) -> None:
        self.token = token
        self.api_secret = api_secret
        base = host.rstrip("/")
        self.url = f"{base}/import" if api_secret else f"{base}/track"

    def event(self, event: EnrichedEvent) -> dict[str, Any]:
        """One event as Mixpanel takes it: everything in `properties`."""
        props: dict[str, Any] = {
            "token": self.token,
            "distinct_id": event["user_id"] or event["anonymous_id"],
            # The import API takes milliseconds; the track API, seconds.
            "time": event["timestamp"] if self.api_secret else event["timestamp"] / 1000,
            "$insert_id": insert_id(event["event_id"]),
            **enriched_properties(event),
            **properties(event),
        }
        name = event["event"]
        if event["type"] == "identify":
            name = "$identify"
            props["$identified_id"] = event["user_id"]
            props["$anon_id"] = event["anonymous_id"]
        return {"event": name, "properties": props}

    def request(self, events: Sequence[EnrichedEvent]) -> httpx.Request:
        """The batch as the form field `data` (a JSON array)."""
        form = {
            "data": orjson.dumps([self.event(e) for e in events]).decode(),
            "verbose": "1",
            "ip": "0",
        }
        if self.api_secret:
            basic = base64.b64encode(f"{self.api_secret}:".encode()).decode()
            return httpx.Request(
                "POST",
                self.url,
                params={"strict": "1"},
                data=form,
                headers={"authorization": f"Basic {basic}"},
            )
        return httpx.Request("POST", self.url, data=form)

    def answer(self, response: httpx.Response, events: Sequence[EnrichedEvent]) -> Answer:
        """Import: a 400 with `failed_records` names the refused events (the rest went in).
        Track: `{"status": 0, "error": ...}` refuses the batch."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return Answer() if response.is_success else Answer(batch_error=message(response))
        failed = body.get("failed_records")
        if isinstance(failed, list) and failed:
            return Answer(
                rejected={
                    int(r["index"]): f"mixpanel: {r.get('field', '')}: {r.get('message', '')}"
                    for r in failed
                }
            )
        if response.is_success and body.get("status", 1) in (1, "OK"):
            return Answer()
        return Answer(batch_error=f"mixpanel: {body.get('error') or message(response)}")


class MixpanelDeletion:
    """Mixpanel's GDPR API: `POST {app host}/api/app/data-deletions/v3.0/?token=...` with every
    distinct id of the person (an OAuth token)."""

    name = "mixpanel"

    def __init__(self, token: str, gdpr_token: str, app_host: str) -> None:
        self.gdpr_token = gdpr_token
        self.url = f"{app_host.rstrip('/')}/api/app/data-deletions/v3.0/?token={token}"

    def request(self, erasure: Erasure) -> httpx.Request | None:
        """Every id the person was known by in Mixpanel (user id and devices)."""
        ids = person_ids(erasure)
        auth = {"authorization": f"Bearer {self.gdpr_token}"}
        return (
            json_request(self.url, {"distinct_ids": ids, "compliance_type": "GDPR"}, auth)
            if ids
            else None
        )
