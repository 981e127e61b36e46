"""A stand-in for PostHog, Mixpanel, Amplitude and a webhook receiver, on a free loopback port.

It records every request, answers as each provider does, and can be told to be down (503 with
Retry-After) or to refuse the events named `poison` the way each provider refuses one event.
Paths: /posthog/batch/, /mixpanel/import (or /track), /amplitude/2/httpapi, /webhook, and the
deletion APIs (PostHog's persons/bulk_delete/, Mixpanel's data-deletions, Amplitude's
deletions/users), which answer 200.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from millimetric_app.embedded import free_port

POISON = "poison"


@dataclass
class Received:
    """One request as it arrived."""

    provider: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int = 0

    def payload(self) -> Any:
        """The JSON it carried (Mixpanel's: the `data` form field)."""
        body = self.body
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        if self.headers.get("content-type") == "application/x-www-form-urlencoded":
            return json.loads(parse_qs(body.decode())["data"][0])
        return json.loads(body)

    def events(self) -> list[dict[str, Any]]:
        """The events it carried, as the provider names them."""
        payload = self.payload()
        if self.provider == "posthog":
            return list(payload["batch"])
        if self.provider == "mixpanel":
            return payload if isinstance(payload, list) else [payload]
        if self.provider == "amplitude":
            return list(payload["events"])
        return list(payload["batch"])


def event_name(provider: str, event: dict[str, Any]) -> str:
    """An event's name in a provider's payload."""
    return str(event["event_type"] if provider == "amplitude" else event["event"])


def event_insert_id(provider: str, event: dict[str, Any]) -> str:
    """An event's insert id in a provider's payload."""
    if provider == "posthog":
        return str(event["uuid"])
    if provider == "mixpanel":
        return str(event["properties"]["$insert_id"])
    return str(event["insert_id"])


@dataclass
class Receiver:
    """The recorded requests, what each provider accepted, and how it is told to behave."""

    requests: list[Received] = field(default_factory=list)
    accepted: dict[str, Counter[str]] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    def url(self, provider: str) -> str:
        """The base URL that plays `provider`."""
        return f"http://127.0.0.1:{self.port}/{provider}"

    def answer(self, received: Received) -> tuple[int, dict[str, Any]]:
        """Record a request and decide the provider's answer."""
        provider = received.provider
        with self.lock:
            self.requests.append(received)
            if provider in self.down:
                return 503, {"error": "down"}
        if "deletions" in received.path or "bulk_delete" in received.path:
            return 200, {"status": "ok"}
        events = received.events()
        poisoned = [i for i, e in enumerate(events) if event_name(provider, e) == POISON]
        taken = [e for i, e in enumerate(events) if i not in poisoned]
        status, body = 200, {"status": 1}
        if poisoned and provider == "mixpanel":
            status, body = (
                400,
                {
                    "code": 400,
                    "error": "some data points in the request failed validation",
                    "failed_records": [
                        {"index": i, "field": "event", "message": "poison is refused"}
                        for i in poisoned
                    ],
                    "num_records_imported": len(taken),
                    "status": "failure",
                },
            )
        elif poisoned and provider == "amplitude":
            taken = []
            status, body = (
                400,
                {
                    "code": 400,
                    "error": "Invalid field values on some events",
                    "events_with_invalid_fields": {"event_type": poisoned},
                },
            )
        elif poisoned:
            taken = []
            status, body = 400, {"type": "validation_error", "detail": "poison is refused"}
        elif provider == "amplitude":
            body = {"code": 200, "events_ingested": len(events)}
        with self.lock:
            counts = self.accepted.setdefault(provider, Counter())
            counts.update(event_insert_id(provider, e) for e in taken)
        return status, body

    def of(self, provider: str) -> list[Received]:
        """The requests `provider` received."""
        with self.lock:
            return [r for r in self.requests if r.provider == provider]


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            received = Received(
                url.path.split("/")[1],
                url.path,
                parse_qs(url.query),
                {k.lower(): v for k, v in self.headers.items()},
                body,
            )
            status, answer = receiver.answer(received)
            received.status = status
            out = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            if status == 503:
                self.send_header("retry-after", "1")
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: Any) -> None:
            return None

    return Handler


class running_receiver:
    """`with running_receiver() as receiver:` serves until the block ends."""

    def __enter__(self) -> Receiver:
        self.receiver = Receiver(port=free_port())
        self.server = ThreadingHTTPServer(
            ("127.0.0.1", self.receiver.port), _handler(self.receiver)
        )
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.receiver

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
