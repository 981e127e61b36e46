"""A webhook: `POST` a JSON batch of enriched events to MILLIMETRIC_TRACKING_WEBHOOK_URL, with
MILLIMETRIC_TRACKING_WEBHOOK_AUTH as the `Authorization` header, signed the Standard Webhooks way
(`webhook-id`, `webhook-timestamp`, `webhook-signature`) when a `whsec_` secret is set.

The `webhook-id` is derived from the batch's event ids, so a receiver can drop a batch it got
already; each event carries its `event_id` too. A 4xx refuses the batch (the runner halves it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from ingest.records import EnrichedEvent
from sinks.destinations.contract import Answer, insert_id, message, properties

SECRET_PREFIX = "whsec_"


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` value (`v1,` + base64 HMAC-SHA256)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


class Webhook:
    """Sends to one URL."""

    name = "webhook"

    def __init__(self, url: str, authorization: str | None, secret: str | None) -> None:
        if secret is not None and not secret.startswith(SECRET_PREFIX):
            raise ValueError("MILLIMETRIC_TRACKING_WEBHOOK_SECRET must start with whsec_")
        self.url = url
        self.authorization = authorization
        self.secret = secret

    @staticmethod
    def event(event: EnrichedEvent) -> dict[str, Any]:
        """The enriched event, its properties as an object."""
        return {**event, "properties": properties(event), "insert_id": insert_id(event["event_id"])}

    def request(self, events: Sequence[EnrichedEvent]) -> httpx.Request:
        """`{"batch": [...]}`, signed when a secret is set."""
        body = orjson.dumps({"batch": [self.event(e) for e in events]})
        headers = {"content-type": "application/json"}
        if self.authorization:
            headers["authorization"] = self.authorization
        if self.secret:
            ids = "\n".join(e["event_id"] for e in events).encode()
            msg_id = "msg_" + hashlib.sha256(ids).hexdigest()[:32]
            now = int(time.time())
            headers["webhook-id"] = msg_id
            headers["webhook-timestamp"] = str(now)
            headers["webhook-signature"] = sign(self.secret, msg_id, now, body)
        return httpx.Request("POST", self.url, content=body, headers=headers)

    def answer(self, response: httpx.Response, events: Sequence[EnrichedEvent]) -> Answer:
        """2xx: taken; a 4xx refuses the batch."""
        return Answer() if response.is_success else Answer(batch_error=message(response))
